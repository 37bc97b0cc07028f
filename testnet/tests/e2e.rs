//! End to end, through the real binaries: `cloudless` processes on loopback, driven by
//! `cloudlessctl`. Needs both binaries built (`cargo test --workspace` builds them; alone:
//! `cargo build --bins` first).
//!
//! 1. init + joins with invites; `node list` shows every node alive
//! 2. a WASI workload with 3 replicas applied through a node that is not the leader runs,
//!    and each replica's output is readable through the CLI
//! 3. SIGKILL of a node running a replica: the replica runs elsewhere (time printed); the
//!    node restarts from its data dir, rejoins, and runs nothing of what moved
//! 4. SIGKILL of the raft leader: a new leader, the workload keeps its replicas, a new apply
//!    succeeds
//! 5. delete: every replica stops everywhere
//! 6. a bad spec, an expired invite, a reused invite, an unknown key and an unenrolled peer
//!    are refused with clear messages, and the cluster is unchanged
//! 7. a container workload (busybox, locally imported) runs on a node with an engine

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::Path;
use std::time::{Duration, Instant};

use cloudless_testnet::procs::{Procs, until};
use serde_json::Value;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello/hello.yaml");
const MODULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello/hello.wat");
/// Generous for a debug build on two cores; the figures themselves come from the report.
const DEADLINE: Duration = Duration::from_secs(45);

fn replicas(c: &Procs, name: &str) -> Vec<Value> {
    c.json(&["workload", "get", name])
        .map_or_else(|_| Vec::new(), |w| w["replicas"].as_array().cloned().unwrap_or_default())
}

fn running_on(c: &Procs, name: &str) -> Option<Vec<String>> {
    let r = replicas(c, name);
    let all = !r.is_empty() && r.iter().all(|r| r["phase"] == "running");
    all.then(|| r.iter().map(|r| r["node"].as_str().unwrap_or_default().to_string()).collect())
}

fn leader(c: &Procs) -> Option<String> {
    c.json(&["cluster", "status"]).ok()?["leader"].as_str().map(str::to_string)
}

