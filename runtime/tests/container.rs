//! The container driver against a real Docker Engine API (`.ci/engine` starts one and imports
//! the busybox test image). Set CLOUDLESS_SKIP_CONTAINER_TESTS=1 to skip these where no
//! engine can run.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cloudless_runtime::container::{ContainerConfig, ContainerDriver};
use cloudless_runtime::driver::Stream;
use cloudless_runtime::{Driver, DriverError, ExitReason, ReplicaSpec, RunState};
use cloudless_types::{Image, Kind, Resources, Restart, WorkloadSpec};

fn image() -> String {
    std::env::var("CLOUDLESS_TEST_IMAGE").unwrap_or_else(|_| "cloudless/busybox:test".into())
}

/// A driver with a scope of its own, or `None` when the tests are explicitly skipped.
async fn engine(scope: &str) -> Option<ContainerDriver> {
    if std::env::var("CLOUDLESS_SKIP_CONTAINER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("container tests skipped (CLOUDLESS_SKIP_CONTAINER_TESTS=1)");
        return None;
    }
    let scope = format!("{scope}-{}", std::process::id());
    let config = ContainerConfig { scope, allow_network: true, ..ContainerConfig::default() };
    match ContainerDriver::connect(config).await {
        Ok(d) => Some(d),
        Err(e) => panic!(
            "{e}\nthe container tests need an engine: run `eval \"$(.ci/engine)\"` first (or set \
             CLOUDLESS_SKIP_CONTAINER_TESTS=1 to skip them)"
        ),
    }
}

fn spec(name: &str, script: &str) -> ReplicaSpec {
    let mut w = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        Image::Container(image()),
        Resources { cpu_millis: 500, memory_mib: 32, disk_mib: 0, gpus: 0 },
        1,
    );
    w.kind = Kind::Job;
    w.restart = Restart::Never;
    w.command = vec!["sh".into(), "-c".into(), script.into()];
    ReplicaSpec::from_workload(&w, 0)
}

async fn wait(d: &ContainerDriver, s: &ReplicaSpec) -> cloudless_runtime::Exit {
    tokio::time::timeout(Duration::from_secs(60), d.wait(&s.id)).await.expect("it ends").unwrap()
}

async fn clean(d: &ContainerDriver) {
    for o in d.list().await.unwrap() {
        d.stop(&o.id, Duration::ZERO).await.unwrap();
    }
}

#[tokio::test]
async fn busybox_output_and_exit_code() {
    let Some(d) = engine("echo").await else { return };
    let s = spec("echo", "echo hello; echo oops >&2; exit 3");
    d.start(&s).await.unwrap();
    let exit = wait(&d, &s).await;
    assert_eq!((exit.code, &exit.reason), (Some(3), &ExitReason::Exited), "{exit:?}");
    let logs = d.logs(&s.id, 10).await.unwrap();
    let mut lines: Vec<(Stream, String)> = logs.into_iter().map(|l| (l.stream, l.text)).collect();
    lines.sort_by_key(|(s, _)| *s == Stream::Stderr);
    assert_eq!(lines, [(Stream::Stdout, "hello".into()), (Stream::Stderr, "oops".into())]);
    clean(&d).await;
}

