//! Untrusted workloads against a real `cloudless` process: a guest's output, CPU and files
//! stay within their bounds, and the node keeps serving.
//!
//! - `workload_empty_line_flood`: a guest writes 60,000 newlines per call, as fast as its
//!   share lets it (empty lines cost the old log ring nothing, so it grew without bound): the
//!   node's memory stays within the bound and the log files rotate.
//! - `workload_disk_fill`: a guest writes into its directory forever: it is stopped at its
//!   disk limit with "out of disk" as its reason, its files are removed, and the node's data
//!   dir stays bounded.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::Path;
use std::time::Duration;

use cloudless_testnet::hostile::Pool;
use cloudless_testnet::procs::{throughout, until};

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How much the node's resident memory may grow while the guest runs (its own 16 MiB of
/// linear memory and the compiled module included).
const RSS_GROWTH_MIB: f64 = 64.0;

const DEADLINE: Duration = Duration::from_secs(60);

/// How much the node's data dir may grow under a disk fill: the 64 MiB a replica gets without
/// a limit, what it writes before the next measure (a few MiB), and the node's own files.
const DISK_BOUND: u64 = 96 * 1024 * 1024;

/// Writes 60,000 newlines to stdout per call, forever.
const FLOOD: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (memory.fill (i32.const 1024) (i32.const 10) (i32.const 60000))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 60000))
    (loop $l (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))) (br $l))))"#;

/// Creates `fill` in its directory and writes 60,000 bytes to it per call, forever.
const FILL: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "fill")
  (func (export "_start") (local $fd i32)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 4)
          (i32.const 1) (i64.const 0x42) (i64.const 0x42) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 100))))
    (local.set $fd (i32.load (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 60000))
    (loop $l (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))) (br $l))))"#;

/// Writes the module and a workload document for it into `dir`; returns the document's path.
fn workload(dir: &Path, name: &str, wat: &str, extra: &str) -> String {
    std::fs::write(dir.join(format!("{name}.wat")), wat).unwrap();
    let doc = format!(
        "name: {name}\nkind: service\nruntime: {{ wasi: {{ module: ./{name}.wat }} }}\n\
         resources: {{ requests: {{ cpu: 500m, memory: 16Mi }} }}\n{extra}"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, doc).unwrap();
    path.display().to_string()
}

/// Bytes under `dir`, recursively.
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => size_of(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Replica 0 of workload `name`, as `workload get` shows it.
fn replica(p: &Pool, name: &str) -> Option<serde_json::Value> {
    p.procs.json(&["workload", "get", name]).ok()?["replicas"].get(0).cloned()
}

#[test]
fn workload_empty_line_flood() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut p = Pool::start(1, 0).unwrap();
    let before = p.rss_mib(0).unwrap();
    let doc = workload(p.dir.path(), "flood", FLOOD, "");
    let out = p.procs.ctl(&["workload", "apply", "-f", &doc]);
    assert!(out.ok, "{out:?}");
    until("the flood runs", DEADLINE, || {
        replica(&p, "flood").filter(|r| r["phase"] == "running").map(|_| ())
    })
    .unwrap();
    let logs = p.procs.nodes[0].data_dir.join("wasi/replicas/flood.0");
    until("its log has rotated (the flood is on)", DEADLINE, || {
        logs.join("replica.log.1").exists().then_some(())
    })
    .unwrap();
    throughout("the node's memory stays bounded", Duration::from_secs(10), || {
        p.rss_mib(0).is_some_and(|r| r < before + RSS_GROWTH_MIB)
    })
    .unwrap();
    let out = p.procs.ctl(&["workload", "logs", "flood"]);
    assert!(out.ok, "the log cannot be read during the flood: {out:?}");
    let on_disk = size_of(&logs);
    let peak = p.peak_rss_mib(0).unwrap();
    eprintln!(
        "empty-line flood: log files {:.1} MiB on disk; node RSS {before:.1} -> peak {peak:.1} MiB",
        on_disk as f64 / 1048576.0
    );
    // The current file and two rotated ones, 1 MiB each, plus a line past the rotation.
    assert!(on_disk < 4 * 1024 * 1024, "the log files take {on_disk} bytes");
    assert!(peak < before + RSS_GROWTH_MIB, "the node grew from {before:.1} to {peak:.1} MiB");
    p.keeps_serving().unwrap();
    let out = p.procs.ctl(&["workload", "delete", "flood"]);
    assert!(out.ok, "{out:?}");
    p.report("workload_empty_line_flood", 0);
}

#[test]
fn workload_disk_fill() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut p = Pool::start(1, 0).unwrap();
    let data = p.procs.nodes[0].data_dir.clone();
    let before = size_of(&data);
    let doc = workload(p.dir.path(), "fill", FILL, "");
    let out = p.procs.ctl(&["workload", "apply", "-f", &doc]);
    assert!(out.ok, "{out:?}");
    // No disk asked for: the node's default scratch space, 64 MiB. The data dir is measured
    // while the guest writes, and for a while after (its restarts write again).
    let most = std::sync::atomic::AtomicU64::new(0);
    let bounded = || {
        let s = size_of(&data);
        most.fetch_max(s, std::sync::atomic::Ordering::Relaxed);
        s < before + DISK_BOUND
    };
    let r = until("the guest is stopped out of disk", DEADLINE, || {
        assert!(bounded(), "the data dir grew past its bound while the guest wrote");
        replica(&p, "fill")
            .filter(|r| r["reason"].as_str().is_some_and(|s| s.contains("out of disk")))
    })
    .unwrap();
    throughout("the data dir stays bounded", Duration::from_secs(5), bounded).unwrap();
    let reason = replica(&p, "fill").and_then(|r| r["reason"].as_str().map(str::to_owned));
    eprintln!(
        "disk fill: {r}; reason now {reason:?}; data dir {:.1} -> at most {:.1} MiB",
        before as f64 / 1048576.0,
        most.into_inner() as f64 / 1048576.0
    );
    p.keeps_serving().unwrap();
    let out = p.procs.ctl(&["workload", "delete", "fill"]);
    assert!(out.ok, "{out:?}");
    p.report("workload_disk_fill", 0);
}
