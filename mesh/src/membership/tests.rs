use std::time::{Duration, Instant};

use cloudless_types::{Capacity, Power, Runtime, Runtimes};
use proptest::prelude::*;

use super::sim::{self, Scenario};
use super::*;

fn cap(free: u32) -> Capacity {
    Capacity {
        cpu_total_millis: 4000,
        cpu_free_millis: free,
        memory_total_mib: 4096,
        memory_free_mib: 2048,
        disk_total_mib: 20_000,
        disk_free_mib: 10_000,
        workloads: 0,
        power: Power::Mains,
        metered: false,
        runtimes: Runtimes::of(&[Runtime::Wasi]),
    }
}

fn alive(id: u32, incarnation: u32) -> Update<u32> {
    Update { id, incarnation, kind: UpdateKind::Alive }
}

/// Node `me` that already knows `others` alive at incarnation 0.
fn node_with(me: u32, others: &[u32], now: Instant) -> Membership<u32> {
    let mut m = Membership::new(me, Config::default(), cap(1000), 0, u64::from(me), now);
    for chunk in others.chunks(1000) {
        let updates = chunk.iter().map(|&o| alive(o, 0)).collect();
        let _ = m.handle(
            Input::Message { from: 999_999, message: Message::Sync { page: 0, pages: 1, updates } },
            now,
        );
    }
    m
}

fn state_of(m: &Membership<u32>, id: u32) -> Option<State> {
    m.member(&id).map(|v| v.state)
}

fn broadcasts(out: &[Output<u32>]) -> Vec<Update<u32>> {
    out.iter()
        .filter_map(|o| match o {
            Output::Broadcast(u) => Some(u.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn sends(out: &[Output<u32>]) -> Vec<(u32, Message<u32>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { to, message } => Some((*to, message.clone())),
            _ => None,
        })
        .collect()
}

/// Ticks `m` at every deadline up to `until`, collecting outputs.
fn run_until(m: &mut Membership<u32>, mut now: Instant, until: Instant) -> Vec<Output<u32>> {
    let mut out = Vec::new();
    while let Some(d) = m.next_deadline() {
        if d > until {
            break;
        }
        now = d.max(now);
        out.extend(m.handle(Input::Tick, now));
    }
    out
}

#[test]
fn config_validation_names_the_field() {
    Config::default().validate().unwrap();
    let c = Config { suspicion_min: Duration::from_secs(10), ..Config::default() };
    assert_eq!(c.validate().unwrap_err().field, "suspicion_min");
}

#[test]
fn suspicion_timeout_shrinks_with_confirmations() {
    // Enough members for every expected witness.
    let m = node_with(1, &[2, 3, 4, 5, 6, 7], Instant::now());
    let c = Config::default();
    assert_eq!(m.suspicion_timeout(0), c.suspicion_max);
    assert_eq!(m.suspicion_timeout(4), c.suspicion_min);
    assert!(m.suspicion_timeout(2) < m.suspicion_timeout(1));
    assert_eq!(m.suspicion_timeout(100), c.suspicion_min);
    // Three members: one possible witness, so one confirmation is all there can be.
    let small = node_with(1, &[2, 3], Instant::now());
    assert_eq!(small.suspicion_timeout(0), c.suspicion_max);
    assert_eq!(small.suspicion_timeout(1), c.suspicion_min);
    // Two members: nobody can confirm; the short timeout at once.
    let pair = node_with(1, &[2], Instant::now());
    assert_eq!(pair.suspicion_timeout(0), c.suspicion_min);
}

#[test]
fn a_live_node_refutes_a_suspicion_about_itself() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let out = m.handle(
        Input::Broadcast {
            updates: vec![Update {
                id: 1,
                incarnation: 0,
                kind: UpdateKind::Suspect { by: 2, witnesses: 1 },
            }],
            author: None,
        },
        now,
    );
    assert_eq!(m.incarnation(), 1);
    assert_eq!(m.local_health(), 1, "being suspected raises the local health multiplier");
    assert!(broadcasts(&out).contains(&alive(1, 1)));
    // Old news about an older incarnation changes nothing.
    let out = m.handle(
        Input::Broadcast {
            updates: vec![Update { id: 1, incarnation: 0, kind: UpdateKind::Dead }],
            author: None,
        },
        now,
    );
    assert!(out.is_empty());
    assert_eq!(m.incarnation(), 1);
}

#[test]
fn suspect_becomes_dead_after_its_timeout_unless_refuted() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let suspect = |id, witnesses| Update {
        id,
        incarnation: 0,
        kind: UpdateKind::Suspect { by: 4, witnesses },
    };
    let _ = m.handle(
        Input::Broadcast { updates: vec![suspect(2, 5), suspect(3, 5)], author: None },
        now,
    );
    assert_eq!(state_of(&m, 2), Some(State::Suspect));
    // 3 refutes in time.
    let _ = m.handle(
        Input::Broadcast { updates: vec![alive(3, 1)], author: None },
        now + Duration::from_millis(100),
    );
    let min = Config::default().suspicion_min;
    let _ = m.handle(Input::Tick, now + min - Duration::from_millis(1));
    assert_eq!(state_of(&m, 2), Some(State::Suspect), "not before the timeout");
    let out = m.handle(Input::Tick, now + min);
    assert_eq!(state_of(&m, 2), Some(State::Dead));
    assert_eq!(state_of(&m, 3), Some(State::Alive));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Event(Event::State { id: 2, state: State::Dead, .. })))
    );
    // A dead member is not revived by its old incarnation, only by a newer one.
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 0)], author: None }, now + min);
    assert_eq!(state_of(&m, 2), Some(State::Dead));
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 1)], author: None }, now + min);
    assert_eq!(state_of(&m, 2), Some(State::Alive));
}

