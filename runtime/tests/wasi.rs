//! The WASI driver against real wasmtime: output and exit codes, args and env, the sandbox,
//! CPU and memory limits, deadlines, preview 2 components, and stop.

#![allow(clippy::unwrap_used)]

mod guests;

use std::time::{Duration, Instant};

use cloudless_runtime::driver::Stream;
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Driver, ExitReason, ReplicaId, ReplicaSpec, RunState};
use cloudless_types::{Image, Kind, Resources, Restart, WorkloadSpec};

fn driver(dir: &tempfile::TempDir) -> WasiDriver {
    let mut config = WasiConfig::new(dir.path());
    config.max_memory_mib = 64;
    config.max_replicas = 8;
    WasiDriver::new(config).unwrap()
}

fn job(name: &str, hash: &cloudless_types::ModuleHash) -> ReplicaSpec {
    let mut w = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        Image::Wasi(hash.clone()),
        Resources { cpu_millis: 1000, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    w.kind = Kind::Job;
    w.restart = Restart::Never;
    ReplicaSpec::from_workload(&w, 0)
}

async fn deploy(d: &WasiDriver, name: &str, module: &[u8]) -> ReplicaSpec {
    let hash = d.store_module(module).unwrap();
    let spec = job(name, &hash);
    d.start(&spec).await.unwrap();
    spec
}

async fn wait(d: &WasiDriver, id: &ReplicaId) -> cloudless_runtime::Exit {
    tokio::time::timeout(Duration::from_secs(30), d.wait(id)).await.expect("the run ends").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_output_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let spec = deploy(&d, "hello", &guests::hello(3)).await;
    let exit = wait(&d, &spec.id).await;
    assert_eq!((exit.code, &exit.reason), (Some(3), &ExitReason::Exited), "{exit:?}");
    let logs = d.logs(&spec.id, 10).await.unwrap();
    let lines: Vec<(Stream, &str)> = logs.iter().map(|l| (l.stream, l.text.as_str())).collect();
    assert_eq!(lines, [(Stream::Stdout, "hello from wasi"), (Stream::Stderr, "a warning")]);
    let file = dir.path().join("replicas/hello.0/replica.log");
    assert!(std::fs::read_to_string(file).unwrap().contains("out hello from wasi"));
    match d.status(&spec.id).await.unwrap().unwrap().state {
        RunState::Exited(e) => assert_eq!(e.code, Some(3)),
        s => panic!("{s:?}"),
    }
    // Success is code 0.
    let ok = deploy(&d, "hello-ok", &guests::hello(0)).await;
    assert!(wait(&d, &ok.id).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_and_environment_reach_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let hash = d.store_module(&guests::args_env()).unwrap();
    let mut spec = job("args", &hash);
    spec.command = vec!["prog".into(), "--flag".into()];
    spec.args = vec!["two words".into()];
    spec.env.insert("GREETING".into(), "hi there".into());
    d.start(&spec).await.unwrap();
    assert!(wait(&d, &spec.id).await.success());
    let text: Vec<String> =
        d.logs(&spec.id, 10).await.unwrap().into_iter().map(|l| l.text).collect();
    assert_eq!(text, ["prog", "--flag", "two words", "GREETING=hi there"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_sees_its_directory_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let spec = deploy(&d, "escape", &guests::escape()).await;
    let exit = wait(&d, &spec.id).await;
    assert_eq!(exit.reason, ExitReason::Exited);
    let code = exit.code.unwrap();
    assert!(code != 0 && code != 100, "the guest opened a path outside its directory: {exit:?}");
    let replica = dir.path().join("replicas/escape.0");
    assert!(replica.join("work/inside.txt").exists(), "it can write inside");
    assert!(!replica.join("outside.txt").exists(), "it cannot write outside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_held_to_its_cpu_share_and_stopped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let hash = d.store_module(&guests::spin()).unwrap();
    let mut spec = job("spin", &hash);
    spec.cpu_millis = 200;
    spec.timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    d.start(&spec).await.unwrap();
    // Meanwhile another guest runs to completion: the spinner does not hold the node.
    let other = deploy(&d, "bystander", &guests::hello(0)).await;
    assert!(wait(&d, &other.id).await.success());
    let exit = wait(&d, &spec.id).await;
    let wall = started.elapsed();
    assert_eq!(exit.reason, ExitReason::Timeout, "{exit:?}");
    assert!(wall < Duration::from_secs(4), "stopped {wall:?} after start, limit 2 s");
    let cpu = Duration::from_nanos(d.stats(&spec.id).await.unwrap().cpu_nanos);
    // 200 millicores for 2 s is 0.4 s of CPU; allow for tick granularity.
    assert!(cpu > Duration::from_millis(200) && cpu < Duration::from_millis(700), "used {cpu:?}");
}

/// CPU time this process has used, every thread together (from /proc, in nanoseconds).
fn process_cpu() -> Duration {
    let mut nanos = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            nanos += s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Duration::from_nanos(nanos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_in_host_calls_counts_in_the_cpu_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let hash = d.store_module(&guests::host_spin()).unwrap();
    let mut spec = job("host-spin", &hash);
    spec.cpu_millis = 100;
    spec.timeout = Some(Duration::from_secs(3));
    d.start(&spec).await.unwrap();
    let before = process_cpu();
    let exit = wait(&d, &spec.id).await;
    let used = process_cpu().saturating_sub(before);
    assert_eq!(exit.reason, ExitReason::Timeout, "{exit:?}");
    let counted = Duration::from_nanos(d.stats(&spec.id).await.unwrap().cpu_nanos);
    eprintln!(
        "host-call spinner at 100m for 3 s: the process used {used:?}, the guest {counted:?}"
    );
    // 100 millicores for 3 s is 0.3 s. A meter that counted only WebAssembly let this guest
    // take a whole core (about 3 s): nearly all its time is in `random_get`.
    assert!(used < Duration::from_millis(1200), "the process used {used:?}");
    assert!(counted > Duration::from_millis(100), "the guest barely ran: {counted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_filling_the_disk_is_stopped_at_its_limit_and_its_files_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let hash = d.store_module(&guests::disk_fill()).unwrap();
    let mut spec = job("fill", &hash);
    spec.disk_mib = 4;
    spec.cpu_millis = 250;
    d.start(&spec).await.unwrap();
    let exit = wait(&d, &spec.id).await;
    let ExitReason::OutOfDisk { used_mib, limit_mib } = exit.reason else {
        panic!("{exit:?}");
    };
    eprintln!("disk fill at 250m, limit 4 MiB: stopped at {used_mib} MiB");
    assert_eq!(limit_mib, 4);
    // Measured again as the files near the limit: what is written past it is at most what a
    // whole core writes into the page cache before its first CPU tick and one measure (10 +
    // 10 ms). This machine writes 60 KB chunks at 1–1.5 GB/s: 4 to 26 MiB past the limit in
    // runs of the code before and after the epoch ticker learned to rest (the bound was 16
    // MiB and failed about one run in four). A host-side count of bytes written would bound
    // it exactly; until then the bound is a time.
    assert!(used_mib <= 4 + 48, "it wrote {used_mib} MiB");
    assert!(exit.describe().starts_with("out of disk"), "{}", exit.describe());
    let work = dir.path().join("replicas/fill.0/work");
    let left = std::fs::read_dir(&work).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0, "its files were not removed");

    // A limit above the node's largest is refused up front; no limit gets the default.
    let mut big = job("big-disk", &hash);
    big.disk_mib = 4096;
    assert!(d.start(&big).await.unwrap_err().to_string().contains("disk limit"));
    let mut scratch = job("scratch", &hash);
    scratch.cpu_millis = 1000;
    d.start(&scratch).await.unwrap();
    let exit = wait(&d, &scratch.id).await;
    match exit.reason {
        ExitReason::OutOfDisk { limit_mib, .. } => {
            assert_eq!(limit_mib, cloudless_runtime::spec::DEFAULT_DISK_MIB)
        }
        r => panic!("{r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_stopped_at_its_limit_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let spec = deploy(&d, "bomb", &guests::memory_bomb()).await;
    let exit = wait(&d, &spec.id).await;
    assert_eq!(exit.reason, ExitReason::OutOfMemory, "{exit:?}");
    let used = d.stats(&spec.id).await.unwrap().memory_bytes;
    assert!(used <= 16 << 20, "it held {used} bytes, limit 16 MiB");
    // A limit above the node's largest is refused up front.
    let mut big = spec.clone();
    big.id = ReplicaId::new(&cloudless_types::WorkloadName::new("big").unwrap(), 0);
    big.memory_mib = 4096;
    assert!(d.start(&big).await.unwrap_err().to_string().contains("above this node's"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_stop_and_bad_modules_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let spec = deploy(&d, "crash", &guests::crash()).await;
    assert!(matches!(wait(&d, &spec.id).await.reason, ExitReason::Trap(_)));

    let spinner = deploy(&d, "spinner", &guests::spin()).await;
    d.stop(&spinner.id, Duration::from_secs(1)).await.unwrap();
    assert!(d.status(&spinner.id).await.unwrap().is_none(), "removed");
    assert!(!dir.path().join("replicas/spinner.0").exists());

    let missing = job("missing", &cloudless_types::ModuleHash::new("0".repeat(64)).unwrap());
    let err = d.start(&missing).await.unwrap_err().to_string();
    assert!(err.contains("not available"), "{err}");
    let junk = d.store_module(b"\0asm\x01\0\0\0garbage").unwrap();
    let err = d.start(&job("junk", &junk)).await.unwrap_err().to_string();
    assert!(err.contains("not a valid module"), "{err}");
    let mut net = job("net", &junk);
    net.network = true;
    let err = d.start(&net).await.unwrap_err().to_string();
    assert!(err.contains("network"), "{err}");
    let mut container = job("box", &junk);
    container.image = Image::Container("busybox".into());
    assert!(d.start(&container).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview2_components_run_as_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(&dir);
    let spec = deploy(&d, "component", &guests::component(&guests::hello(0))).await;
    let exit = wait(&d, &spec.id).await;
    assert!(exit.success(), "{exit:?}");
    let text: Vec<String> =
        d.logs(&spec.id, 10).await.unwrap().into_iter().map(|l| l.text).collect();
    assert_eq!(text, ["hello from wasi", "a warning"]);
    // WASI 0.2 carries only success or failure: a non-zero exit is code 1.
    let failing = deploy(&d, "component-fails", &guests::component(&guests::hello(3))).await;
    let exit = wait(&d, &failing.id).await;
    assert_eq!((exit.code, exit.reason), (Some(1), ExitReason::Exited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_modules_are_cached_on_disk_across_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let module = guests::hello(0);
    let first = driver(&dir);
    let hash = first.store_module(&module).unwrap();
    first.compile(&hash).unwrap();
    drop(first);
    let cache = dir.path().join("cache");
    let artifacts = compiled(&cache);
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let second = driver(&dir);
    second.compile(&hash).unwrap();
    // The same artifact, untouched: the second engine loaded it instead of compiling.
    assert_eq!(compiled(&cache), artifacts);
}

/// Compiled artifacts in wasmtime's cache (not its usage statistics or work files), with
/// their modification times.
fn compiled(dir: &std::path::Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            found.extend(compiled(&path));
        } else if !path.file_name().unwrap().to_string_lossy().contains('.') {
            found.push((path.clone(), e.metadata().unwrap().modified().unwrap()));
        }
    }
    found
}
