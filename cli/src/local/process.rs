//! Child processes of the local substrate: start one with its output in a log file, learn the
//! address it bound (servers print `listening on http://ADDR`), stop it politely then firmly.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// A started server process and where its output goes.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    /// Size of the log when this process started: the `listening on` line is searched after it,
    /// so a restarted replica does not pick up its predecessor's address.
    log_offset: u64,
}

impl Proc {
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let log_offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        if args.iter().any(|a| a == "--memory-path") {
            // The router refuses a memory path and PRISM_MEMORY_URL together; `prism up` chose the
            // file, so a URL left in the user's environment must not reach it.
            cmd.env_remove("PRISM_MEMORY_URL");
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (build it with `make build`, or set its path with the flag shown in `prism up --help`)", bin.display()))?;
        Ok(Self { child, log: log.to_path_buf(), log_offset })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The `http://ADDR` the process printed after it bound its port, if it has yet.
    pub fn bound_url(&self) -> Option<String> {
        let text = std::fs::read(&self.log).ok()?;
        let start = (self.log_offset as usize).min(text.len());
        let text = String::from_utf8_lossy(&text[start..]);
        text.lines().find_map(|l| {
            let i = l.find("listening on http://")?;
            let url = l[i + "listening on ".len()..].split_whitespace().next()?;
            Some(url.trim_end_matches('/').to_string())
        })
    }

    /// `Some(description)` once the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            Ok(None) => None,
            Err(e) => Some(format!("unknown exit ({e})")),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            terminate(pid);
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }

    /// Last `n` lines of this process's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(9)) => "killed (SIGKILL)".to_string(),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "exited".to_string(),
    }
}

/// Sends SIGTERM to a process id.
pub fn terminate(pid: u32) {
    // SAFETY: kill(2) with a pid we started (or read from our own state file) and a valid signal.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Whether a process id is alive. A zombie (exited, not yet reaped by its parent) counts as
/// gone: it no longer serves anything, and `prism down` must not wait for its parent to reap it.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

/// GET `{url}{path}` with a short timeout; true on 2xx.
pub async fn probe(http: &reqwest::Client, url: &str, path: &str) -> bool {
    matches!(http.get(format!("{url}{path}")).timeout(Duration::from_millis(500)).send().await, Ok(r) if r.status().is_success())
}