#[test]
fn an_unanswered_probe_goes_indirect_then_suspects_and_tells_the_target() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4, 5], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let (target, seq) = match sends(&out).as_slice() {
        [(to, Message::Ping { seq, .. })] => (*to, *seq),
        other => panic!("expected one ping, got {other:?}"),
    };
    let t = Config::default().probe_timeout;
    let out = m.handle(Input::Tick, first + t);
    let reqs: Vec<_> = sends(&out)
        .into_iter()
        .filter(|(_, msg)| matches!(msg, Message::PingReq { target: x, .. } if *x == target))
        .collect();
    assert_eq!(reqs.len(), 3, "every other member helps");
    assert!(reqs.iter().all(|(to, _)| *to != target));
    assert!(
        sends(&out)
            .iter()
            .any(|(to, msg)| *to == target
                && matches!(msg, Message::Ping { seq: s, .. } if *s == seq))
    );
    // One helper nacks, nobody acks.
    let _ =
        m.handle(Input::Message { from: reqs[0].0, message: Message::Nack { seq } }, first + t * 2);
    let out = m.handle(Input::Tick, first + t * 3);
    assert_eq!(state_of(&m, target), Some(State::Suspect));
    let flood = broadcasts(&out);
    assert!(
        matches!(flood.as_slice(), [Update { id, kind: UpdateKind::Suspect { by: 1, witnesses: 2 }, .. }] if *id == target)
    );
    // Buddy system: the target hears of it directly.
    assert!(sends(&out).iter().any(|(to, msg)| *to == target
        && matches!(msg, Message::Ping { updates, .. } if updates.iter().any(|u| u.id == target && matches!(u.kind, UpdateKind::Suspect { .. })))));
    assert!(m.local_health() > 0, "missing nacks raise local health");
}

#[test]
fn an_ack_keeps_the_target_alive_and_heals_local_health() {
    let now = Instant::now();
    let mut m = node_with(1, &[2], now);
    m.local_health = 2;
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let sent = sends(&out);
    let [(2, Message::Ping { seq, .. })] = sent.as_slice() else { panic!("{out:?}") };
    let _ = m.handle(
        Input::Message {
            from: 2,
            message: Message::Ack { seq: *seq, incarnation: 0, updates: vec![] },
        },
        first,
    );
    assert_eq!(m.local_health(), 1, "a successful probe heals local health by one");
    // Past the end of that probe: nothing to suspect.
    let out = m.handle(Input::Tick, first + Config::default().probe_timeout * 9);
    assert_eq!(state_of(&m, 2), Some(State::Alive));
    assert!(broadcasts(&out).is_empty());
}

