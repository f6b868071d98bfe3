//! `--memory-path` and `--memory-url` exclude each other, and an unreachable database stops the
//! router with an error that names where it tried, never the password.

use std::process::{Command, Stdio};

fn router(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prism-router"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("PRISM_ROUTER_MEMORY_PATH")
        .stdin(Stdio::null())
        .output()
        .expect("run prism-router");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn memory_path_and_memory_url_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let url = "postgres://prism:flag-s3cret@127.0.0.1:1/memory";
    for env in [vec![], vec![("PRISM_MEMORY_URL", url)]] {
        let mut args = vec!["--memory-path", db.to_str().unwrap()];
        if env.is_empty() {
            args.extend(["--memory-url", url]);
        }
        let (ok, text) = router(&args, &env);
        assert!(!ok, "{text}");
        assert!(text.contains("--memory-url") && text.contains("--memory-path"), "{text}");
        assert!(!text.contains("flag-s3cret"), "{text}");
    }
    assert!(!db.exists(), "refused before opening anything");
}

#[test]
fn an_unreachable_database_is_a_clear_error_without_the_password() {
    // Nothing listens on the port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://prism:env-s3cret@127.0.0.1:{port}/memory");
    let (ok, text) = router(&[], &[("PRISM_MEMORY_URL", &url)]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("cannot connect to the memory database postgres://prism@127.0.0.1:{port}/memory")),
        "{text}"
    );
    assert!(!text.contains("env-s3cret"), "{text}");
}
