//! A throwaway PostgreSQL server for tests: `initdb` into a tempdir, `postgres` on a free
//! loopback port with its socket in that tempdir (fsync on, the server's default), killed on
//! Drop. Password auth over TCP (scram), so the URLs carry a password the tests can look for.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as `nobody` (through `setpriv`,
//! which execs, so the child we hold is the postmaster itself; `runuser` for `initdb`), in a
//! tempdir chowned to it. Missing binaries are a test failure naming what is missing
//! (`scripts/install-deps.sh` installs them), never a silent pass.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "prism";
pub const PASSWORD: &str = "pg-s3cret-Zq7";
pub const DATABASE: &str = "memory";

pub struct PgServer {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    as_nobody: bool,
}

/// The directory holding `initdb` and `postgres`: `$PG_BIN`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/*/bin`, or `initdb` on `PATH`.
fn bin_dir() -> Result<PathBuf, String> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file() && d.join("pg_isready").is_file();
    if let Ok(d) = std::env::var("PG_BIN") {
        let d = PathBuf::from(d);
        return if has(&d) { Ok(d) } else { Err(format!("PG_BIN={} has no initdb/postgres/pg_isready", d.display())) };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Ok(d);
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has(&d) {
            return Ok(d);
        }
    }
    Err("PostgreSQL server binaries not found (no PG_BIN, no `pg_config --bindir`, nothing in \
         /usr/lib/postgresql/*/bin, no initdb on PATH): run scripts/install-deps.sh (apt package postgresql)"
        .into())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    /// Start a fresh server; panics with the reason when it cannot.
    pub fn start() -> Self {
        let bin = bin_dir().unwrap_or_else(|e| panic!("cannot run PostgreSQL for this test: {e}"));
        let as_nobody = is_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let (data, sock) = (root.join("data"), root.join("sock"));
        std::fs::create_dir(&sock).expect("socket dir");
        std::fs::write(root.join("pwfile"), format!("{PASSWORD}\n")).expect("pwfile");
        if as_nobody {
            let mut c = Command::new("chown");
            c.args(["-R", "nobody:"]).arg(root);
            run(c, "chown the PostgreSQL tempdir to nobody");
        }
        let mut initdb = if as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(bin.join("initdb"));
            c
        } else {
            Command::new(bin.join("initdb"))
        };
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", root.join("pwfile").display()))
            .current_dir(root);
        run(initdb, "initdb");

        // The port is free when picked; another process may take it before the server binds:
        // try a few.
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(root.join("postgres.log")).expect("log file");
            let mut cmd = if as_nobody {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(bin.join("postgres"));
                c
            } else {
                Command::new(bin.join("postgres"))
            };
            cmd.arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "fsync=on", "-c", "max_connections=100"])
                .current_dir(root)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            let mut child =
                cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.join("postgres").display()));
            let t0 = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_log = std::fs::read_to_string(root.join("postgres.log")).unwrap_or_default();
                    eprintln!("postgres exited ({status}) on port {port}:\n{last_log}");
                    break;
                }
                let ready = Command::new(bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
                    .status()
                    .is_ok_and(|s| s.success());
                if ready {
                    let mut server = Self { child, dir, port, bin, as_nobody };
                    server.psql(&format!("CREATE DATABASE {DATABASE}"));
                    return server;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "postgres did not accept connections within 30 s:\n{}",
                        std::fs::read_to_string(root.join("postgres.log")).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("postgres would not start:\n{last_log}");
    }

    /// `postgres://prism:PASSWORD@127.0.0.1:PORT/memory`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Run SQL through psql over the socket (trust auth), as the server's OS user.
    pub fn psql(&mut self, sql: &str) -> String {
        let db = if sql.starts_with("CREATE DATABASE") { "postgres" } else { DATABASE };
        let mut c = if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(self.bin.join("psql"));
            c
        } else {
            Command::new(self.bin.join("psql"))
        };
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", USER, "-d", db])
            .arg("-h")
            .arg(self.dir.path().join("sock"))
            .args(["-p", &self.port.to_string(), "-c", sql])
            .current_dir(self.dir.path());
        let out = c.output().unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown (the postmaster takes its backends down with it).
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
