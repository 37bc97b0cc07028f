#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cloudless_types::{DeviceClass, Runtime};
use proptest::prelude::*;

use super::*;

fn key() -> Keypair {
    Keypair::generate_ed25519()
}

fn desc(zone: &str) -> NodeDescriptor {
    let mut d = NodeDescriptor {
        addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()],
        zone: Some(zone.into()),
        device_class: Some(DeviceClass::Laptop),
        runtimes: vec![Runtime::Wasi],
        cpu_millis: 4000,
        memory_mib: 8192,
        ..Default::default()
    };
    d.labels.insert("owner".into(), "alice".into());
    d
}

fn anyone(_: &PeerId) -> bool {
    true
}

/// Runs the protocol between two directories, starting with `a`'s summary, until neither has
/// anything to send. Returns the number of messages exchanged.
fn exchange(a: &mut Directory, b: &mut Directory, now: Instant) -> usize {
    let mut queue = VecDeque::from([(true, a.summary())]);
    let mut n = 0;
    while let Some((to_b, m)) = queue.pop_front() {
        n += 1;
        assert!(n < 10_000, "the exchange did not settle");
        let (from, to) = if to_b { (&*a, &mut *b) } else { (&*b, &mut *a) };
        let from = from.me;
        let out = to.receive(from, m, anyone, now).unwrap();
        assert!(out.refused.is_empty(), "{:?}", out.refused);
        for r in out.replies {
            queue.push_back((!to_b, r));
        }
    }
    n
}

/// A valid entry signed by `k`, as it travels.
fn signed(k: &Keypair, d: &NodeDescriptor, version: u64) -> Vec<u8> {
    let mut dir = Directory::new(k.clone());
    dir.set_own(d, version).unwrap();
    dir.entries.get(&dir.me).unwrap().bytes.clone()
}

#[test]
fn entries_replicate_and_converge_after_concurrent_edits() {
    let now = Instant::now();
    let (mut a, mut b, mut c) =
        (Directory::new(key()), Directory::new(key()), Directory::new(key()));
    let (pa, pc) = (a.me, c.me);
    a.set_own(&desc("a"), 1).unwrap();
    b.set_own(&desc("b"), 1).unwrap();
    exchange(&mut a, &mut b, now);
    exchange(&mut b, &mut c, now);
    assert_eq!(c.get(&pa), Some(desc("a")));
    // "Partition": a and c edit concurrently, then heal through b.
    a.set_own(&desc("a2"), 2).unwrap();
    let mut d = desc("c2");
    d.labels.insert("gpu".into(), "true".into());
    c.set_own(&d, 2).unwrap();
    exchange(&mut a, &mut b, now);
    exchange(&mut b, &mut c, now);
    exchange(&mut a, &mut b, now);
    assert_eq!(a.digest(), c.digest());
    assert_eq!(a.entries(), c.entries());
    assert_eq!(a.get(&pc), Some(d));
    assert_eq!(c.get(&pa).unwrap().zone.as_deref(), Some("a2"));
    // In sync, an exchange is one summary.
    assert_eq!(exchange(&mut a, &mut c, now), 1);
}

#[test]
fn a_directory_larger_than_one_message_converges_range_by_range() {
    let now = Instant::now();
    let (mut a, mut b) = (Directory::new(key()), Directory::new(key()));
    for i in 0..2500u64 {
        let bytes = signed(&key(), &desc("z"), i + 1);
        a.receive(b.me, Message::Entries(vec![bytes]), anyone, now).unwrap();
    }
    b.set_own(&desc("b"), 1).unwrap();
    assert!(a.versions(true).len() >= 3, "the versions must span several messages");
    let n = exchange(&mut a, &mut b, now);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(b.len(), 2501);
    assert!(n > 3, "{n} messages");
}

