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
//!
//! This file is the entry point ([`fetch`]) and the Hugging Face side; `uri.rs` parses the URIs,
//! `oci.rs` reads OCI manifests and registry auth challenges, `session.rs` is the HTTP session
//! (retries, auth, streaming to `.part` files with digest checks, progress) and `verify.rs`
//! checks a finished folder.

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

mod oci;
mod session;
mod uri;
mod verify;

use oci::*;
use session::*;
pub use uri::{HfRepo, ModelUri, OciRef, OciReference};
pub use verify::verify_folder;

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

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
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
