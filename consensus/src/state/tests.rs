use cloudless_types::{Image, ReplicaPhase, Resources, WorkloadSpec};

/// A node name for a readable label: the peer id of a key spelled from the label.
fn n(label: &str) -> NodeName {
    let mut key = [0u8; 32];
    for (k, b) in key.iter_mut().zip(label.bytes()) {
        *k = b;
    }
    NodeName::from_ed25519(key)
}

fn w(name: &str) -> WorkloadName {
    WorkloadName::new(name).unwrap()
}
use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;

use super::*;

const ROOT_SECRET: [u8; 32] = [7; 32];
const ADMIN: UserKey = [1; 32];
const DEPLOYER: UserKey = [2; 32];
const VIEWER: UserKey = [3; 32];

fn root() -> SigningKey {
    SigningKey::from_bytes(&ROOT_SECRET)
}

fn settings() -> Settings {
    Settings {
        name: "pool".into(),
        root_key: root().verifying_key().to_bytes(),
        voter_target: None,
        phones_may_vote: false,
    }
}

struct Client {
    id: u64,
    serial: u64,
}

impl Client {
    fn req(&mut self, actor: Actor, command: Command) -> Request {
        self.serial += 1;
        Request {
            client: self.id,
            serial: self.serial,
            actor,
            time_ms: 1_000,
            command,
            proof: None,
        }
    }
}

fn spec(name: &str, replicas: u32) -> WorkloadSpec {
    WorkloadSpec::new(
        w(name),
        Image::Container("busybox:1".into()),
        Resources { cpu_millis: 100, memory_mib: 64, disk_mib: 0, gpus: 0 },
        replicas,
    )
}

/// A bootstrapped state with an admin, a deployer, a viewer and two nodes.
fn ready() -> (State, Client) {
    let mut s = State::new();
    let mut c = Client { id: 1, serial: 0 };
    s.apply(&c.req(
        Actor::System,
        Command::Bootstrap { settings: settings(), admin: ADMIN, node: n("node-a") },
    ))
    .unwrap();
    for (key, role) in [(DEPLOYER, Role::Deployer), (VIEWER, Role::Viewer)] {
        s.apply(
            &c.req(Actor::User(ADMIN), Command::PutUser { key, name: format!("{role:?}"), role }),
        )
        .unwrap();
    }
    let (token, signature) = token(1, 10_000);
    s.apply(&c.req(
        Actor::Node(n("node-b")),
        Command::Enroll { proof: proof(&token, "node-b"), token, signature, peer: n("node-b") },
    ))
    .unwrap();
    (s, c)
}

fn token(max_uses: u32, expires_ms: u64) -> (Token, Vec<u8>) {
    let token = Token {
        cluster: "pool".into(),
        nonce: [max_uses as u8; 16],
        expires_ms,
        max_uses,
        roles: [NodeRole::Worker].into_iter().collect(),
        labels: BTreeMap::new(),
        claim_key: claim().verifying_key().to_bytes(),
    };
    let sig = root().sign(&token.to_bytes()).to_bytes().to_vec();
    (token, sig)
}

/// The invites' claim key (its private half is in the invite string only).
fn claim() -> SigningKey {
    SigningKey::from_bytes(&[5; 32])
}

/// The device's proof that it holds the invite of `token`.
fn proof(token: &Token, peer: &str) -> Vec<u8> {
    claim().sign(&token.claim_bytes(&n(peer))).to_bytes().to_vec()
}

/// The state without the bookkeeping a refused request still updates (sessions, counter).
fn visible(s: &State) -> State {
    State { sessions: BTreeMap::new(), session_lru: BTreeMap::new(), applied: 0, ..s.clone() }
}

#[test]
fn bootstrap_happens_once_and_everything_waits_for_it() {
    let mut s = State::new();
    let mut c = Client { id: 9, serial: 0 };
    assert_eq!(
        s.apply(&c.req(Actor::User(ADMIN), Command::DeleteWorkload { name: w("x") })),
        Err(CommandError::NotBootstrapped)
    );
    let boot = Command::Bootstrap { settings: settings(), admin: ADMIN, node: n("a") };
    assert!(matches!(
        s.apply(&c.req(Actor::User(ADMIN), boot.clone())),
        Err(CommandError::Unauthorized { .. })
    ));
    s.apply(&c.req(Actor::System, boot.clone())).unwrap();
    assert_eq!(s.apply(&c.req(Actor::System, boot)), Err(CommandError::AlreadyBootstrapped));
    assert!(s.is_member(&n("a")));
    assert_eq!(s.user_role(&ADMIN), Some(Role::Admin));
}

