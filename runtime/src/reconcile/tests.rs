#![allow(clippy::cloned_ref_to_slice_refs)] // reads better in assertions

use std::time::{Duration, SystemTime};

use cloudless_types::{Image, Probe, ProbeCheck, Resources, WorkloadSpec};

use super::*;
use crate::driver::ExitReason;

fn spec(name: &str, kind: Kind, when: Restart) -> ReplicaSpec {
    let mut w = WorkloadSpec::new(
        cloudless_types::WorkloadName::new(name).unwrap(),
        Image::Wasi(cloudless_types::ModuleHash::of(b"test")),
        Resources { cpu_millis: 100, memory_mib: 16, disk_mib: 0, gpus: 0 },
        1,
    );
    w.kind = kind;
    w.restart = when;
    ReplicaSpec::from_workload(&w, 0)
}

fn exit(code: i32) -> Exit {
    Exit { code: Some(code), reason: ExitReason::Exited, at: SystemTime::now() }
}

fn starts(actions: &[Action]) -> Vec<ReplicaId> {
    actions
        .iter()
        .filter_map(|a| if let Action::Start(s) = a { Some(s.id.clone()) } else { None })
        .collect()
}

fn phases(r: &mut Reconciler) -> Vec<ReplicaPhase> {
    r.take_changes().into_iter().map(|s| s.phase).collect()
}

#[test]
fn starts_what_is_wanted_and_stops_what_is_not() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let a = spec("a", Kind::Service, Restart::Always);
    r.set_desired(vec![a.clone()], t0);
    assert_eq!(starts(&r.plan(t0)), [a.id.clone()]);
    assert!(r.plan(t0).is_empty(), "no second start while the first is under way");
    r.observe(Event::Started(a.id.clone()), t0);
    assert_eq!(phases(&mut r), [ReplicaPhase::Pending, ReplicaPhase::Running { ready: true }]);
    r.set_desired(vec![], t0);
    assert_eq!(r.plan(t0), [Action::Stop(a.id.clone())]);
    assert!(r.statuses().is_empty());
}

#[test]
fn always_restarts_with_doubling_backoff_and_a_long_run_resets_it() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let a = spec("a", Kind::Service, Restart::Always);
    r.set_desired(vec![a.clone()], t0);
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..4 {
        assert_eq!(starts(&r.plan(now)), [a.id.clone()]);
        r.observe(Event::Started(a.id.clone()), now);
        r.observe(Event::Exited(a.id.clone(), exit(0)), now);
        let due = r.next_due().unwrap();
        waits.push(due - now);
        assert!(r.plan(due - Duration::from_millis(1)).is_empty(), "not before the backoff");
        now = due;
    }
    assert_eq!(waits.iter().map(Duration::as_secs).collect::<Vec<_>>(), [1, 2, 4, 8]);
    // A run longer than reset_after starts the backoff over.
    r.plan(now);
    r.observe(Event::Started(a.id.clone()), now);
    now += a.restart.reset_after;
    r.observe(Event::Exited(a.id.clone(), exit(1)), now);
    assert_eq!(r.next_due().unwrap() - now, Duration::from_secs(1));
    assert_eq!(r.statuses()[0].restarts, 5);
}

#[test]
fn on_failure_and_never_settle_and_jobs_finish() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let job = spec("job", Kind::Job, Restart::OnFailure);
    let once = spec("once", Kind::Service, Restart::Never);
    r.set_desired(vec![job.clone(), once.clone()], t0);
    r.plan(t0);
    for id in [&job.id, &once.id] {
        r.observe(Event::Started(id.clone()), t0);
    }
    r.observe(Event::Exited(job.id.clone(), exit(2)), t0);
    r.observe(Event::Exited(once.id.clone(), exit(2)), t0);
    let st: BTreeMap<ReplicaId, ReplicaPhase> =
        r.statuses().into_iter().map(|s| (s.id, s.phase)).collect();
    assert!(matches!(st[&job.id], ReplicaPhase::Restarting { .. }));
    assert_eq!(st[&once.id], ReplicaPhase::Failed("exit code 2".into()));
    let due = r.next_due().unwrap();
    assert_eq!(starts(&r.plan(due)), [job.id.clone()]);
    r.observe(Event::Started(job.id.clone()), due);
    r.observe(Event::Exited(job.id.clone(), exit(0)), due);
    assert_eq!(r.statuses()[0].phase, ReplicaPhase::Succeeded);
    assert_eq!(r.next_due(), None);
}

