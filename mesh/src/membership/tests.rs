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

/// `kind` news about `id` at `incarnation`, signed by its author.
fn news(id: u32, incarnation: u32, kind: UpdateKind<u32>) -> Update<u32> {
    let author = match &kind {
        UpdateKind::Suspect { by, .. } | UpdateKind::Dead { by } => *by,
        _ => id,
    };
    Update::signed(id, incarnation, kind, &sim::TestSeal(author))
}

/// `kind` news about `id`, signed by `signer` whoever its author should be.
fn forged(id: u32, incarnation: u32, kind: UpdateKind<u32>, signer: u32) -> Update<u32> {
    Update::signed(id, incarnation, kind, &sim::TestSeal(signer))
}

fn alive(id: u32, incarnation: u32) -> Update<u32> {
    news(id, incarnation, UpdateKind::Alive)
}

/// A node `me` that knows nobody.
fn lone(me: u32, config: Config, seed: u64, now: Instant) -> Membership<u32> {
    Membership::new(me, config, cap(1000), 0, Box::new(sim::TestSeal(me)), seed, now)
}

/// Node `me` that already knows `others` alive at incarnation 0.
fn node_with(me: u32, others: &[u32], now: Instant) -> Membership<u32> {
    let mut m = lone(me, Config::default(), u64::from(me), now);
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

/// What `m` sends a joiner (node 9) about member `id` in its member list.
fn synced_about(m: &mut Membership<u32>, id: u32, now: Instant) -> Vec<Update<u32>> {
    let join = Message::Join { updates: vec![alive(9, 0)], want_sync: true, pages: vec![] };
    let out = m.handle(Input::Message { from: 9, message: join }, now);
    sends(&out)
        .into_iter()
        .filter_map(|(_, msg)| match msg {
            Message::Sync { updates, .. } => Some(updates),
            _ => None,
        })
        .flatten()
        .filter(|u| u.id == id)
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
    let c = Config { probe_timeout_min: Duration::from_secs(1), ..Config::default() };
    assert_eq!(c.validate().unwrap_err().field, "probe_timeout_min");
    let c = Config { probe_timeout_min: Duration::ZERO, ..Config::default() };
    assert_eq!(c.validate().unwrap_err().field, "probe_timeout_min");
    let c = Config { piggyback_bytes: MAX_PIGGYBACK_BYTES + 1, ..Config::default() };
    assert_eq!(c.validate().unwrap_err().field, "piggyback_bytes");
}

#[test]
fn suspicion_timeout_shrinks_with_confirmations() {
    // Enough members for every expected witness.
    let m = node_with(1, &[2, 3, 4, 5, 6, 7], Instant::now());
    let c = Config::default();
    // Not measured yet: three of the longest probe waits at least.
    let least = (c.probe_timeout * 3).max(c.suspicion_min);
    assert_eq!(m.suspicion_timeout(&2, 0), c.suspicion_max);
    assert_eq!(m.suspicion_timeout(&2, 4), least);
    assert!(m.suspicion_timeout(&2, 2) < m.suspicion_timeout(&2, 1));
    assert_eq!(m.suspicion_timeout(&2, 100), least);
    // Three members: one possible witness, so one confirmation is all there can be.
    let small = node_with(1, &[2, 3], Instant::now());
    assert_eq!(small.suspicion_timeout(&2, 0), c.suspicion_max);
    assert_eq!(small.suspicion_timeout(&2, 1), least);
    // Two members: nobody can confirm; the short timeout at once.
    let mut pair = node_with(1, &[2], Instant::now());
    assert_eq!(pair.suspicion_timeout(&2, 0), least);
    // A member measured at a short round trip: the configured minimum.
    if let Some(m) = pair.members.get_mut(&2) {
        for _ in 0..20 {
            m.rtt.sample(Duration::from_millis(1));
        }
    }
    assert_eq!(pair.suspicion_timeout(&2, 0), c.suspicion_min);
}

#[test]
fn a_live_node_refutes_a_suspicion_about_itself() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let out = m.handle(
        Input::Broadcast { updates: vec![news(1, 0, UpdateKind::Suspect { by: 2, witnesses: 1 })] },
        now,
    );
    assert_eq!(m.incarnation(), 2, "two above: one above may already be held by others");
    assert_eq!(m.local_health(), 1, "being suspected raises the local health multiplier");
    assert!(broadcasts(&out).contains(&alive(1, 2)));
    // Old news about an older incarnation changes nothing.
    let out =
        m.handle(Input::Broadcast { updates: vec![news(1, 0, UpdateKind::Dead { by: 2 })] }, now);
    assert!(out.is_empty());
    assert_eq!(m.incarnation(), 2);
}

