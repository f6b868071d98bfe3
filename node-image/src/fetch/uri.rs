//! Model URIs: `hf://ORG/NAME[@REVISION]` and `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`,
//! parsed and validated before anything is fetched.

use super::*;

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

pub(super) fn parse_hf(rest: &str) -> Result<HfRepo, String> {
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

pub(super) fn parse_oci(rest: &str) -> Result<OciRef, String> {
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

pub(super) fn validate_registry(registry: &str) -> Result<(), String> {
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

pub(super) fn validate_repository(repository: &str) -> Result<(), String> {
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
pub(super) fn parse_digest(d: &str) -> Result<String, String> {
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
    pub(super) fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}
