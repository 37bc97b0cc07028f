//! Hostile peers that want to be believed: a node believes what it is told about the cluster
//! (who is enrolled, what to run, that it is enrolled) only from the raft members it learned
//! and its bootstrap peers, and takes nudges only from members.
//!
//! - `trust_nudge_hijack`: a worker-only device nudges another worker so that it asks the
//!   attacker for its assignments, which name a workload `../../` (its directory would be
//!   removed on stop) and a gate list that revokes every real node: the nudge is refused, the
//!   victim never asks the attacker, runs nothing and still sees the pool.
//! - `trust_joiner_hijack`: a stranger connects to a device that is joining while the
//!   invite's bootstrap peer does not answer (as an mDNS neighbour would), and answers
//!   whatever it is asked ("enrolled", fake lists): the joiner asks it nothing, and enrolls for
//!   real once its bootstrap peer answers.
//! - `trust_invite_front_run`: a node that relayed a device's enrollment (and so saw its
//!   token, signature and proof) enrolls an identity of its own with them first, the token
//!   being single-use (the old tokens were bearer credentials): refused, the use is not
//!   spent, and the device the invite was for joins.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::{Duration, Instant};

use cloudless_api::invite::Invite;
use cloudless_api::node::{AssignedList, Assignment, Enroll, EnrolledList, Nudge};
use cloudless_api::{ApiError, NodeRequest, Reply, Request};
use cloudless_mesh::identity;
use cloudless_testnet::hostile::{Asked, Hostile, Pool, peer_of, unauthorized};
use cloudless_testnet::procs::until;
use cloudless_types::{Image, NodeName, Resources, WorkloadName, WorkloadSpec};

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the victim is watched for asking the attacker: many of its polls (every 250 ms)
/// and gate refreshes (every 2 s) fit in it.
const WATCH: Duration = Duration::from_secs(6);

/// What the attacker answers to anything it is asked: success, a gate list in which the
/// attacker is the only voter and every real node is revoked, and assignments naming a
/// workload `../../` (bytes no honest node could encode: the name is swapped in on the wire).
fn lies(me: NodeName, real: Vec<NodeName>) -> impl Fn(&Request) -> Option<Vec<u8>> + Send {
    move |r: &Request| match r {
        Request::Node(NodeRequest::Enroll(_)) => {
            postcard::to_allocvec(&Ok::<Reply, ApiError>(Reply::Done)).ok()
        }
        Request::Node(NodeRequest::Enrolled(_)) => {
            let list = EnrolledList {
                generation: u64::MAX,
                whole: true,
                nodes: vec![me.clone()],
                revoked: real.clone(),
                voters: vec![me.clone()],
                learners: Vec::new(),
            };
            postcard::to_allocvec(&Ok::<EnrolledList, ApiError>(list)).ok()
        }
        Request::Node(NodeRequest::Assigned(_)) => Some(traversal_assignment()),
        _ => None,
    }
}

/// An `Assigned` answer whose workload is named `../../`.
fn traversal_assignment() -> Vec<u8> {
    let spec = WorkloadSpec::new(
        WorkloadName::new("abcdef").unwrap(),
        Image::Container("busybox:1".into()),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    let a = Assignment { spec, indexes: vec![0], leaving: Vec::new() };
    let list = AssignedList { generation: u64::MAX, assignments: Some(vec![a]) };
    let mut bytes = postcard::to_allocvec(&Ok::<AssignedList, ApiError>(list)).unwrap();
    let (from, to) = (b"\x06abcdef", b"\x06../../");
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + from.len()].copy_from_slice(to);
    bytes
}