#[test]
fn suspect_becomes_dead_after_its_timeout_unless_refuted() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let suspect = |id, witnesses| news(id, 0, UpdateKind::Suspect { by: 4, witnesses });
    let _ = m.handle(Input::Broadcast { updates: vec![suspect(2, 5), suspect(3, 5)] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Suspect));
    // 3 refutes in time.
    let _ =
        m.handle(Input::Broadcast { updates: vec![alive(3, 1)] }, now + Duration::from_millis(100));
    // Neither is measured: three of the longest probe waits.
    let c = Config::default();
    let min = (c.probe_timeout * 3).max(c.suspicion_min);
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
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 0)] }, now + min);
    assert_eq!(state_of(&m, 2), Some(State::Dead));
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 1)] }, now + min);
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
    // One helper nacks (twice), nobody acks; a node that was not asked nacks too, and
    // counts for nothing.
    for from in [reqs[0].0, reqs[0].0, target] {
        let _ = m.handle(Input::Message { from, message: Message::Nack { seq } }, first + t * 2);
    }
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
fn a_probe_of_a_dead_incarnation_does_not_suspect_its_successor() {
    // The probe starts while the target's process is dead (no ack will come); the target
    // restarts and announces a newer incarnation before the probe runs out. The probe's
    // silence was its predecessor's: suspecting the new incarnation for it declared freshly
    // restarted members dead again in the six-node report.
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4, 5], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let (target, seq) = match sends(&out).as_slice() {
        [(to, Message::Ping { seq, .. })] => (*to, *seq),
        other => panic!("expected one ping, got {other:?}"),
    };
    let t = Config::default().probe_timeout;
    let _ = m.handle(Input::Tick, first + t);
    let _ = m.handle(Input::Broadcast { updates: vec![alive(target, 1)] }, first + t);
    let others: Vec<u32> = [2, 3, 4, 5].into_iter().filter(|id| *id != target).collect();
    for from in others {
        let _ = m.handle(Input::Message { from, message: Message::Nack { seq } }, first + t * 2);
    }
    let out = m.handle(Input::Tick, first + t * 3);
    assert_eq!(state_of(&m, target), Some(State::Alive), "the new incarnation is not suspected");
    assert!(broadcasts(&out).is_empty(), "no suspicion is flooded: {out:?}");
    // The same probe without the restart suspects, so the test above can fail.
    let mut m = node_with(1, &[2, 3, 4, 5], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let sent = sends(&out);
    let [(target, Message::Ping { .. })] = sent.as_slice() else { panic!("{out:?}") };
    let target = *target;
    let _ = m.handle(Input::Tick, first + t);
    let _ = m.handle(Input::Tick, first + t * 3);
    assert_eq!(state_of(&m, target), Some(State::Suspect));
}

#[test]
fn a_weak_suspicion_is_probed_at_once_and_confirmed_by_the_probe_that_fails() {
    // Member 3 suspects 2 with no helper's nack behind it (witnesses 1): on its own that
    // suspicion runs for most of `suspicion_max`. A small pool's members each probe 2 at once;
    // this one's probe fails too, so it floods its own suspicion as a confirmation, and 2 is
    // declared dead well before `suspicion_max`.
    let now = Instant::now();
    let c = Config::default();
    let mut m = node_with(1, &[2, 3, 4, 5], now);
    let weak = news(2, 0, UpdateKind::Suspect { by: 3, witnesses: 1 });
    let out = m.handle(Input::Broadcast { updates: vec![weak] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Suspect));
    let probe = sends(&out).into_iter().find_map(|(to, msg)| match msg {
        Message::Ping { seq, .. } if to == 2 => Some(seq),
        _ => None,
    });
    let Some(seq) = probe else { panic!("the suspect is probed out of turn: {out:?}") };
    // Nobody answers: the direct wait, the helpers' wait, then the probe's end.
    let mut flooded = Vec::new();
    let mut t = now;
    while t < now + c.probe_timeout * 4 {
        t += Duration::from_millis(10);
        for from in [4, 5] {
            if t == now + c.probe_timeout * 2 {
                let _ = m.handle(Input::Message { from, message: Message::Nack { seq } }, t);
            }
        }
        flooded.extend(broadcasts(&m.handle(Input::Tick, t)));
    }
    assert!(
        flooded.iter().any(|u| u.id == 2 && matches!(u.kind, UpdateKind::Suspect { by: 1, .. })),
        "this node's failed probe is flooded as a confirmation: {flooded:?}"
    );
    // Two suspectors and helpers' nacks: dead long before the unconfirmed timer's end.
    let mut dead_at = None;
    while dead_at.is_none() && t < now + c.suspicion_max {
        t += Duration::from_millis(10);
        let _ = m.handle(Input::Tick, t);
        if state_of(&m, 2) == Some(State::Dead) {
            dead_at = Some(t);
        }
    }
    let dead_at = dead_at.expect("declared dead before suspicion_max");
    assert!(dead_at - now < c.suspicion_max / 2, "dead after {:?}", dead_at - now);
    // An unconfirmed weak suspicion takes longer than that: the confirmation is what counts.
    let mut lone = node_with(1, &[2, 3, 4, 5], now);
    let weak = news(2, 0, UpdateKind::Suspect { by: 3, witnesses: 1 });
    let _ = lone.handle(Input::Broadcast { updates: vec![weak] }, now);
    let _ = lone.handle(Input::Tick, dead_at);
    assert_eq!(state_of(&lone, 2), Some(State::Suspect), "unconfirmed, still suspect");
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
    let left = news(1, 0, UpdateKind::Left);
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
    let _ = b.handle(Input::Broadcast { updates: vec![left] }, now);
    assert_eq!(state_of(&b, 1), Some(State::Left));
    let _ =
        b.handle(Input::Broadcast { updates: vec![news(1, 0, UpdateKind::Dead { by: 3 })] }, now);
    assert_eq!(state_of(&b, 1), Some(State::Left), "a leave is not turned into a death");
    let _ = b.handle(Input::Broadcast { updates: vec![alive(1, 0)] }, now);
    assert_eq!(state_of(&b, 1), Some(State::Left));
    let _ = b.handle(Input::Broadcast { updates: vec![alive(1, 1)] }, now);
    assert_eq!(state_of(&b, 1), Some(State::Alive), "a rejoin at a higher incarnation counts");
}

#[test]
fn a_joiner_gets_every_page_of_the_member_list_and_asks_again_for_lost_ones() {
    let now = Instant::now();
    let others: Vec<u32> = (10..10_010).collect();
    let mut seed = node_with(2, &others, now);
    let mut joiner = lone(1, Config::default(), 7, now);
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
    let _ =
        m.handle(Input::Broadcast { updates: vec![news(77, 0, UpdateKind::Dead { by: 2 })] }, now);
    assert_eq!(state_of(&m, 77), None);
}

#[test]
fn the_member_table_is_bounded() {
    let now = Instant::now();
    let config = Config { max_members: 5, ..Config::default() };
    let mut m = lone(1, config, 1, now);
    let updates = (2..100).map(|i| alive(i, 0)).collect();
    let _ = m.handle(Input::Broadcast { updates }, now);
    assert_eq!(m.members().count(), 5);
}