fn write_spec(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// A workload of `replicas` replicas of the example module, written under `dir`.
fn hello_spec(dir: &Path, name: &str, replicas: u32) -> String {
    write_spec(
        dir,
        name,
        &format!(
            "name: {name}\nruntime: {{ wasi: {{ module: {MODULE} }} }}\nresources: {{ requests: {{ cpu: 100m, memory: 16Mi }} }}\nreplicas: {replicas}\n"
        ),
    )
}

#[test]
fn a_pool_of_processes_from_init_to_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Procs::init(dir.path(), &[]).unwrap();

    // 1. Init and joins: five nodes, so that two crashes still leave a raft majority.
    let first_invite = c.invite(&[]).unwrap();
    c.join_with(&first_invite).unwrap();
    for _ in 0..3 {
        c.join().unwrap();
    }
    let nodes = c.json(&["node", "list"]).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 5, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["state"] == "alive" && n["schedulable"] == "schedulable"));
    let listed = c.ctl(&["node", "list"]);
    assert_eq!(listed.stdout.lines().filter(|l| l.contains(" alive ")).count(), 5);
    for i in 0..5 {
        until("every node is ready", DEADLINE, || {
            c.get(i, "/ready").filter(|(code, _)| *code == 200)
        })
        .unwrap_or_else(|e| panic!("node {i}: {e}: {:?}\n{}", c.get(i, "/ready"), c.tail(i, 40)));
    }

    // 6. Refusals, with the cluster unchanged afterwards.
    let before = (c.json(&["node", "list"]).unwrap(), c.json(&["workload", "list"]).unwrap());
    let bad = write_spec(
        dir.path(),
        "bad",
        "name: bad\nruntime: { wasi: { module: x.wasm } }\nresources: { requests: { cpu: 100m, memory: 16Mi } }\nreplcas: 2\n",
    );
    let out = c.ctl(&["workload", "apply", "-f", &bad]);
    assert!(!out.ok && out.stderr.contains("replcas"), "bad spec: {out:?}");
    assert_eq!(out.code, Some(3), "invalid input exits 3: {out:?}");
    let negative = write_spec(
        dir.path(),
        "negative",
        "name: neg\nruntime: { wasi: { module: x.wasm } }\nresources: { requests: { cpu: -5, memory: 16Mi } }\n",
    );
    let out = c.ctl(&["workload", "apply", "-f", &negative]);
    assert!(!out.ok && out.stderr.contains("resources.requests.cpu"), "bad value: {out:?}");
    let expired = c.invite(&["--ttl", "0"]).unwrap();
    std::thread::sleep(Duration::from_millis(5)); // the invite's expiry is in milliseconds
    let out = c.cloudless(&["join", &expired], &dir.path().join("expired"));
    assert!(!out.ok && out.stderr.contains("expired"), "expired invite: {out:?}");
    let out = c.cloudless(&["join", &first_invite], &dir.path().join("reused"));
    assert!(!out.ok && out.stderr.contains("used 1 time(s)"), "reused invite: {out:?}");
    let stranger = dir.path().join("stranger.key");
    let out = c.ctl(&["--key", &stranger.display().to_string(), "key", "create"]);
    assert!(out.ok, "{out:?}");
    let out = c.ctl(&["--key", &stranger.display().to_string(), "workload", "list"]);
    assert!(!out.ok && out.stderr.contains("is not known to this cluster"), "unknown key: {out:?}");
    assert_eq!(out.code, Some(4), "unauthorized exits 4: {out:?}");
    let stranger_key = c.ctl(&["--key", &stranger.display().to_string(), "key", "show"]);
    let out = c.ctl(&[
        "--key",
        &stranger.display().to_string(),
        "user",
        "add",
        stranger_key.stdout.trim(),
        "--role",
        "admin",
        "--name",
        "mallory",
    ]);
    assert!(!out.ok && out.stderr.contains("is not known"), "unknown key, command: {out:?}");
    assert_eq!(out.code, Some(4), "{out:?}");
    // A viewer may read but not change anything; what does not exist is not found.
    let viewer = dir.path().join("viewer.key");
    let viewer_flag = viewer.display().to_string();
    let created = c.ctl(&["--key", &viewer_flag, "key", "create"]);
    assert!(created.ok, "{created:?}");
    let added =
        c.ctl(&["user", "add", created.stdout.trim(), "--role", "viewer", "--name", "vera"]);
    assert!(added.ok, "{added:?}");
    let out = c.ctl(&["--key", &viewer_flag, "workload", "list"]);
    assert!(out.ok, "a viewer reads: {out:?}");
    let out = c.ctl(&["--key", &viewer_flag, "workload", "delete", "hello"]);
    assert!(!out.ok && out.stderr.contains("has role viewer"), "viewer writes: {out:?}");
    assert_eq!(out.code, Some(5), "forbidden exits 5: {out:?}");
    let out = c.ctl(&["workload", "get", "nothing-here"]);
    assert!(!out.ok && out.stderr.contains("no workload named nothing-here"), "{out:?}");
    assert_eq!(out.code, Some(6), "not found exits 6: {out:?}");
    let out = c.ctl(&["workload", "scale", "Not_A_Name", "2"]);
    assert_eq!(out.code, Some(3), "a bad name is invalid input: {out:?}");
    let intruder = c.run_unenrolled().unwrap();
    let ready = until("the unenrolled node answers /ready", DEADLINE, || c.get(intruder, "/ready"))
        .unwrap();
    assert_eq!(ready.0, 503, "an unenrolled node is not ready: {ready:?}");
    assert!(ready.1.contains("not enrolled"), "{ready:?}");
    // Give it time to try the membership and the api: nothing it can do lands.
    until("the intruder has knocked", DEADLINE, || {
        let log = std::fs::read_to_string(c.log(intruder)).unwrap_or_default();
        log.contains("is not an enrolled node").then_some(())
    })
    .unwrap();
    let after = (c.json(&["node", "list"]).unwrap(), c.json(&["workload", "list"]).unwrap());
    let peers = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|n| n["peer"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(peers(&before.0), peers(&after.0), "no node was added");
    assert_eq!(before.1, after.1, "no workload was written");
    c.kill(intruder);

    // 2. Apply through a node that is not the leader.
    let boss = until("a leader is known", DEADLINE, || leader(&c)).unwrap();
    let via = (0..5).find(|i| c.nodes[*i].peer != boss).unwrap();
    let out = c.ctl_via(via, &["workload", "apply", "-f", HELLO]);
    assert!(out.ok, "apply: {out:?}");
    let hosts = until("three replicas run", DEADLINE, || running_on(&c, "hello")).unwrap();
    assert_eq!(hosts.len(), 3);
    for i in 0..3 {
        until("the replica's output is readable", DEADLINE, || {
            let out = c.ctl(&["workload", "logs", "hello", "--replica", &i.to_string()]);
            out.stdout.contains("hello from a Cloudless replica").then_some(())
        })
        .unwrap();
    }
    // The leader's metrics show the placements; every node exports libp2p's too.
    let leader_index = c.index(&boss).unwrap();
    let (code, metrics) = c.get(leader_index, "/metrics").unwrap();
    assert_eq!(code, 200);
    for series in [
        "cloudless_scheduler_decisions_total{outcome=\"placed\"}",
        "cloudless_workload_placement_latency_seconds_count",
        "cloudless_node_cpu_utilization",
        "cloudless_membership_members{state=\"alive\"}",
        "cloudless_raft_is_leader 1",
        "libp2p_",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics:\n{metrics}");
    }
    let out = c.ctl(&["workload", "explain", "hello"]);
    assert!(
        out.ok && out.stdout.contains("hello.0 on ") && out.stdout.contains("locality"),
        "{out:?}"
    );

    // 3. SIGKILL a node (not the leader) running a replica.
    let (replica, victim) = hosts
        .iter()
        .enumerate()
        .find(|(_, h)| **h != boss)
        .map(|(r, h)| (r, c.index(h).unwrap()))
        .unwrap();
    let killed = Instant::now();
    c.kill(victim);
    let dead = c.nodes[victim].peer.clone();
    until("the replica runs elsewhere", DEADLINE, || {
        let r = replicas(&c, "hello");
        let r = r.get(replica)?;
        (r["phase"] == "running" && r["node"] != dead.as_str()).then_some(())
    })
    .unwrap();
    eprintln!("SIGKILL → replica {replica} running elsewhere: {:?}", killed.elapsed());
    // The node comes back from its data dir: enrolled still, its old replica not its own
    // (even when it was a raft voter that the group replaced while it was down).
    c.restart(victim).unwrap();
    until("the returned node is ready", DEADLINE, || {
        c.get(victim, "/ready").filter(|(code, _)| *code == 200)
    })
    .unwrap_or_else(|e| {
        panic!("{e}: /ready {:?}\n{}", c.get(victim, "/ready"), c.tail(victim, 40))
    });
    until("moved replicas stay moved and the returned node runs none", DEADLINE, || {
        let hosts = running_on(&c, "hello")?;
        let none = c.metric(victim, "cloudless_replicas{phase=\"running\"}") == Some(0.0);
        (none && !hosts.contains(&dead)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", replicas(&c, "hello")));

    // 4. SIGKILL the leader once the group is whole again (three live voters).
    until("three live voters", DEADLINE, || {
        let s = c.json(&["cluster", "status"]).ok()?;
        let voters: Vec<String> =
            s["voters"].as_array()?.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
        let live =
            voters.iter().filter(|v| c.index(v).is_some_and(|i| c.nodes[i].running())).count();
        (voters.len() == 3 && live == 3).then_some(())
    })
    .unwrap();
    let old = leader(&c).unwrap();
    c.kill(c.index(&old).unwrap());
    let new =
        until("a new leader", DEADLINE, || leader(&c).filter(|l| *l != old)).unwrap_or_else(|e| {
            // What each live node says, and the ends of their logs: a leaderless group is a
            // bug to find, not a slow machine to wait out.
            let live: Vec<usize> = (0..c.nodes.len()).filter(|i| c.nodes[*i].running()).collect();
            let mut why = format!("{e} (old leader {old})\n");
            for i in live {
                let status = c.ctl_via(i, &["-o", "json", "cluster", "status"]);
                why.push_str(&format!(
                    "--- node {i} ({}): {}{}\n{}\n",
                    c.nodes[i].peer,
                    status.stdout,
                    status.stderr,
                    c.tail(i, 30)
                ));
            }
            panic!("{why}")
        });
    assert_ne!(new, old);
    until("the workload keeps three running replicas", DEADLINE, || {
        let hosts = running_on(&c, "hello")?;
        hosts.iter().all(|h| c.index(h).is_some_and(|i| c.nodes[i].running())).then_some(())
    })
    .unwrap();
    let second = hello_spec(dir.path(), "again", 2);
    let out = c.ctl(&["workload", "apply", "-f", &second]);
    assert!(out.ok, "apply after the leader died: {out:?}");
    until("the new workload runs", DEADLINE, || running_on(&c, "again")).unwrap();

    // 5. Delete: every replica stops on every live node.
    for name in ["hello", "again"] {
        let out = c.ctl(&["workload", "delete", name]);
        assert!(out.ok, "{out:?}");
    }
    let live: Vec<usize> = (0..c.nodes.len()).filter(|i| c.nodes[*i].running()).collect();
    until("no replica runs anywhere", DEADLINE, || {
        live.iter()
            .all(|i| c.metric(*i, "cloudless_replicas{phase=\"running\"}") == Some(0.0))
            .then_some(())
    })
    .unwrap();
    let list = c.json(&["workload", "list"]).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}

#[test]
fn a_container_workload_runs_on_a_node_with_an_engine() {
    if std::env::var("CLOUDLESS_SKIP_CONTAINER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: no container engine (CLOUDLESS_SKIP_CONTAINER_TESTS=1)");
        return;
    }
    let engine =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let dir = tempfile::tempdir().unwrap();
    let c = Procs::init(dir.path(), &["--container-engine", &engine]).unwrap();
    let engine = Containers { host: engine, prefix: format!("cloudless-{}-", c.nodes[0].peer) };
    let spec = write_spec(
        dir.path(),
        "box",
        "name: box\nruntime: { container: { image: \"cloudless/busybox:test\" } }\ncommand: [sh, -c, \"echo hello from a container; sleep 600\"]\nresources: { requests: { cpu: 100m, memory: 32Mi } }\n",
    );
    let out = c.ctl(&["workload", "apply", "-f", &spec]);
    assert!(out.ok, "{out:?}");
    until("the container runs", DEADLINE, || running_on(&c, "box")).unwrap();
    until("its output is readable", DEADLINE, || {
        let out = c.ctl(&["workload", "logs", "box"]);
        out.stdout.contains("hello from a container").then_some(())
    })
    .unwrap();
    let out = c.ctl(&["workload", "delete", "box"]);
    assert!(out.ok, "{out:?}");
    until("the container stops", DEADLINE, || {
        (c.metric(0, "cloudless_replicas{phase=\"running\"}") == Some(0.0)).then_some(())
    })
    .unwrap();
    // Deleting a workload removes its containers, not only stops them.
    until("the node removes the container", DEADLINE, || {
        engine.containers().is_empty().then_some(())
    })
    .unwrap();
}

#[test]
fn a_node_runs_no_more_replicas_than_it_offers() {
    let dir = tempfile::tempdir().unwrap();
    let c = Procs::init(dir.path(), &["--max-replicas", "2"]).unwrap();
    let spec = hello_spec(dir.path(), "three", 3);
    let out = c.ctl(&["workload", "apply", "-f", &spec]);
    assert!(out.ok, "{out:?}");
    // Two run; the third waits, and says why (it used to be placed and crash-loop when the
    // runtime's instance pool was full, with an empty reason).
    let why = until("two run and the third waits for a slot", DEADLINE, || {
        let w = c.json(&["workload", "get", "three"]).ok()?;
        let running = w["replicas"].as_array()?.iter().filter(|r| r["phase"] == "running").count();
        let why = w["unschedulable"].as_str()?.to_owned();
        (running == 2).then_some(why)
    })
    .unwrap();
    assert!(why.contains("1 is at its replica limit"), "{why}");
    let nodes = c.json(&["node", "list"]).unwrap();
    assert_eq!(nodes[0]["max_replicas"], 2, "{nodes}");
    assert!(c.ctl(&["node", "list"]).stdout.contains(" 2/2"), "the list shows the limit");
}

/// The engine's containers of one node (named `cloudless-<peer>-<replica>`); whatever a
/// test leaves behind (a panic, a killed node) is removed when this is dropped.
struct Containers {
    host: String,
    prefix: String,
}

impl Containers {
    fn docker(&self, args: &[&str]) -> String {
        let out =
            std::process::Command::new("docker").arg("-H").arg(&self.host).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    /// The ids of the node's containers, running or not.
    fn containers(&self) -> Vec<String> {
        let filter = format!("name=^{}", self.prefix);
        self.docker(&["ps", "-aq", "--filter", &filter])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = self.containers();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            self.docker(&args);
        }
    }
}

/// Copies directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A data dir restored from a backup is older than the node's last run: with it, a voter
/// could vote twice in one election. The pool holds an entry the node signed later than
/// anything the backup kept, so the node finds out, stops, and says how to rejoin; the
/// operator can say the restore was on purpose.
#[test]
fn a_stale_restored_data_dir_is_refused_and_says_how_to_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Procs::init(dir.path(), &[]).unwrap();
    c.join().unwrap();
    let i = c.join().unwrap();
    let data = c.nodes[i].data_dir.clone();
    c.stop(i);
    let backup = dir.path().join("backup");
    copy_dir(&data, &backup);
    // It runs again (on new ports: a later directory entry, kept in its data dir) and stops.
    c.restart(i).unwrap();
    c.stop(i);
    // The backup comes back.
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&backup, &data);
    c.run_detached(i, &[]).unwrap();
    until("the restored node stops", DEADLINE, || c.exited(i).then_some(())).unwrap();
    let log = c.tail(i, 5);
    eprintln!("restored data dir: {}", log.lines().last().unwrap_or_default());
    assert!(log.contains("older than this node's last run"), "{log}");
    assert!(log.contains("join again") && log.contains("cloudless run --restored"), "{log}");
    // Restored on purpose: it runs, and the pool lists it alive.
    c.restart_with(i, &["--restored"]).unwrap();
}

/// A data dir copied elsewhere would be a second node with the first one's identity: it is
/// refused with what to do instead, while the original starts again where it was; the data
/// dir and its key are the owner's alone.
#[test]
fn a_copied_data_dir_is_refused_and_the_original_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Procs::init(dir.path(), &[]).unwrap();
    let data = c.nodes[0].data_dir.clone();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700, "the data dir is private");
        assert_eq!(mode(&data.join("identity.key")), 0o600, "the key is private");
    }
    c.kill(0);
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    let out = c.cloudless(&["run"], &copy);
    assert!(!out.ok, "the copy ran: {out:?}");
    assert!(out.stderr.contains("last ran at") && out.stderr.contains("--moved"), "{out:?}");
    c.restart(0).unwrap();
}
