//! Capacity announcements: when this node floods its own summary, and the byte budget that
//! spaces those floods out as the cluster grows.

use std::time::{Duration, Instant};

use super::{
    FLOOD_ENVELOPE, Id, MESSAGE_OVERHEAD, Membership, Output, Summary, Update, UpdateKind,
    encoded_len,
};

impl<I: Id> Membership<I> {
    /// The summary last announced, with the version it was announced under.
    pub(super) fn own_capacity_update(&self) -> Option<Update<I>> {
        self.members.get(&self.me)?.capacity_update(&self.me)
    }

    /// Shortest interval between two of our capacity floods that keeps every node within
    /// `capacity_budget` bytes per second for all members' capacity floods together.
    pub(super) fn capacity_interval(&self) -> Duration {
        // What one flooded copy of our summary costs: the signed update, the transport's
        // overhead and gossipsub's envelope.
        let size = (self.capacity_bytes + MESSAGE_OVERHEAD + FLOOD_ENVELOPE) as f64;
        let per_node = size * f64::from(self.config.flood_degree) * self.alive_count as f64;
        let secs = per_node / f64::from(self.config.capacity_budget.max(1));
        Duration::from_secs_f64(secs.min(86_400.0)).max(self.config.capacity_min_interval)
    }

    pub(super) fn capacity_due(&self) -> Option<Instant> {
        if self.leaving || self.alive_count <= 1 {
            return None;
        }
        let (last, at) = self.announced;
        let min = at + self.capacity_interval();
        if self.capacity.differs_meaningfully(&last) {
            Some(min)
        } else {
            Some(min.max(at + self.config.capacity_refresh))
        }
    }

    pub(super) fn announce_capacity_if_due(&mut self, now: Instant) {
        if self.capacity_due().is_none_or(|at| now < at) {
            return;
        }
        self.capacity_version = self.capacity_version.wrapping_add(1);
        self.announced = (self.capacity, now);
        let kind = UpdateKind::Capacity { version: self.capacity_version, capacity: self.capacity };
        let u = Update::signed(self.me.clone(), self.incarnation, kind, &*self.seal);
        self.capacity_bytes = encoded_len(&u);
        if let Some(m) = self.members.get_mut(&self.me) {
            m.capacity = Summary::of(&u);
        }
        self.out.push(Output::Broadcast(vec![u]));
    }
}