/// Watches `asked` for `WATCH`: the victim must not ask the attacker anything.
fn never_asked(asked: &Asked) {
    let start = Instant::now();
    while start.elapsed() < WATCH {
        assert_eq!(asked.total(), 0, "the attacker was asked: {:?}", asked.counts());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(p: &Pool) -> Vec<NodeName> {
    p.procs.nodes.iter().map(|n| identity::node_name(&peer_of(&n.addr).unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_nudge_hijack() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 2).unwrap();
    let (attacker, victim) = (3, 4);
    let real = names(&p);
    let key = p.take_over(attacker).unwrap();
    let h = Hostile::start(key, &p.procs.nodes[victim].addr).await.unwrap();
    let asked = h.serve_api(lies(identity::node_name(&h.peer_id()), real.clone())).await.unwrap();
    let target = peer_of(&p.procs.nodes[victim].addr).unwrap();

    let r = h
        .api::<Nudge>(target, &Request::Node(NodeRequest::Nudge(Nudge { generation: u64::MAX })))
        .await;
    assert!(
        matches!(&r, Ok(Err(e)) if e.kind == cloudless_api::ErrorKind::Unauthorized)
            || unauthorized(&r),
        "{r:?}"
    );
    never_asked(&asked);

    // It runs nothing, and still sees every real node (no fake gate list was believed).
    let replicas = p.procs.nodes[victim].data_dir.join("wasi").join("replicas");
    let ran = std::fs::read_dir(&replicas).map(|d| d.count()).unwrap_or(0);
    assert_eq!(ran, 0, "the victim runs something");
    let listed = p.procs.ctl_via(victim, &["node", "list"]);
    assert!(listed.ok, "{}", listed.stderr);
    for (i, n) in real.iter().enumerate() {
        if i != attacker {
            assert!(listed.stdout.contains(n.as_str()), "{n} missing:\n{}", listed.stdout);
        }
    }
    p.keeps_serving().unwrap();
    p.report("trust_nudge_hijack", victim);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_joiner_hijack() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let l = p.leader().unwrap();
    let boot = (0..3).find(|i| *i != l).unwrap();
    let invite = p.procs.invite(&["--bootstrap", &p.procs.nodes[boot].addr.clone()]).unwrap();
    // The invite's only way in stops answering (it keeps its address).
    p.procs.freeze(boot);
    let joiner = p.procs.start_join(&invite).unwrap();
    let h = Hostile::stranger(&p.procs.nodes[joiner].addr).await.unwrap();
    let real = names(&p);
    let asked = h.serve_api(lies(identity::node_name(&h.peer_id()), real)).await.unwrap();

    never_asked(&asked);
    let log = std::fs::read_to_string(p.procs.log(joiner)).unwrap();
    assert!(!log.contains("Enrolled in cluster"), "the joiner believed the stranger:\n{log}");

    // Once the bootstrap peer answers, the joiner enrolls for real.
    p.procs.thaw(boot);
    let peer = p.procs.nodes[joiner].peer.clone();
    until("the joiner is enrolled and alive", Duration::from_secs(60), || {
        let out = p.procs.ctl(&["node", "list"]);
        out.stdout.lines().any(|l| l.starts_with(&peer) && l.contains(" alive ")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.procs.tail(joiner, 40)));
    assert_eq!(asked.total(), 0, "the attacker was asked: {:?}", asked.counts());
    p.keeps_serving().unwrap();
    p.report("trust_joiner_hijack", joiner);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_invite_front_run() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let text = p.procs.invite(&[]).unwrap();
    let invite = Invite::decode(&text).unwrap();
    assert_eq!(invite.token.max_uses, 1, "the invite must be single-use for the race to matter");
    // What a relaying node sees of a device's enrollment: the token, the root's signature,
    // and the device's proof for its own PeerId.
    let device = NodeName::from_ed25519(rand::random());
    let seen = Enroll {
        token: invite.token.clone(),
        signature: invite.signature.clone(),
        proof: invite.claim_proof(&device),
        peer: device,
    };
    let h = Hostile::stranger(&p.procs.nodes[0].addr).await.unwrap();
    let me = identity::node_name(&h.peer_id());
    let target = peer_of(&p.procs.nodes[p.leader().unwrap()].addr).unwrap();
    h.connect(target, p.procs.nodes[p.leader().unwrap()].addr.parse().unwrap()).await.unwrap();
    let front_run = Enroll { peer: me.clone(), ..seen.clone() };
    let answer = h.api::<Enroll>(target, &Request::Node(NodeRequest::Enroll(front_run))).await;
    let err = match answer {
        Ok(Err(e)) => e,
        other => panic!("the front-run was not refused: {other:?}"),
    };
    eprintln!("invite front-run: {err}");
    assert!(err.to_string().contains("claim"), "{err}");
    h.stop().await;

    // The use was not spent: the device the invite was for joins with it.
    let joiner = p.procs.join_with(&text).unwrap();
    let peer = p.procs.nodes[joiner].peer.clone();
    assert!(p.procs.index(me.as_ref()).is_none());
    let out = p.procs.ctl(&["node", "list"]);
    assert!(out.stdout.contains(&peer), "{out:?}");
    assert!(
        !out.stdout.contains(&me.to_string()),
        "the front-runner was enrolled:\n{}",
        out.stdout
    );
    p.keeps_serving().unwrap();
    p.report("trust_invite_front_run", 0);
}