#[test]
fn a_forged_entry_is_refused_and_changes_nothing() {
    let now = Instant::now();
    let (victim, forger) = (key(), key());
    let mut target = Directory::new(key());
    let real = signed(&victim, &desc("real"), 5);
    target
        .receive(forger.public().to_peer_id(), Message::Entries(vec![real]), anyone, now)
        .unwrap();
    let before = target.digest();
    let pv = victim.public().to_peer_id();

    // The victim's envelope with another payload: the signature no longer verifies.
    let evil = postcard::to_allocvec(&Payload { version: 99, descriptor: desc("evil") }).unwrap();
    let mut tampered = signed(&victim, &desc("real"), 5);
    let at = tampered.windows(4).position(|w| w == b"real").unwrap();
    tampered[at..at + 4].copy_from_slice(b"evil");
    // The forger signs a payload of its own: it can only ever describe itself.
    let own_claim = SignedEnvelope::new(&forger, DOMAIN.into(), PAYLOAD_TYPE.to_vec(), evil)
        .unwrap()
        .into_protobuf_encoding();
    // A signature made for another purpose.
    let other_domain = SignedEnvelope::new(
        &victim,
        "libp2p-peer-record".into(),
        PAYLOAD_TYPE.to_vec(),
        postcard::to_allocvec(&Payload { version: 100, descriptor: desc("evil") }).unwrap(),
    )
    .unwrap()
    .into_protobuf_encoding();
    let out = target
        .receive(
            forger.public().to_peer_id(),
            Message::Entries(vec![tampered, other_domain, b"garbage".to_vec()]),
            anyone,
            now,
        )
        .unwrap();
    assert!(out.changed.is_empty());
    assert_eq!(out.refused.len(), 3, "{:?}", out.refused);
    assert!(out.refused.iter().all(|r| r.contains("verify") || r.contains("envelope")));
    assert_eq!(target.digest(), before);
    assert_eq!(target.get(&pv), Some(desc("real")));
    let out = target
        .receive(forger.public().to_peer_id(), Message::Entries(vec![own_claim]), anyone, now)
        .unwrap();
    assert_eq!(out.changed, BTreeSet::from([forger.public().to_peer_id()]));
    assert_eq!(target.get(&pv), Some(desc("real")));
}

#[test]
fn entries_of_non_members_and_oversized_messages_are_refused() {
    let now = Instant::now();
    let mut d = Directory::new(key());
    let member = key();
    let pm = member.public().to_peer_id();
    let only = move |p: &PeerId| *p == pm;
    let strangers: Vec<Vec<u8>> = (0..200).map(|_| signed(&key(), &desc("x"), 1)).collect();
    let out = d.receive(pm, Message::Entries(strangers), only, now).unwrap();
    assert_eq!(out.refused.len(), 200);
    assert!(out.refused[0].contains("not a member"), "{}", out.refused[0]);
    assert!(d.is_empty());

    let too_many = vec![signed(&member, &desc("m"), 1); MAX_BATCH_ENTRIES + 1];
    let err = d.receive(pm, Message::Entries(too_many), only, now).unwrap_err();
    assert!(err.to_string().contains("at most 256"), "{err}");
    let out = d.receive(pm, Message::Entries(vec![vec![0; MAX_ENTRY_BYTES + 1]]), only, now);
    assert!(out.unwrap().refused[0].contains("at most"));
    assert!(d.is_empty());

    // A member revoked later loses its entry.
    d.receive(pm, Message::Entries(vec![signed(&member, &desc("m"), 1)]), only, now).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d.retain(|_| false), vec![pm]);
    assert!(d.is_empty());
}

#[test]
fn versions_out_of_order_or_outside_their_range_are_malformed() {
    let now = Instant::now();
    let mut d = Directory::new(key());
    d.set_own(&desc("d"), 1).unwrap();
    let mut ids: Vec<PeerId> = (0..3).map(|_| key().public().to_peer_id()).collect();
    ids.sort();
    let v = |p: PeerId| Version { peer: p, version: 1, hash: [0; 32] };
    let cases = [
        (None, None, vec![v(ids[1]), v(ids[0])]),
        (None, None, vec![v(ids[0]), v(ids[0])]),
        (Some(ids[1]), None, vec![v(ids[0])]),
        (None, Some(ids[1]), vec![v(ids[2])]),
        (Some(ids[2]), Some(ids[0]), vec![]),
        (None, None, vec![v(ids[0]); MAX_VERSIONS + 1]),
    ];
    let before = d.digest();
    for (after, upto, versions) in cases {
        let m = Message::Versions { after, upto, versions, reply: true };
        let err = d.receive(ids[0], m, anyone, now).unwrap_err();
        assert!(err.to_string().starts_with("malformed directory message"), "{err}");
    }
    assert_eq!(d.digest(), before);
}

#[test]
fn two_entries_with_one_version_converge_on_the_same_one() {
    // A malicious node signs two entries with the same version and gives one to each side.
    let now = Instant::now();
    let liar = key();
    let (mut a, mut b) = (Directory::new(key()), Directory::new(key()));
    let pl = liar.public().to_peer_id();
    a.receive(pl, Message::Entries(vec![signed(&liar, &desc("one"), 7)]), anyone, now).unwrap();
    b.receive(pl, Message::Entries(vec![signed(&liar, &desc("two"), 7)]), anyone, now).unwrap();
    exchange(&mut a, &mut b, now);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.get(&pl), b.get(&pl));
}

