//! An enrolled device that lies in the membership protocol, against a pool of real
//! `cloudless` processes: what it says about others is refused, the victim stays alive in
//! everyone's view, and the member table holds members only.
//!
//! - `membership_forged_news_at_max`: a worker-only device tells a voter, point to point, that
//!   another worker is dead, suspect, left and alive, all at incarnation `u32::MAX` (where the
//!   victim could never refute again): refused, the victim stays alive.
//! - `membership_fake_member_flood`: the same device sends 100,000 made-up members (25
//!   messages used to fill the 100,000-member table, after which no real device could join):
//!   none is admitted.
//! - `membership_relayed_death_is_a_suspicion`: the device signs death notices about another
//!   worker at every incarnation it could be at (bad news nobody can disprove in advance): the
//!   voter only suspects it, the victim refutes (once, not once per notice), and it is never
//!   listed dead.
//! - `membership_suspicion_flood`: the device suspects the same worker again and again, four
//!   times a second for 20 s, each time at the incarnation its last refutation reached: once
//!   its budget is spent (four refuted suspicions, then one per 10 s) it is no longer
//!   believed: the victim refuted 5 times (47 with the budget lifted, each a pool-wide flood).
//! - `membership_member_list_flood`: the device asks a voter for the member list 100 times
//!   (each answer used to be the whole list: 2.4 MB at 10,000 members, for a request of a
//!   hundred bytes): it gets its budget of pages (16 for a one-page list, per 60 s), no more
//!   (with the budget lifted, more than 16 arrive at once).
//! - `membership_lying_answers`: the device answers every datagram a voter sends it (the
//!   member-list pages it asked for) with a frame announcing 8 MiB and never sending it: the
//!   voter keeps serving and does not grow. (That the answer is refused at the 4 KiB limit
//!   before a buffer is taken is `cloudless-mesh`'s codec test; RSS alone could not tell,
//!   since a zeroed buffer costs no memory until it is written.)

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::time::Duration;

use cloudless_mesh::identity::KeySeal;
use cloudless_mesh::membership::{Message, Update, UpdateKind};
use cloudless_mesh::node::{DATAGRAM_PROTOCOL, Datagram};
use cloudless_testnet::hostile::{NO_ANSWER, Pool, RawPeer, is_ack};
use cloudless_testnet::procs::{throughout, until};
use libp2p::PeerId;

