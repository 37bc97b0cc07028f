//! An enrolled device that lies in the node directory, against a pool of real `cloudless`
//! processes: it cannot write another node's entry, cannot store entries for made-up nodes,
//! and cannot make a node hold or send more than the directory's bounds.
//!
//! - `directory_forged_entry`: the victim's own signed entry, as every member holds it, with
//!   one address changed (the old directory believed the author named inside a change), and a
//!   signature made for another purpose: refused; the victim's addresses stay as they were.
//! - `directory_inflation_bomb`: 4,096 entries of the largest descriptor, signed by made-up
//!   nodes, in datagrams of up to 8 MiB (the old directory inflated what automerge
//!   decompressed and stored whatever keys a change wrote); messages with too many or too
//!   large entries; 2,000 requests for the whole directory and 1,000 for every member's entry:
//!   nothing is stored, the answers stay within the asker's budget, and the target's memory
//!   stays within the bound.
//! - `directory_entry_churn`: a member re-signs its own entry sixty times in a row (the old
//!   directory took every one, each costing every node an event, an address book update and
//!   a file rewrite): the target takes at most [`directory::CHANGE_BURST`] of them, and the
//!   newest one once its budget refilled.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use cloudless_mesh::directory::{self, Message};
use cloudless_mesh::node::{DATAGRAM_PROTOCOL, Datagram};
use cloudless_testnet::hostile::{NO_ANSWER, Pool, RawPeer};
use cloudless_testnet::procs::{throughout, until};
use cloudless_types::NodeDescriptor;
use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use libp2p::identity::Keypair;

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The target's resident memory may grow this much: 4,096 stored entries of the largest
/// descriptor would take over 100 MiB, an 8 MiB datagram decoded twice 16.
const RSS_GROWTH_MIB: f64 = 64.0;

/// A datagram frame carrying a directory message.
fn frame(m: Message) -> Vec<u8> {
    let body = postcard::to_allocvec(&Datagram::Directory(m)).unwrap();
    let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    f.extend(body);
    f
}

/// Sends a directory message to `target` and checks that it was read (acknowledged).
async fn send(raw: &RawPeer, target: PeerId, m: Message) {
    let answer =
        raw.ask(target, DATAGRAM_PROTOCOL, &frame(m), Duration::from_secs(30)).await.unwrap();
    assert_eq!(answer, NO_ANSWER, "the datagram was not taken");
}

/// An entry signed by `key`, as the directory signs them.
fn entry(key: &Keypair, d: &NodeDescriptor, version: u64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Payload<'a> {
        version: u64,
        descriptor: &'a NodeDescriptor,
    }
    let payload = postcard::to_allocvec(&Payload { version, descriptor: d }).unwrap();
    SignedEnvelope::new(key, directory::DOMAIN.into(), directory::PAYLOAD_TYPE.to_vec(), payload)
        .unwrap()
        .into_protobuf_encoding()
}

/// The largest descriptor `NodeDescriptor::validate` allows.
fn largest() -> NodeDescriptor {
    let mut d = NodeDescriptor {
        addrs: (0..cloudless_types::MAX_ADDRS).map(|i| format!("{i:0>256}")).collect(),
        ..Default::default()
    };
    for i in 0..cloudless_types::MAX_LABELS {
        d.labels.insert(format!("{i:a>63}"), "v".repeat(cloudless_types::MAX_LABEL_VALUE));
    }
    d.validate().unwrap();
    d
}

/// Node `i`'s directory size, from its /metrics.
fn entries(p: &Pool, i: usize) -> Option<f64> {
    p.procs.metric(i, "cloudless_directory_entries")
}

/// Node `i`'s view of node `peer`: its addresses and runtimes (from its directory entry).
fn seen(p: &Pool, i: usize, peer: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let out = p.procs.ctl_via(i, &["-o", "json", "node", "get", peer]);
    let n: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let addrs = n["addresses"].clone();
    addrs.as_array().is_some_and(|a| !a.is_empty()).then(|| (addrs, n["runtimes"].clone()))
}