#[test]
fn a_partitioned_side_merges_back_through_reconnect_probes() {
    let now = Instant::now();
    let mut a = node_with(1, &[2], now);
    let mut b = node_with(2, &[1], now);
    // Each hears the other is dead (each holds it suspect), as in a partition.
    let _ =
        a.handle(Input::Broadcast { updates: vec![news(2, 0, UpdateKind::Dead { by: 3 })] }, now);
    let _ =
        b.handle(Input::Broadcast { updates: vec![news(1, 0, UpdateKind::Dead { by: 3 })] }, now);
    // Partitioned: nothing gets through until both suspicions have run out.
    let cut = now + Config::default().suspicion_max + Duration::from_millis(1);
    let _ = run_until(&mut a, now, cut);
    let _ = run_until(&mut b, now, cut);
    assert_eq!((state_of(&a, 2), state_of(&b, 1)), (Some(State::Dead), Some(State::Dead)));
    // Deliver everything instantly until quiet.
    let mut inbox: Vec<(u32, u32, Message<u32>)> = Vec::new();
    let mut t = cut;
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
        (0u32..6).prop_map(|by| UpdateKind::Dead { by }),
        Just(UpdateKind::Left),
        (0u32..4, 0u32..5000)
            .prop_map(|(version, free)| UpdateKind::Capacity { version, capacity: cap(free) }),
    ]
}

fn arb_update() -> impl Strategy<Value = Update<u32>> {
    // Mostly signed by their author, sometimes by another node (a forgery).
    (0u32..6, 0u32..4, arb_kind(), prop::option::weighted(0.2, 0u32..6)).prop_map(
        |(id, incarnation, kind, forger)| match forger {
            Some(signer) => forged(id, incarnation, kind, signer),
            None => news(id, incarnation, kind),
        },
    )
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
        (0u32..8, 0u32..6, any::<u16>(), ups()).prop_map(|(seq, target, within_ms, updates)| {
            Message::PingReq { seq, target, within_ms, updates }
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
        let mut m = lone(0u32, Config::default(), 3, now);
        let mut last_inc = 0;
        for step in steps {
            let out = match step {
                Step::Advance(ms) => {
                    now += Duration::from_millis(u64::from(ms));
                    m.handle(Input::Tick, now)
                }
                Step::Message(from, message) => m.handle(Input::Message { from, message }, now),
                Step::Broadcast(updates) => m.handle(Input::Broadcast { updates }, now),
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
    // Bad news at `u32::MAX` is nothing an honest node holds: ignored, not refuted past it.
    let dead = news(1, u32::MAX, UpdateKind::Dead { by: 2 });
    let _ = m.handle(Input::Broadcast { updates: vec![dead] }, now);
    assert_eq!(m.incarnation(), 0);
    // One above ours (others take it as overtaking our alive notice) is refuted above it.
    let suspect = news(1, 1, UpdateKind::Suspect { by: 2, witnesses: 1 });
    let _ = m.handle(
        Input::Message {
            from: 2,
            message: Message::Ping { seq: 1, incarnation: 0, updates: vec![suspect] },
        },
        now,
    );
    assert_eq!(m.incarnation(), 2);
    // Our own signed news there (a long life's) saturates instead of overflowing.
    let capacity = news(1, u32::MAX, UpdateKind::Capacity { version: u32::MAX, capacity: cap(10) });
    let _ = m.handle(Input::Broadcast { updates: vec![capacity] }, now);
    assert_eq!(m.incarnation(), u32::MAX);
    // And news about us signed by someone else moves nothing.
    let mut m = node_with(1, &[2], now);
    let _ = m.handle(Input::Broadcast { updates: vec![forged(1, 90, UpdateKind::Alive, 2)] }, now);
    assert_eq!(m.incarnation(), 0);
}

/// What others say about a member cannot push its incarnation out of its reach: its own news
/// counts only with its own signature, bad news moves it one step at most, and bad news at
/// `u32::MAX` is ignored.
#[test]
fn third_parties_cannot_inflate_incarnations_or_say_others_left() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let at_max = |kind| news(2, u32::MAX, kind);
    for update in [
        at_max(UpdateKind::Dead { by: 3 }),
        forged(2, u32::MAX, UpdateKind::Alive, 3),
        at_max(UpdateKind::Suspect { by: 3, witnesses: 1 }),
    ] {
        let _ = m.handle(Input::Broadcast { updates: vec![update.clone()] }, now);
        let _ = m.handle(
            Input::Message {
                from: 3,
                message: Message::Ping { seq: 9, incarnation: 0, updates: vec![update] },
            },
            now,
        );
        assert_eq!(state_of(&m, 2), Some(State::Alive));
    }
    let left = forged(2, 0, UpdateKind::Left, 3);
    let _ = m.handle(Input::Broadcast { updates: vec![left.clone()] }, now);
    let _ = m.handle(
        Input::Message {
            from: 3,
            message: Message::Ping { seq: 10, incarnation: 0, updates: vec![left.clone()] },
        },
        now,
    );
    assert_eq!(state_of(&m, 2), Some(State::Alive), "3 cannot say that 2 left");
    // 2's own word counts at any incarnation, whoever relays it.
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 40)] }, now);
    assert_eq!(m.members().find(|v| v.id == 2).map(|v| v.incarnation), Some(40));
    let left = news(2, 40, UpdateKind::Left);
    let _ = m.handle(
        Input::Message {
            from: 3,
            message: Message::Ping { seq: 11, incarnation: 0, updates: vec![left] },
        },
        now,
    );
    assert_eq!(state_of(&m, 2), Some(State::Left), "2's leave, relayed by 3, counts");
}

