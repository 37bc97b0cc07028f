//! A real openraft group in one process, over the in-memory transport with faults: failover,
//! voter replacement, partitions, restarts, snapshots, refusals and forced recovery.
//!
//! Every wait has a deadline; nothing sleeps for a fixed time to let something happen.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudless_api::{SignedRequest, UserRequest};
use cloudless_consensus::memnet::{MemNet, MemTransport};
use cloudless_consensus::state::{
    Actor, Command, CommandError, Reply, Request, Role, Settings, State,
};
use cloudless_consensus::voters::Candidate;
use cloudless_consensus::{Candidates, Config, Consensus, Consistency, Member, node_id};
use cloudless_types::{Image, NodeName, Resources, WorkloadName, WorkloadSpec, now_ms};
use ed25519_dalek::SigningKey;

/// The cluster's root public key (what users sign their requests for).
const ROOT: [u8; 32] = [9; 32];

/// The bootstrap admin's key (the public half goes to `bootstrap`).
fn admin() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

/// A command as the CLI sends it: signed by `user`, with the signature travelling along so
/// that a follower may forward it (a member never speaks for a user without one).
fn signed(user: &SigningKey, command: Command) -> Request {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, Ordering::SeqCst) + 1;
    let (client, time_ms) = (7, now_ms());
    let proof = SignedRequest::sign(
        user,
        ROOT,
        client,
        serial,
        time_ms,
        UserRequest::Command(command.clone()),
    );
    Request::from_signed(proof, command, time_ms)
}

fn config() -> Config {
    Config {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(250),
        election_max: Duration::from_millis(500),
        snapshot_every: 50,
        keep_after_snapshot: 10,
        rpc_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(10),
        controller_interval: Duration::from_millis(100),
        caught_up_lag: 10,
        quiet_start: Duration::from_secs(3),
        leader_silence: Duration::from_secs(1),
    }
}

/// Liveness as the test decides it (the node gets it from the mesh).
#[derive(Default)]
struct Oracle {
    alive: Mutex<BTreeSet<NodeName>>,
    members: Mutex<Vec<NodeName>>,
}

impl Candidates for Oracle {
    fn candidates(&self, _: &State) -> Vec<Candidate> {
        let alive = self.alive.lock().unwrap();
        self.members
            .lock()
            .unwrap()
            .iter()
            .map(|p| Candidate {
                id: node_id(p),
                member: Member { peer: p.clone() },
                alive: alive.contains(p),
                eligible: true,
                stability: 1.0,
            })
            .collect()
    }
}

struct Cluster {
    net: MemNet,
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<Consensus<MemTransport>>>,
    oracle: Arc<Oracle>,
}

fn peer(i: usize) -> NodeName {
    NodeName::from_ed25519([i as u8 + 1; 32])
}

fn spec(name: &str) -> WorkloadSpec {
    WorkloadSpec::new(
        WorkloadName::new(name).unwrap(),
        Image::Container("busybox:1".into()),
        Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
        1,
    )
}

async fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