#[test]
fn roles_decide_who_may_do_what() {
    let (mut s, mut c) = ready();
    let err = s
        .apply(&c.req(Actor::User(VIEWER), Command::PutWorkload(Box::new(spec("web", 2)))))
        .unwrap_err();
    assert_eq!(err.to_string(), "user 0303030303030303 may not put workload");
    assert_eq!(
        s.apply(&c.req(Actor::User(DEPLOYER), Command::PutWorkload(Box::new(spec("web", 2))))),
        Ok(Reply::Version(1))
    );
    assert!(
        s.apply(&c.req(
            Actor::User(DEPLOYER),
            Command::PutUser { key: [9; 32], name: "x".into(), role: Role::Admin }
        ))
        .is_err()
    );
    assert!(
        s.apply(&c.req(Actor::User([42; 32]), Command::Scale { name: w("web"), replicas: 1 }))
            .is_err()
    );
    let err = s.apply(&c.req(Actor::User(ADMIN), Command::RemoveUser { key: ADMIN })).unwrap_err();
    assert_eq!(err.to_string(), "invalid key: the last admin cannot be removed");
    assert!(matches!(
        s.apply(&c.req(Actor::Node(n("node-b")), Command::Scale { name: w("web"), replicas: 1 })),
        Err(CommandError::Unauthorized { .. })
    ));
}

#[test]
fn an_invalid_spec_is_refused_with_its_field_and_changes_nothing() {
    let (mut s, mut c) = ready();
    let before = visible(&s);
    let mut bad = spec("web", 2);
    bad.min_available = 5;
    let err = s.apply(&c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(bad)))).unwrap_err();
    assert_eq!(err.to_string(), "invalid min_available: 5 is more than replicas (2)");
    assert_eq!(visible(&s), before);
}

#[test]
fn a_retried_request_is_applied_once() {
    let (mut s, mut c) = ready();
    let req = c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec("web", 2))));
    assert_eq!(s.apply(&req), Ok(Reply::Version(1)));
    assert_eq!(s.apply(&req), Ok(Reply::Version(1)), "the retry gets the stored answer");
    assert_eq!(s.workloads()[&w("web")].version, 1);
    // Requests in flight together may be applied in any order, and each only once.
    c.serial += 1; // the serial the "earlier" request got; it arrives late
    let later = c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec("b", 1))));
    let earlier = Request { serial: later.serial - 1, ..later.clone() };
    let earlier = Request { command: Command::PutWorkload(Box::new(spec("a", 1))), ..earlier };
    assert_eq!(s.apply(&later), Ok(Reply::Version(1)));
    assert_eq!(
        s.apply(&earlier),
        Ok(Reply::Version(1)),
        "an earlier serial arriving late is applied"
    );
    assert_eq!(s.apply(&earlier), Ok(Reply::Version(1)));
    assert_eq!(s.workloads().len(), 3);
    // Beyond the window, a retry cannot be answered and is refused rather than applied twice.
    for _ in 0..SESSION_WINDOW + 1 {
        s.apply(&c.req(Actor::User(ADMIN), Command::Scale { name: w("web"), replicas: 1 }))
            .unwrap();
    }
    assert!(s.apply(&req).is_err(), "a retry older than the window is refused");
}

