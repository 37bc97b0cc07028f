//! Start-up cost of replicas, with percentiles (criterion reports means; the targets are
//! percentiles).
//!
//!   cargo bench -p cloudless-runtime --bench start
//!
//! - WASI cold start with a cached compile, to the guest's first instruction: instantiate a
//!   small module in a fresh store and run its `_start` (which returns at once). Target P50
//!   ≤ 100 µs.
//! - WASI replica start: `Driver::start` to the exit being reported, with the replica's
//!   directory, log and task.
//! - Container create-to-running on the local engine, when `DOCKER_HOST` names one
//!   (`eval "$(.ci/engine)"`).
//!
//! `ROUNDS` sets the samples (default 2,000 for WASI, 30 for containers).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use cloudless_runtime::container::{ContainerConfig, ContainerDriver};
use cloudless_runtime::wasi::{WasiConfig, WasiDriver};
use cloudless_runtime::{Driver, ReplicaSpec, RunState};
use cloudless_types::{Image, Kind, Resources, Restart, WorkloadSpec};

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    let n = samples.len();
    println!(
        "{what}: P50 {:?}  P99 {:?}  max {:?}  ({n} samples)",
        pct(&mut samples, 0.5),
        pct(&mut samples, 0.99),
        pct(&mut samples, 1.0)
    );
}

fn spec(name: &str, image: Image) -> ReplicaSpec {
    let mut w = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        image,
        Resources { cpu_millis: 1000, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    w.kind = Kind::Job;
    w.restart = Restart::Never;
    w.command = vec!["true".into()];
    ReplicaSpec::from_workload(&w, 0)
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let wasi = WasiDriver::new(WasiConfig::new(dir.path())).unwrap();
        // A small command module: a page of memory, WASI imports, an empty `_start`.
        let module = wat::parse_str(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                 (memory (export "memory") 1)
                 (func (export "_start")))"#,
        )
        .unwrap();
        let hash = wasi.store_module(&module).unwrap();
        wasi.compile(&hash).unwrap();
        for _ in 0..100 {
            wasi.run_bare(&hash).await.unwrap();
        }
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let exit = wasi.run_bare(&hash).await.unwrap();
            samples.push(t.elapsed());
            assert!(exit.success());
        }
        report("wasi cold start (cached compile) to first instruction", samples);

        let mut samples = Vec::new();
        let s = spec("bench", Image::Wasi(hash.clone()));
        for _ in 0..rounds.min(500) {
            let t = Instant::now();
            wasi.start(&s).await.unwrap();
            let exit = wasi.wait(&s.id).await.unwrap();
            samples.push(t.elapsed());
            assert!(exit.success());
            wasi.stop(&s.id, Duration::ZERO).await.unwrap();
        }
        report("wasi replica start to exit reported (Driver::start + wait)", samples);

        if std::env::var("DOCKER_HOST").is_err() {
            println!("container create-to-running: skipped (no DOCKER_HOST; eval \"$(.ci/engine)\")");
            return;
        }
        let config = ContainerConfig { scope: "bench".into(), ..ContainerConfig::default() };
        let docker = ContainerDriver::connect(config).await.unwrap();
        let image = std::env::var("CLOUDLESS_TEST_IMAGE")
            .unwrap_or_else(|_| "cloudless/busybox:test".into());
        let mut s = spec("bench", Image::Container(image));
        s.command = vec!["sleep".into(), "60".into()];
        let rounds: usize =
            std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(30).min(200);
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            docker.start(&s).await.unwrap();
            let running = matches!(
                docker.status(&s.id).await.unwrap().map(|o| o.state),
                Some(RunState::Running { .. })
            );
            samples.push(t.elapsed());
            assert!(running);
            docker.stop(&s.id, Duration::ZERO).await.unwrap();
        }
        report("container create-to-running (local engine)", samples);
    });
}