/// A pool of three voters and two workers whose node 0 holds all five entries; worker 3 is
/// taken over and a raw peer with its key is connected to node 0.
async fn attacker() -> (Pool, RawPeer, PeerId) {
    let mut p = Pool::start(3, 2).unwrap();
    until("node 0 holds every entry", Duration::from_secs(60), || {
        (entries(&p, 0) == Some(5.0)).then_some(())
    })
    .unwrap();
    let (addr, target) = p.addr(0).unwrap();
    let key = p.take_over(3).unwrap();
    let raw = RawPeer::connected(key, target, &addr).await.unwrap();
    (p, raw, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_forged_entry() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target) = attacker().await;
    let victim = p.procs.nodes[4].peer.clone();
    let before =
        until("node 0 shows the victim's entry", Duration::from_secs(30), || seen(&p, 0, &victim))
            .unwrap();

    // The victim's entry as it signed it (every member holds a copy), one address changed.
    let file = std::fs::read(p.procs.nodes[4].data_dir.join(directory::FILE)).unwrap();
    let list: Vec<Vec<u8>> = postcard::from_bytes(&file).unwrap();
    let real = list
        .into_iter()
        .find(|e| {
            let env = SignedEnvelope::from_protobuf_encoding(e).unwrap();
            let (_, key) = env
                .payload_and_signing_key(directory::DOMAIN.into(), directory::PAYLOAD_TYPE)
                .unwrap();
            key.to_peer_id().to_string() == victim
        })
        .expect("the victim's file holds its entry");
    let mut forged = real.clone();
    let at = forged.windows(9).position(|w| w == b"127.0.0.1").expect("an address");
    forged[at + 8] = b'9';
    // The same payload signed for another purpose (a libp2p peer record's domain).
    let env = SignedEnvelope::from_protobuf_encoding(&real).unwrap();
    let (payload, _) =
        env.payload_and_signing_key(directory::DOMAIN.into(), directory::PAYLOAD_TYPE).unwrap();
    let other_purpose = SignedEnvelope::new(
        &raw_key(&p, 3),
        "libp2p-peer-record".into(),
        directory::PAYLOAD_TYPE.to_vec(),
        payload.to_vec(),
    )
    .unwrap()
    .into_protobuf_encoding();
    for m in [Message::Entries(vec![forged.clone()]), Message::Entries(vec![other_purpose])] {
        send(&raw, target, m).await;
    }
    // Sent again and again: still refused, and the victim's own entry keeps coming back.
    for _ in 0..20 {
        send(&raw, target, Message::Entries(vec![forged.clone()])).await;
    }
    throughout("node 0 shows the victim's real entry", Duration::from_secs(3), || {
        seen(&p, 0, &victim).is_some_and(|s| s == before)
    })
    .unwrap();
    eprintln!("forged entry: 22 refused; node 0 still has {:?}", before.0);
    p.keeps_serving().unwrap();
    p.report("directory_forged_entry", 0);
}