#[test]
fn enrollment_tokens_are_checked_inside_apply() {
    let (mut s, mut c) = ready();
    let enroll = |c: &mut Client, t: Token, sig: Vec<u8>, peer: &str| {
        let proof = proof(&t, peer);
        c.req(
            Actor::Node(n(peer)),
            Command::Enroll { token: t, signature: sig, proof, peer: n(peer) },
        )
    };
    // Used once already (max 1).
    let (t, sig) = token(1, 10_000);
    assert_eq!(
        s.apply(&enroll(&mut c, t, sig, "node-c")),
        Err(CommandError::TokenUsed { uses: 1 })
    );
    // Expired.
    let (t, sig) = token(2, 500);
    assert_eq!(
        s.apply(&enroll(&mut c, t, sig, "node-c")),
        Err(CommandError::TokenExpired { expired_ms: 500 })
    );
    // Forged.
    let (mut t, sig) = token(3, 10_000);
    t.max_uses = 100;
    assert_eq!(s.apply(&enroll(&mut c, t, sig, "node-c")), Err(CommandError::BadSignature));
    // Someone else's name.
    let (t, sig) = token(4, 10_000);
    let req = c.req(
        Actor::Node(n("mallory")),
        Command::Enroll {
            proof: proof(&t, "node-c"),
            token: t.clone(),
            signature: sig.clone(),
            peer: n("node-c"),
        },
    );
    assert!(matches!(s.apply(&req), Err(CommandError::Unauthorized { .. })));
    // A relay that saw node-c's enrollment uses its token and proof for an identity of its
    // own: the proof is node-c's.
    let front_run = c.req(
        Actor::Node(n("mallory")),
        Command::Enroll {
            proof: proof(&t, "node-c"),
            token: t.clone(),
            signature: sig.clone(),
            peer: n("mallory"),
        },
    );
    let err = s.apply(&front_run).unwrap_err();
    assert!(err.to_string().contains("claim"), "{err}");
    assert!(!s.is_member(&n("mallory")));
    // Good, twice (max 4... we use 2 of them).
    assert_eq!(s.apply(&enroll(&mut c, t.clone(), sig.clone(), "node-c")), Ok(Reply::Done));
    assert!(s.is_member(&n("node-c")));
    // Enrolling again (another token, more roles) changes nothing: cordons and roles stay.
    s.apply(&c.req(
        Actor::User(ADMIN),
        Command::SetSchedulable { peer: n("node-c"), schedulable: Schedulable::Draining },
    ))
    .unwrap();
    let before = visible(&s);
    assert!(matches!(
        s.apply(&enroll(&mut c, t.clone(), sig.clone(), "node-c")),
        Err(CommandError::AlreadyEnrolled { .. })
    ));
    assert_eq!(visible(&s), before);
    // A revoked node cannot come back with a fresh token.
    s.apply(&c.req(Actor::User(ADMIN), Command::Revoke { peer: n("node-c") })).unwrap();
    assert!(!s.is_member(&n("node-c")));
    assert!(s.apply(&enroll(&mut c, t, sig, "node-c")).is_err());
}

fn start(r: &ReplicaId, node: &str) -> Change {
    Change::Start { replica: r.clone(), node: n(node) }
}

#[test]
fn assignments_follow_epochs_nodes_and_replica_counts() {
    let (mut s, mut c) = ready();
    s.apply(&c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec("web", 2))))).unwrap();
    let r = |i| ReplicaId::new(&w("web"), i);
    let assign = |epoch, changes: Vec<Change>| Command::Assign { epoch, changes };
    assert!(
        matches!(
            s.apply(&c.req(Actor::User(ADMIN), assign(1, vec![start(&r(0), "node-a")]))),
            Err(CommandError::Unauthorized { .. })
        ),
        "only the leader assigns"
    );
    s.apply(&c.req(Actor::System, assign(1, vec![start(&r(0), "node-a"), start(&r(1), "node-b")])))
        .unwrap();
    assert_eq!(
        s.apply(&c.req(Actor::System, assign(1, vec![]))),
        Err(CommandError::StaleEpoch { epoch: 1, current: 1 })
    );
    assert!(
        s.apply(&c.req(Actor::System, assign(2, vec![start(&r(5), "node-a")]))).is_err(),
        "beyond the desired count"
    );
    assert!(
        s.apply(&c.req(Actor::System, assign(2, vec![start(&r(0), "ghost")]))).is_err(),
        "unknown node"
    );
    assert!(
        s.apply(&c.req(
            Actor::System,
            assign(2, vec![Change::Move { replica: r(0), from: n("node-b"), to: n("node-a") }])
        ))
        .is_err(),
        "a move starts where the replica runs"
    );
    assert!(
        s.apply(&c.req(Actor::System, assign(2, vec![Change::Release { replica: r(0) }]))).is_err(),
        "only a moving replica is released"
    );
    assert_eq!(s.runs_on(&n("node-b")).count(), 1);
    // Scaling down leaves the choice of what stops to the leader's plan.
    s.apply(&c.req(Actor::User(ADMIN), Command::Scale { name: w("web"), replicas: 1 })).unwrap();
    assert_eq!(s.assignments().len(), 2, "the surplus runs until the plan stops it");
    s.apply(&c.req(Actor::System, assign(2, vec![Change::Stop { replica: r(0) }]))).unwrap();
    assert_eq!(s.assignments().keys().collect::<Vec<_>>(), vec![&r(1)]);
    assert!(
        s.apply(&c.req(Actor::System, assign(3, vec![start(&r(0), "node-a")]))).is_err(),
        "one replica is wanted and one is assigned"
    );
    s.apply(&c.req(Actor::User(ADMIN), Command::Revoke { peer: n("node-b") })).unwrap();
    assert!(s.assignments().is_empty(), "a revoked node's replicas lose their assignment");
}

