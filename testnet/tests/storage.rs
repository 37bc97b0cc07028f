//! A node whose storage fails says so and stops, instead of answering as if all were well:
//! its data dir is a small file system that the test fills (a full disk), a write makes raft
//! append, and the node's `/health` fails and the process exits with a message that names
//! the data dir.
//!
//! Needs root (to mount a tmpfs). Without it the test says so and passes, unless
//! `CLOUDLESS_REQUIRE_ROOT=1` (CI sets it), which turns the skip into a failure.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::io::Write;
use std::time::Duration;

use cloudless_testnet::procs::{Procs, tmpfs, until};

#[test]
fn a_full_disk_fails_health_and_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = tmpfs(&dir.path().join("node-0"), 64).unwrap() else { return };
    let mut c = Procs::init(dir.path(), &[]).unwrap();
    until("the node is healthy", Duration::from_secs(30), || {
        (c.get(0, "/health")?.0 == 200).then_some(())
    })
    .unwrap();

    // Fill the disk.
    let mut filler = std::fs::File::create(dir.path().join("node-0/filler")).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut filled = 0usize;
    while filler.write_all(&chunk).is_ok() {
        filled += 1;
    }
    let _ = filler.flush();

    // A write: the leader appends it to its log, on the full disk.
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let hex: String = key.verifying_key().to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let out = c.ctl(&["user", "add", &hex, "--role", "viewer", "--name", "probe"]);
    let mut unhealthy = None;
    until("the node stops", Duration::from_secs(60), || {
        if let Some((code, body)) = c.get(0, "/health")
            && code != 200
        {
            unhealthy = Some(body);
        }
        c.exited(0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nthe write: {out:?}\n{}", c.tail(0, 30)));
    let log = c.tail(0, 30);
    eprintln!(
        "full disk: filled with {filled} MiB; the write: ok={}; /health before the exit: \
         {unhealthy:?}; last lines:\n{log}",
        out.ok
    );
    assert!(!out.ok, "a write on a full disk was acknowledged: {out:?}");
    assert!(log.contains("raft stopped"), "the node did not say what failed:\n{log}");
    assert!(
        log.contains(&dir.path().join("node-0").display().to_string()),
        "the message does not name the data dir:\n{log}"
    );
}
