//! `prism-node fetch`: downloads a model folder before the server starts. The operator runs it as
//! the init container of `hf://` and `oci://` models (same image), writing into the emptyDir that
//! the serving container then mounts read-only as `file:///model`.
//!
//! * `hf://ORG/NAME[@REVISION]` (revision `main` by default): the files the backends read, from
//!   `{HF_ENDPOINT}/ORG/NAME/resolve/REVISION/FILE` (`HF_ENDPOINT` defaults to
//!   `https://huggingface.co`), with `Authorization: Bearer $HF_TOKEN` when set. `config.json` and
//!   `model.safetensors` are required; the others ([`HF_FILES`]) are skipped when the repository
//!   does not have them, unless `--architecture` names a backend that needs them.
//! * `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`: an ORAS-style model artifact through the OCI
//!   distribution API v2. The manifest's layers are written under the name of their
//!   `org.opencontainers.image.title` annotation (`oras push REF config.json model.safetensors
//!   ...` sets it); each blob's size and sha256 are checked. Anonymous registries work as they are
//!   (including the anonymous-token dance of ghcr.io / Docker Hub); `OCI_TOKEN` is sent as a
//!   Bearer token. Plain http for `localhost` / loopback addresses or with `--insecure-http`.
//!
//! Every file is written to `FILE.part` and renamed when complete and verified, so the folder
//! never holds a truncated or corrupted file under its real name. Connection errors, 408/429 and
//! 5xx answers are retried with exponential backoff. Progress goes to stderr.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, ACCEPT, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::backend::{Architecture, BackendError};

/// Default `HF_ENDPOINT`.
pub const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The only manifest type accepted from registries.
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Layer annotation that names the file (set by `oras push`).
pub const OCI_TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// ORAS marks a pushed directory (a tar.gz to unpack) with this annotation.
const ORAS_UNPACK_ANNOTATION: &str = "io.deis.oras.content.unpack";

/// Files of a Hugging Face repository that the backends read, in download order, and whether every
/// model needs them. `bert` also needs tokenizer.json, `vit` / `clip-vision` preprocessor_config.json
/// (see `Architecture::needs`); the adapter pair is a LoRA merged at load (`transformer::merge_lora`);
/// `projection.safetensors` is a shared-space head applied after the encoder (`backend::projection`).
/// Small files first, so a wrong name, revision or token fails before the large download.
pub const HF_FILES: &[(&str, bool)] = &[
    ("config.json", true),
    ("tokenizer.json", false),
    ("preprocessor_config.json", false),
    ("adapter_config.json", false),
    ("adapter_model.safetensors", false),
    ("projection.safetensors", false),
    ("model.safetensors", true),
];

const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_TOKEN_BYTES: u64 = 64 << 10;
const MAX_JSON_FILE_BYTES: u64 = 64 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Errors of `prism-node fetch`. Each message names the URL or file and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid model URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("{0}")]
    InvalidOption(String),
    /// An HTTP answer other than success (after retries for 408/429/5xx).
    #[error("GET {url}: HTTP {}: {hint}", status_text(*.status))]
    Status {
        url: String,
        status: u16,
        hint: String,
        /// The file (not the repository or revision) does not exist: an optional file may be skipped.
        missing_file: bool,
    },
    /// Could not connect, or the connection broke (after retries).
    #[error("GET {url}: {message}")]
    Network { url: String, message: String },
    /// Wrong size or digest: the bytes were not kept.
    #[error("GET {url}: {message}")]
    Integrity { url: String, message: String },
    #[error("manifest {url}: {message}")]
    Manifest { url: String, message: String },
    #[error("layer {digest}: refusing file name {title:?}: {reason}")]
    UnsafeName { digest: String, title: String, reason: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// The fetched folder is not what the server loads.
    #[error("fetched folder {} cannot be served: {message}", dir.display())]
    Incomplete { dir: PathBuf, message: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl FetchError {
    /// HTTP status of a [`FetchError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn io(path: &Path, err: std::io::Error) -> Self {
        FetchError::Io { path: path.to_path_buf(), err }
    }

    fn network(url: &str, e: &reqwest::Error) -> Self {
        FetchError::Network { url: url.to_string(), message: network_message(e) }
    }
}

fn status_text(status: u16) -> String {
    match StatusCode::from_u16(status) {
        Ok(s) => s.to_string(),
        Err(_) => status.to_string(),
    }
}

/// `cannot connect: tcp connect error: Connection refused (os error 111)`: the kind, then the causes
/// (reqwest's own message only repeats the URL; hyper's "client error (Connect)" says nothing).
fn network_message(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_redirect() {
        "too many redirects"
    } else {
        "request failed"
    };
    let mut causes = Vec::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let m = c.to_string();
        if !m.starts_with("client error (") && !causes.contains(&m) {
            causes.push(m);
        }
        cur = c.source();
    }
    if causes.is_empty() {
        causes.push(e.to_string());
    }
    format!("{kind}: {}", causes.join(": "))
}

