//! Bearer tokens never reach the router's log or its metrics, even at trace level and when a
//! client sends a wrong one (a typo of a real token is as sensitive as the token).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn tokens_are_not_logged_at_trace_level_nor_exported_as_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let (good, typo) = ("tok-0f3a9c2e71d4b8aa", "tok-0f3a9c2e71d4b8ab");
    std::fs::write(&tokens, format!("{good}\n")).unwrap();
    let table = dir.path().join("table.json");
    std::fs::write(&table, r#"{"pipeline": "p", "generation": 1, "modalities": {"text": []}}"#).unwrap();
    let log_path = dir.path().join("router.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut router = Command::new(env!("CARGO_BIN_EXE_prism-router"))
        .args(["--listen", "127.0.0.1:0", "--routing-table", table.to_str().unwrap()])
        .args(["--auth-token-file", tokens.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let t0 = Instant::now();
    let url = loop {
        if let Some(l) = read_log().lines().find_map(|l| l.strip_prefix("listening on ").map(str::to_string)) {
            break l.trim().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "router did not start:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr = url.trim_start_matches("http://").to_string();
    let send = |auth: &str, path: &str, body: &str| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let method = if body.is_empty() { "GET" } else { "POST" };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let body = r#"{"inputs": {"text": "hello"}}"#;
    assert!(send(typo, "/v1/infer", body).starts_with("HTTP/1.1 401"));
    // The right token passes auth (the empty table then answers 503 naming the modality).
    assert!(send(good, "/v1/infer", body).starts_with("HTTP/1.1 503"));
    let metrics = send(good, "/metrics", "");
    std::thread::sleep(Duration::from_millis(300));
    let _ = router.kill();
    let _ = router.wait();
    let logged = read_log();
    assert!(logged.contains("router listening"), "the log was captured:\n{logged}");
    for secret in [good, typo] {
        assert!(!logged.contains(secret), "token {secret} in the log:\n{logged}");
        assert!(!metrics.contains(secret), "token {secret} in /metrics");
    }
}