/// A capacity summary counts only with its member's signature, whoever relays it: a relay
/// cannot make a member look empty (or huge), and the real summary gets through any relay.
#[test]
fn capacity_counts_only_signed_by_its_member() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let summary = |free| UpdateKind::Capacity { version: 5, capacity: cap(free) };
    let _ = m.handle(Input::Broadcast { updates: vec![forged(2, 0, summary(0), 3)] }, now);
    assert_eq!(m.member(&2).and_then(|v| v.capacity), None, "forged by 3");
    let out = m.handle(
        Input::Message {
            from: 3,
            message: Message::Ping {
                seq: 1,
                incarnation: 0,
                updates: vec![news(2, 0, summary(1234))],
            },
        },
        now,
    );
    assert_eq!(m.member(&2).and_then(|v| v.capacity), Some(cap(1234)), "relayed by 3");
    assert!(out.iter().any(|o| matches!(o, Output::Event(Event::Capacity { id: 2, .. }))));
    // What we relay is the member's own signed summary.
    let relayed = synced_about(&mut m, 2, now);
    assert!(relayed.contains(&news(2, 0, summary(1234))), "{relayed:?}");
    assert!(relayed.iter().all(|u| u.verify(&sim::TestSeal(0))));
}

/// A death notice from another node is that node's suspicion: the member gets its time to
/// refute, and is dead only when our own timer says so.
#[test]
fn a_relayed_death_is_only_a_suspicion() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let _ =
        m.handle(Input::Broadcast { updates: vec![news(2, 0, UpdateKind::Dead { by: 3 })] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Suspect));
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 1)] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Alive), "2 refuted in time");
    let _ =
        m.handle(Input::Broadcast { updates: vec![news(4, 0, UpdateKind::Dead { by: 3 })] }, now);
    let out = run_until(&mut m, now, now + Config::default().suspicion_max);
    assert_eq!(state_of(&m, 4), Some(State::Dead), "unrefuted, our timer declares it");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Event(Event::State { id: 4, state: State::Dead, .. })))
    );
    // A death notice signed by its own subject, or by nobody we can check, is nothing.
    let mut m = node_with(1, &[2, 3, 4], now);
    let _ =
        m.handle(Input::Broadcast { updates: vec![news(3, 0, UpdateKind::Dead { by: 3 })] }, now);
    let _ = m.handle(
        Input::Broadcast { updates: vec![forged(3, 0, UpdateKind::Dead { by: 2 }, 9)] },
        now,
    );
    assert_eq!(state_of(&m, 3), Some(State::Alive));
}

/// Only the member list a joiner asked for is believed as such: a page sent unasked is news
/// like any other, so bad news in it about strangers is ignored and a death is a suspicion.
#[test]
fn an_unasked_member_list_is_not_believed_as_a_joiners() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let updates = vec![
        news(2, 0, UpdateKind::Dead { by: 3 }),
        news(50, 0, UpdateKind::Left),
        news(51, 0, UpdateKind::Suspect { by: 3, witnesses: 1 }),
    ];
    let _ = m.handle(
        Input::Message { from: 3, message: Message::Sync { page: 0, pages: 1, updates } },
        now,
    );
    assert_eq!(state_of(&m, 2), Some(State::Suspect));
    assert_eq!(state_of(&m, 50), None);
    assert_eq!(state_of(&m, 51), None);
    // A joiner believes the list of the peer it asked: departures of members it does not
    // know, and deaths the peer declared itself; a death it relays is a suspicion.
    let mut joiner = lone(7, Config::default(), 7, now);
    let _ = joiner.handle(Input::Contact { peer: 3 }, now);
    let updates = vec![
        alive(3, 0),
        alive(2, 0),
        news(2, 0, UpdateKind::Dead { by: 3 }),
        alive(4, 0),
        news(4, 0, UpdateKind::Dead { by: 5 }),
        news(50, 0, UpdateKind::Left),
    ];
    let _ = joiner.handle(
        Input::Message { from: 3, message: Message::Sync { page: 0, pages: 1, updates } },
        now,
    );
    assert_eq!(state_of(&joiner, 2), Some(State::Dead));
    assert_eq!(state_of(&joiner, 4), Some(State::Suspect));
    assert_eq!(state_of(&joiner, 50), Some(State::Left));
}

/// A message full of bad news about a member moves its incarnation one step at most: the
/// bound is what the member itself vouched for, and accepted bad news does not raise it.
#[test]
fn a_chain_of_bad_news_moves_an_incarnation_one_step() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let chain =
        (1..=100).map(|inc| news(2, inc, UpdateKind::Suspect { by: 3, witnesses: 1 })).collect();
    let _ = m.handle(
        Input::Message {
            from: 3,
            message: Message::Ping { seq: 1, incarnation: 0, updates: chain },
        },
        now,
    );
    let v = m.member(&2).unwrap();
    assert_eq!((v.state, v.incarnation), (State::Suspect, 1));
    // 2 refutes at 2, which it signs: that is what it vouched for now.
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 2)] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Alive));
    let _ =
        m.handle(Input::Broadcast { updates: vec![news(2, 4, UpdateKind::Dead { by: 3 })] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Alive), "two above what 2 vouched for");
}

/// However much bad news about this node one message holds, it refutes once, above the
/// highest incarnation that bad news could honestly name.
#[test]
fn one_message_of_bad_news_costs_one_refutation() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    let mut updates: Vec<Update<u32>> =
        (0..100).map(|inc| news(1, inc, UpdateKind::Suspect { by: 2, witnesses: 1 })).collect();
    updates.extend((0..100).map(|_| news(1, 0, UpdateKind::Dead { by: 2 })));
    let out = m.handle(
        Input::Message { from: 2, message: Message::Ping { seq: 1, incarnation: 0, updates } },
        now,
    );
    assert_eq!(m.incarnation(), 2);
    let floods = out.iter().filter(|o| matches!(o, Output::Broadcast(_))).count();
    assert_eq!(floods, 1, "{out:?}");
    assert!(broadcasts(&out).contains(&alive(1, 2)));
    // More of it at once waits for the next probe interval, then costs one refutation more.
    let again = || Input::Message {
        from: 2,
        message: Message::Ping {
            seq: 2,
            incarnation: 0,
            updates: vec![news(1, 2, UpdateKind::Suspect { by: 2, witnesses: 1 })],
        },
    };
    let out = m.handle(again(), now);
    assert!(broadcasts(&out).is_empty(), "{out:?}");
    let later = now + Config::default().probe_interval;
    assert!(m.next_deadline().unwrap() <= later);
    let out = m.handle(Input::Tick, later);
    assert!(broadcasts(&out).contains(&alive(1, 4)), "{out:?}");
}