/// reqwest's Display hides the cause ("error sending request"); the cause is what an operator needs
/// ("Connection refused", "dns error", "certificate ...").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// URIs

/// A model URI that `fetch` downloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelUri {
    Hf(HfRepo),
    Oci(OciRef),
}

/// `hf://ORG/NAME[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfRepo {
    /// `ORG/NAME` (or a bare legacy `NAME`).
    pub repo: String,
    /// Branch, tag or commit; `main` when the URI has none.
    pub revision: String,
}

/// `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    /// `HOST[:PORT]` as written.
    pub registry: String,
    pub repository: String,
    pub reference: OciReference,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OciReference {
    Tag(String),
    /// Lowercase hex of a sha256 digest (without the `sha256:` prefix).
    Digest(String),
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciReference::Tag(t) => f.write_str(t),
            OciReference::Digest(d) => write!(f, "sha256:{d}"),
        }
    }
}

/// `HOST[:PORT]/REPOSITORY:TAG` or `HOST[:PORT]/REPOSITORY@sha256:DIGEST`.
impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if matches!(self.reference, OciReference::Digest(_)) { '@' } else { ':' };
        write!(f, "{}/{}{sep}{}", self.registry, self.repository, self.reference)
    }
}

impl fmt::Display for ModelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelUri::Hf(h) => write!(f, "hf://{}@{}", h.repo, h.revision),
            ModelUri::Oci(o) => write!(f, "oci://{o}"),
        }
    }
}

impl FromStr for ModelUri {
    type Err = FetchError;
    fn from_str(s: &str) -> Result<Self, FetchError> {
        ModelUri::parse(s)
    }
}

impl ModelUri {
    /// Parses and validates `hf://...` or `oci://...`; every other input is an error saying what
    /// the accepted forms are.
    pub fn parse(uri: &str) -> Result<Self, FetchError> {
        let bad = |reason: String| FetchError::InvalidUri { uri: uri.to_string(), reason };
        if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters".into()));
        }
        if let Some(rest) = uri.strip_prefix("hf://") {
            parse_hf(rest).map(ModelUri::Hf).map_err(|r| bad(format!("{r}; expected hf://ORG/NAME[@REVISION]")))
        } else if let Some(rest) = uri.strip_prefix("oci://") {
            parse_oci(rest)
                .map(ModelUri::Oci)
                .map_err(|r| bad(format!("{r}; expected oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]")))
        } else if uri.starts_with("file://") || uri.starts_with("pvc://") {
            Err(bad("file:// and pvc:// models are local folders: nothing to fetch, pass them to the server".into()))
        } else {
            Err(bad("fetch takes hf://ORG/NAME[@REVISION] or oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]".into()))
        }
    }
}

fn parse_hf(rest: &str) -> Result<HfRepo, String> {
    let (repo, revision) = match rest.split_once('@') {
        Some((r, v)) => (r, v),
        None => (rest, "main"),
    };
    let segments: Vec<&str> = repo.split('/').collect();
    if repo.is_empty() || segments.len() > 2 {
        return Err(format!("repository {repo:?} must be ORG/NAME"));
    }
    for seg in &segments {
        let ok_chars = seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let ok_ends = !seg.starts_with(['-', '.']) && !seg.ends_with(['-', '.']);
        if seg.is_empty() || seg.len() > 96 || !ok_chars || !ok_ends || seg.contains("..") || seg.contains("--") {
            return Err(format!(
                "{seg:?} is not a valid repository name part (letters, digits, '-', '_', '.'; at most 96)"
            ));
        }
    }
    let ok_rev = revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if revision.is_empty()
        || revision.len() > 255
        || !ok_rev
        || revision.contains("..")
        || revision.starts_with('/')
        || revision.ends_with('/')
    {
        return Err(format!("revision {revision:?} is not a branch, tag or commit"));
    }
    Ok(HfRepo { repo: repo.to_string(), revision: revision.to_string() })
}

