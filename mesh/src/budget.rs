//! Token buckets per peer: what a peer may make this node do over time — bytes of directory
//! answers, pages of the member list, suspicions of its that were refuted.
//!
//! ```text
//!   request from peer ─▶ available(peer, now) ─▶ work within it ─▶ spend(peer, cost, now)
//!                         (a peer not held has a full bucket)
//! ```
//!
//! A bucket holds at most `burst` tokens and refills in full over `refill`, so a peer may
//! spend `burst` at once and `burst / refill` sustained. Buckets are plain values driven by
//! the caller's clock (the simulator replays them from a seed), and the map of them is
//! bounded: a bucket that refilled is the same as none and is forgotten by `prune`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One peer's tokens, as of `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: u64,
    at: Instant,
}

impl Bucket {
    /// The bucket at `now`: what was left plus what the time since brought, at most `burst`.
    /// Time not yet worth a whole token is kept for later (a bucket of one token per 10 s,
    /// looked at every second, still refills).
    fn at(self, now: Instant, burst: u64, refill: Duration) -> Bucket {
        let period = refill.as_nanos().max(1);
        let elapsed = now.saturating_duration_since(self.at).as_nanos();
        let gained = elapsed.saturating_mul(u128::from(burst)) / period;
        let tokens = u128::from(self.tokens).saturating_add(gained);
        if tokens >= u128::from(burst) {
            return Bucket { tokens: burst, at: now };
        }
        // The time the whole tokens gained took (at most `elapsed`, so no overflow).
        let used = gained.saturating_mul(period) / u128::from(burst.max(1));
        let used = Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        Bucket { tokens: u64::try_from(tokens).unwrap_or(burst), at: self.at + used }
    }
}

/// Token buckets per key, at most `max` of them.
#[derive(Clone, Debug)]
pub(crate) struct Budgets<K> {
    buckets: BTreeMap<K, Bucket>,
    burst: u64,
    refill: Duration,
    max: usize,
}

impl<K: Ord + Clone> Budgets<K> {
    /// Buckets of `burst` tokens refilled in full over `refill`; at most `max` are held
    /// (beyond, a new one takes the place of an arbitrary other).
    pub(crate) fn new(burst: u64, refill: Duration, max: usize) -> Self {
        Budgets { buckets: BTreeMap::new(), burst, refill, max }
    }

    /// Changes the burst (a budget that follows the size of what it pays for); buckets hold
    /// what they held, up to the new burst.
    pub(crate) fn set_burst(&mut self, burst: u64) {
        self.burst = burst;
    }

    /// The tokens `key` has at `now`.
    pub(crate) fn available(&self, key: &K, now: Instant) -> u64 {
        self.buckets.get(key).map_or(self.burst, |b| b.at(now, self.burst, self.refill).tokens)
    }

    /// Takes `cost` tokens (as many as there are) from `key`'s bucket.
    pub(crate) fn spend(&mut self, key: K, cost: u64, now: Instant) {
        let (burst, refill) = (self.burst, self.refill);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max {
            self.prune(now);
            if self.buckets.len() >= self.max
                && let Some(other) = self.buckets.keys().next().cloned()
            {
                self.buckets.remove(&other);
            }
        }
        let b = self.buckets.entry(key).or_insert(Bucket { tokens: burst, at: now });
        let mut level = b.at(now, burst, refill);
        level.tokens = level.tokens.saturating_sub(cost);
        *b = level;
    }

    /// Forgets `key`'s bucket (a peer that left).
    pub(crate) fn forget(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Whether a bucket is held for `key` (it spent something that has not refilled).
    pub(crate) fn holds(&self, key: &K) -> bool {
        self.buckets.contains_key(key)
    }

    /// Forgets the buckets that refilled: a full bucket is the same as none.
    pub(crate) fn prune(&mut self, now: Instant) {
        let (burst, refill) = (self.burst, self.refill);
        self.buckets.retain(|_, b| b.at(now, burst, refill).tokens < burst);
    }

    /// Buckets held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let now = Instant::now();
        let mut b = Budgets::new(4, Duration::from_secs(40), 16);
        assert_eq!(b.available(&1, now), 4, "a peer not held has a full bucket");
        for left in (0..4).rev() {
            b.spend(1, 1, now);
            assert_eq!(b.available(&1, now), left);
        }
        b.spend(1, 1, now);
        assert_eq!(b.available(&1, now), 0, "never below empty");
        assert_eq!(b.available(&2, now), 4, "others have their own");
        // One token per 10 s, however often it is looked at or spent from.
        let mut t = now;
        for _ in 0..9 {
            t += Duration::from_secs(1);
            b.spend(1, 0, t);
        }
        assert_eq!(b.available(&1, t), 0, "9 s bring no whole token");
        assert_eq!(b.available(&1, now + Duration::from_secs(10)), 1);
        assert_eq!(b.available(&1, now + Duration::from_secs(400)), 4, "at most the burst");
        b.prune(now + Duration::from_secs(40));
        assert_eq!(b.len(), 0, "refilled buckets are forgotten");
    }

    #[test]
    fn the_map_is_bounded() {
        let now = Instant::now();
        let mut b = Budgets::new(10, Duration::from_secs(1), 3);
        for k in 0..10 {
            b.spend(k, 5, now);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.available(&9, now), 5, "the newest is held");
        // Refilled ones make room before anything is evicted.
        b.spend(10, 5, now + Duration::from_secs(5));
        assert_eq!(b.len(), 1);
    }
}