#[test]
fn a_peer_that_asks_again_and_again_gets_its_budget_and_no_more() {
    let now = Instant::now();
    let mut d = Directory::new(key());
    for _ in 0..1000 {
        let bytes = signed(&key(), &desc("z"), 1);
        d.receive(d.me, Message::Entries(vec![bytes]), anyone, now).unwrap();
    }
    let asker = key().public().to_peer_id();
    let ask = || Message::Versions { after: None, upto: None, versions: vec![], reply: true };
    let mut answered = 0u64;
    for _ in 0..100 {
        let out = d.receive(asker, ask(), anyone, now).unwrap();
        answered += out.replies.iter().map(message_cost).sum::<u64>();
    }
    assert!(answered <= ANSWER_BURST_BYTES, "{answered} bytes answered at once");
    assert!(answered > 0);
    // A second later, about a second's worth more.
    let later = now + Duration::from_secs(1);
    let out = d.receive(asker, ask(), anyone, later).unwrap();
    assert!(!out.replies.is_empty());
}

#[test]
fn an_author_that_changes_its_entry_again_and_again_is_followed_within_a_budget() {
    let now = Instant::now();
    let (k, mut b) = (key(), Directory::new(key()));
    let author = k.public().to_peer_id();
    let burst = usize::try_from(CHANGE_BURST).unwrap();
    // The author's entry of version `v`, with zone `z<v>`, offered at `t`.
    let offer = |b: &mut Directory, v: u64, t: Instant| {
        let entry = signed(&k, &desc(&format!("z{v}")), v);
        b.receive(author, Message::Entries(vec![entry]), anyone, t).unwrap()
    };
    // Sixty changes at once: the first `burst` are taken, the rest refused (and said why).
    let mut refused = 0;
    for v in 1..=60u64 {
        let out = offer(&mut b, v, now);
        refused += out.refused.len();
        assert_eq!(out.changed.len(), usize::from(v <= CHANGE_BURST));
    }
    assert_eq!(refused, 60 - burst);
    assert_eq!(b.get(&author).unwrap().zone, Some(format!("z{burst}")));
    // Entries it did not sign, or old ones, spend nothing of its budget: another author's
    // changes and a relayer's copies are taken as before.
    let other = key();
    let out = b
        .receive(author, Message::Entries(vec![signed(&other, &desc("o"), 1)]), anyone, now)
        .unwrap();
    assert_eq!(out.changed.len(), 1);
    // Late, not lost: one interval on, the newest entry (which the author's periodic exchange
    // offers again) is taken.
    let later = now + CHANGE_INTERVAL;
    let out = offer(&mut b, 60, later);
    assert_eq!(out.changed.len(), 1, "{:?}", out.refused);
    assert_eq!(b.get(&author).unwrap().zone.as_deref(), Some("z60"));
    let out = offer(&mut b, 61, later);
    assert!(out.changed.is_empty(), "one per interval");
    // Replayed older entries do not keep the newest out: refused while the budget is spent,
    // the newest seen is kept and wins the next token, whatever arrives with it.
    let later = later + CHANGE_INTERVAL;
    let out = offer(&mut b, 62, later);
    assert_eq!(out.changed.len(), 1);
    for v in [70, 63] {
        let out = offer(&mut b, v, later);
        assert!(out.changed.is_empty());
    }
    let refill = later + CHANGE_INTERVAL;
    let out = offer(&mut b, 64, refill);
    assert_eq!(out.changed.len(), 1);
    assert_eq!(b.get(&author).unwrap().zone.as_deref(), Some("z70"), "the newest refused one won");
    // Or, with nothing arriving, the periodic promotion takes it.
    let out = offer(&mut b, 80, refill);
    assert!(out.changed.is_empty());
    assert!(b.promote_late(anyone, refill).is_empty(), "not before the budget allows");
    assert_eq!(b.promote_late(anyone, refill + CHANGE_INTERVAL), vec![author]);
    assert_eq!(b.get(&author).unwrap().zone.as_deref(), Some("z80"));
    // Its own changes are never budgeted.
    for v in 1..=60u64 {
        assert!(b.set_own(&desc(&format!("own{v}")), v).unwrap());
    }
}

#[test]
fn persistence_round_trips_and_bad_files_are_set_aside() {
    let now = Instant::now();
    let k = key();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(OLD_FILE), b"automerge").unwrap();
    let (mut a, warning) = Directory::open(k.clone(), dir.path()).unwrap();
    assert!(warning.is_none());
    assert!(!dir.path().join(OLD_FILE).exists());
    a.set_own(&desc("a"), 1).unwrap();
    let other = key();
    a.receive(a.me, Message::Entries(vec![signed(&other, &desc("o"), 3)]), anyone, now).unwrap();
    a.persist(dir.path()).unwrap();
    let (mut b, _) = Directory::open(k.clone(), dir.path()).unwrap();
    assert_eq!(b.entries(), a.entries());
    assert_eq!(b.digest(), a.digest());

    // A tampered entry in the file is dropped; the rest stays.
    let mut tampered = signed(&other, &desc("other-zone"), 4);
    let at = tampered.windows(10).position(|w| w == b"other-zone").unwrap();
    tampered[at] = b'O';
    let own = a.entries.get(&a.me).unwrap().bytes.clone();
    fs::write(dir.path().join(FILE), postcard::to_allocvec(&vec![own, tampered]).unwrap()).unwrap();
    let (c, warning) = Directory::open(k.clone(), dir.path()).unwrap();
    assert!(warning.unwrap().contains("did not verify"));
    assert_eq!(c.len(), 1);

    fs::write(dir.path().join(FILE), b"\xff\xff\xff\xff\xff").unwrap();
    let (c, warning) = Directory::open(k, dir.path()).unwrap();
    assert!(warning.unwrap().contains("is corrupt"));
    assert!(c.is_empty());
}

