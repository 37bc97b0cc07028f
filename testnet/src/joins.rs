//! How long a join takes, step by step, read from the nodes' own logs (their timestamps, so
//! the harness's polling adds nothing to what is measured).
//!
//! ```text
//!   t0: `cloudless join <invite>` starts ─▶ joiner's log:  "enrolled"                (enrollment committed)
//!                                                         "the cluster lets this node in" (gate list learned)
//!                                                         "member joined" of another (membership join)
//!                                       ─▶ node 0's log:   "first capacity of member seen" (schedulable)
//!                                       ─▶ every log:      "member joined" of the joiner   (alive everywhere)
//! ```
//!
//! Every node logs in plain text (no colours when not on a terminal): a line starts with its
//! RFC 3339 timestamp, then the level, the target, the message and `key=value` fields.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// When the steps of one join happened, counted from `cloudless join` starting.
#[derive(Clone, Copy, Debug, Default)]
pub struct JoinTimes {
    /// Its enrollment was committed (the joiner's `enrolled`).
    pub enrolled: Duration,
    /// It found itself in the enrolled list a member gave it (its gate lets the pool in).
    pub admitted: Duration,
    /// Its membership listed another member alive.
    pub joined: Duration,
    /// Node 0 saw its first capacity (from then on the scheduler can place work on it).
    pub capacity: Duration,
    /// The last of the other nodes listed it alive.
    pub alive_everywhere: Duration,
    /// Which node that was.
    pub last: usize,
}

/// Where each node's log ended when a join began: only what came after is read.
#[derive(Clone, Debug)]
pub struct Marks {
    start: SystemTime,
    offsets: Vec<u64>,
}

impl Marks {
    /// Marks the ends of `logs` now.
    pub fn now(logs: &[std::path::PathBuf]) -> Marks {
        let offsets = logs.iter().map(|l| std::fs::metadata(l).map_or(0, |m| m.len())).collect();
        Marks { start: SystemTime::now(), offsets }
    }

    /// The start of the join.
    pub fn start(&self) -> SystemTime {
        self.start
    }

    /// Where log `i` ended (0 for a log that did not exist yet).
    pub fn offset(&self, i: usize) -> u64 {
        self.offsets.get(i).copied().unwrap_or(0)
    }
}

/// What log `path` holds after byte `from` (empty if it cannot be read).
pub fn read_from(path: &Path, from: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The time of the first line of `log` that says `message` and holds every one of `fields`
/// (`key=value`), and none of `not`.
pub fn first(log: &str, message: &str, fields: &[&str], not: &[&str]) -> Option<SystemTime> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter(|l| fields.iter().all(|f| l.split_whitespace().any(|w| w == *f)))
        .find(|l| !not.iter().any(|f| l.split_whitespace().any(|w| w == *f)))
        .and_then(time_of)
}

/// The timestamp a log line starts with.
pub fn time_of(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let t = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
    let micros = u64::try_from(t.timestamp_micros()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_micros(micros))
}

/// `t` counted from `start` (zero if it came before: clocks of one machine).
pub fn since(start: SystemTime, t: SystemTime) -> Duration {
    t.duration_since(start).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_by_message_and_fields_and_timed() {
        let log = "2026-12-02T07:13:14.385324Z  INFO cloudless_node::loops::view: member joined peer=A incarnation=0\n\
                   2026-12-02T07:13:14.500000Z  INFO cloudless_node::loops::view: member joined peer=B incarnation=0\n\
                   garbage\n";
        let a = first(log, "member joined", &["peer=A"], &[]).unwrap();
        let b = first(log, "member joined", &[], &["peer=A"]).unwrap();
        assert_eq!(b.duration_since(a).unwrap(), Duration::from_micros(114_676));
        assert!(first(log, "member joined", &["peer=C"], &[]).is_none());
        assert!(first(log, "member failed", &[], &[]).is_none());
        assert!(time_of("garbage").is_none());
    }
}