impl Cluster {
    /// `n` members; member 0 bootstraps, the controller grows the group to its target.
    async fn start(n: usize) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut c = Cluster {
            net: MemNet::new(),
            dirs: Vec::new(),
            nodes: Vec::new(),
            oracle: Arc::new(Oracle::default()),
        };
        for i in 0..n {
            c.dirs.push(tempfile::tempdir().unwrap());
            c.oracle.members.lock().unwrap().push(peer(i));
            c.nodes.push(None);
            c.boot(i).await;
        }
        let settings = Settings {
            name: "test".into(),
            root_key: ROOT,
            voter_target: None,
            phones_may_vote: false,
        };
        c.node(0).bootstrap(settings, admin().verifying_key().to_bytes()).await.unwrap().unwrap();
        let want = match n {
            0..=2 => 1,
            3..=6 => 3,
            _ => 5,
        };
        c.wait_voters(want).await;
        c
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.dirs[i].path().to_path_buf()
    }

    async fn boot(&mut self, i: usize) {
        let me = Member { peer: peer(i) };
        // A member that just stopped may hold its database until its last handler returns.
        let start = Instant::now();
        let node = loop {
            match Consensus::open(&self.dir(i), me.clone(), self.net.transport(&peer(i)), config())
                .await
            {
                Ok(node) => break node,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "open: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        node.start_controller(self.oracle.clone()).await;
        self.net.register(node.clone());
        self.oracle.alive.lock().unwrap().insert(peer(i));
        self.nodes[i] = Some(node);
    }

    fn node(&self, i: usize) -> &Consensus<MemTransport> {
        self.nodes[i].as_ref().expect("running")
    }

    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    fn leader(&self) -> Option<usize> {
        self.running().into_iter().find(|i| self.node(*i).is_leader())
    }

    async fn wait_leader(&self, timeout: Duration) -> (usize, Duration) {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                // Every running member of the group agrees (a peer outside it knows nothing).
                let id = self.node(l).id();
                let members: BTreeSet<u64> = self
                    .node(l)
                    .raft()
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect();
                let in_group: Vec<usize> = self
                    .running()
                    .into_iter()
                    .filter(|i| members.contains(&self.node(*i).id()))
                    .collect();
                if in_group.iter().all(|i| self.node(*i).leader().map(|(x, _)| x) == Some(id)) {
                    return (l, start.elapsed());
                }
            }
            assert!(start.elapsed() < timeout, "no agreed leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_voters(&self, n: usize) {
        wait_for(&format!("{n} voters"), Duration::from_secs(30), || {
            self.leader().is_some_and(|l| {
                let metrics = self.node(l).raft().metrics().borrow().clone();
                // Settled: n voters and no joint configuration in progress.
                self.node(l).voters().len() == n
                    && metrics.membership_config.membership().get_joint_config().len() == 1
            })
        })
        .await;
    }

    /// Crashes member `i`: it stops and nothing reaches it; its disk stays.
    async fn kill(&mut self, i: usize) {
        self.net.remove(&peer(i));
        self.oracle.alive.lock().unwrap().remove(&peer(i));
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    async fn write(&self, via: usize, name: &str) -> Result<Reply, CommandError> {
        self.node(via)
            .submit(signed(&admin(), Command::PutWorkload(Box::new(spec(name)))))
            .await
            .unwrap()
    }

    async fn workloads(&self, i: usize, c: Consistency) -> BTreeSet<String> {
        self.node(i)
            .read(c, |s| s.workloads().keys().map(|k| k.to_string()).collect())
            .await
            .unwrap()
    }
}

/// The leader crashes: a new one is elected within the election bound, nothing committed is
/// lost, and writes through any member succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_without_losing_committed_writes() {
    let mut c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    for i in 0..20 {
        c.write(i % 3, &format!("w{i}")).await.unwrap();
    }
    c.kill(l).await;
    let (new, took) = c.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new, l);
    eprintln!("new leader after {took:?}");
    let follower = c.running().into_iter().find(|i| *i != new).unwrap();
    assert_eq!(
        c.workloads(follower, Consistency::Linearizable).await.len(),
        20,
        "no committed entry lost"
    );
    c.write(follower, "after").await.unwrap();
    assert!(c.workloads(new, Consistency::Linearizable).await.contains("after"));
}

/// A voter dies for good: the controller replaces it with an eligible peer and the group is
/// back at three voters, with no operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_automatically() {
    let mut c = Cluster::start(4).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let voters = c.node(l).voters();
    let victim = (0..4).find(|i| *i != l && voters.contains(&node_id(&peer(*i)))).unwrap();
    let spare = (0..4).find(|i| !voters.contains(&node_id(&peer(*i)))).unwrap();
    c.kill(victim).await;
    wait_for("the spare becomes a voter and the dead one is gone", Duration::from_secs(30), || {
        c.leader().is_some_and(|l| {
            let v = c.node(l).voters();
            v.len() == 3
                && v.contains(&node_id(&peer(spare)))
                && !v.contains(&node_id(&peer(victim)))
        })
    })
    .await;
    c.write(spare, "still-writable").await.unwrap();
}