#[test]
fn a_leave_is_announced_final_and_never_a_failure() {
    let now = Instant::now();
    let mut a = node_with(1, &[2, 3, 4], now);
    let out = a.handle(Input::Leave, now);
    let left = Update { id: 1, incarnation: 0, kind: UpdateKind::Left };
    assert_eq!(broadcasts(&out), vec![left.clone()]);
    assert_eq!(sends(&out).len(), 3, "told a few members directly too");
    assert_eq!(a.next_deadline(), None, "a node that left asks for no more ticks");
    let out = a.handle(
        Input::Message {
            from: 2,
            message: Message::Ping { seq: 1, incarnation: 0, updates: vec![] },
        },
        now,
    );
    assert!(
        matches!(sends(&out).as_slice(), [(2, Message::Ack { seq: 1, updates, .. })]
            if updates.iter().any(|u| u.id == 1 && u.kind == UpdateKind::Left)),
        "a leaving node answers probes with its leave: {out:?}"
    );

    let mut b = node_with(2, &[1, 3, 4], now);
    let _ = b.handle(Input::Broadcast { updates: vec![left], author: Some(1) }, now);
    assert_eq!(state_of(&b, 1), Some(State::Left));
    let _ = b.handle(
        Input::Broadcast {
            updates: vec![Update { id: 1, incarnation: 0, kind: UpdateKind::Dead }],
            author: None,
        },
        now,
    );
    assert_eq!(state_of(&b, 1), Some(State::Left), "a leave is not turned into a death");
    let _ = b.handle(Input::Broadcast { updates: vec![alive(1, 0)], author: None }, now);
    assert_eq!(state_of(&b, 1), Some(State::Left));
    let _ = b.handle(Input::Broadcast { updates: vec![alive(1, 1)], author: None }, now);
    assert_eq!(state_of(&b, 1), Some(State::Alive), "a rejoin at a higher incarnation counts");
}

#[test]
fn a_joiner_gets_every_page_of_the_member_list_and_asks_again_for_lost_ones() {
    let now = Instant::now();
    let others: Vec<u32> = (10..10_010).collect();
    let mut seed = node_with(2, &others, now);
    let mut joiner = Membership::new(1, Config::default(), cap(1000), 0, 7, now);
    let out = joiner.handle(Input::Contact { peer: 2 }, now);
    let sent = sends(&out);
    let [(2, join)] = sent.as_slice() else { panic!("{out:?}") };
    let join = join.clone();
    assert!(matches!(join, Message::Join { want_sync: true, .. }));
    let out = seed.handle(Input::Message { from: 1, message: join.clone() }, now);
    assert!(
        broadcasts(&out).iter().any(|u| u.id == 1 && u.kind == UpdateKind::Alive),
        "the seed floods the joiner"
    );
    let pages: Vec<Message<u32>> =
        sends(&out).into_iter().filter(|(to, _)| *to == 1).map(|(_, m)| m).collect();
    assert!(
        pages.len() > 1,
        "ten thousand members need several pages: {} pages, seed knows {}",
        pages.len(),
        seed.alive_count()
    );
    for p in &pages {
        assert!(encoded_len(p) <= Config::default().sync_chunk_bytes + 200);
    }
    // Lose the last page.
    for p in &pages[..pages.len() - 1] {
        let _ = joiner.handle(Input::Message { from: 2, message: p.clone() }, now);
    }
    assert!(joiner.join_pending.is_some());
    let retry = now + Config::default().join_retry;
    let out = joiner.handle(Input::Tick, retry);
    let last = u16::try_from(pages.len() - 1).unwrap();
    let ask = sends(&out)
        .into_iter()
        .find_map(|(to, m)| match m {
            Message::Join { want_sync: true, pages, .. } if to == 2 => {
                Some(Message::Join { updates: vec![], want_sync: true, pages })
            }
            _ => None,
        })
        .expect("the joiner asks again");
    assert!(
        matches!(&ask, Message::Join { pages, .. } if *pages == vec![last]),
        "only the lost page: {ask:?}"
    );
    let out = seed.handle(Input::Message { from: 1, message: ask }, retry);
    let resent: Vec<Message<u32>> =
        sends(&out).into_iter().filter(|(to, _)| *to == 1).map(|(_, m)| m).collect();
    assert_eq!(resent.len(), 1, "the seed sends only the missing page");
    for p in resent {
        let _ = joiner.handle(Input::Message { from: 2, message: p }, retry);
    }
    assert!(joiner.join_pending.is_none());
    assert_eq!(joiner.alive_count(), 10_002);
}

