//! The piggyback queue: recent news waiting to ride on pings and acks, the repair path for a
//! node that missed a flood. Each update goes out a bounded number of times.

use super::{Id, Membership, Update, UpdateKind, encoded_len};

#[derive(Clone, Debug)]
pub(super) struct Queued<I> {
    pub(super) update: Update<I>,
    size: usize,
    transmits: u32,
}

/// Largest number of updates waiting to be piggybacked.
const MAX_QUEUE: usize = 1024;

impl<I: Id> Membership<I> {
    /// Queues news to piggyback: `retransmit_limit` times, or once when `flooded` (every
    /// other node got the same flood from its mesh peers, so our copies only repair the rare
    /// miss, and signed news is too large to repeat for nothing).
    pub(super) fn enqueue(&mut self, update: Update<I>, flooded: bool) {
        let liveness = update.kind.is_liveness();
        self.queue
            .retain(|q| !(q.update.id == update.id && q.update.kind.is_liveness() == liveness));
        if self.queue.len() >= MAX_QUEUE {
            // Drop the most retransmitted entry: it has had the most chances already.
            if let Some(i) =
                self.queue.iter().enumerate().max_by_key(|(_, q)| q.transmits).map(|(i, _)| i)
            {
                self.queue.swap_remove(i);
            }
        }
        let size = encoded_len(&update);
        let transmits = if flooded { self.retransmit_limit().saturating_sub(1) } else { 0 };
        self.queue.push(Queued { update, size, transmits });
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.alive_count as f64 + 1.0;
        self.config.retransmit_mult * (n.log10().ceil() as u32).max(1)
    }

    pub(super) fn piggyback_for(&mut self, to: &I) -> Vec<Update<I>> {
        self.piggyback(to, self.config.piggyback_bytes)
    }

    /// Takes the least-transmitted queued updates that fit in `budget` bytes.
    pub(super) fn piggyback(&mut self, to: &I, budget: usize) -> Vec<Update<I>> {
        if self.queue.is_empty() {
            return Vec::new();
        }
        let limit = self.retransmit_limit();
        self.queue.sort_by_key(|q| q.transmits);
        let mut used = 0;
        let mut picked = Vec::new();
        for q in &mut self.queue {
            if &q.update.id == to
                && !matches!(q.update.kind, UpdateKind::Suspect { .. } | UpdateKind::Dead { .. })
            {
                // It knows best about itself, except for the news it must refute.
                continue;
            }
            if used + q.size > budget {
                continue;
            }
            used += q.size;
            q.transmits += 1;
            picked.push(q.update.clone());
        }
        self.queue.retain(|q| q.transmits < limit);
        picked
    }
}