/// A learner the leader drops (here one it never wanted: the controller removes it at its next
/// review) still lists itself as a member and still names the leader (raft never tells a
/// removed member, and a learner does not campaign), but it stops hearing that leader, so it
/// knows its state is stale; the members of the group hear theirs. In a real pool a member
/// that trusted such a frozen state kept its enrollment gate as it was and refused every node
/// enrolled since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_knows_it_no_longer_hears_a_leader() {
    let c = Cluster::start(4).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let voters = c.node(l).voters();
    let spare = (0..4).find(|i| !voters.contains(&node_id(&peer(*i)))).unwrap();
    assert!(!c.node(spare).is_member() && !c.node(spare).hears_leader());
    let member = Member { peer: peer(spare) };
    // Waits until the learner caught up, so its own view lists it.
    c.node(l).raft().add_learner(node_id(&peer(spare)), member, true).await.unwrap();
    wait_for("the controller drops the learner it does not want", Duration::from_secs(10), || {
        c.leader().is_some_and(|l| !c.node(l).members().contains(&peer(spare)))
    })
    .await;
    wait_for("the removed learner stops hearing a leader", Duration::from_secs(10), || {
        !c.node(spare).hears_leader()
    })
    .await;
    assert!(c.node(spare).is_member(), "its own frozen view still lists it");
    assert!(c.node(spare).leader().is_some(), "and still names the leader");
    for i in (0..4).filter(|i| *i != spare) {
        assert!(c.node(i).hears_leader(), "member {i} of the group hears its leader");
    }
}

/// A minority cannot commit; the majority keeps committing; after the heal everyone agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_cannot_commit_and_the_heal_converges() {
    let c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    c.write(l, "before").await.unwrap();
    // Cut the leader off: it is the minority now.
    let others: Vec<NodeName> = (0..3).filter(|i| *i != l).map(peer).collect();
    let others_ref: Vec<&NodeName> = others.iter().collect();
    c.net.partition(&[&peer(l)], &others_ref);
    let minority = c.node(l).clone();
    let stuck = tokio::spawn(async move {
        minority.submit(signed(&admin(), Command::PutWorkload(Box::new(spec("minority"))))).await
    });
    let majority = (0..3).find(|i| *i != l).unwrap();
    c.write(majority, "majority").await.unwrap();
    assert!(!c.workloads(majority, Consistency::Linearizable).await.contains("minority"));
    c.net.heal();
    let _ = stuck.await;
    wait_for("all three hold the same workloads", Duration::from_secs(20), || {
        let sets: Vec<BTreeSet<String>> = (0..3)
            .map(|i| {
                futures::executor::block_on(c.node(i).read(Consistency::Stale, |s| {
                    s.workloads().keys().map(|k| k.to_string()).collect()
                }))
                .unwrap()
            })
            .collect();
        sets.iter().all(|s| *s == sets[0] && s.contains("majority") && s.contains("before"))
    })
    .await;
}

/// Losing one direction of a link (answers lost) does not stop the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_does_not_stop_the_group() {
    let c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let f = (0..3).find(|i| *i != l).unwrap();
    c.net.cut_one_way(&peer(l), &peer(f));
    for i in 0..5 {
        let via = (0..3).find(|x| *x != f).unwrap();
        c.write(via, &format!("one-way-{i}")).await.unwrap();
    }
    c.net.heal();
    wait_for("the cut-off follower catches up", Duration::from_secs(20), || {
        futures::executor::block_on(c.node(f).read(Consistency::Stale, |s| s.workloads().len()))
            .unwrap()
            == 5
    })
    .await;
}

/// Everyone restarts from disk and finds the same state; a member that missed many entries
/// (the log was compacted meanwhile) catches up by snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_the_state_and_a_laggard_catches_up_by_snapshot() {
    let mut c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let laggard = (0..3).find(|i| *i != l).unwrap();
    c.kill(laggard).await;
    for i in 0..200 {
        c.write(l, &format!("w{i}")).await.unwrap();
    }
    let snap = c.node(l).raft().metrics().borrow().snapshot;
    assert!(snap.is_some_and(|s| s.index > 100), "the leader compacted its log: {snap:?}");
    c.boot(laggard).await;
    wait_for("the laggard installs a snapshot and catches up", Duration::from_secs(30), || {
        futures::executor::block_on(
            c.node(laggard).read(Consistency::Stale, |s| s.workloads().len()),
        )
        .unwrap()
            == 200
    })
    .await;
    let before = c.workloads(l, Consistency::Linearizable).await;
    for i in 0..3 {
        c.kill(i).await;
    }
    for i in 0..3 {
        c.boot(i).await;
    }
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    assert_eq!(c.workloads(l, Consistency::Linearizable).await, before);
    for i in 0..3 {
        assert_eq!(c.workloads(i, Consistency::Linearizable).await, before, "member {i}");
    }
}

