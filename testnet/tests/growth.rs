//! A pool grown one `cloudless join` at a time to 20 real processes: every join completes,
//! which means every node that runs lists the newcomer alive (pools of 12 and 30 used to
//! stop growing at their 7th or 9th node, which enrolled and then stayed out of the
//! membership). How long each step took is printed (`-- --nocapture`); the timing targets
//! are the report's (`cloudless-testnet report`, `docs/node.md`), not asserted here.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use cloudless_testnet::joins::JoinTimes;
use cloudless_testnet::procs::Procs;
use cloudless_testnet::report::percentile;

/// Processes the pool grows to.
const NODES: usize = 20;

#[test]
fn a_pool_grows_to_twenty_processes_and_every_join_completes() {
    // CLOUDLESS_REPORT_DIR keeps the nodes' data dirs and logs for a look afterwards.
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var_os("CLOUDLESS_REPORT_DIR")
        .map_or_else(|| dir.path().to_path_buf(), std::path::PathBuf::from);
    std::fs::create_dir_all(&path).unwrap();
    let mut p = Procs::init(&path, &[]).unwrap();
    let mut joins: Vec<JoinTimes> = Vec::new();
    for _ in 1..NODES {
        let (i, t) = p.join_timed().unwrap();
        eprintln!(
            "join of node {i:>2}: enrolled {:>6.0} ms, let in {:>6.0} ms, joined {:>6.0} ms, \
             capacity at node 0 {:>6.0} ms, alive everywhere {:>6.0} ms (last: node {})",
            ms(t.enrolled),
            ms(t.admitted),
            ms(t.joined),
            ms(t.capacity),
            ms(t.alive_everywhere),
            t.last
        );
        joins.push(t);
    }
    let running = (0..NODES).filter(|i| p.nodes[*i].running()).count();
    assert_eq!(running, NODES, "a node exited while the pool grew");
    for (what, step) in [
        ("enrolled", (|t: &JoinTimes| t.enrolled) as fn(&JoinTimes) -> Duration),
        ("let in", |t| t.admitted),
        ("joined", |t| t.joined),
        ("capacity at node 0", |t| t.capacity),
        ("alive everywhere", |t| t.alive_everywhere),
    ] {
        let mut v: Vec<Duration> = joins.iter().map(step).collect();
        v.sort();
        eprintln!(
            "{what}: P50 {:.0} ms, P95 {:.0} ms, max {:.0} ms ({} joins, debug build)",
            ms(percentile(&v, 50.0)),
            ms(percentile(&v, 95.0)),
            ms(v.last().copied().unwrap_or_default()),
            v.len()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
