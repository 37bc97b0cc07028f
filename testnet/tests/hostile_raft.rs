//! Hostile peers against the raft service of a pool of real `cloudless` processes: each test
//! is one attack, refused, after which the pool still serves (no node restarted, a write
//! succeeds) and the target's memory stayed bounded.
//!
//! - `raft_worker_becomes_admin`: a worker-only device forwards "make my key an admin" as the
//!   system, and as the admin, and sends votes and appends: it is no raft member, refused.
//! - `raft_member_speaks_for_others`: a voter's device forwards writes as the system, as a user
//!   without the user's signature, as another node: each refused, nothing changed.
//! - `raft_term_inflation`: a voter sends votes and appends in other members' names at a far
//!   higher term (to depose the leader, or overwrite a follower's log): refused, same term.
//! - `raft_snapshot_offset`: a voter sends a snapshot chunk a terabyte into a snapshot (the
//!   receive buffer would grow to that size): refused, the target's memory unchanged.
//!
//! The tests run one at a time (each starts its own pool; two cores run one well).

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use cloudless_api::user::Whoami;
use cloudless_api::{Command, ErrorKind, Role, SignedRequest, UserRequest};
use cloudless_consensus::state::{Actor, Batch, CommandError, Request};
use cloudless_consensus::{Answer, Message, node_id};
use cloudless_mesh::identity;
use cloudless_testnet::hostile::{Hostile, Pool, peer_of, unauthorized};
use cloudless_types::{NodeName, now_ms};
use ed25519_dalek::SigningKey;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{SnapshotMeta, StoredMembership, Vote};

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How much a target's resident memory may grow during an attack: the attacks here send a few
/// KiB; growth beyond this means something allocated what the attacker asked for.
const RSS_GROWTH_MIB: f64 = 64.0;

/// A command as raft carries it, with whatever actor the attacker writes in.
fn request(actor: Actor, command: Command) -> Request {
    Request { client: 99, serial: 1, actor, time_ms: now_ms(), command, proof: None }
}

/// The attacker's own user key, and the command that would make it an admin.
fn eve() -> (SigningKey, Command) {
    let eve = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let grab = Command::PutUser {
        key: eve.verifying_key().to_bytes(),
        name: "eve".into(),
        role: Role::Admin,
    };
    (eve, grab)
}

/// Asserts that `eve` holds no role: the target does not know the key.
async fn is_no_user(h: &Hostile, root: [u8; 32], target: libp2p::PeerId, eve: &SigningKey) {
    let who = SignedRequest::sign(eve, root, 5, 1, now_ms(), UserRequest::Whoami(Whoami));
    let r = h.api::<Whoami>(target, &cloudless_api::Request::User(who)).await;
    match r {
        Ok(Err(e)) => assert_eq!(e.kind, ErrorKind::Unauthorized, "{e:?}"),
        other => panic!("eve's key has a role after the attack: {other:?}"),
    }
}

fn admin_key(p: &Pool) -> [u8; 32] {
    let key = cloudless_api::keys::load(&p.procs.ctl_dir().join(cloudless_api::ctl::USER_KEY));
    key.unwrap().verifying_key().to_bytes()
}