#[test]
fn a_move_keeps_the_origin_running_until_released() {
    let (mut s, mut c) = ready();
    s.apply(&c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec("web", 1))))).unwrap();
    let r = ReplicaId::new(&w("web"), 0);
    let assign = |epoch, changes: Vec<Change>| Command::Assign { epoch, changes };
    s.apply(&c.req(Actor::System, assign(1, vec![start(&r, "node-a")]))).unwrap();
    let mv = Change::Move { replica: r.clone(), from: n("node-a"), to: n("node-b") };
    s.apply(&c.req(Actor::System, assign(2, vec![mv]))).unwrap();
    assert_eq!(s.runs_on(&n("node-a")).count(), 1, "the origin still runs it");
    assert_eq!(s.runs_on(&n("node-b")).count(), 1, "the destination starts it");
    assert_eq!(s.assignments()[&r].node, n("node-b"), "and reports for it");
    let again = Change::Move { replica: r.clone(), from: n("node-b"), to: n("node-a") };
    assert!(
        s.apply(&c.req(Actor::System, assign(3, vec![again]))).is_err(),
        "a moving replica moves again only once released"
    );
    s.apply(&c.req(Actor::System, assign(3, vec![Change::Release { replica: r.clone() }])))
        .unwrap();
    assert_eq!(s.runs_on(&n("node-a")).count(), 0, "released: the origin stops it");
    assert_eq!(s.assignments()[&r].from, None);
    // Revoking the node a replica moves to sends it back to its origin.
    let mv = Change::Move { replica: r.clone(), from: n("node-b"), to: n("node-a") };
    s.apply(&c.req(Actor::System, assign(4, vec![mv]))).unwrap();
    s.apply(&c.req(Actor::User(ADMIN), Command::Revoke { peer: n("node-a") })).unwrap();
    assert_eq!(s.assignments()[&r].node, n("node-b"), "back where it runs");
    assert_eq!(s.assignments()[&r].from, None);
}

#[test]
fn nodes_report_only_for_themselves() {
    let (mut s, mut c) = ready();
    s.apply(&c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec("web", 1))))).unwrap();
    let key = ReplicaId::new(&w("web"), 0);
    let status = |node: &str| ReplicaStatus {
        node: n(node),
        phase: ReplicaPhase::Running { ready: true },
        restarts: 0,
        at_ms: 5,
    };
    s.apply(
        &c.req(Actor::Node(n("node-b")), Command::Report(vec![(key.clone(), status("node-b"))])),
    )
    .unwrap();
    assert!(
        s.apply(
            &c.req(
                Actor::Node(n("node-b")),
                Command::Report(vec![(key.clone(), status("node-a"))])
            )
        )
        .is_err()
    );
    assert!(
        s.apply(&c.req(
            Actor::Node(n("stranger")),
            Command::Report(vec![(key.clone(), status("stranger"))])
        ))
        .is_err()
    );
    let long = ReplicaStatus {
        phase: ReplicaPhase::Restarting { reason: "x".repeat(2000), backoff: Default::default() },
        ..status("node-b")
    };
    assert!(
        s.apply(&c.req(Actor::Node(n("node-b")), Command::Report(vec![(key.clone(), long)])))
            .is_err(),
        "reasons are bounded"
    );
    // Only the node the replica is assigned to speaks for it: a former host's late report
    // is accepted (it is its own) but changes nothing.
    assert!(s.statuses().is_empty(), "node-b reported on a replica not assigned to it");
    let changes = vec![start(&key, "node-a")];
    s.apply(&c.req(Actor::System, Command::Assign { epoch: 1, changes })).unwrap();
    let report = |node: &str| Command::Report(vec![(key.clone(), status(node))]);
    s.apply(&c.req(Actor::Node(n("node-a")), report("node-a"))).unwrap();
    s.apply(&c.req(Actor::Node(n("node-b")), report("node-b"))).unwrap();
    assert_eq!(s.statuses()[&key].node, n("node-a"));
}

