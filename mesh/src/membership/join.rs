//! Joining and leaving: contacting a peer, the `Join` message, the member list sent back in
//! pages (and asked for again, missing pages only, after a loss), and the announced leave.

use std::time::{Duration, Instant};

use super::{
    Event, Id, MAX_UPDATES_PER_MESSAGE, Map, Membership, Message, Output, Said, State, Update,
    UpdateKind, Via, encoded_len,
};

#[derive(Clone, Debug)]
pub(super) struct Joining<I> {
    /// Peers asked for the member list.
    peers: Vec<I>,
    pub(super) retry_at: Instant,
    /// Page count and pages received, per answering peer.
    received: Map<I, (u16, Vec<u16>)>,
}

/// Largest number of peers a joiner asks for the member list at once.
const MAX_SEEDS: usize = 8;
/// Largest page count of a member list: `max_members` members at two or three updates each
/// fill under 2,000 pages of the smallest useful page (a few KiB); more is made up, and
/// counting them would cost the joiner quadratic time.
const MAX_SYNC_PAGES: u16 = 4096;
/// Members told directly of a voluntary leave, in addition to the flood.
const LEAVE_DIRECT: usize = 3;
/// The time over which a peer's budget of member-list pages refills in full. A joiner takes
/// a few seconds; asking for the list again and again (240 B per member, 2.4 MB at 10,000
/// members, for a request of a hundred bytes) is what the budget is for.
pub(super) const SYNC_WINDOW: Duration = Duration::from_secs(60);
/// Pages one peer may be sent at once, at least: a small list costs little, and a device
/// restarted a few times in a row still joins.
const MIN_SYNC_BUDGET: u64 = 16;

/// Pages a peer may be sent at once when the list has `pages` pages: the whole list and
/// half of it again for the pages a lossy link loses.
pub(super) fn sync_budget(pages: u16) -> u64 {
    let pages = u64::from(pages);
    (pages + pages / 2 + 1).max(MIN_SYNC_BUDGET)
}

impl<I: Id> Membership<I> {
    /// A joiner that has not received the whole member list within `join_retry` asks again.
    pub(super) fn retry_join(&mut self, now: Instant) {
        if let Some(j) = &mut self.join_pending
            && now >= j.retry_at
        {
            // Some page was lost (or the peer is gone): ask again, for the missing pages only
            // where some arrived. At 10,000 members the list is some 80 pages; asking for all
            // of it again after every single loss would rarely finish under heavy loss.
            j.retry_at = now + self.config.join_retry;
            let asks: Vec<(I, Vec<u16>)> = j
                .peers
                .iter()
                .map(|p| {
                    let missing = match j.received.get(p) {
                        Some((total, got)) if !got.is_empty() => (0..*total)
                            .filter(|i| !got.contains(i))
                            .take(MAX_UPDATES_PER_MESSAGE)
                            .collect(),
                        _ => Vec::new(),
                    };
                    (p.clone(), missing)
                })
                .collect();
            for (p, missing) in asks {
                self.send_join(p, true, missing);
            }
        }
    }

    /// A `Join`: takes the joiner's own news, and sends it the member list if it asked (or
    /// what we believe about it, if that is not what it claims).
    pub(super) fn on_join(
        &mut self,
        from: &I,
        updates: Vec<Update<I>>,
        want_sync: bool,
        pages: Vec<u16>,
        now: Instant,
    ) {
        for u in updates.into_iter().take(2) {
            // A joiner speaks only for itself.
            if u.id == *from {
                self.apply(u, Via::FirstHand, now);
            }
        }
        self.flood_firsthand();
        if want_sync && !self.leaving {
            self.send_sync(from, &pages, now);
        } else if self.members.get(from).is_some_and(|m| m.state != State::Alive) {
            // It is not alive in our view at the incarnation it claims: tell it why.
            let news = self.liveness_update(from);
            self.send(
                from.clone(),
                Message::Sync { page: 0, pages: 1, updates: news.into_iter().collect() },
            );
        }
    }

    /// A page of the member list: counts it towards the join, and applies its news.
    pub(super) fn on_sync(
        &mut self,
        from: &I,
        page: u16,
        pages: u16,
        updates: Vec<Update<I>>,
        now: Instant,
    ) {
        // Only the peers we asked count towards a complete list, and only their list is
        // believed as a joiner's (bad news about members we do not know yet); a page from
        // anyone else is news like any other.
        let asked = self.join_pending.as_ref().is_some_and(|j| j.peers.contains(from));
        if pages > MAX_SYNC_PAGES {
            // More pages than the largest member table fills: made up.
            return;
        }
        if let Some(j) = self.join_pending.as_mut().filter(|j| j.peers.contains(from)) {
            // Pages are arriving: wait for the rest before asking again.
            j.retry_at = now + self.config.join_retry;
            let (total, got) = j.received.entry(from.clone()).or_default();
            // The list may have been re-paged between two answers: the latest count
            // wins, pages already received still count.
            *total = pages;
            if page < pages && !got.contains(&page) {
                got.push(page);
            }
            if (0..pages).all(|p| got.contains(&p)) {
                self.join_pending = None;
            }
        }
        for u in updates.into_iter().take(MAX_UPDATES_PER_MESSAGE) {
            // A death counts as one only from the seed's own timer; one it relays is a
            // suspicion, which the member gets the time to refute.
            let own_verdict = !matches!(&u.kind, UpdateKind::Dead { by } if by != from);
            let via = if asked && own_verdict { Via::Sync } else { Via::Direct };
            self.apply(u, via, now);
        }
    }