#[tokio::test]
async fn the_disk_limit_holds_on_tmp_and_on_a_writable_root() {
    let Some(d) = engine("disk").await else { return };
    // Read-only root: /tmp is a tmpfs of the replica's disk limit.
    let mut s = spec("disk-tmp", "dd if=/dev/zero of=/tmp/fill bs=1M count=20 2>&1; exit 7");
    s.disk_mib = 4;
    d.start(&s).await.unwrap();
    let exit = wait(&d, &s).await;
    assert_eq!(exit.code, Some(7), "{exit:?}");
    let logs: Vec<String> = d.logs(&s.id, 10).await.unwrap().into_iter().map(|l| l.text).collect();
    assert!(logs.iter().any(|l| l.contains("No space left")), "{logs:?}");
    clean(&d).await;

    // A path the image declares as a volume: a tmpfs of the limit, not an anonymous volume
    // on the engine's disk.
    let volume_image = std::env::var("CLOUDLESS_TEST_VOLUME_IMAGE")
        .unwrap_or_else(|_| "cloudless/busybox-vol:test".into());
    let mut s = spec("disk-vol", "dd if=/dev/zero of=/data/fill bs=1M count=20 2>&1; exit 7");
    s.image = Image::Container(volume_image);
    s.disk_mib = 4;
    d.start(&s).await.unwrap();
    let exit = wait(&d, &s).await;
    assert_eq!(exit.code, Some(7), "{exit:?}");
    let logs: Vec<String> = d.logs(&s.id, 10).await.unwrap().into_iter().map(|l| l.text).collect();
    assert!(
        logs.iter().any(|l| l.contains("No space left")),
        "the volume was not bounded: {logs:?}"
    );
    clean(&d).await;

    // A writable root (the operator's choice): measured, and stopped past the limit; a
    // limit above what the node offers is refused up front.
    let config = ContainerConfig {
        scope: format!("disk-rw-{}", std::process::id()),
        writable_rootfs: true,
        max_disk_mib: Some(64),
        ..ContainerConfig::default()
    };
    let rw = ContainerDriver::connect(config).await.unwrap();
    let mut big = spec("disk-big", "true");
    big.disk_mib = 65;
    let err = rw.start(&big).await.unwrap_err().to_string();
    assert!(err.contains("above this node's 64 MiB"), "{err}");
    let mut s = spec("disk-rw", "dd if=/dev/zero of=/fill bs=1M count=20; sleep 60");
    s.disk_mib = 4;
    rw.start(&s).await.unwrap();
    let exit = wait(&rw, &s).await;
    match exit.reason {
        ExitReason::OutOfDisk { used_mib, limit_mib } => {
            assert_eq!(limit_mib, 4);
            assert!(used_mib >= 4, "{exit:?}");
        }
        r => panic!("{r:?}"),
    }
    clean(&rw).await;
}

#[tokio::test]
async fn the_memory_limit_is_enforced_and_reported_as_oom() {
    let Some(d) = engine("oom").await else { return };
    // dd allocates its whole block: 100 MiB against a 32 MiB limit.
    let s = spec("oom", "dd if=/dev/zero of=/dev/null bs=100M count=1");
    d.start(&s).await.unwrap();
    let exit = wait(&d, &s).await;
    assert_eq!(exit.reason, ExitReason::OutOfMemory, "{exit:?}");
    assert_eq!(exit.code, Some(137));
    clean(&d).await;
}

#[tokio::test]
async fn stop_removes_and_the_deadline_is_enforced() {
    let Some(d) = engine("stop").await else { return };
    let long = spec("sleeper", "sleep 600");
    d.start(&long).await.unwrap();
    assert!(matches!(d.status(&long.id).await.unwrap().unwrap().state, RunState::Running { .. }));
    let stats = d.stats(&long.id).await.unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    d.stop(&long.id, Duration::from_secs(1)).await.unwrap();
    assert!(d.status(&long.id).await.unwrap().is_none(), "stopped and removed");
    d.stop(&long.id, Duration::from_secs(1)).await.unwrap();

    let mut timed = spec("timed", "sleep 600");
    timed.timeout = Some(Duration::from_secs(1));
    d.start(&timed).await.unwrap();
    let exit = wait(&d, &timed).await;
    assert_eq!(exit.reason, ExitReason::Timeout, "{exit:?}");
    clean(&d).await;
}