#[test]
fn gives_up_after_max_restarts_and_counts_failed_starts() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let mut a = spec("a", Kind::Service, Restart::OnFailure);
    a.restart.max_restarts = Some(2);
    r.set_desired(vec![a.clone()], t0);
    let mut now = t0;
    for _ in 0..3 {
        assert_eq!(starts(&r.plan(now)), [a.id.clone()]);
        r.observe(Event::StartFailed(a.id.clone(), "image missing".into()), now);
        now = r.next_due().unwrap_or(now);
    }
    match &r.statuses()[0].phase {
        ReplicaPhase::Failed(why) => {
            assert!(why.contains("image missing") && why.contains("2 restarts"), "{why}")
        }
        p => panic!("{p:?}"),
    }
}

#[test]
fn a_changed_spec_is_replaced_and_liveness_failures_restart() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let mut a = spec("a", Kind::Service, Restart::Always);
    a.readiness = Some(Probe::new(ProbeCheck::Tcp { port: 80 }));
    r.set_desired(vec![a.clone()], t0);
    r.plan(t0);
    r.observe(Event::Started(a.id.clone()), t0);
    assert_eq!(r.statuses()[0].phase, ReplicaPhase::Running { ready: false });
    r.observe(Event::Ready(a.id.clone(), true), t0);
    assert_eq!(r.statuses()[0].phase, ReplicaPhase::Running { ready: true });
    // Liveness fails: the replica is stopped, and its end is that failure.
    r.observe(Event::Unhealthy(a.id.clone(), "connection refused".into()), t0);
    assert_eq!(r.plan(t0), [Action::Stop(a.id.clone())]);
    r.stopped(&a.id);
    r.observe(
        Event::Exited(
            a.id.clone(),
            Exit { code: None, reason: ExitReason::Stopped, at: SystemTime::now() },
        ),
        t0,
    );
    match &r.statuses()[0].phase {
        ReplicaPhase::Restarting { reason, .. } => assert!(reason.contains("liveness"), "{reason}"),
        p => panic!("{p:?}"),
    }
    // A new spec replaces it at once.
    let mut b = a.clone();
    b.env.insert("V".into(), "2".into());
    r.set_desired(vec![b.clone()], t0);
    assert_eq!(r.plan(t0), [Action::Start(b)]);
}

#[test]
fn adopts_matching_replicas_found_at_startup_and_stops_the_rest() {
    let t0 = Instant::now();
    let mut r = Reconciler::new();
    let a = spec("a", Kind::Service, Restart::Always);
    let old = spec("old", Kind::Service, Restart::Always);
    let running = |s: &ReplicaSpec| Observed {
        id: s.id.clone(),
        fingerprint: s.fingerprint(),
        state: RunState::Running { since: SystemTime::now() },
    };
    r.observe(Event::Found(running(&a)), t0);
    r.observe(Event::Found(running(&old)), t0);
    assert!(r.plan(t0).is_empty(), "nothing is stopped before the desired set is known");
    r.set_desired(vec![a.clone()], t0);
    let actions = r.plan(t0);
    assert!(actions.contains(&Action::Watch(a.clone())), "{actions:?}");
    assert!(actions.contains(&Action::Stop(old.id.clone())), "{actions:?}");
    assert!(starts(&actions).is_empty(), "adopted, not started again");
    assert_eq!(r.statuses()[0].phase, ReplicaPhase::Running { ready: true });
    // A replica found later that nobody wants is stopped.
    let stray = spec("stray", Kind::Service, Restart::Always);
    r.observe(Event::Found(running(&stray)), t0);
    assert_eq!(r.plan(t0), [Action::Stop(stray.id)]);
}