#[test]
fn capacity_is_announced_on_meaningful_change_within_the_budget() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let min = m.capacity_interval();
    assert!(min >= Config::default().capacity_min_interval);
    let is_capacity = |u: &Update<u32>| matches!(u.kind, UpdateKind::Capacity { .. });
    let out = m.handle(Input::SetCapacity(cap(1050)), now + min);
    assert!(!broadcasts(&out).iter().any(is_capacity), "a drift is not news");
    let out = m.handle(Input::SetCapacity(cap(3000)), now + min / 2);
    assert!(!broadcasts(&out).iter().any(is_capacity), "not before the minimum interval");
    let out = run_until(&mut m, now, now + min + Duration::from_millis(1));
    let b = broadcasts(&out);
    assert!(b.iter().any(|u| matches!(u.kind, UpdateKind::Capacity { version: 1, capacity } if capacity.cpu_free_millis == 3000)), "{b:?}");
    // The interval grows with the cluster: n · size · degree / budget.
    let big = node_with(1, &(2..5002).collect::<Vec<_>>(), now);
    assert!(big.capacity_interval() > Duration::from_secs(3600));
}

#[test]
fn a_ping_from_a_stranger_adds_it_quietly_and_news_from_strangers_is_ignored() {
    let now = Instant::now();
    let mut m = node_with(1, &[2], now);
    let out = m.handle(
        Input::Message {
            from: 9,
            message: Message::Ping { seq: 4, incarnation: 3, updates: vec![] },
        },
        now,
    );
    assert_eq!(state_of(&m, 9), Some(State::Alive));
    assert!(broadcasts(&out).is_empty(), "an implied alive is not flooded");
    assert!(
        sends(&out).iter().any(|(to, msg)| *to == 9 && matches!(msg, Message::Ack { seq: 4, .. }))
    );
    let _ = m.handle(
        Input::Broadcast {
            updates: vec![Update { id: 77, incarnation: 0, kind: UpdateKind::Dead }],
            author: None,
        },
        now,
    );
    assert_eq!(state_of(&m, 77), None);
}

#[test]
fn the_member_table_is_bounded() {
    let now = Instant::now();
    let config = Config { max_members: 5, ..Config::default() };
    let mut m = Membership::new(1, config, cap(1000), 0, 1, now);
    let updates = (2..100).map(|i| alive(i, 0)).collect();
    let _ = m.handle(Input::Broadcast { updates, author: None }, now);
    assert_eq!(m.members().count(), 5);
}

#[test]
fn a_partitioned_side_merges_back_through_reconnect_probes() {
    let now = Instant::now();
    let mut a = node_with(1, &[2], now);
    let mut b = node_with(2, &[1], now);
    // Each holds the other dead, as after a partition.
    let _ = a.handle(
        Input::Broadcast {
            updates: vec![Update { id: 2, incarnation: 0, kind: UpdateKind::Dead }],
            author: None,
        },
        now,
    );
    let _ = b.handle(
        Input::Broadcast {
            updates: vec![Update { id: 1, incarnation: 0, kind: UpdateKind::Dead }],
            author: None,
        },
        now,
    );
    // Deliver everything instantly until quiet.
    let mut inbox: Vec<(u32, u32, Message<u32>)> = Vec::new();
    let mut t = now;
    for _ in 0..200 {
        t += Duration::from_millis(100);
        for (from, node) in [(1u32, &mut a), (2u32, &mut b)] {
            for o in node.handle(Input::Tick, t) {
                if let Output::Send { to, message } = o {
                    inbox.push((from, to, message));
                }
            }
        }
        for (from, to, message) in std::mem::take(&mut inbox) {
            let node = if to == 1 { &mut a } else { &mut b };
            for o in node.handle(Input::Message { from, message }, t) {
                if let Output::Send { to, message } = o {
                    inbox.push((if to == 1 { 2 } else { 1 }, to, message));
                }
            }
        }
        if state_of(&a, 2) == Some(State::Alive) && state_of(&b, 1) == Some(State::Alive) {
            return;
        }
    }
    panic!("no merge: a sees {:?}, b sees {:?}", state_of(&a, 2), state_of(&b, 1));
}