/// Bad news never brings back a dead or departed member (a stream of suspicions would keep a
/// crashed node "live").
#[test]
fn bad_news_does_not_revive_the_dead() {
    let now = Instant::now();
    let mut joiner = lone(1, Config::default(), 1, now);
    let _ = joiner.handle(Input::Contact { peer: 3 }, now);
    let updates = vec![alive(3, 0), alive(2, 0), news(2, 0, UpdateKind::Dead { by: 3 })];
    let _ = joiner.handle(
        Input::Message { from: 3, message: Message::Sync { page: 0, pages: 1, updates } },
        now,
    );
    assert_eq!(state_of(&joiner, 2), Some(State::Dead));
    for update in [
        news(2, 1, UpdateKind::Suspect { by: 3, witnesses: 5 }),
        news(2, 1, UpdateKind::Dead { by: 3 }),
    ] {
        let _ = joiner.handle(Input::Broadcast { updates: vec![update] }, now);
        assert_eq!(state_of(&joiner, 2), Some(State::Dead));
        assert_eq!(joiner.alive_count(), 2);
    }
}

/// A member first heard of through its pings (unsigned) gets relayed once its own signed
/// alive notice at that incarnation arrives.
#[test]
fn a_member_known_from_its_pings_is_relayed_once_its_notice_arrives() {
    let now = Instant::now();
    let mut m = node_with(1, &[2], now);
    let _ = m.handle(
        Input::Message {
            from: 5,
            message: Message::Ping { seq: 1, incarnation: 3, updates: vec![] },
        },
        now,
    );
    assert!(synced_about(&mut m, 5, now).is_empty(), "nothing signed to relay yet");
    let out = m.handle(Input::Broadcast { updates: vec![alive(5, 3)] }, now);
    assert!(!out.iter().any(|o| matches!(o, Output::Event(_))), "no change to report: {out:?}");
    assert_eq!(synced_about(&mut m, 5, now), vec![alive(5, 3)]);
}

/// A forgery ends the message it came in: an honest node sends none, so a message of
/// thousands of forged updates costs one signature check, not thousands.
#[test]
fn a_forgery_ends_the_message_it_came_in() {
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4], now);
    let mut updates = vec![alive(4, 1), forged(2, 5, UpdateKind::Alive, 3)];
    updates.extend((6..100).map(|inc| forged(2, inc, UpdateKind::Alive, 3)));
    updates.push(alive(3, 1));
    let _ = m.handle(
        Input::Message { from: 3, message: Message::Ping { seq: 1, incarnation: 0, updates } },
        now,
    );
    let inc = |m: &Membership<u32>, id| m.member(&id).map(|v| v.incarnation);
    assert_eq!(inc(&m, 4), Some(1), "news before the forgery counts");
    assert_eq!(inc(&m, 2), Some(0), "the forgery does not");
    assert_eq!(inc(&m, 3), Some(0), "nor anything after it");
    // The next message is judged on its own.
    let _ = m.handle(Input::Broadcast { updates: vec![alive(3, 1)] }, now);
    assert_eq!(inc(&m, 3), Some(1));
}

/// A member whose suspicions keep being refuted uses up its budget: about that suspect, and
/// (across different suspects) about anyone. Its bad news is then ignored (and a flood of it
/// not forwarded) until the budget refills, while others' is taken as before; the victim
/// itself refutes whoever accuses it.
#[test]
fn refuted_suspicions_use_up_their_authors_budget() {
    use super::suspicion::{BLAME_BURST, BLAME_REFILL};
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4, 5, 6], now);
    // `by` suspects `of` at its current incarnation; `of` refutes.
    let refuted = |m: &mut Membership<u32>, inc: &mut [u32; 7], by: u32, of: u32| {
        let u = news(of, inc[of as usize], UpdateKind::Suspect { by, witnesses: 1 });
        let _ = m.handle(Input::Broadcast { updates: vec![u] }, now);
        assert_eq!(state_of(m, of), Some(State::Suspect), "{by} about {of}: within budget");
        inc[of as usize] += 2;
        let _ = m.handle(Input::Broadcast { updates: vec![alive(of, inc[of as usize])] }, now);
        assert_eq!(state_of(m, of), Some(State::Alive), "refuted");
        inc[of as usize]
    };
    // The same suspect again and again: not believed about it, still about others.
    let (mut at, mut inc) = (0, [0u32; 7]);
    for _ in 0..BLAME_BURST {
        at = refuted(&mut m, &mut inc, 3, 2);
    }
    let spent = news(2, at, UpdateKind::Suspect { by: 3, witnesses: 1 });
    assert!(m.holds_blamed_news(std::slice::from_ref(&spent), now));
    let _ = m.handle(Input::Broadcast { updates: vec![spent] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Alive), "its budget about 2 is spent");
    let death = news(2, at, UpdateKind::Dead { by: 3 });
    let _ = m.handle(Input::Broadcast { updates: vec![death] }, now);
    assert_eq!(state_of(&m, 2), Some(State::Alive), "a death notice is bad news too");
    let other = news(4, 0, UpdateKind::Suspect { by: 3, witnesses: 1 });
    assert!(!m.holds_blamed_news(&[other.clone(), alive(3, 1)], now), "good news never");
    let _ = m.handle(Input::Broadcast { updates: vec![other] }, now);
    assert_eq!(state_of(&m, 4), Some(State::Suspect), "about another member it counts");
    let _ = m.handle(Input::Broadcast { updates: vec![alive(4, 2)] }, now);
    // Different suspects in turn: not believed about anyone.
    let mut m = node_with(1, &[2, 3, 4, 5, 6], now);
    let mut inc = [0u32; 7];
    for round in 0..BLAME_BURST {
        refuted(&mut m, &mut inc, 5, if round % 2 == 0 { 2 } else { 4 });
    }
    let anyone = news(6, 0, UpdateKind::Suspect { by: 5, witnesses: 1 });
    let _ = m.handle(Input::Broadcast { updates: vec![anyone.clone()] }, now);
    assert_eq!(state_of(&m, 6), Some(State::Alive), "its budget is spent");
    assert!(m.holds_blamed_news(std::slice::from_ref(&anyone), now));
    // Once the interval has passed, one more of its suspicions is taken.
    let later = now + BLAME_REFILL;
    assert!(!m.holds_blamed_news(std::slice::from_ref(&anyone), later));
    let _ = m.handle(Input::Broadcast { updates: vec![anyone] }, later);
    assert_eq!(state_of(&m, 6), Some(State::Suspect), "refilled");

    // The victim charges its accuser as the others do, and still refutes it: a node that
    // does not blame the accuser yet may hold the suspicion.
    let mut v = node_with(1, &[2, 3], now);
    let mut at = now;
    for round in 0..=BLAME_BURST {
        let accusation = news(1, v.incarnation(), UpdateKind::Suspect { by: 3, witnesses: 1 });
        let before = v.incarnation();
        let out = v.handle(
            Input::Message {
                from: 3,
                message: Message::Ping { seq: round, incarnation: 0, updates: vec![accusation] },
            },
            at,
        );
        assert_eq!(v.incarnation(), before + 2, "round {round}: refuted");
        assert!(broadcasts(&out).contains(&alive(1, before + 2)));
        at += Config::default().probe_interval;
    }
    let again = news(1, v.incarnation(), UpdateKind::Suspect { by: 3, witnesses: 1 });
    assert!(v.holds_blamed_news(&[again], at), "3 is not believed about 1 any more");
}