/// One pool at a time (a lock that works across the tests' runtimes).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A datagram frame carrying `updates` piggybacked on a ping.
fn ping(seq: u32, updates: Vec<Update<PeerId>>) -> Vec<u8> {
    let body = postcard::to_allocvec(&Datagram::Membership(Message::Ping {
        seq,
        incarnation: 0,
        updates,
    }))
    .unwrap();
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Members of each state in node `i`'s table, from its /metrics.
fn members(p: &Pool, i: usize) -> f64 {
    ["alive", "suspect", "dead", "left"]
        .iter()
        .filter_map(|s| {
            p.procs.metric(i, &format!("cloudless_membership_members{{state=\"{s}\"}}"))
        })
        .sum()
}

/// Starts a pool of three voters and two workers, takes over worker 3, and connects a raw
/// peer with its key to node 0; the seal signs with that key.
async fn attacker() -> (Pool, RawPeer, PeerId, KeySeal) {
    let mut p = Pool::start(3, 2).unwrap();
    let (addr, target) = p.addr(0).unwrap();
    let key = p.take_over(3).unwrap();
    let seal = KeySeal::new(key.clone());
    let raw = RawPeer::connected(key, target, &addr).await.unwrap();
    (p, raw, target, seal)
}

/// Node `victim`'s state in node `i`'s list, if listed.
fn listed_state(p: &Pool, i: usize, victim: &str) -> Option<String> {
    let out = p.procs.ctl_via(i, &["-o", "json", "node", "list"]);
    let nodes = serde_json::from_str::<serde_json::Value>(&out.stdout).ok()?;
    nodes
        .as_array()?
        .iter()
        .find(|n| n["peer"] == victim)
        .and_then(|n| n["state"].as_str().map(str::to_owned))
}

/// Whether node `i` lists node `victim` alive.
fn listed_alive(p: &Pool, i: usize, victim: &str) -> bool {
    let out = p.procs.ctl_via(i, &["-o", "json", "node", "list"]);
    let Ok(nodes) = serde_json::from_str::<serde_json::Value>(&out.stdout) else { return false };
    nodes.as_array().is_some_and(|a| a.iter().any(|n| n["peer"] == victim && n["state"] == "alive"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_forged_news_at_max() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, seal) = attacker().await;
    let victim: PeerId = p.procs.nodes[4].peer.parse().unwrap();
    // Bad news in the attacker's own name, and the victim's own news signed by the attacker.
    let kinds = [
        UpdateKind::Dead { by: raw.peer_id() },
        UpdateKind::Suspect { by: raw.peer_id(), witnesses: 8 },
        UpdateKind::Left,
        UpdateKind::Alive,
        UpdateKind::Dead { by: raw.peer_id() },
    ];
    for (seq, kind) in kinds.into_iter().enumerate() {
        let forged = Update::signed(victim, u32::MAX, kind, &seal);
        let seq = u32::try_from(seq).unwrap();
        let answer = raw
            .ask(target, DATAGRAM_PROTOCOL, &ping(seq, vec![forged]), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(is_ack(&answer), "the ping was not taken: {answer:?}");
    }
    // Watched long enough for a suspicion to have run out (and for the victim to have been
    // unable to refute one at u32::MAX).
    let name = p.procs.nodes[4].peer.clone();
    throughout("the victim is listed alive", Duration::from_secs(5), || listed_alive(&p, 0, &name))
        .unwrap();
    p.keeps_serving().unwrap();
    p.report("membership_forged_news_at_max", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_fake_member_flood() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, seal) = attacker().await;
    let before = members(&p, 0);
    assert!(before >= 3.0, "node 0's membership gauges are not read: {before}");
    for seq in 0..25u32 {
        let fakes: Vec<Update<PeerId>> = (0..4000)
            .map(|_| Update::signed(PeerId::random(), 0, UpdateKind::Alive, &seal))
            .collect();
        let answer = raw
            .ask(target, DATAGRAM_PROTOCOL, &ping(seq, fakes), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(is_ack(&answer), "the ping was not taken: {answer:?}");
    }
    // The five real devices at most (the gauges may still be catching up with the last
    // joiner when `before` is read), watched while the gauges would catch up with fakes.
    let real = p.procs.nodes.len() as f64;
    throughout("only real devices are members", Duration::from_secs(3), || members(&p, 0) <= real)
        .unwrap();
    let after = members(&p, 0);
    eprintln!("fake member flood: 100,000 made-up members sent; node 0 holds {before} -> {after}");
    p.keeps_serving().unwrap();
    p.report("membership_fake_member_flood", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_relayed_death_is_a_suspicion() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, seal) = attacker().await;
    let victim: PeerId = p.procs.nodes[4].peer.parse().unwrap();
    let name = p.procs.nodes[4].peer.clone();
    let before = saved_incarnation(&p, 4).unwrap_or(0);
    // The attacker does not know the victim's incarnation: one notice for each it could be
    // (a fresh pool's nodes are at their first few), 64 in one message: each used to count,
    // and each accepted one let the next name one incarnation more.
    let notices = (0..64)
        .map(|inc| Update::signed(victim, inc, UpdateKind::Dead { by: raw.peer_id() }, &seal));
    let answer = raw
        .ask(target, DATAGRAM_PROTOCOL, &ping(1, notices.collect()), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(is_ack(&answer), "the ping was not taken: {answer:?} {}", p.procs.tail(0, 30));
    // Before, the notice was believed at once: node 0 listed the victim dead. Now it is a
    // suspicion the victim refutes within a few probe rounds, long before its timer ends.
    let mut seen = std::collections::BTreeSet::new();
    throughout("the victim is never listed dead", Duration::from_secs(6), || {
        let state = listed_state(&p, 0, &name);
        if let Some(s) = &state {
            seen.insert(s.clone());
        }
        state.as_deref() != Some("dead")
    })
    .unwrap();
    // The notice was taken (as a suspicion, which reached the victim): it refuted.
    let after = until("the victim refutes", Duration::from_secs(10), || {
        saved_incarnation(&p, 4).filter(|i| *i > before)
    })
    .unwrap();
    eprintln!(
        "relayed death: node 0 listed the victim as {seen:?}; its incarnation {before} -> {after}"
    );
    assert!(after <= before + 4, "one refutation or two, not one per notice: {before} -> {after}");
    assert!(listed_alive(&p, 0, &name), "the victim refuted: {seen:?}");
    p.keeps_serving().unwrap();
    p.report("membership_relayed_death_is_a_suspicion", 0);
}

/// The victim's incarnation as it saves it (a refutation raises it by two).
fn saved_incarnation(p: &Pool, i: usize) -> Option<u32> {
    let saved = p.procs.nodes[i].data_dir.join("membership.incarnation");
    std::fs::read_to_string(saved).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_suspicion_flood() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, seal) = attacker().await;
    let victim: PeerId = p.procs.nodes[4].peer.parse().unwrap();
    let name = p.procs.nodes[4].peer.clone();
    let before = saved_incarnation(&p, 4).unwrap_or(0);
    // The attack's own pace (four suspicions a second), not a wait for a condition.
    const ATTACK: Duration = Duration::from_secs(20);
    let start = std::time::Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < ATTACK {
        let at = saved_incarnation(&p, 4).unwrap_or(0);
        let kind = UpdateKind::Suspect { by: raw.peer_id(), witnesses: 5 };
        let suspicion = Update::signed(victim, at, kind, &seal);
        let answer = raw
            .ask(target, DATAGRAM_PROTOCOL, &ping(sent, vec![suspicion]), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(is_ack(&answer), "the ping was not taken: {answer:?}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = saved_incarnation(&p, 4).unwrap_or(0);
    let refutations = (after - before) / 2;
    eprintln!(
        "suspicion flood: {sent} suspicions of one worker in 20 s; it refuted {refutations} \
         times (incarnation {before} -> {after})"
    );
    assert!(refutations >= 1, "no suspicion was taken: the attack did not happen");
    // Four at once, then one per 10 s: six in 20 s, and one for a refill at the edge.
    assert!(refutations <= 7, "the accuser was believed {refutations} times");
    assert!(listed_alive(&p, 0, &name), "the victim is alive");
    p.keeps_serving().unwrap();
    p.report("membership_suspicion_flood", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_member_list_flood() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, _) = attacker().await;
    let frames = raw.take_frames(DATAGRAM_PROTOCOL).unwrap();
    let join =
        Datagram::Membership(Message::Join { updates: vec![], want_sync: true, pages: vec![] });
    let body = postcard::to_allocvec(&join).unwrap();
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend(body);
    for _ in 0..100 {
        let answer =
            raw.ask(target, DATAGRAM_PROTOCOL, &frame, Duration::from_secs(10)).await.unwrap();
        assert_eq!(answer, NO_ANSWER, "the datagram was not taken");
    }
    let pages = || {
        frames
            .bodies()
            .iter()
            .filter(|b| {
                matches!(
                    postcard::from_bytes::<Datagram>(b),
                    Ok(Datagram::Membership(Message::Sync { .. }))
                )
            })
            .count()
    };
    until("a page of the member list arrives", Duration::from_secs(10), || {
        (pages() > 0).then_some(())
    })
    .unwrap();
    // Watched for as long as the last answers would take to arrive.
    throughout("the budget holds", Duration::from_secs(3), || pages() <= 16).unwrap();
    let got = pages();
    eprintln!("member list flood: 100 requests for the list (one page), {got} pages sent");
    p.keeps_serving().unwrap();
    p.report("membership_member_list_flood", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_lying_answers() {
    let _one = SERIAL.lock().await;
    let (mut p, raw, target, _) = attacker().await;
    let before = p.rss_mib(0).unwrap();
    // 8 MiB announced, a few bytes sent: refused at the 4 KiB answer limit, never allocated.
    let mut huge = (8u32 << 20).to_be_bytes().to_vec();
    huge.extend([1u8; 64]);
    let frames = raw.take_frames_answering(DATAGRAM_PROTOCOL, huge).unwrap();
    // Asking for the member list makes node 0 send datagrams (its pages) to the liar.
    let join =
        Datagram::Membership(Message::Join { updates: vec![], want_sync: true, pages: vec![] });
    let body = postcard::to_allocvec(&join).unwrap();
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend(body);
    for _ in 0..20 {
        let answer =
            raw.ask(target, DATAGRAM_PROTOCOL, &frame, Duration::from_secs(10)).await.unwrap();
        assert_eq!(answer, NO_ANSWER, "the join was not taken");
    }
    until("node 0 sends the liar datagrams", Duration::from_secs(10), || {
        (!frames.bodies().is_empty()).then_some(())
    })
    .unwrap();
    p.keeps_serving().unwrap();
    let peak = p.peak_rss_mib(0).unwrap();
    assert!(peak < before + 16.0, "node 0 grew from {before:.1} to {peak:.1} MiB");
    eprintln!(
        "lying answers: {} datagrams answered with 8 MiB announced; node 0 RSS {before:.1} -> \
         peak {peak:.1} MiB",
        frames.bodies().len()
    );
    p.report("membership_lying_answers", 0);
}