/// A follower that restarts rejoins without an election: the leader and its term stay (without
/// a pre-vote, a restarted member standing at once would unseat a healthy leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_does_not_unseat_the_leader() {
    let mut c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let term = |c: &Cluster, i: usize| c.node(i).raft().metrics().borrow().current_term;
    let before = term(&c, l);
    let f = (0..3).find(|i| *i != l).unwrap();
    c.kill(f).await;
    for i in 0..20 {
        c.write(l, &format!("w{i}")).await.unwrap();
    }
    // The leader cannot reach the restarted member at first (as while the mesh reconnects),
    // for longer than openraft's own election timer after a start (lease + timeout).
    c.net.cut_one_way(&peer(l), &peer(f));
    c.boot(f).await;
    tokio::time::sleep(config().election_max * 3).await;
    c.net.heal();
    for i in 0..20 {
        c.write(f, &format!("after{i}")).await.unwrap();
    }
    assert_eq!(c.workloads(f, Consistency::Linearizable).await.len(), 40);
    assert!(c.node(l).is_leader(), "the leader stays");
    assert_eq!(term(&c, l), before, "no election happened");
}

/// Malformed and unauthorized commands come back as typed errors and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_refused_and_change_nothing() {
    let c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let follower = (0..3).find(|i| *i != l).unwrap();
    c.write(follower, "ok").await.unwrap();
    let before = c.node(l).read(Consistency::Linearizable, Clone::clone).await.unwrap();
    let mut bad = spec("bad");
    bad.replicas = 50_000;
    let r = c
        .node(follower)
        .submit(signed(&admin(), Command::PutWorkload(Box::new(bad))))
        .await
        .unwrap();
    assert!(
        matches!(r, Err(CommandError::Invalid { ref field, .. }) if field == "replicas"),
        "{r:?}"
    );
    let r = c
        .node(follower)
        .submit(signed(
            &SigningKey::from_bytes(&[77; 32]),
            Command::DeleteWorkload { name: WorkloadName::new("ok").unwrap() },
        ))
        .await
        .unwrap();
    assert!(matches!(r, Err(CommandError::Unauthorized { .. })), "{r:?}");
    let r = c
        .node(l)
        .submit(signed(
            &admin(),
            Command::PutUser { key: [5; 32], name: "\u{7}".into(), role: Role::Viewer },
        ))
        .await
        .unwrap();
    assert!(matches!(r, Err(CommandError::Invalid { .. })), "{r:?}");
    let after = c.node(l).read(Consistency::Linearizable, Clone::clone).await.unwrap();
    assert_eq!(after.workloads(), before.workloads());
    assert_eq!(after.users(), before.users());
}

/// Two of three voters are lost for good: forced recovery on the survivor rebuilds a working
/// group from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_recovery_rebuilds_the_group_from_a_survivor() {
    let mut c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    c.write(l, "kept").await.unwrap();
    let survivor = (0..3).find(|i| *i != l).unwrap();
    for i in 0..3 {
        c.kill(i).await;
    }
    // The other two never come back: forget them.
    c.oracle.members.lock().unwrap().retain(|p| *p == peer(survivor));
    // The stopped member's in-flight handlers may hold the database a moment longer.
    let me = Member { peer: peer(survivor) };
    let start = Instant::now();
    while let Err(e) = Consensus::<MemTransport>::force_recover(&c.dir(survivor), &me) {
        assert!(start.elapsed() < Duration::from_secs(10), "forced recovery: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.boot(survivor).await;
    wait_for("the survivor leads alone", Duration::from_secs(10), || c.node(survivor).is_leader())
        .await;
    assert_eq!(c.node(survivor).voters().len(), 1);
    assert!(c.workloads(survivor, Consistency::Linearizable).await.contains("kept"));
    c.write(survivor, "after-recovery").await.unwrap();
}

/// Reads: linearizable through a follower sees every acknowledged write; stale reads answer
/// from local state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_through_followers_see_acknowledged_writes() {
    let c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let f = (0..3).find(|i| *i != l).unwrap();
    c.net.set_delay(Duration::from_millis(5));
    for i in 0..10 {
        c.write(l, &format!("r{i}")).await.unwrap();
        assert!(c.workloads(f, Consistency::Linearizable).await.contains(&format!("r{i}")));
    }
    let stale = c.workloads(f, Consistency::Stale).await;
    assert!(stale.len() <= 10);
}

