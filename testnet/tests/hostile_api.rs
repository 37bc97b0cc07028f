//! Users who try to exceed their role, and strangers replaying what users signed, against a
//! pool of real `cloudless` processes.
//!
//! - `user_cross_cluster_replay`: a request the admin signed for another cluster (where the
//!   same person is admin too) is sent here: refused, nothing changed.
//! - `user_session_eviction_replay`: a deployer floods refused commands from thousands of
//!   client sessions, and valid ones from dozens, to push the admin's session out; then the
//!   admin's captured request is replayed within the clock window: answered from the session,
//!   applied once.
//! - `user_viewer_reads_env`: a viewer reads a workload: the environment values (where secrets
//!   are passed) are hidden; a deployer sees them.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::sync::atomic::{AtomicU64, Ordering};

use cloudless_api::user::GetWorkload;
use cloudless_api::{
    ApiError, Command, ErrorKind, Reply, Request, Role, SignedRequest, UserKey, UserRequest,
};
use cloudless_testnet::hostile::{Hostile, Pool, peer_of};
use cloudless_types::{Image, Resources, WorkloadName, WorkloadSpec, now_ms};
use ed25519_dalek::SigningKey;
use futures::future::join_all;
use libp2p::PeerId;

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Distinct client sessions for the requests these tests sign.
static CLIENT: AtomicU64 = AtomicU64::new(1);

fn spec(name: &str, replicas: u32) -> WorkloadSpec {
    WorkloadSpec::new(
        WorkloadName::new(name).unwrap(),
        Image::Container("busybox:1".into()),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        replicas,
    )
}

fn admin(p: &Pool) -> SigningKey {
    cloudless_api::keys::load(&p.procs.ctl_dir().join(cloudless_api::ctl::USER_KEY)).unwrap()
}

/// `command` signed by `user` for cluster `root`, in a fresh session.
fn signed(user: &SigningKey, root: UserKey, command: Command) -> SignedRequest {
    let client = CLIENT.fetch_add(1, Ordering::Relaxed);
    SignedRequest::sign(user, root, client, 1, now_ms(), UserRequest::Command(command))
}

async fn send(h: &Hostile, to: PeerId, s: &SignedRequest) -> Result<Reply, ApiError> {
    h.api::<Command>(to, &Request::User(s.clone())).await.unwrap()
}

/// Adds `key` as a user with `role`, through the CLI.
fn add_user(p: &Pool, key: &SigningKey, role: &str) {
    let hex = cloudless_types::hex(&key.verifying_key().to_bytes());
    let out = p.procs.ctl(&["user", "add", &hex, "--role", role, "--name", role]);
    assert!(out.ok, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_cross_cluster_replay() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let target = peer_of(&p.procs.nodes[0].addr).unwrap();
    let h = Hostile::stranger(&p.procs.nodes[0].addr).await.unwrap();
    let eve = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let grab = Command::PutUser {
        key: eve.verifying_key().to_bytes(),
        name: "eve".into(),
        role: Role::Admin,
    };
    // What the admin's CLI signed for the other cluster (its root key is another).
    let elsewhere = signed(&admin(&p), rand::random(), grab.clone());
    let r = send(&h, target, &elsewhere).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    assert!(e.message.contains("another cluster"), "{e}");
    // The same command signed for this cluster is what works (so the refusal is the binding).
    let here = signed(&admin(&p), p.root_key().unwrap(), Command::RemoveUser { key: [3; 32] });
    assert!(send(&h, target, &here).await.is_err_and(|e| e.kind == ErrorKind::NotFound));
    let who = SignedRequest::sign(
        &eve,
        p.root_key().unwrap(),
        1,
        1,
        now_ms(),
        UserRequest::Whoami(cloudless_api::user::Whoami),
    );
    let r = h.api::<cloudless_api::user::Whoami>(target, &Request::User(who)).await.unwrap();
    assert!(r.is_err_and(|e| e.kind == ErrorKind::Unauthorized), "eve is no user");
    p.keeps_serving().unwrap();
    p.report("user_cross_cluster_replay", 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_session_eviction_replay() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let target = peer_of(&p.procs.nodes[0].addr).unwrap();
    let root = p.root_key().unwrap();
    let h = Hostile::stranger(&p.procs.nodes[0].addr).await.unwrap();
    let deployer = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    add_user(&p, &deployer, "deployer");

    // The admin's request, captured on its way.
    let captured = signed(&admin(&p), root, Command::PutWorkload(Box::new(spec("captured", 1))));
    let first = send(&h, target, &captured).await.unwrap();

    // Refused commands from more sessions than the cluster keeps, then valid ones from many.
    let flood = cloudless_consensus::state::MAX_SESSIONS + 100;
    let bad = Command::PutWorkload(Box::new(spec("bad", 50_000)));
    // In chunks a node takes from one peer at once (more are answered "busy").
    let at_once = cloudless_mesh::node::MAX_STREAMS_PER_STRANGER;
    for chunk in (0..flood).collect::<Vec<_>>().chunks(at_once) {
        let sent = chunk.iter().map(|_| {
            let s = signed(&deployer, root, bad.clone());
            let h = &h;
            async move { send(h, target, &s).await }
        });
        for r in join_all(sent).await {
            assert!(r.is_err_and(|e| e.kind == ErrorKind::Invalid));
        }
    }
    for i in 0..(cloudless_consensus::state::MAX_SESSIONS_PER_ACTOR * 4) {
        let s = signed(&deployer, root, Command::PutWorkload(Box::new(spec(&format!("d{i}"), 1))));
        send(&h, target, &s).await.unwrap();
    }

    // The replay is answered from the admin's session: applied once.
    let again = send(&h, target, &captured).await.unwrap();
    assert_eq!(again, first, "the replay was applied again");
    let w = p.procs.json(&["workload", "get", "captured"]).unwrap();
    assert_eq!(w["version"].as_u64(), Some(1), "{w}");
    p.keeps_serving().unwrap();
    p.report("user_session_eviction_replay", 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_viewer_reads_env() {
    let _one = SERIAL.lock().await;
    let mut p = Pool::start(3, 0).unwrap();
    let target = peer_of(&p.procs.nodes[0].addr).unwrap();
    let root = p.root_key().unwrap();
    let h = Hostile::stranger(&p.procs.nodes[0].addr).await.unwrap();
    let viewer = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    add_user(&p, &viewer, "viewer");
    let mut s = spec("secretive", 1);
    s.env.insert("TOKEN".into(), "s3cret".into());
    send(&h, target, &signed(&admin(&p), root, Command::PutWorkload(Box::new(s)))).await.unwrap();

    let get = |key: &SigningKey| {
        let client = CLIENT.fetch_add(1, Ordering::Relaxed);
        let name = WorkloadName::new("secretive").unwrap();
        let r = UserRequest::Workload(GetWorkload { name });
        Request::User(SignedRequest::sign(key, root, client, 1, now_ms(), r))
    };
    let seen = h.api::<GetWorkload>(target, &get(&viewer)).await.unwrap().unwrap();
    assert_ne!(seen.spec.env["TOKEN"], "s3cret", "a viewer read the secret");
    let seen = h.api::<GetWorkload>(target, &get(&admin(&p))).await.unwrap().unwrap();
    assert_eq!(seen.spec.env["TOKEN"], "s3cret");
    p.keeps_serving().unwrap();
    p.report("user_viewer_reads_env", 0);
    h.stop().await;
}