fn arb_actor() -> impl Strategy<Value = Actor> {
    prop_oneof![
        Just(Actor::User(ADMIN)),
        Just(Actor::User(DEPLOYER)),
        Just(Actor::User(VIEWER)),
        Just(Actor::User([99; 32])),
        Just(Actor::Node(n("node-b"))),
        Just(Actor::System),
    ]
}

fn arb_node() -> impl Strategy<Value = NodeName> {
    prop_oneof![Just(n("node-a")), Just(n("node-b")), Just(n("ghost"))]
}

fn arb_change() -> impl Strategy<Value = Change> {
    let replica = (prop_oneof![Just("web"), Just("db")], 0u32..12)
        .prop_map(|(name, i)| ReplicaId::new(&w(name), i));
    prop_oneof![
        (replica.clone(), arb_node()).prop_map(|(replica, node)| Change::Start { replica, node }),
        (replica.clone(), arb_node(), arb_node()).prop_map(|(replica, from, to)| Change::Move {
            replica,
            from,
            to
        }),
        replica.clone().prop_map(|replica| Change::Release { replica }),
        replica.prop_map(|replica| Change::Stop { replica }),
    ]
}

fn arb_command() -> impl Strategy<Value = Command> {
    let name = prop_oneof![Just("web"), Just("db"), Just("ghost")];
    prop_oneof![
        (name.clone(), 0u32..20_000)
            .prop_map(|(n, r)| Command::PutWorkload(Box::new(spec(n, r.min(10))))),
        (name.clone(), 0u32..12, 0u32..12).prop_map(|(n, r, m)| Command::PutWorkload(Box::new(
            WorkloadSpec { min_available: m, ..spec(n, r) }
        ))),
        name.clone().prop_map(|n| Command::DeleteWorkload { name: w(n) }),
        (name.clone(), 0u32..20_000).prop_map(|(n, r)| Command::Scale { name: w(n), replicas: r }),
        (0u64..5, prop::collection::vec(arb_change(), 0..6))
            .prop_map(|(epoch, changes)| Command::Assign { epoch, changes }),
        arb_node().prop_map(|p| Command::Revoke { peer: p }),
        (any::<u8>(), prop_oneof![Just(Role::Admin), Just(Role::Viewer)])
            .prop_map(|(k, role)| Command::PutUser { key: [k; 32], name: "u".into(), role }),
        any::<u8>().prop_map(|k| Command::RemoveUser { key: [k; 32] }),
    ]
}

proptest! {
    /// A refused command leaves the state exactly as it was; an accepted one keeps the
    /// invariants (assignments only to enrolled nodes and existing workloads, never more
    /// replicas assigned than wanted unless they were before, moves only between nodes).
    #[test]
    fn refused_commands_change_nothing(cmds in prop::collection::vec((arb_actor(), arb_command()), 1..40)) {
        let (mut s, mut c) = ready();
        for (actor, cmd) in cmds {
            let before = visible(&s);
            let was_assigned = |name: &WorkloadName| before.assigned_of(name).count();
            let is_assign = matches!(cmd, Command::Assign { .. });
            let res = s.apply(&c.req(actor, cmd));
            if res.is_err() {
                prop_assert_eq!(visible(&s), before);
                continue;
            }
            for (r, a) in s.assignments() {
                prop_assert!(s.is_member(&a.node));
                prop_assert!(a.from.as_ref() != Some(&a.node));
                prop_assert!(s.workloads().contains_key(&r.workload));
            }
            if is_assign {
                for (name, wl) in s.workloads() {
                    let now = s.assigned_of(name).count();
                    prop_assert!(now <= (wl.spec.replicas as usize).max(was_assigned(name)));
                }
            }
            prop_assert!(s.users().values().any(|u| u.role == Role::Admin));
        }
    }
}

