//! One fetch's HTTP session: requests with retries and auth, answers streamed to `.part` files
//! with size and digest checks, progress on stderr.

use super::*;

#[derive(Clone)]
pub(super) enum Source {
    Hf(HfRepo),
    Oci(OciRef),
}

/// What a request is for: names it in progress lines and picks the hint of an error.
#[derive(Clone, Copy)]
pub(super) enum Item<'a> {
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
pub(super) struct Expect {
    pub(super) size: Option<u64>,
    /// Lowercase hex.
    pub(super) sha256: Option<String>,
    /// Refuse anything larger (manifests, tokens).
    pub(super) max: Option<u64>,
}

pub(super) struct Got {
    pub(super) bytes: u64,
    pub(super) sha256: String,
    /// The body when no file was written.
    pub(super) body: Vec<u8>,
}

/// A failed try: worth another (connection, 5xx) or not (401, digest mismatch).
pub(super) enum Failure {
    Retry(FetchError),
    Fatal(FetchError),
}

impl From<FetchError> for Failure {
    fn from(e: FetchError) -> Self {
        Failure::Fatal(e)
    }
}

pub(super) struct Session<'o> {
    client: reqwest::Client,
    source: Source,
    opts: &'o FetchOptions,
    /// The user's token (HF_TOKEN / OCI_TOKEN).
    user_token: Option<String>,
    /// Anonymous pull token from the registry's token service (WWW-Authenticate: Bearer realm=...).
    registry_token: Option<String>,
}

impl<'o> Session<'o> {
    pub(super) fn new(
        source: Source,
        token: Option<String>,
        opts: &'o FetchOptions,
        loopback: bool,
    ) -> Result<Self, FetchError> {
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
    pub(super) async fn download(
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

pub(super) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Streams an answer into `dest` (via `dest.part`) or memory, checking size and digest.
pub(super) async fn receive(
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
pub(super) enum Sink {
    Memory(Vec<u8>),
    File { file: tokio::fs::File, part: PartFile, dest: PathBuf },
}

pub(super) struct PartFile {
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

pub(super) struct Progress {
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