#[test]
fn a_restarted_node_without_its_copy_wins_its_own_entry_back() {
    let now = Instant::now();
    let k = key();
    let (mut a, mut b) = (Directory::new(k.clone()), Directory::new(key()));
    // The earlier life's clock ran ahead.
    a.set_own(&desc("old"), 1_000_000).unwrap();
    exchange(&mut a, &mut b, now);
    // a loses its copy and comes back with a slower clock, writing before syncing.
    let mut a2 = Directory::new(k);
    a2.set_own(&desc("new"), 10).unwrap();
    exchange(&mut a2, &mut b, now);
    exchange(&mut a2, &mut b, now);
    assert_eq!(b.get(&a2.me).unwrap().zone.as_deref(), Some("new"));
    assert_eq!(a2.get(&a2.me).unwrap().zone.as_deref(), Some("new"));
    assert!(a2.entries.get(&a2.me).unwrap().version > 1_000_000);
}

proptest! {
    /// Whatever a peer sends decodes to an error or a message, and applying it never panics
    /// nor grows the directory by entries that do not verify.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let now = Instant::now();
        let mut d = Directory::new(key());
        let peer = key().public().to_peer_id();
        if let Ok(m) = postcard::from_bytes::<Message>(&bytes) {
            let _ = d.receive(peer, m, anyone, now);
        }
        let _ = d.receive(peer, Message::Entries(vec![bytes]), anyone, now);
        prop_assert!(d.is_empty());
    }
}

#[test]
fn a_data_dir_older_than_the_last_run_is_found_out_and_only_then() {
    let now = Instant::now();
    let k = key();
    let (backup, current) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut peer = Directory::new(key());
    // First run: an entry, kept; the data dir is backed up.
    let mut a = Directory::open(k.clone(), backup.path()).unwrap().0;
    a.set_own(&desc("v1"), 1_000).unwrap();
    a.persist(backup.path()).unwrap();
    fs::copy(backup.path().join(FILE), current.path().join(FILE)).unwrap();
    // Second run, from the current data dir: a later entry, which the peer gets.
    let mut a = Directory::open(k.clone(), current.path()).unwrap().0;
    a.set_own(&desc("v2"), 2_000).unwrap();
    a.persist(current.path()).unwrap();
    exchange(&mut a, &mut peer, now);
    // A normal restart: nothing stale, whatever the peer echoes.
    let mut again = Directory::open(k.clone(), current.path()).unwrap().0;
    exchange(&mut peer, &mut again, now);
    again.set_own(&desc("v3"), 3_000).unwrap();
    // Not shared before the data dir keeps it.
    exchange(&mut again, &mut peer, now);
    assert_eq!(peer.get(&again.me).unwrap().zone.as_deref(), Some("v2"));
    again.persist(current.path()).unwrap();
    exchange(&mut again, &mut peer, now);
    assert_eq!(again.stale(), None);

    // The backup is restored: the peer holds an entry signed after everything it kept.
    let mut restored = Directory::open(k.clone(), backup.path()).unwrap().0;
    restored.set_own(&desc("v4"), 4_000).unwrap();
    let mut queue = VecDeque::from([(true, restored.summary())]);
    while let Some((to_peer, m)) = queue.pop_front() {
        let out = if to_peer {
            peer.receive(restored.me, m, anyone, now).unwrap()
        } else {
            restored.receive(peer.me, m, anyone, now).unwrap()
        };
        queue.extend(out.replies.into_iter().map(|r| (!to_peer, r)));
    }
    assert_eq!(restored.stale(), Some(Stale { kept: 1_000, seen: 3_000 }));

    // Restored on purpose: it signs above the later entry instead.
    let mut ok = Directory::open(k, backup.path()).unwrap().0;
    ok.accept_restored();
    ok.set_own(&desc("v5"), 4_100).unwrap();
    ok.persist(backup.path()).unwrap();
    exchange(&mut ok, &mut peer, now);
    exchange(&mut ok, &mut peer, now);
    assert_eq!(ok.stale(), None);
    assert_eq!(peer.get(&ok.me).unwrap().zone.as_deref(), Some("v5"));
}