#[derive(Clone, Debug)]
enum Step {
    Advance(u16),
    Message(u32, Message<u32>),
    Broadcast(Vec<Update<u32>>),
    Contact(u32),
    SetCapacity(u32),
}

fn arb_kind() -> impl Strategy<Value = UpdateKind<u32>> {
    prop_oneof![
        Just(UpdateKind::Alive),
        (0u32..6, 0u8..8).prop_map(|(by, witnesses)| UpdateKind::Suspect { by, witnesses }),
        Just(UpdateKind::Dead),
        Just(UpdateKind::Left),
        (0u32..4, 0u32..5000)
            .prop_map(|(version, free)| UpdateKind::Capacity { version, capacity: cap(free) }),
    ]
}

fn arb_update() -> impl Strategy<Value = Update<u32>> {
    (0u32..6, 0u32..4, arb_kind()).prop_map(|(id, incarnation, kind)| Update {
        id,
        incarnation,
        kind,
    })
}

fn arb_message() -> impl Strategy<Value = Message<u32>> {
    let ups = || prop::collection::vec(arb_update(), 0..4);
    prop_oneof![
        (0u32..8, 0u32..4, ups()).prop_map(|(seq, incarnation, updates)| Message::Ping {
            seq,
            incarnation,
            updates
        }),
        (0u32..8, 0u32..4, ups()).prop_map(|(seq, incarnation, updates)| Message::Ack {
            seq,
            incarnation,
            updates
        }),
        (0u32..8, 0u32..6, ups()).prop_map(|(seq, target, updates)| Message::PingReq {
            seq,
            target,
            updates
        }),
        (0u32..8).prop_map(|seq| Message::Nack { seq }),
        (ups(), any::<bool>()).prop_map(|(updates, want_sync)| Message::Join {
            updates,
            want_sync,
            pages: vec![]
        }),
        (0u16..3, 0u16..3, ups()).prop_map(|(page, pages, updates)| Message::Sync {
            page,
            pages,
            updates
        }),
    ]
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u16..2000).prop_map(Step::Advance),
        (0u32..6, arb_message()).prop_map(|(f, m)| Step::Message(f, m)),
        prop::collection::vec(arb_update(), 0..4).prop_map(Step::Broadcast),
        (0u32..6).prop_map(Step::Contact),
        (0u32..4000).prop_map(Step::SetCapacity),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives, in whatever order: no panic, the counts stay consistent, this node
    /// stays alive at its own incarnation, it never messages itself, and time always moves on.
    #[test]
    fn arbitrary_inputs_keep_the_invariants(steps in prop::collection::vec(arb_step(), 1..80)) {
        let mut now = Instant::now();
        let mut m = Membership::new(0u32, Config::default(), cap(1000), 0, 3, now);
        let mut last_inc = 0;
        for step in steps {
            let out = match step {
                Step::Advance(ms) => {
                    now += Duration::from_millis(u64::from(ms));
                    m.handle(Input::Tick, now)
                }
                Step::Message(from, message) => m.handle(Input::Message { from, message }, now),
                Step::Broadcast(updates) => m.handle(Input::Broadcast { updates, author: None }, now),
                Step::Contact(peer) => m.handle(Input::Contact { peer }, now),
                Step::SetCapacity(free) => m.handle(Input::SetCapacity(cap(free)), now),
            };
            for o in &out {
                if let Output::Send { to, .. } = o {
                    prop_assert_ne!(*to, 0, "never sends to itself");
                }
            }
            let me = m.member(&0).unwrap();
            prop_assert_eq!(me.state, State::Alive);
            prop_assert_eq!(me.incarnation, m.incarnation());
            prop_assert!(m.incarnation() >= last_inc, "incarnation never goes back");
            last_inc = m.incarnation();
            let live = m.members().filter(|v| matches!(v.state, State::Alive | State::Suspect)).count();
            prop_assert_eq!(live, m.alive_count());
            let _ = m.handle(Input::Tick, now);
            prop_assert!(m.next_deadline().unwrap() > now, "a tick always moves the next deadline forward");
        }
    }
}