fn parse_oci(rest: &str) -> Result<OciRef, String> {
    let (registry, path) = rest.split_once('/').ok_or("no repository after the registry host")?;
    validate_registry(registry)?;
    let (name_tag, digest) = match path.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (path, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    validate_repository(repository)?;
    let reference = match (digest, tag) {
        // `repo:tag@digest` pins the digest; the tag is only a label (docker's rule).
        (Some(d), _) => OciReference::Digest(parse_digest(d)?),
        (None, Some(t)) => {
            let ok = t.len() <= 128
                && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(format!("tag {t:?} is not valid ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"));
            }
            OciReference::Tag(t.to_string())
        }
        (None, None) => OciReference::Tag("latest".into()),
    };
    Ok(OciRef { registry: registry.to_string(), repository: repository.to_string(), reference })
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(v6) = registry.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("unclosed '[' in the registry host")?;
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return Err(format!("registry host [{addr}] is not an IPv6 address"));
        }
        match after {
            "" => (addr, None),
            p => (addr, Some(p.strip_prefix(':').ok_or("expected :PORT after ']'")?)),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    if !registry.starts_with('[') {
        let ok = !host.is_empty()
            && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && !host.starts_with(['.', '-']);
        if !ok {
            return Err(format!("registry host {host:?} is not a host name"));
        }
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |n| n == 0) {
            return Err(format!("registry port {p:?} is not a port number"));
        }
    }
    Ok(())
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("empty repository".into());
    }
    for seg in repository.split('/') {
        let ok = !seg.is_empty()
            && seg.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            && seg.starts_with(|c: char| c.is_ascii_alphanumeric())
            && seg.ends_with(|c: char| c.is_ascii_alphanumeric())
            && !seg.contains("..");
        if !ok {
            return Err(format!(
                "repository {repository:?}: {seg:?} is not a valid path component (lowercase letters, digits, '.', '_', '-')"
            ));
        }
    }
    Ok(())
}

/// `sha256:<64 lowercase hex>` to its hex.
fn parse_digest(d: &str) -> Result<String, String> {
    let hex = d.strip_prefix("sha256:").ok_or_else(|| format!("digest {d:?} must be sha256:<64 hex digits>"))?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        return Err(format!("digest {d:?} must be sha256:<64 lowercase hex digits>"));
    }
    Ok(hex.to_string())
}

impl OciRef {
    /// Plain http: loopback registries (tests, `kind` / local registries) or `--insecure-http`.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(v6) => return v6.starts_with("::1]"),
            None => self.registry.split(':').next().unwrap_or_default(),
        };
        host.eq_ignore_ascii_case("localhost") || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
    }

    /// Docker Hub's API is not served on its name.
    fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options and entry point

/// How to fetch. Tokens come from the environment ([`FetchOptions::with_env_tokens`]), never from
/// the command line (where `ps` and pod specs would show them).
#[derive(Clone)]
pub struct FetchOptions {
    pub out: PathBuf,
    /// `HF_ENDPOINT`.
    pub hf_endpoint: String,
    pub hf_token: Option<String>,
    pub oci_token: Option<String>,
    /// Plain http for any registry (`--insecure-http` / `OCI_INSECURE=1`).
    pub insecure_http: bool,
    /// `--architecture`: makes the files it needs required, and checks them after the download.
    pub architecture: Option<&'static Architecture>,
    /// Tries per request (connection errors, 408, 429, 5xx).
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest silence while reading an answer.
    pub read_timeout: Duration,
}

impl fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchOptions")
            .field("out", &self.out)
            .field("hf_endpoint", &self.hf_endpoint)
            .field("hf_token", &self.hf_token.as_ref().map(|_| "<set>"))
            .field("oci_token", &self.oci_token.as_ref().map(|_| "<set>"))
            .field("insecure_http", &self.insecure_http)
            .field("architecture", &self.architecture.map(|a| a.name))
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl FetchOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            hf_endpoint: HF_DEFAULT_ENDPOINT.into(),
            hf_token: None,
            oci_token: None,
            insecure_http: false,
            architecture: None,
            attempts: 3,
            backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
        }
    }

    /// `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`) and `OCI_TOKEN`; empty values count as unset.
    pub fn with_env_tokens(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        self.hf_token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN"));
        self.oci_token = var("OCI_TOKEN");
        self
    }
}