#[tokio::test]
async fn a_restarted_node_adopts_its_containers_by_label() {
    let Some(d) = engine("adopt").await else { return };
    let s = spec("service", "sleep 600");
    d.start(&s).await.unwrap();
    let name = d.container_name(&s.id);
    // The node restarts: a new driver with the same scope.
    let again = engine("adopt").await.unwrap();
    let found = again.list().await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].id.clone(), found[0].fingerprint.clone()),
        (s.id.clone(), s.fingerprint())
    );
    let before = started_at(&name).await;
    again.start(&s).await.unwrap();
    assert_eq!(started_at(&name).await, before, "adopted, not restarted");
    // A changed spec replaces it.
    let mut changed = s.clone();
    changed.env.insert("V".into(), "2".into());
    again.start(&changed).await.unwrap();
    assert_ne!(started_at(&name).await, before);
    assert_eq!(again.status(&s.id).await.unwrap().unwrap().fingerprint, changed.fingerprint());
    // Another node's containers on the same engine are not ours.
    let other = engine("someone-else").await.unwrap();
    assert!(other.list().await.unwrap().is_empty());
    clean(&again).await;
}

async fn started_at(name: &str) -> String {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let c = docker
        .inspect_container(name, None::<bollard::query_parameters::InspectContainerOptions>)
        .await
        .unwrap();
    c.state.unwrap().started_at.unwrap()
}

#[tokio::test]
async fn sandbox_defaults_exec_and_refusals() {
    let Some(d) = engine("sandbox").await else { return };
    // Read-only root, writable /tmp, no network, no capabilities.
    let s = spec(
        "sandbox",
        "touch /tmp/ok || exit 10; touch /nope 2>/dev/null && exit 11; \
         wget -q -T 1 http://10.0.0.1/ 2>/dev/null && exit 12; exit 0",
    );
    d.start(&s).await.unwrap();
    let exit = wait(&d, &s).await;
    assert!(exit.success(), "{exit:?} {:?}", d.logs(&s.id, 10).await);

    let svc = spec("probe", "sleep 600");
    d.start(&svc).await.unwrap();
    let ok = d.exec(&svc.id, &["true".into()], Duration::from_secs(10)).await.unwrap();
    let bad = d.exec(&svc.id, &["false".into()], Duration::from_secs(10)).await.unwrap();
    assert_eq!((ok, bad), (0, 1));

    let mut missing = spec("missing", "true");
    missing.image = Image::Container("cloudless/does-not-exist:1".into());
    match d.start(&missing).await {
        Err(DriverError::MissingArtifact { artifact, reason }) => {
            assert!(artifact.contains("cloudless/does-not-exist:1"), "{artifact}: {reason}");
        }
        other => panic!("expected a missing image error, got {other:?}"),
    }
    clean(&d).await;
}

#[tokio::test]
async fn probes_reach_a_published_port_and_logs_can_be_followed() {
    use futures::StreamExt;
    let Some(d) = engine("probe-http").await else { return };
    let mut s =
        spec("web", "echo ok > /tmp/index.html; echo serving; exec httpd -f -p 8080 -h /tmp");
    s.ports = vec![cloudless_types::Port { port: 8080, udp: false }];
    d.start(&s).await.unwrap();
    let probe = cloudless_types::Probe {
        timeout_ms: 1000,
        ..cloudless_types::Probe::new(cloudless_types::ProbeCheck::Http {
            port: 8080,
            path: "/index.html".into(),
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match cloudless_runtime::probe::check(&d, &s.id, &probe).await {
            Ok(()) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "never healthy: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing = cloudless_types::Probe {
        check: cloudless_types::ProbeCheck::Http { port: 8080, path: "/nope".into() },
        ..probe.clone()
    };
    let err = cloudless_runtime::probe::check(&d, &s.id, &missing).await.unwrap_err();
    assert!(err.contains("404"), "{err}");

    let talker = spec("talker", "sleep 1; echo first; echo second; sleep 600");
    d.start(&talker).await.unwrap();
    let mut follow = d.follow(&talker.id).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(20), follow.next())
            .await
            .expect("lines arrive")
            .expect("the stream stays open");
        got.push(line.text);
    }
    assert_eq!(got, ["first", "second"]);
    clean(&d).await;
}
