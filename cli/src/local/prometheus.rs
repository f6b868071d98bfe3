//! The Prometheus `prism up` starts for the builtin autoscaler: the Debian/upstream
//! `prometheus` binary on a loopback port, scraping exactly the replicas the supervisor
//! runs (file-based discovery, rewritten whenever a replica's address changes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::process::{probe, Proc};

/// Scrape (and rule evaluation) interval: short, so a panic window of a few seconds has samples.
pub const SCRAPE_INTERVAL_S: u64 = 1;

pub struct LocalPrometheus {
    pub url: String,
    proc: Proc,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    targets: PathBuf,
    written: Option<String>,
    restart_at: Option<Instant>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

impl LocalPrometheus {
    /// Starts Prometheus with its data and config under `dir` and waits until it is ready.
    pub async fn start(bin: &Path, dir: &Path, http: &reqwest::Client) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let targets = dir.join("targets.json");
        std::fs::write(&targets, "[]")?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n\
                 scrape_configs:\n  - job_name: prism-nodes\n    file_sd_configs:\n      - files: [{}]\n        refresh_interval: 1s\n",
                targets.display()
            ),
        )?;
        let port = free_port()?;
        let args = vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--storage.tsdb.retention.time=2h".into(),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let log = dir.join("prometheus.log");
        let _ = std::fs::remove_file(&log);
        let proc = Proc::spawn(bin, &args, &log)?;
        let mut me = Self {
            url: format!("http://127.0.0.1:{port}"),
            proc,
            bin: bin.to_path_buf(),
            args,
            log,
            targets,
            written: None,
            restart_at: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !probe(http, &me.url, "/-/ready").await {
            if let Some(why) = me.proc.exited() {
                bail!("prometheus exited during start ({why}); last log lines:\n{}", me.proc.log_tail(15));
            }
            if Instant::now() > deadline {
                me.proc.stop(Duration::from_secs(2)).await;
                bail!("prometheus was not ready within 30s; see {}", me.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(me)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Points the scrape at these `host:port` targets (a no-op when unchanged).
    pub fn set_targets(&mut self, targets: &[String]) {
        let body = serde_json::json!([{ "targets": targets }]).to_string();
        if self.written.as_deref() == Some(body.as_str()) {
            return;
        }
        // Atomic, so Prometheus never reads a half-written file.
        if super::write_atomic(&self.targets, body.as_bytes()).is_ok() {
            self.written = Some(body);
        }
    }

    /// Restarts Prometheus when it died (after a pause, so a crash loop does not spin). While it
    /// is down the autoscaler reads "metrics unavailable" and holds every node's replicas.
    pub fn supervise(&mut self) {
        if let Some(at) = self.restart_at {
            if Instant::now() >= at {
                match Proc::spawn(&self.bin, &self.args, &self.log) {
                    Ok(p) => {
                        println!("prometheus restarted");
                        self.proc = p;
                        self.restart_at = None;
                    }
                    Err(e) => {
                        eprintln!("restarting prometheus: {e:#}");
                        self.restart_at = Some(Instant::now() + Duration::from_secs(10));
                    }
                }
            }
            return;
        }
        if let Some(why) = self.proc.exited() {
            println!("prometheus {why}; autoscaling holds replicas until it is back (restart in 10s)");
            self.restart_at = Some(Instant::now() + Duration::from_secs(10));
        }
    }

    pub async fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(3)).await;
    }
}