fn name_of(p: &Pool, i: usize) -> NodeName {
    identity::node_name(&peer_of(&p.procs.nodes[i].addr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_worker_becomes_admin() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 1).unwrap();
    let l = p.leader().unwrap();
    let target = peer_of(&p.procs.nodes[l].addr).unwrap();
    let before = p.rss_mib(l).unwrap();
    let key = p.take_over(3).unwrap();
    let h = Hostile::start(key, &p.procs.nodes[l].addr).await.unwrap();
    let (eve, grab) = eve();

    // As the system (the leader's own actor), and as the admin: no raft member, no raft.
    for actor in [Actor::System, Actor::User(admin_key(&p))] {
        let forward = Message::Forward(Batch(vec![request(actor, grab.clone())]));
        let r = h.raft(target, &forward).await;
        assert!(unauthorized(&r), "{r:?}");
    }
    // Nor elections or appends in its own name.
    let term = p.term().unwrap();
    let me = node_id(&identity::node_name(&h.peer_id()));
    let vote = Message::Vote(VoteRequest::new(Vote::new(term + 1, me), None));
    assert!(unauthorized(&h.raft(target, &vote).await));
    let append = Message::Append(AppendEntriesRequest {
        vote: Vote::new_committed(term + 1, me),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    });
    assert!(unauthorized(&h.raft(target, &append).await));

    is_no_user(&h, p.root_key().unwrap(), target, &eve).await;
    assert_eq!(p.term().unwrap(), term);
    p.keeps_serving().unwrap();
    assert!(p.rss_mib(l).unwrap() < before + RSS_GROWTH_MIB);
    p.report("raft_worker_becomes_admin", l);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_member_speaks_for_others() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let l = p.leader().unwrap();
    let f = (0..3).find(|i| *i != l).unwrap();
    let o = (0..3).find(|i| *i != l && *i != f).unwrap();
    let target = peer_of(&p.procs.nodes[l].addr).unwrap();
    let key = p.take_over(f).unwrap();
    let h = Hostile::start(key, &p.procs.nodes[l].addr).await.unwrap();
    let (eve, grab) = eve();

    let mut forged = request(Actor::User(eve.verifying_key().to_bytes()), grab.clone());
    // A signature by eve, over the command: eve is no user, so the state machine refuses it.
    forged.proof = Some(Box::new(SignedRequest::sign(
        &eve,
        p.root_key().unwrap(),
        forged.client,
        forged.serial,
        forged.time_ms,
        UserRequest::Command(grab.clone()),
    )));
    let batch = Batch(vec![
        request(Actor::System, grab.clone()),
        request(Actor::User(admin_key(&p)), grab.clone()),
        request(Actor::Node(name_of(&p, o)), Command::Report(Vec::new())),
        forged,
    ]);
    let r = h.raft(target, &Message::Forward(batch)).await;
    let Ok(Answer::Forward(Ok(replies))) = r else { panic!("{r:?}") };
    assert_eq!(replies.len(), 4);
    for reply in &replies {
        assert!(matches!(reply, Err(CommandError::Unauthorized { .. })), "{reply:?}");
    }

    is_no_user(&h, p.root_key().unwrap(), target, &eve).await;
    p.keeps_serving().unwrap();
    p.report("raft_member_speaks_for_others", l);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_term_inflation() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let l = p.leader().unwrap();
    let f = (0..3).find(|i| *i != l).unwrap();
    let o = (0..3).find(|i| *i != l && *i != f).unwrap();
    let (leader, other) =
        (peer_of(&p.procs.nodes[l].addr).unwrap(), peer_of(&p.procs.nodes[o].addr).unwrap());
    let term = p.term().unwrap();
    let key = p.take_over(f).unwrap();
    let h = Hostile::start(key, &p.procs.nodes[l].addr).await.unwrap();
    let o_addr = p.procs.nodes[o].addr.parse().unwrap();
    h.connect(other, o_addr).await.unwrap();
    let (l_id, o_id) = (node_id(&name_of(&p, l)), node_id(&name_of(&p, o)));

    for round in 1..=20u64 {
        // An election in o's name at a far higher term would make the leader step down.
        let vote = VoteRequest::new(Vote::new(term + round * 1000, o_id), None);
        assert!(unauthorized(&h.raft(leader, &Message::Vote(vote)).await));
        // Appends in the leader's name would overwrite o's log and keep it from the real one.
        let append = Message::Append(AppendEntriesRequest {
            vote: Vote::new_committed(term + round * 1000, l_id),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        });
        assert!(unauthorized(&h.raft(other, &append).await));
    }

    let s = p.status().unwrap();
    assert_eq!(s["term"].as_u64(), Some(term), "the term moved: {s}");
    assert_eq!(p.leader().unwrap(), l, "the leader changed");
    p.keeps_serving().unwrap();
    p.report("raft_term_inflation", o);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_snapshot_offset() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let l = p.leader().unwrap();
    let f = (0..3).find(|i| *i != l).unwrap();
    let o = (0..3).find(|i| *i != l && *i != f).unwrap();
    let other = peer_of(&p.procs.nodes[o].addr).unwrap();
    let term = p.term().unwrap();
    let before = p.rss_mib(o).unwrap();
    let key = p.take_over(f).unwrap();
    let h = Hostile::start(key, &p.procs.nodes[o].addr).await.unwrap();
    let f_id = node_id(&name_of(&p, f));

    // In its own name (so not an impostor), at offsets a follower would seek to.
    for offset in [1u64 << 40, 1 << 30, u64::MAX - 16] {
        let chunk = InstallSnapshotRequest {
            vote: Vote::new_committed(term, f_id),
            meta: SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: "huge".into(),
            },
            offset,
            data: vec![0; 16],
            done: false,
        };
        let r = h.raft(other, &Message::Snapshot(chunk)).await;
        assert!(unauthorized(&r), "offset {offset}: {r:?}");
    }

    p.keeps_serving().unwrap();
    let after = p.rss_mib(o).unwrap();
    assert!(after < before + RSS_GROWTH_MIB, "RSS {before:.1} -> {after:.1} MiB");
    p.report("raft_snapshot_offset", o);
    h.stop().await;
}