    pub(super) fn on_contact(&mut self, peer: I, now: Instant) {
        if peer == self.me || self.leaving {
            return;
        }
        let known_alive = self
            .members
            .get(&peer)
            .is_some_and(|m| matches!(m.state, State::Alive | State::Suspect));
        if known_alive {
            return;
        }
        // With nobody else known we are joining: ask for the member list and keep asking.
        let joining = self.alive_count <= 1;
        if joining {
            let at = now + self.config.join_retry;
            match &mut self.join_pending {
                Some(j) => {
                    if j.peers.contains(&peer) {
                        // Asked already: `retry_join` asks again, for the missing pages only
                        // (a second whole list would use up its budget at that peer).
                        return;
                    }
                    if j.peers.len() < MAX_SEEDS {
                        j.peers.push(peer.clone());
                    }
                }
                None => {
                    self.join_pending = Some(Joining {
                        peers: vec![peer.clone()],
                        retry_at: at,
                        received: Map::default(),
                    })
                }
            }
        }
        self.send_join(peer, joining, Vec::new());
    }

    fn send_join(&mut self, peer: I, want_sync: bool, pages: Vec<u16>) {
        let mut updates: Vec<Update<I>> = self.liveness_update(&self.me).into_iter().collect();
        updates.extend(self.own_capacity_update());
        self.send(peer, Message::Join { updates, want_sync, pages });
    }

    /// Sends the member list to `to`: the pages numbered in `wanted`, or all when empty, as
    /// far as its budget allows (see [`SYNC_WINDOW`]); a peer whose budget is spent costs no
    /// more than this check (the paging is what costs).
    fn send_sync(&mut self, to: &I, wanted: &[u16], now: Instant) {
        if self.synced.available(to, now) == 0 {
            return;
        }
        let mut page = Vec::new();
        let mut size = 0;
        let mut ids: Vec<&I> = self.members.keys().collect();
        ids.sort();
        let mut pages = Vec::new();
        for id in ids {
            let m = &self.members[id];
            // What we hold signed: its own news, then the bad news about it (which the
            // joiner can only take after the own news it is bounded by), then its capacity.
            // A member we know only from its pings is left out (the joiner hears from it when
            // it probes).
            // One member's news never spans two pages: a later page arriving first would
            // otherwise bring news about a member the joiner does not know yet.
            let notice = self.notices.get(id).map(|n| n.update(id));
            let news: Vec<Update<I>> =
                m.own_update(id).into_iter().chain(notice).chain(m.capacity_update(id)).collect();
            let s: usize = news.iter().map(encoded_len).sum();
            let full = size + s > self.config.sync_chunk_bytes
                || page.len() + news.len() > MAX_UPDATES_PER_MESSAGE;
            if full && !page.is_empty() {
                pages.push(std::mem::take(&mut page));
                size = 0;
            }
            size += s;
            page.extend(news);
        }
        if !page.is_empty() {
            pages.push(page);
        }
        let count = u16::try_from(pages.len()).unwrap_or(u16::MAX);
        self.synced.set_burst(sync_budget(count));
        let mut left = self.synced.available(to, now);
        let mut sent = 0;
        for (i, updates) in pages.into_iter().enumerate().take(usize::from(count)) {
            let page = u16::try_from(i).unwrap_or(u16::MAX);
            if left > 0 && (wanted.is_empty() || wanted.contains(&page)) {
                self.send(to.clone(), Message::Sync { page, pages: count, updates });
                left -= 1;
                sent += 1;
            }
        }
        // A request counts one page at least: asking for pages past the end sends nothing but
        // still costs the paging.
        self.synced.spend(to.clone(), sent.max(1), now);
    }

    pub(super) fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        let update =
            Update::signed(self.me.clone(), self.incarnation, UpdateKind::Left, &*self.seal);
        if let Some(m) = self.members.get_mut(&self.me) {
            m.state = State::Left;
            m.own = Said::of(&update);
        }
        self.out.push(Output::Event(Event::State {
            id: self.me.clone(),
            previous: Some(State::Alive),
            state: State::Left,
            incarnation: self.incarnation,
        }));
        self.out.push(Output::Broadcast(vec![update.clone()]));
        for peer in self.random_live(LEAVE_DIRECT, &[]) {
            let seq = self.next_seq();
            self.send(
                peer,
                Message::Ping { seq, incarnation: self.incarnation, updates: vec![update.clone()] },
            );
        }
        self.probes.clear();
        self.relays.clear();
        self.suspicions.clear();
    }
}