/// One file written into the folder.
#[derive(Clone, Debug)]
pub struct FetchedFile {
    pub name: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// Downloads `uri` into `opts.out` (created if missing), then checks the folder with
/// [`verify_folder`].
pub async fn fetch(uri: &ModelUri, opts: &FetchOptions) -> Result<Vec<FetchedFile>, FetchError> {
    if opts.attempts == 0 {
        return Err(FetchError::InvalidOption("--attempts must be at least 1".into()));
    }
    tokio::fs::create_dir_all(&opts.out).await.map_err(|e| FetchError::io(&opts.out, e))?;
    let started = Instant::now();
    let files = match uri {
        ModelUri::Hf(h) => fetch_hf(h, opts).await?,
        ModelUri::Oci(o) => fetch_oci(o, opts).await?,
    };
    verify_folder(&opts.out, opts.architecture)?;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    eprintln!(
        "fetched {uri} into {}: {} files, {} in {:.1}s",
        opts.out.display(),
        files.len(),
        human_bytes(total),
        started.elapsed().as_secs_f64()
    );
    Ok(files)
}

async fn fetch_hf(h: &HfRepo, opts: &FetchOptions) -> Result<Vec<FetchedFile>, FetchError> {
    let endpoint = opts.hf_endpoint.trim_end_matches('/');
    let endpoint_url = reqwest::Url::parse(endpoint)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| FetchError::InvalidOption(format!("HF_ENDPOINT {endpoint:?} is not an http(s) URL")))?;
    let loopback = is_loopback_host(endpoint_url.host_str().unwrap_or_default());
    let mut session = Session::new(Source::Hf(h.clone()), opts.hf_token.clone(), opts, loopback)?;
    let needs = opts.architecture.map_or(&[][..], |a| a.needs);
    // `/` in a revision (refs/pr/1) is one path segment for the hub.
    let revision = h.revision.replace('/', "%2F");
    let mut files = Vec::new();
    for &(file, always) in HF_FILES {
        let required = always || needs.contains(&file);
        let url = format!("{endpoint}/{}/resolve/{revision}/{file}", h.repo);
        let dest = opts.out.join(file);
        match session.download(&url, Item::HfFile(file), Some(&dest), Expect::default()).await {
            Ok(got) => files.push(FetchedFile { name: file.to_string(), bytes: got.bytes, sha256: got.sha256 }),
            Err(FetchError::Status { missing_file: true, .. }) if !required => {
                eprintln!("skipping {file}: not in {}@{} (optional)", h.repo, h.revision);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
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
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// A layer to write: file name, digest hex, size.
struct Layer {
    title: String,
    digest: String,
    size: u64,
}

async fn fetch_oci(r: &OciRef, opts: &FetchOptions) -> Result<Vec<FetchedFile>, FetchError> {
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
fn plan_layers(url: &str, body: &[u8]) -> Result<Vec<Layer>, FetchError> {
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

/// A file name from the network: one plain path component, nothing hidden in it.
pub fn safe_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name.starts_with('/') || name.starts_with('\\') {
        Err("absolute path")
    } else if name.contains('/') || name.contains('\\') {
        Err("contains a path separator; files are written flat into the output folder")
    } else if name.contains("..") || name == "." {
        Err("contains '..' or is '.'")
    } else if name.chars().any(|c| c.is_control()) {
        Err("contains control characters")
    } else if name.len() > 255 {
        Err("longer than 255 bytes")
    } else if name.ends_with(".part") {
        Err("ends with .part (reserved for downloads in progress)")
    } else {
        Ok(())
    }
}

/// A complete file from an earlier try of this init container (it restarts into the same emptyDir)
/// is kept when its size and digest match.
async fn already_present(dest: &Path, size: u64, digest: &str) -> Result<bool, FetchError> {
    match tokio::fs::metadata(dest).await {
        Ok(m) if m.is_file() && m.len() == size => {}
        _ => return Ok(false),
    }
    let dest = dest.to_path_buf();
    let hex = tokio::task::spawn_blocking(move || -> Result<String, FetchError> {
        let mut f = std::fs::File::open(&dest).map_err(|e| FetchError::io(&dest, e))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(|e| FetchError::io(&dest, e))?;
        Ok(hex(&h.finalize()))
    })
    .await
    .map_err(|e| FetchError::InvalidOption(format!("hashing task failed: {e}")))??;
    Ok(hex == digest)
}

// ---------------------------------------------------------------------------------------------
// Checking the result

/// Checks that `dir` holds what the server loads: `config.json` (a JSON object), a
/// `model.safetensors` with a valid header, the files `arch` needs, readable JSON side files and
/// no half of a LoRA pair. Cheap: reads headers and small files only.
pub fn verify_folder(dir: &Path, arch: Option<&Architecture>) -> Result<(), FetchError> {
    let bad = |message: String| FetchError::Incomplete { dir: dir.to_path_buf(), message };
    let config = read_json(dir, "config.json")?.ok_or_else(|| bad("config.json is missing".into()))?;
    if !config.is_object() {
        return Err(bad("config.json is not a JSON object".into()));
    }
    check_safetensors(&dir.join("model.safetensors")).map_err(|m| bad(format!("model.safetensors: {m}")))?;
    for f in ["tokenizer.json", "preprocessor_config.json", "adapter_config.json"] {
        read_json(dir, f)?;
    }
    if let Some(a) = arch {
        for f in a.needs {
            if !dir.join(f).is_file() {
                return Err(bad(format!("{f} is missing and --architecture {} needs it", a.name)));
            }
        }
    }
    let adapter = dir.join("adapter_model.safetensors");
    if adapter.is_file() {
        if !dir.join("adapter_config.json").is_file() {
            return Err(bad("adapter_model.safetensors without adapter_config.json".into()));
        }
        check_safetensors(&adapter).map_err(|m| bad(format!("adapter_model.safetensors: {m}")))?;
    }
    let head = dir.join("projection.safetensors");
    if head.is_file() {
        check_safetensors(&head).map_err(|m| bad(format!("projection.safetensors: {m}")))?;
    }
    Ok(())
}

/// `Ok(None)` when the file does not exist; an error when it exists and is not JSON.
fn read_json(dir: &Path, name: &str) -> Result<Option<serde_json::Value>, FetchError> {
    let p = dir.join(name);
    let bad = |message: String| FetchError::Incomplete { dir: dir.to_path_buf(), message };
    match std::fs::metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FetchError::io(&p, e)),
        Ok(m) if m.len() > MAX_JSON_FILE_BYTES => {
            return Err(bad(format!("{name} is {} (larger than any config)", human_bytes(m.len()))))
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(&p).map_err(|e| FetchError::io(&p, e))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| bad(format!("{name} is not JSON ({e})")))
}

/// safetensors: 8-byte little-endian header length, then that many bytes of JSON object.
fn check_safetensors(p: &Path) -> Result<(), String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(p).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("{len} bytes is too short for a safetensors file"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len == 0 || header_len > 100 << 20 || header_len + 8 > len {
        return Err(format!(
            "not a safetensors file (header length {header_len} in a {len}-byte file; an HTML error page?)"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    match serde_json::from_slice::<serde_json::Value>(&header) {
        Ok(v) if v.is_object() => Ok(()),
        _ => Err("not a safetensors file (its header is not a JSON object)".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[derive(Clone)]
enum Source {
    Hf(HfRepo),
    Oci(OciRef),
}

/// What a request is for: names it in progress lines and picks the hint of an error.
#[derive(Clone, Copy)]
enum Item<'a> {
    HfFile(&'a str),
    Manifest,
    Blob { title: &'a str, digest: &'a str },
}

impl Item<'_> {
    fn name(&self) -> &str {
        match self {
            Item::HfFile(f) => f,
            Item::Manifest => "manifest",
            Item::Blob { title, .. } => title,
        }
    }
}

/// What the answer must be; unset fields are not checked.
#[derive(Default)]
struct Expect {
    size: Option<u64>,
    /// Lowercase hex.
    sha256: Option<String>,
    /// Refuse anything larger (manifests, tokens).
    max: Option<u64>,
}

struct Got {
    bytes: u64,
    sha256: String,
    /// The body when no file was written.
    body: Vec<u8>,
}

/// A failed try: worth another (connection, 5xx) or not (401, digest mismatch).
enum Failure {
    Retry(FetchError),
    Fatal(FetchError),
}

impl From<FetchError> for Failure {
    fn from(e: FetchError) -> Self {
        Failure::Fatal(e)
    }
}

struct Session<'o> {
    client: reqwest::Client,
    source: Source,
    opts: &'o FetchOptions,
    /// The user's token (HF_TOKEN / OCI_TOKEN).
    user_token: Option<String>,
    /// Anonymous pull token from the registry's token service (WWW-Authenticate: Bearer realm=...).
    registry_token: Option<String>,
}

impl<'o> Session<'o> {
    fn new(source: Source, token: Option<String>, opts: &'o FetchOptions, loopback: bool) -> Result<Self, FetchError> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("prism-node/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout);
        if loopback {
            // A cluster-wide HTTP(S)_PROXY must not capture loopback traffic.
            b = b.no_proxy();
        }
        let client = b.build().map_err(|e| FetchError::InvalidOption(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Self { client, source, opts, user_token: token, registry_token: None })
    }

    /// GETs `url` into `dest` (or memory when `None`), retrying transient failures.
    async fn download(
        &mut self,
        url: &str,
        item: Item<'_>,
        dest: Option<&Path>,
        expect: Expect,
    ) -> Result<Got, FetchError> {
        let attempts = self.opts.attempts.max(1);
        let mut attempt = 1;
        loop {
            let res = match self.get(url, item).await {
                Ok(resp) => receive(resp, url, item, dest, &expect).await,
                Err(f) => Err(f),
            };
            match res {
                Ok(got) => return Ok(got),
                Err(Failure::Retry(e)) if attempt < attempts => {
                    let wait = self.opts.backoff.saturating_mul(1 << (attempt - 1).min(16));
                    eprintln!(
                        "fetching {}: {e}; retrying in {:.1}s (attempt {} of {attempts})",
                        item.name(),
                        wait.as_secs_f64(),
                        attempt + 1
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(Failure::Retry(e)) => {
                    if attempts > 1 {
                        eprintln!("fetching {}: giving up after {attempts} attempts", item.name());
                    }
                    return Err(e);
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
    }

    /// One GET with a success status, answering a registry's token challenge on the way.
    async fn get(&mut self, url: &str, item: Item<'_>) -> Result<reqwest::Response, Failure> {
        let mut challenged = false;
        loop {
            let mut req = self.client.get(url);
            if let Some(t) = self.user_token.as_ref().or(self.registry_token.as_ref()) {
                req = req.bearer_auth(t);
            }
            if matches!(item, Item::Manifest) {
                req = req.header(ACCEPT, OCI_MANIFEST_MEDIA_TYPE);
            }
            let resp = req.send().await.map_err(|e| Failure::Retry(FetchError::network(url, &e)))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            // Registries that allow anonymous pulls (ghcr.io, Docker Hub, Harbor public projects)
            // still want a token, issued by the realm of their challenge. Also renews an expired one.
            if status == StatusCode::UNAUTHORIZED
                && matches!(self.source, Source::Oci(_))
                && self.user_token.is_none()
                && !challenged
            {
                if let Some(ch) = bearer_challenge(resp.headers()) {
                    self.registry_token = Some(self.anonymous_token(&ch).await?);
                    challenged = true;
                    continue;
                }
            }
            let missing_file = status == StatusCode::NOT_FOUND
                && match self.source {
                    // The hub names what is missing; RepoNotFound / RevisionNotFound are not "no such file".
                    Source::Hf(_) => header_str(resp.headers(), "x-error-code").is_none_or(|c| c == "EntryNotFound"),
                    Source::Oci(_) => matches!(item, Item::Blob { .. }),
                };
            let hint = self.hint(status, resp.headers(), item, challenged);
            let err = FetchError::Status { url: url.to_string(), status: status.as_u16(), hint, missing_file };
            let transient = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(if transient { Failure::Retry(err) } else { Failure::Fatal(err) });
        }
    }

    /// Token-service request of the docker/OCI token auth spec, without credentials.
    async fn anonymous_token(&self, ch: &Challenge) -> Result<String, Failure> {
        let Source::Oci(r) = &self.source else {
            return Err(Failure::Fatal(FetchError::InvalidOption("token challenge outside a registry".into())));
        };
        let realm = reqwest::Url::parse(&ch.realm).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(
            || FetchError::Manifest {
                url: ch.realm.clone(),
                message: "the registry's WWW-Authenticate realm is not an http(s) URL".into(),
            },
        )?;
        let realm_str = realm.to_string();
        let scope = ch.scope.clone().unwrap_or_else(|| format!("repository:{}:pull", r.repository));
        let mut query = vec![("scope", scope)];
        if let Some(s) = &ch.service {
            query.push(("service", s.clone()));
        }
        let resp = self
            .client
            .get(realm)
            .query(&query)
            .send()
            .await
            .map_err(|e| Failure::Retry(FetchError::network(&realm_str, &e)))?;
        let status = resp.status();
        if !status.is_success() {
            let err = FetchError::Status {
                url: realm_str.clone(),
                status: status.as_u16(),
                hint: format!(
                    "the registry's token service refused an anonymous pull token for {}: the repository is \
                     private or does not exist; set OCI_TOKEN to a registry token with pull access",
                    r.repository
                ),
                missing_file: false,
            };
            return Err(if status.is_server_error() { Failure::Retry(err) } else { Failure::Fatal(err) });
        }
        let expect = Expect { max: Some(MAX_TOKEN_BYTES), ..Default::default() };
        let got = receive(resp, &realm_str, Item::Manifest, None, &expect).await?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: Option<TokenAnswer> = serde_json::from_slice(&got.body).ok();
        answer.and_then(|a| a.token.or(a.access_token)).filter(|t| !t.is_empty()).ok_or_else(|| {
            Failure::Fatal(FetchError::Manifest {
                url: realm_str,
                message: "the token service answered without a token".into(),
            })
        })
    }

    /// The sentence after `HTTP <status>:` that says what is wrong and what to do.
    fn hint(&self, status: StatusCode, headers: &HeaderMap, item: Item<'_>, challenged: bool) -> String {
        let server_says = header_str(headers, "x-error-message")
            .map(|m| format!(" (server: {})", m.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        let h = match (&self.source, status.as_u16()) {
            (Source::Hf(h), 401) if self.user_token.is_some() => format!(
                "HF_TOKEN was refused: it is invalid or expired, or cannot read {} (private or gated); \
                 check the token, or the repository name",
                h.repo
            ),
            (Source::Hf(h), 401) => format!(
                "{} is private or gated, or does not exist: set HF_TOKEN to a Hugging Face token that can read it \
                 (and check the repository name)",
                h.repo
            ),
            (Source::Hf(h), 403) => format!(
                "access to {} is forbidden: for a gated model, accept its terms on the Hub with the account of \
                 HF_TOKEN; otherwise use a token with read access",
                h.repo
            ),
            (Source::Hf(h), 404) => match header_str(headers, "x-error-code") {
                Some("RepoNotFound") => format!("repository {} does not exist (or HF_TOKEN cannot see it)", h.repo),
                Some("RevisionNotFound") => format!("revision {:?} does not exist in {}", h.revision, h.repo),
                _ => {
                    let mut s = format!("{} does not exist in {} at revision {}", item.name(), h.repo, h.revision);
                    if item.name() == "model.safetensors" {
                        s.push_str(
                            "; prism-node serves single-file model.safetensors checkpoints (sharded or \
                             pytorch_model.bin-only repositories need converting)",
                        );
                    }
                    s
                }
            },
            (Source::Oci(r), 401) if self.user_token.is_some() => format!(
                "OCI_TOKEN was refused by {}: it is invalid or expired, or has no pull access to {}",
                r.registry, r.repository
            ),
            (Source::Oci(r), 401) if challenged => format!(
                "{} refuses anonymous pulls of {}: set OCI_TOKEN to a registry token with pull access",
                r.registry, r.repository
            ),
            (Source::Oci(r), 401) => format!(
                "{} needs credentials for {}: set OCI_TOKEN to a registry token with pull access",
                r.registry, r.repository
            ),
            (Source::Oci(r), 403) => format!(
                "pulling {} from {} is forbidden: set OCI_TOKEN to a token with pull access",
                r.repository, r.registry
            ),
            (Source::Oci(r), 404) => match item {
                Item::Blob { title, digest } => format!(
                    "blob sha256:{digest} ({title}) does not exist in {}/{}; the artifact is incomplete, push it again",
                    r.registry, r.repository
                ),
                _ => format!(
                    "{} {} does not exist in {}/{} (or the repository does not)",
                    if matches!(r.reference, OciReference::Tag(_)) { "tag" } else { "digest" },
                    r.reference,
                    r.registry,
                    r.repository
                ),
            },
            (_, 406) => format!(
                "the registry has no {OCI_MANIFEST_MEDIA_TYPE} for this reference (a docker image rather \
                 than an OCI model artifact?)"
            ),
            (_, 429) => "rate limited by the server".into(),
            (_, s) if (500..600).contains(&s) => "server error".into(),
            _ => format!("unexpected answer fetching {}", item.name()),
        };
        h + &server_says
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Streams an answer into `dest` (via `dest.part`) or memory, checking size and digest.
async fn receive(
    mut resp: reqwest::Response,
    url: &str,
    item: Item<'_>,
    dest: Option<&Path>,
    expect: &Expect,
) -> Result<Got, Failure> {
    let integrity = |message: String| FetchError::Integrity { url: url.to_string(), message };
    let announced = resp.content_length();
    if let (Some(a), Some(e)) = (announced, expect.size) {
        if a != e {
            return Err(Failure::Fatal(integrity(format!(
                "the server announces {a} bytes for {} but the manifest says {e}",
                item.name()
            ))));
        }
    }
    let cap = expect.max.unwrap_or(u64::MAX);
    if announced.is_some_and(|a| a > cap) {
        return Err(Failure::Fatal(integrity(format!("{} is larger than {}", item.name(), human_bytes(cap)))));
    }
    let limit = expect.size.or(announced).unwrap_or(cap).min(cap);
    let total = expect.size.or(announced);
    let mut sink = match dest {
        Some(d) => Sink::file(d).await?,
        None => Sink::Memory(Vec::new()),
    };
    let mut progress = dest.map(|_| Progress::start(item.name(), url, total));
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                return Err(Failure::Retry(FetchError::Network {
                    url: url.to_string(),
                    message: format!("connection lost after {}: {}", human_bytes(n), network_message(&e)),
                }))
            }
        };
        n += chunk.len() as u64;
        if n > limit {
            return Err(Failure::Fatal(integrity(format!(
                "{} is longer than the {limit} bytes announced",
                item.name()
            ))));
        }
        hasher.update(&chunk);
        sink.write(&chunk).await?;
        if let Some(p) = progress.as_mut() {
            p.update(n);
        }
    }
    if let Some(want) = expect.size.or(announced) {
        if n != want {
            // A connection closed early: worth another try.
            return Err(Failure::Retry(integrity(format!("short answer for {}: {n} of {want} bytes", item.name()))));
        }
    }
    let digest = hex(&hasher.finalize());
    if let Some(want) = &expect.sha256 {
        if *want != digest {
            return Err(Failure::Fatal(integrity(format!(
                "sha256 mismatch for {}: expected sha256:{want}, received sha256:{digest}; refused, nothing kept",
                item.name()
            ))));
        }
    }
    let body = sink.finish().await?;
    if let Some(p) = progress {
        p.done(n);
    }
    Ok(Got { bytes: n, sha256: digest, body })
}

/// Where an answer goes. A file is written as `NAME.part` and renamed by `finish`; dropping the
/// sink before that (any error, or cancellation) removes the part file.
enum Sink {
    Memory(Vec<u8>),
    File { file: tokio::fs::File, part: PartFile, dest: PathBuf },
}

struct PartFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Sink {
    async fn file(dest: &Path) -> Result<Sink, FetchError> {
        let mut part = dest.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let file = tokio::fs::File::create(&part).await.map_err(|e| FetchError::io(&part, e))?;
        Ok(Sink::File { file, part: PartFile { path: part, armed: true }, dest: dest.to_path_buf() })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        match self {
            Sink::Memory(v) => {
                v.extend_from_slice(chunk);
                Ok(())
            }
            Sink::File { file, part, .. } => file.write_all(chunk).await.map_err(|e| FetchError::io(&part.path, e)),
        }
    }

    async fn finish(self) -> Result<Vec<u8>, FetchError> {
        match self {
            Sink::Memory(v) => Ok(v),
            Sink::File { mut file, mut part, dest } => {
                file.flush().await.map_err(|e| FetchError::io(&part.path, e))?;
                file.sync_all().await.map_err(|e| FetchError::io(&part.path, e))?;
                drop(file);
                tokio::fs::rename(&part.path, &dest).await.map_err(|e| FetchError::io(&dest, e))?;
                part.armed = false;
                Ok(Vec::new())
            }
        }
    }
}

/// `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`.
struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

fn bearer_challenge(headers: &HeaderMap) -> Option<Challenge> {
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
fn parse_auth_params(s: &str) -> HashMap<String, String> {
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

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

struct Progress {
    name: String,
    total: Option<u64>,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn start(name: &str, url: &str, total: Option<u64>) -> Self {
        let size = total.map(|t| format!(" ({})", human_bytes(t))).unwrap_or_default();
        eprintln!("fetching {name}{size} from {url}");
        let now = Instant::now();
        Self { name: name.to_string(), total, started: now, last: now }
    }

    fn update(&mut self, n: u64) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = human_bytes((n as f64 / secs) as u64);
        match self.total {
            Some(t) if t > 0 => eprintln!(
                "fetching {}: {} of {} ({:.0}%), {rate}/s",
                self.name,
                human_bytes(n),
                human_bytes(t),
                n as f64 * 100.0 / t as f64
            ),
            _ => eprintln!("fetching {}: {}, {rate}/s", self.name, human_bytes(n)),
        }
    }

    fn done(self, n: u64) {
        eprintln!(
            "fetching {}: {} ... done in {:.1}s",
            self.name,
            human_bytes(n),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// `612 B`, `455.3 KiB`, `86.7 MiB`, `1.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