/// A member speaks only for itself: votes and appends in another's name, writes as the
/// system, for another node or for a user without the user's signature, and snapshot chunks
/// far past what was received are refused before raft sees them; the group carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_speak_only_for_themselves() {
    use cloudless_consensus::node::Refused;
    use cloudless_consensus::{Answer, Message};
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use openraft::{SnapshotMeta, StoredMembership, Vote};

    let c = Cluster::start(3).await;
    let (l, _) = c.wait_leader(Duration::from_secs(10)).await;
    let f = (0..3).find(|i| *i != l).unwrap();
    let o = (0..3).find(|i| *i != l && *i != f).unwrap();
    let term = c.node(l).raft().metrics().borrow().current_term;
    let (bad, o_id, l_id) = (peer(f), c.node(o).id(), c.node(l).id());

    // An election in o's name at a far higher term would depose the leader.
    let vote = VoteRequest::new(Vote::new(term + 100, o_id), None);
    let r = c.node(l).handle(&bad, Message::Vote(vote)).await;
    assert_eq!(r.unwrap_err(), Refused::Impostor { claims: o_id });
    // Appends in the leader's name would overwrite o's log.
    let append = AppendEntriesRequest {
        vote: Vote::new_committed(term + 100, l_id),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let r = c.node(o).handle(&bad, Message::Append(append)).await;
    assert!(matches!(r, Err(Refused::Impostor { .. })), "{r:?}");
    // A chunk a terabyte into a snapshot, in the sender's own name.
    let chunk = InstallSnapshotRequest {
        vote: Vote::new_committed(term, c.node(f).id()),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "huge".into(),
        },
        offset: 1 << 40,
        data: vec![0; 16],
        done: false,
    };
    let r = c.node(o).handle(&bad, Message::Snapshot(chunk)).await;
    assert!(matches!(r, Err(Refused::Chunk { .. })), "{r:?}");
    assert_eq!(c.node(l).raft().metrics().borrow().current_term, term, "nobody was deposed");

    // Forwarded writes it may not make, each refused on its own.
    let before = c.node(l).read(Consistency::Linearizable, Clone::clone).await.unwrap();
    let eve = Command::PutUser { key: [4; 32], name: "eve".into(), role: Role::Admin };
    let mut unsigned = signed(&admin(), eve.clone());
    unsigned.proof = None;
    let mut system = signed(&admin(), eve.clone());
    system.actor = Actor::System;
    let mut other = signed(&admin(), Command::Report(Vec::new()));
    other.actor = Actor::Node(peer(o));
    let ok = signed(&admin(), Command::PutWorkload(Box::new(spec("forwarded"))));
    let batch = cloudless_consensus::state::Batch(vec![unsigned, system, other, ok]);
    let r = c.node(l).handle(&bad, Message::Forward(batch)).await.unwrap();
    let Answer::Forward(Ok(replies)) = r else { panic!("{r:?}") };
    assert_eq!(replies.len(), 4);
    for refused in &replies[..3] {
        assert!(matches!(refused, Err(CommandError::Unauthorized { .. })), "{refused:?}");
    }
    assert!(replies[3].is_ok(), "{:?}", replies[3]);
    let after = c.node(l).read(Consistency::Linearizable, Clone::clone).await.unwrap();
    assert_eq!(after.users(), before.users());
    assert!(after.workloads().contains_key("forwarded"));
    c.write(f, "still-writing").await.unwrap();
}