/// A member asking for the member list again and again gets it once and a half (at least
/// 16 pages), then nothing until its budget has refilled.
#[test]
fn the_member_list_is_sent_within_a_budget_per_peer() {
    let now = Instant::now();
    let others: Vec<u32> = (2..10_000).collect();
    let mut m = node_with(1, &others, now);
    let ask = |m: &mut Membership<u32>, at: Instant| {
        let join = Message::Join { updates: vec![alive(9, 0)], want_sync: true, pages: vec![] };
        sends(&m.handle(Input::Message { from: 9, message: join }, at))
            .into_iter()
            .filter(|(to, msg)| *to == 9 && matches!(msg, Message::Sync { .. }))
            .count()
    };
    let pages = ask(&mut m, now);
    assert!(pages > 20, "a list of 10,000 members fills more than 20 pages: {pages}");
    let second = ask(&mut m, now);
    assert_eq!(second, pages / 2 + 1, "half of it again, for what a lossy link loses");
    for _ in 0..10 {
        assert_eq!(ask(&mut m, now), 0, "the budget is spent");
    }
    // Another peer has a budget of its own; after the window, so does this one again.
    let join = Message::Join { updates: vec![alive(8, 0)], want_sync: true, pages: vec![] };
    let out = m.handle(Input::Message { from: 8, message: join }, now);
    assert_eq!(sends(&out).len(), pages);
    assert_eq!(ask(&mut m, now + SYNC_WINDOW), pages);

    // A small list: 16 pages a window whatever it holds.
    let mut small = node_with(1, &[2, 3], now);
    let answered: usize = (0..40).map(|_| ask(&mut small, now)).sum();
    assert_eq!(answered, 16);
}

#[test]
fn round_trips_are_smoothed_as_tcp_does() {
    let mut r = probing::Rtt::default();
    assert_eq!(r.timeout(), None, "nothing measured");
    r.sample(Duration::from_millis(1));
    assert_eq!(r.timeout(), Some(Duration::from_millis(3)), "first sample: srtt + 4·srtt/2");
    for _ in 0..50 {
        r.sample(Duration::from_millis(1));
    }
    assert_eq!(r.timeout(), Some(Duration::from_millis(1)), "steady: the deviation decays");
    // One slow answer widens the timeout at once (the deviation), more than the mean moves.
    r.sample(Duration::from_millis(81));
    let t = r.timeout().unwrap();
    assert!(t >= Duration::from_millis(70), "{t:?}");
    // Below one unit, and beyond what a u16 holds, it saturates instead of wrapping.
    let mut tiny = probing::Rtt::default();
    tiny.sample(Duration::ZERO);
    assert!(tiny.timeout().is_some());
    let mut huge = probing::Rtt::default();
    huge.sample(Duration::from_secs(3600));
    assert!(huge.timeout().unwrap() >= Duration::from_secs(6));
}

#[test]
fn probe_waits_follow_the_measured_round_trip() {
    let c = Config::default();
    let now = Instant::now();
    let mut m = node_with(1, &[2], now);
    assert_eq!(m.ack_wait(&2), c.probe_timeout, "not measured yet: the longest wait");
    let mut at = now;
    for _ in 0..8 {
        at = m.next_deadline().unwrap().max(at);
        let out = m.handle(Input::Tick, at);
        let Some((2, Message::Ping { seq, .. })) = sends(&out).first().cloned() else {
            continue;
        };
        at += Duration::from_millis(2);
        let ack = Message::Ack { seq, incarnation: 0, updates: vec![] };
        let _ = m.handle(Input::Message { from: 2, message: ack }, at);
    }
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min, "a 2 ms member: the shortest wait");
    // The next probe goes indirect once that wait has passed, not after probe_timeout.
    let first = m.next_deadline().unwrap().max(at);
    let out = m.handle(Input::Tick, first);
    let Some((2, Message::Ping { seq, .. })) = sends(&out).first().cloned() else {
        panic!("expected a ping of 2: {out:?}")
    };
    let early = m.handle(Input::Tick, first + c.probe_timeout_min - Duration::from_millis(1));
    assert!(
        !sends(&early)
            .iter()
            .any(|(_, msg)| matches!(msg, Message::Ping { seq: s, .. } if *s == seq))
    );
    let late = m.handle(Input::Tick, first + c.probe_timeout_min);
    assert!(
        sends(&late)
            .iter()
            .any(|(to, msg)| *to == 2 && matches!(msg, Message::Ping { seq: s, .. } if *s == seq)),
        "the second direct attempt goes at the measured wait: {late:?}"
    );
}