#[test]
fn the_simulator_detects_crashes_without_false_deaths_and_replays_from_its_seed() {
    let scenario = Scenario {
        nodes: 60,
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(2),
        crash_rate: 0.05,
        join_rate: 0.05,
        leave_rate: 0.02,
        loss: 0.02,
        seed: 42,
        ..Scenario::default()
    };
    let a = sim::run(scenario.clone());
    let b = sim::run(scenario);
    assert!(a.failures_dead.count > 0, "the scenario crashes nodes: {a}");
    assert_eq!(a.failures_dead.unfinished, 0, "{a}");
    assert_eq!(a.joins.unfinished, 0, "{a}");
    assert_eq!(a.leaves.unfinished, 0, "{a}");
    assert_eq!(a.false_deaths, 0, "{a}");
    assert!(a.failures_dead.p99 < 5.0, "{a}");
    assert!(a.bytes_per_node_sec > 0.0);
    // Same seed, same run.
    assert_eq!(
        (a.events, a.false_suspicions, a.joins.p50.to_bits()),
        (b.events, b.false_suspicions, b.joins.p50.to_bits())
    );
    assert_eq!(a.bytes_per_node_sec.to_bits(), b.bytes_per_node_sec.to_bits());
}

#[test]
fn an_undialable_target_is_not_suspected() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let target = sends(&out)[0].0;
    let _ = m.handle(Input::Unreachable { peer: target }, first);
    let out = run_until(&mut m, first, first + Config::default().probe_timeout * 3);
    assert_eq!(state_of(&m, target), Some(State::Alive));
    assert!(!broadcasts(&out).iter().any(|u| u.id == target), "{out:?}");
    assert_eq!(m.local_health(), 0);
}

/// News about this node at the highest incarnation (a hostile peer's, or a long life's) does
/// not overflow its incarnation.
#[test]
fn news_at_the_last_incarnation_does_not_overflow() {
    let now = Instant::now();
    let mut m = node_with(1, &[2], now);
    let dead = Update { id: 1, incarnation: u32::MAX, kind: UpdateKind::Dead };
    let _ = m.handle(Input::Broadcast { updates: vec![dead], author: None }, now);
    assert_eq!(m.incarnation(), u32::MAX);
    let capacity = Update {
        id: 1,
        incarnation: u32::MAX,
        kind: UpdateKind::Capacity { version: u32::MAX, capacity: cap(10) },
    };
    let _ = m.handle(Input::Broadcast { updates: vec![capacity], author: None }, now);
    assert_eq!(m.incarnation(), u32::MAX);
}

/// What others say about a member cannot push its incarnation out of its reach: a third
/// party moves it one step at most, bad news at `u32::MAX` is ignored, and only the member
/// itself says it left.
#[test]
fn third_parties_cannot_inflate_incarnations_or_say_others_left() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let forged = |kind| Update { id: 2, incarnation: u32::MAX, kind };
    for kind in [UpdateKind::Dead, UpdateKind::Alive, UpdateKind::Suspect { by: 3, witnesses: 1 }] {
        let _ = m
            .handle(Input::Broadcast { updates: vec![forged(kind.clone())], author: Some(3) }, now);
        let _ = m.handle(
            Input::Message {
                from: 3,
                message: Message::Ping { seq: 9, incarnation: 0, updates: vec![forged(kind)] },
            },
            now,
        );
        assert_eq!(state_of(&m, 2), Some(State::Alive));
    }
    let left = Update { id: 2, incarnation: 0, kind: UpdateKind::Left };
    let _ = m.handle(Input::Broadcast { updates: vec![left.clone()], author: Some(3) }, now);
    let _ = m.handle(
        Input::Message {
            from: 3,
            message: Message::Ping { seq: 10, incarnation: 0, updates: vec![left.clone()] },
        },
        now,
    );
    assert_eq!(state_of(&m, 2), Some(State::Alive), "3 cannot say that 2 left");
    // A relayed refutation (one step) still counts, and 2's own word at any incarnation.
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 1)], author: Some(3) }, now);
    assert_eq!(m.members().find(|v| v.id == 2).map(|v| v.incarnation), Some(1));
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 40)], author: Some(2) }, now);
    assert_eq!(m.members().find(|v| v.id == 2).map(|v| v.incarnation), Some(40));
    let left = Update { id: 2, incarnation: 40, kind: UpdateKind::Left };
    let _ = m.handle(Input::Broadcast { updates: vec![left], author: Some(2) }, now);
    assert_eq!(state_of(&m, 2), Some(State::Left), "2 may say it left");
}
