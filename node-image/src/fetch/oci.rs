//! The OCI side: the artifact manifest's layers and the registry's Bearer challenge.

use super::uri::parse_digest;
use super::*;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// A layer to write: file name, digest hex, size.
pub(super) struct Layer {
    title: String,
    digest: String,
    size: u64,
}

pub(super) async fn fetch_oci(r: &OciRef, opts: &FetchOptions) -> Result<Vec<FetchedFile>, FetchError> {
    let scheme = if opts.insecure_http || r.is_loopback() { "http" } else { "https" };
    let base = format!("{scheme}://{}/v2/{}", r.api_host(), r.repository);
    let mut session = Session::new(Source::Oci(r.clone()), opts.oci_token.clone(), opts, r.is_loopback())?;
    let manifest_url = format!("{base}/manifests/{}", r.reference);
    let pinned = match &r.reference {
        OciReference::Digest(d) => Some(d.clone()),
        OciReference::Tag(_) => None,
    };
    let expect = Expect { size: None, sha256: pinned, max: Some(MAX_MANIFEST_BYTES) };
    let got = session.download(&manifest_url, Item::Manifest, None, expect).await?;
    eprintln!("{r} is manifest sha256:{}", got.sha256);
    let layers = plan_layers(&manifest_url, &got.body)?;
    let mut files = Vec::new();
    for l in layers {
        let dest = opts.out.join(&l.title);
        if already_present(&dest, l.size, &l.digest).await? {
            eprintln!("{}: already present with sha256:{}", l.title, l.digest);
            files.push(FetchedFile { name: l.title, bytes: l.size, sha256: l.digest });
            continue;
        }
        let url = format!("{base}/blobs/sha256:{}", l.digest);
        let expect = Expect { size: Some(l.size), sha256: Some(l.digest.clone()), max: None };
        let item = Item::Blob { title: &l.title, digest: &l.digest };
        let got = session.download(&url, item, Some(&dest), expect).await?;
        files.push(FetchedFile { name: l.title, bytes: got.bytes, sha256: got.sha256 });
    }
    Ok(files)
}

/// Parses the manifest and picks the layers to write, refusing unsafe or duplicate names.
pub(super) fn plan_layers(url: &str, body: &[u8]) -> Result<Vec<Layer>, FetchError> {
    let bad = |message: String| FetchError::Manifest { url: url.to_string(), message };
    let m: Manifest = serde_json::from_slice(body).map_err(|e| bad(format!("not an OCI image manifest ({e})")))?;
    let is_index = m.manifests.is_some()
        || m.media_type.as_deref().is_some_and(|t| t.contains("index") || t.contains("manifest.list"));
    if is_index {
        return Err(bad(
            "this is an image index (several manifests, e.g. a multi-platform container image), not a model \
             artifact; push the model files with `oras push REF config.json model.safetensors ...`"
                .into(),
        ));
    }
    if m.schema_version != 2 {
        return Err(bad(format!("schemaVersion {} (expected 2)", m.schema_version)));
    }
    let mut layers = Vec::new();
    let mut seen = HashSet::new();
    for d in m.layers {
        let digest = parse_digest(&d.digest).map_err(|r| bad(format!("layer: {r}")))?;
        let Some(title) = d.annotations.get(OCI_TITLE_ANNOTATION) else {
            eprintln!("skipping layer sha256:{digest}: no {OCI_TITLE_ANNOTATION} annotation (not a file)");
            continue;
        };
        if d.annotations.get(ORAS_UNPACK_ANNOTATION).is_some_and(|v| v == "true") || d.media_type.ends_with("tar+gzip")
        {
            return Err(bad(format!(
                "layer {title:?} is a packed directory ({}); push the model files one by one \
                 (`oras push REF config.json model.safetensors ...`)",
                d.media_type
            )));
        }
        safe_file_name(title).map_err(|reason| FetchError::UnsafeName {
            digest: format!("sha256:{digest}"),
            title: title.clone(),
            reason: reason.into(),
        })?;
        if !seen.insert(title.clone()) {
            return Err(bad(format!("two layers are titled {title:?}")));
        }
        layers.push(Layer { title: title.clone(), digest, size: d.size });
    }
    if layers.is_empty() {
        return Err(bad(format!(
            "no layer has an {OCI_TITLE_ANNOTATION} annotation, so there are no files to write; a model artifact \
             is pushed with `oras push REF config.json model.safetensors ...` (container images are not model artifacts)"
        )));
    }
    Ok(layers)
}

/// `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`.
pub(super) struct Challenge {
    pub(super) realm: String,
    pub(super) service: Option<String>,
    pub(super) scope: Option<String>,
}

pub(super) fn bearer_challenge(headers: &HeaderMap) -> Option<Challenge> {
    headers.get_all(WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let (scheme, params) = v.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_auth_params(params);
        Some(Challenge {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    })
}

/// `key="value", key=value` pairs; quoted values may hold commas (`scope="repository:a:pull,push"`).
pub(super) fn parse_auth_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect::<String>().trim().to_string();
        }
        out.insert(key, value);
    }
}