/// The key of node `i` (taken over).
fn raw_key(p: &Pool, i: usize) -> Keypair {
    cloudless_testnet::hostile::key_of(&p.procs.nodes[i].data_dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_inflation_bomb() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target) = attacker().await;
    let before = p.rss_mib(0).unwrap();

    // Made-up nodes with the largest descriptor: 256 to a message, 16 messages of ~7 MiB.
    let big = largest();
    let made_up: Vec<Vec<u8>> = (0..directory::MAX_BATCH_ENTRIES)
        .map(|_| entry(&Keypair::generate_ed25519(), &big, 1))
        .collect();
    let size = made_up[0].len();
    assert!(size > 24 * 1024 && size <= directory::MAX_ENTRY_BYTES, "{size} bytes");
    for _ in 0..16 {
        send(&raw, target, Message::Entries(made_up.clone())).await;
    }
    // More entries than a message may carry, and an entry over the size bound (the
    // attacker's own: a member may describe only itself, and only within the bounds).
    let own = raw_key(&p, 3);
    let mut too_many = made_up.clone();
    too_many.push(made_up[0].clone());
    send(&raw, target, Message::Entries(too_many)).await;
    let mut oversized = big.clone();
    oversized.zone = Some("z".repeat(cloudless_types::MAX_NAME));
    oversized.region = Some("r".repeat(cloudless_types::MAX_NAME));
    let mut huge = entry(&own, &oversized, u64::MAX);
    huge.resize(directory::MAX_ENTRY_BYTES + 1, 0);
    send(&raw, target, Message::Entries(vec![huge])).await;
    // The whole directory, asked for 2,000 times (the answers are metered per asker).
    for _ in 0..100 {
        let asks = (0..20).map(|_| Message::Versions {
            after: None,
            upto: None,
            versions: vec![],
            reply: true,
        });
        for m in asks {
            send(&raw, target, m).await;
        }
    }

    // Every member's entry, whatever its rank, asked for 1,000 times (metered like the
    // rest), and a request for more nodes than a Want may name (refused).
    let members: Vec<PeerId> = p.procs.nodes.iter().map(|n| n.peer.parse().unwrap()).collect();
    for _ in 0..1000 {
        send(&raw, target, Message::Want(members.clone())).await;
    }
    let too_many: Vec<PeerId> = (0..=directory::MAX_WANTED).map(|_| PeerId::random()).collect();
    send(&raw, target, Message::Want(too_many)).await;
    throughout("node 0 holds the five real entries only", Duration::from_secs(3), || {
        entries(&p, 0) == Some(5.0)
    })
    .unwrap();
    let peak = p.peak_rss_mib(0).unwrap();
    eprintln!(
        "directory inflation bomb: {} made-up entries of {size} bytes sent ({:.0} MiB), 2,000 \
         full-directory and 1,000 every-member requests; node 0 holds 5 entries; RSS {before:.1} -> peak {peak:.1} MiB",
        16 * made_up.len(),
        (16 * made_up.len() * size) as f64 / 1048576.0
    );
    assert!(peak < before + RSS_GROWTH_MIB, "node 0 grew from {before:.1} to {peak:.1} MiB");
    p.keeps_serving().unwrap();
    p.report("directory_inflation_bomb", 0);
}

/// The port of the first address node `i` shows for node `peer`.
fn first_port(p: &Pool, i: usize, peer: &str) -> Option<u64> {
    let (addrs, _) = seen(p, i, peer)?;
    let first = addrs.as_array()?.first()?.as_str()?.to_owned();
    first.split('/').nth(4)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_entry_churn() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target) = attacker().await;
    let me = p.procs.nodes[3].peer.clone();
    until("node 0 shows the attacker's entry", Duration::from_secs(30), || first_port(&p, 0, &me))
        .unwrap();
    let key = raw_key(&p, 3);
    // Versions above anything it signed while it ran (its versions are its clock's ms).
    let base =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64
            + 3_600_000;
    const CHANGES: u64 = 60;
    let changed = |v: u64| NodeDescriptor {
        addrs: vec![format!("/ip4/127.0.0.1/udp/{}/quic-v1", 20_000 + v)],
        ..Default::default()
    };
    for v in 1..=CHANGES {
        send(&raw, target, Message::Entries(vec![entry(&key, &changed(v), base + v)])).await;
    }
    let taken = until("node 0 took a change", Duration::from_secs(10), || {
        first_port(&p, 0, &me).filter(|port| (20_001..=20_000 + CHANGES).contains(port))
    })
    .unwrap()
        - 20_000;
    assert!(
        taken <= directory::CHANGE_BURST + 1,
        "node 0 took {taken} of {CHANGES} changes at once, at most {} allowed",
        directory::CHANGE_BURST
    );
    // Late, not lost: offered again (as the periodic exchange does), the newest is taken
    // once the budget refilled.
    let newest = entry(&key, &changed(CHANGES), base + CHANGES);
    let late = std::time::Instant::now();
    let deadline = directory::CHANGE_INTERVAL + Duration::from_secs(15);
    loop {
        send(&raw, target, Message::Entries(vec![newest.clone()])).await;
        if first_port(&p, 0, &me) == Some(20_000 + CHANGES) {
            break;
        }
        assert!(late.elapsed() < deadline, "node 0 never took the newest entry");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "directory entry churn: {CHANGES} changes sent at once, node 0 took {taken}; the newest \
         {:.1} s later",
        late.elapsed().as_secs_f64()
    );
    p.keeps_serving().unwrap();
    p.report("directory_entry_churn", 0);
}