#[test]
fn sessions_belong_to_their_signer_and_refusals_cost_none() {
    let (mut s, _) = ready();
    // The deployer applies a command in its session 42.
    let put = Command::PutWorkload(Box::new(spec("web", 1)));
    let mine = Request {
        client: 42,
        serial: 1,
        actor: Actor::User(DEPLOYER),
        time_ms: 1_000,
        command: put.clone(),
        proof: None,
    };
    assert_eq!(s.apply(&mine), Ok(Reply::Version(1)));
    // A viewer floods refused commands, in the same session id and in thousands of others.
    for client in 0..(MAX_SESSIONS as u64 + 10) {
        let r = Request { client, serial: 1, actor: Actor::User(VIEWER), ..mine.clone() };
        assert!(s.apply(&r).is_err());
    }
    assert!(!s.sessions.keys().any(|(a, _)| *a == Actor::User(VIEWER)), "refusals cost nothing");
    // The deployer's retry is still recognised: applied once, same answer.
    assert_eq!(s.apply(&mine), Ok(Reply::Version(1)));
    assert_eq!(s.workloads()[&w("web")].version, 1);
    // The admin's own many sessions push out only its own oldest.
    for client in 0..(MAX_SESSIONS_PER_ACTOR as u64 * 3) {
        let r = Request {
            client: 1_000 + client,
            serial: 1,
            actor: Actor::User(ADMIN),
            command: Command::Scale { name: w("web"), replicas: 1 },
            ..mine.clone()
        };
        s.apply(&r).unwrap();
    }
    let admin = s.sessions.keys().filter(|(a, _)| *a == Actor::User(ADMIN)).count();
    assert_eq!(admin, MAX_SESSIONS_PER_ACTOR);
    assert!(s.sessions.contains_key(&(Actor::User(DEPLOYER), 42)));
    assert_eq!(s.apply(&mine), Ok(Reply::Version(1)), "still the same answer");
}

/// What `node` runs, as a worker is sent it: each replica, whether it is the node's own,
/// and the spec it runs.
fn list_of(s: &State, node: &NodeName) -> Vec<(ReplicaId, bool, Option<WorkloadSpec>)> {
    s.runs_on(node)
        .map(|(r, a)| {
            (r.clone(), a.node == *node, s.workloads().get(&r.workload).map(|w| w.spec.clone()))
        })
        .collect()
}

proptest! {
    /// No change of a node's list goes without its generation moving (a worker that holds
    /// a generation is told "not modified" and the leader nudges only nodes whose generation
    /// moved, so a missed bump would leave a node running the wrong replicas); generations
    /// never go back; and the gate's changes since any generation, merged into the lists as
    /// they were then, give the lists as they are.
    #[test]
    fn generations_follow_every_change(cmds in prop::collection::vec((arb_actor(), arb_command()), 1..40)) {
        let (mut s, mut c) = ready();
        // Something runs on both nodes from the start, so that most commands touch it.
        for (name, replicas) in [("web", 3), ("db", 2)] {
            s.apply(&c.req(Actor::User(ADMIN), Command::PutWorkload(Box::new(spec(name, replicas))))).unwrap();
        }
        let changes = (0..3)
            .map(|i| start(&ReplicaId::new(&w("web"), i), if i == 0 { "node-a" } else { "node-b" }))
            .chain([start(&ReplicaId::new(&w("db"), 0), "node-a")])
            .collect();
        s.apply(&c.req(Actor::System, Command::Assign { epoch: 1, changes })).unwrap();
        let nodes = [n("node-a"), n("node-b"), n("ghost")];
        let gate = |s: &State| -> (BTreeSet<NodeName>, BTreeSet<NodeName>) {
            let (revoked, enrolled): (Vec<_>, Vec<_>) = s.nodes().iter().partition(|(_, r)| r.revoked);
            (enrolled.into_iter().map(|(n, _)| n.clone()).collect(), revoked.into_iter().map(|(n, _)| n.clone()).collect())
        };
        let mut history = vec![(s.gate_generation(), gate(&s))];
        for (actor, cmd) in cmds {
            let before: Vec<_> = nodes.iter().map(|p| (list_of(&s, p), s.assignments_generation(p))).collect();
            let _ = s.apply(&c.req(actor, cmd));
            for (p, (list, generation)) in nodes.iter().zip(before) {
                let now = s.assignments_generation(p);
                prop_assert!(now >= generation, "generations only grow");
                if list_of(&s, p) != list {
                    prop_assert!(now > generation, "{p}'s list changed but its generation did not");
                }
            }
            history.push((s.gate_generation(), gate(&s)));
        }
        let (want_enrolled, want_revoked) = gate(&s);
        for (since, (mut enrolled, mut revoked)) in history {
            for (p, r) in s.gate_changed_since(since) {
                if r.revoked {
                    enrolled.remove(p);
                    revoked.insert(p.clone());
                } else {
                    revoked.remove(p);
                    enrolled.insert(p.clone());
                }
            }
            prop_assert_eq!(&enrolled, &want_enrolled);
            prop_assert_eq!(&revoked, &want_revoked);
        }
    }
}