#[test]
fn a_helper_nacks_after_the_wait_asked_within_its_own_bounds() {
    let c = Config::default();
    for (asked, waits) in [
        (10u16, c.probe_timeout_min),
        (120, Duration::from_millis(120)),
        (u16::MAX, c.probe_timeout),
    ] {
        let now = Instant::now();
        let mut m = node_with(1, &[2, 3], now);
        // The helper knows the target near (its own wait is the shortest).
        if let Some(member) = m.members.get_mut(&3) {
            for _ in 0..20 {
                member.rtt.sample(Duration::from_millis(2));
            }
        }
        let req = Message::PingReq { seq: 7, target: 3, within_ms: asked, updates: vec![] };
        let _ = m.handle(Input::Message { from: 2, message: req }, now);
        let nacked = |out: &[Output<u32>]| {
            sends(out).iter().any(|(to, msg)| *to == 2 && matches!(msg, Message::Nack { seq: 7 }))
        };
        let before = m.handle(Input::Tick, now + waits - Duration::from_millis(1));
        assert!(!nacked(&before), "asked {asked} ms: nacked before {waits:?}");
        let after = m.handle(Input::Tick, now + waits);
        assert!(nacked(&after), "asked {asked} ms: no nack at {waits:?}");
    }
}

/// Node 1 knowing `others`, with member 2 measured at a 2 ms round trip; returns it and the
/// time reached.
fn measured_fast(others: &[u32], now: Instant) -> (Membership<u32>, Instant) {
    let mut m = node_with(1, others, now);
    if let Some(member) = m.members.get_mut(&2) {
        for _ in 0..20 {
            member.rtt.sample(Duration::from_millis(2));
        }
    }
    (m, now)
}

#[test]
fn a_member_whose_round_trip_grew_is_measured_again_not_suspected() {
    let c = Config::default();
    let (mut m, now) = measured_fast(&[2], Instant::now());
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min);
    let first = m.next_deadline().unwrap().max(now);
    let out = m.handle(Input::Tick, first);
    let Some((2, Message::Ping { seq, .. })) = sends(&out).first().cloned() else {
        panic!("expected a ping of 2: {out:?}")
    };
    // Its ack comes at 120 ms: past the 50 ms wait (the ping went again), before the end.
    let _ = m.handle(Input::Tick, first + c.probe_timeout_min);
    let at = first + Duration::from_millis(120);
    let ack = Message::Ack { seq, incarnation: 0, updates: vec![] };
    let _ = m.handle(Input::Message { from: 2, message: ack }, at);
    let _ = m.handle(Input::Tick, first + Duration::from_millis(400));
    assert_eq!(state_of(&m, 2), Some(State::Alive), "a late ack still proves it alive");
    assert!(
        m.ack_wait(&2) > Duration::from_millis(120),
        "the late ack widened its wait: {:?}",
        m.ack_wait(&2)
    );
}

#[test]
fn only_the_target_or_a_helper_asked_acks_a_probe() {
    let c = Config::default();
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4, 5, 6, 7, 8], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let Some((target, Message::Ping { seq, .. })) = sends(&out).first().cloned() else {
        panic!("expected a ping: {out:?}")
    };
    let out = m.handle(Input::Tick, first + c.probe_timeout);
    let asked: Vec<u32> = sends(&out)
        .into_iter()
        .filter(|(_, msg)| matches!(msg, Message::PingReq { .. }))
        .map(|(to, _)| to)
        .collect();
    let outsider = [2, 3, 4, 5, 6, 7, 8]
        .into_iter()
        .find(|id| *id != target && !asked.contains(id))
        .expect("seven members, four asked");
    // A member that saw the sequence number cannot cancel the probe with an ack of its own.
    let forged = Message::Ack { seq, incarnation: 0, updates: vec![] };
    let _ = m.handle(Input::Message { from: outsider, message: forged }, first + c.probe_timeout);
    let _ = m.handle(Input::Tick, first + c.probe_timeout * 3);
    assert_eq!(state_of(&m, target), Some(State::Suspect), "the outsider's ack was taken");
}

#[test]
fn a_helper_far_from_the_target_waits_its_own_round_trip() {
    let c = Config::default();
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    // The helper has measured the target at 120 ms; the asker, near it, asks for 50 ms.
    if let Some(member) = m.members.get_mut(&3) {
        for _ in 0..20 {
            member.rtt.sample(Duration::from_millis(120));
        }
    }
    let own = m.ack_wait(&3);
    assert!(own > Duration::from_millis(120) && own <= c.probe_timeout, "{own:?}");
    let req = Message::PingReq { seq: 9, target: 3, within_ms: 50, updates: vec![] };
    let _ = m.handle(Input::Message { from: 2, message: req }, now);
    let nacked = |out: &[Output<u32>]| {
        sends(out).iter().any(|(to, msg)| *to == 2 && matches!(msg, Message::Nack { seq: 9 }))
    };
    assert!(!nacked(&m.handle(Input::Tick, now + Duration::from_millis(60))), "nacked at 50 ms");
    // The target's ack at 130 ms is forwarded to the asker.
    let pings = m.relays.keys().copied().collect::<Vec<_>>();
    let [mine] = pings.as_slice() else { panic!("one relay: {pings:?}") };
    let ack = Message::Ack { seq: *mine, incarnation: 0, updates: vec![] };
    let out = m.handle(Input::Message { from: 3, message: ack }, now + Duration::from_millis(130));
    assert!(
        sends(&out).iter().any(|(to, msg)| *to == 2 && matches!(msg, Message::Ack { seq: 9, .. })),
        "{out:?}"
    );
}

