//! cloudlessctl without a cluster: what it refuses before it connects anywhere, and its own
//! key. (The verbs against a running cluster are covered by testnet/tests/e2e.rs.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn run(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloudlessctl"))
        .args(args)
        .env("CLOUDLESS_CONFIG_DIR", dir)
        .env_remove("CLOUDLESS_PEER")
        .output()
        .unwrap()
}

fn ctl(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = run(dir, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_document_is_refused_with_its_field_before_anything_is_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("w.yaml");
    std::fs::write(&spec, "name: w\nruntime: { wasi: { module: w.wasm } }\nresources: { requests: { memory: lots } }\n").unwrap();
    // A peer that cannot exist: the document must be refused before any dial.
    let (ok, _, err) = ctl(
        dir.path(),
        &[
            "--peer",
            "/ip4/127.0.0.1/udp/9/quic-v1",
            "workload",
            "apply",
            "-f",
            spec.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("resources.requests.memory"), "{err}");
}

#[test]
fn without_a_peer_or_key_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = ctl(dir.path(), &["node", "list"]);
    assert!(!ok && err.contains("--peer"), "{err}");
    let (ok, _, err) = ctl(dir.path(), &["--peer", "/ip4/127.0.0.1/udp/9/quic-v1", "node", "list"]);
    assert!(!ok && err.contains("key create"), "{err}");
    let (ok, _, err) =
        ctl(dir.path(), &["--peer", "/ip4/127.0.0.1/udp/9/quic-v1", "token", "create"]);
    assert!(!ok && err.contains("root key"), "{err}");
}

#[test]
fn a_key_is_created_once_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, created, err) = ctl(dir.path(), &["key", "create"]);
    assert!(ok, "{err}");
    assert_eq!(created.trim().len(), 64);
    let (ok, shown, _) = ctl(dir.path(), &["key", "show"]);
    assert!(ok);
    assert_eq!(created, shown);
    let (ok, _, err) = ctl(dir.path(), &["key", "create"]);
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
}

/// The exit code says what kind of failure it was (the table is in `cloudlessctl --help`'s
/// crate docs and docs/node.md); a cluster's answers are covered in testnet/tests/e2e.rs.
#[test]
fn exit_codes_follow_the_kind_of_failure() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("w.yaml");
    std::fs::write(&spec, "name: w\nruntime: { wasi: { module: w.wasm } }\nreplcas: 1\n").unwrap();
    let code = |args: &[&str]| run(dir.path(), args).status.code();
    let peer = "/ip4/127.0.0.1/udp/9/quic-v1";
    assert_eq!(code(&["--peer", peer, "workload", "apply", "-f", spec.to_str().unwrap()]), Some(3));
    assert_eq!(code(&["node", "list"]), Some(1), "no peer configured: not an answer");
    assert_eq!(code(&["nonsense"]), Some(2), "usage");
    assert!(ctl(dir.path(), &["key", "create"]).0);
    assert_eq!(code(&["--peer", peer, "node", "list"]), Some(3), "an address without /p2p/");
    let nobody = format!("{peer}/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA");
    assert_eq!(code(&["--peer", &nobody, "node", "list"]), Some(9), "nobody answers there");
}