#[test]
fn a_member_back_from_the_dead_is_measured_afresh() {
    let c = Config::default();
    let (mut m, now) = measured_fast(&[2], Instant::now());
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min);
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 3)] }, now);
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min, "a refutation keeps the measure");
    let suspect = news(2, 3, UpdateKind::Suspect { by: 3, witnesses: 1 });
    let _ = m.handle(Input::Broadcast { updates: vec![suspect] }, now);
    let later = now + c.suspicion_max;
    let _ = m.handle(Input::Tick, later);
    assert_eq!(state_of(&m, 2), Some(State::Dead));
    let _ = m.handle(Input::Broadcast { updates: vec![alive(2, 4)] }, later);
    assert_eq!(m.ack_wait(&2), c.probe_timeout, "back from the dead: waited for as unmeasured");
    // ...until the first ack, which replaces the estimate instead of being smoothed in.
    if let Some(member) = m.members.get_mut(&2) {
        member.rtt.sample(Duration::from_millis(1));
    }
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min, "re-seeded by the first ack");
    // A slow first ack after a return (a process still starting) does not set the waits...
    if let Some(member) = m.members.get_mut(&2) {
        member.rtt.stale();
        member.rtt.sample(Duration::from_millis(150));
    }
    assert_eq!(m.ack_wait(&2), c.probe_timeout_min, "a slow first ack is dropped");
    // ...but acks that stay slow (a slower path) are smoothed in and raise them.
    for _ in 0..3 {
        if let Some(member) = m.members.get_mut(&2) {
            member.rtt.sample(Duration::from_millis(150));
        }
    }
    assert!(m.ack_wait(&2) >= Duration::from_millis(150), "smoothed in: {:?}", m.ack_wait(&2));
}

#[test]
fn a_helper_that_never_measured_the_target_waits_what_the_asker_asked() {
    let c = Config::default();
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3], now);
    assert_eq!(m.ack_wait(&3), c.probe_timeout, "not measured");
    let req = Message::PingReq { seq: 5, target: 3, within_ms: 50, updates: vec![] };
    let _ = m.handle(Input::Message { from: 2, message: req }, now);
    let out = m.handle(Input::Tick, now + Duration::from_millis(50));
    assert!(
        sends(&out).iter().any(|(to, msg)| *to == 2 && matches!(msg, Message::Nack { seq: 5 })),
        "the nack must reach the asker within its probe: {out:?}"
    );
}

#[test]
fn a_struggling_helper_near_the_target_still_nacks_in_time() {
    let c = Config::default();
    let (mut m, now) = measured_fast(&[2, 3], Instant::now());
    if let Some(member) = m.members.get_mut(&3) {
        for _ in 0..20 {
            member.rtt.sample(Duration::from_millis(2));
        }
    }
    m.local_health = 3;
    let req = Message::PingReq { seq: 4, target: 3, within_ms: 50, updates: vec![] };
    let _ = m.handle(Input::Message { from: 2, message: req }, now);
    let out = m.handle(Input::Tick, now + c.probe_timeout_min);
    assert!(
        sends(&out).iter().any(|(to, msg)| *to == 2 && matches!(msg, Message::Nack { seq: 4 })),
        "its own local health must not stretch the wait the asker asked: {out:?}"
    );
}

/// A node told it stalled gives every wait in flight that much more: the ack that arrived
/// while it was not running, read after the stall, still counts, and nobody is suspected. A
/// short delay is ordinary timer lateness and changes nothing; a stall raises local health.
#[test]
fn a_stalled_node_does_not_blame_others_for_its_own_stall() {
    let c = Config::default();
    let now = Instant::now();
    let mut m = node_with(1, &[2, 3, 4, 5], now);
    let first = m.next_deadline().unwrap();
    let out = m.handle(Input::Tick, first);
    let Some((target, Message::Ping { seq, .. })) = sends(&out).first().cloned() else {
        panic!("expected a ping: {out:?}")
    };
    // No direct ack in time: the helpers are asked.
    let asked = first + c.probe_timeout;
    let out = m.handle(Input::Tick, asked);
    assert!(sends(&out).iter().any(|(_, msg)| matches!(msg, Message::PingReq { .. })));
    // Ordinary lateness: nothing moves.
    let due = m.next_deadline().unwrap();
    let _ = m.handle(Input::Stalled { late: STALL - Duration::from_millis(1) }, asked);
    assert_eq!(m.next_deadline(), Some(due));
    assert_eq!((m.stalls(), m.local_health()), (0, 0));
    // Asleep for two seconds, past the end of the probe: woken, it is told so before the
    // tick (without it, this tick would suspect the target).
    let late = Duration::from_secs(2);
    let woke = asked + late;
    let _ = m.handle(Input::Stalled { late }, woke);
    assert_eq!((m.stalls(), m.local_health()), (1, 1));
    let out = m.handle(Input::Tick, woke);
    assert!(broadcasts(&out).is_empty(), "nobody is suspected for our stall: {out:?}");
    assert_eq!(state_of(&m, target), Some(State::Alive));
    // The ack waiting in the queue is read and ends the probe.
    let ack = Message::Ack { seq, incarnation: 0, updates: vec![] };
    let _ = m.handle(Input::Message { from: target, message: ack }, woke);
    let out = run_until(&mut m, woke, woke + c.probe_timeout * 4);
    assert!(
        !broadcasts(&out).iter().any(|u| u.id == target),
        "the acked target stays unsuspected: {out:?}"
    );
    // A stall of an hour stretches waits by suspicion_max at most.
    let mut m = node_with(1, &[2, 3], now);
    let suspect = news(2, 0, UpdateKind::Suspect { by: 3, witnesses: 1 });
    let _ = m.handle(Input::Broadcast { updates: vec![suspect] }, now);
    let _ = m.handle(Input::Stalled { late: Duration::from_secs(3600) }, now);
    let _ = run_until(&mut m, now, now + c.suspicion_max * 2 + Duration::from_secs(1));
    assert_eq!(state_of(&m, 2), Some(State::Dead), "an hour's stall does not pardon for an hour");
}
