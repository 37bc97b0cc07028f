//! What other nodes ask of this one (the access table has let the caller in already):
//! enrollment, status reports, their own assignments and the gate lists (answered by a raft
//! member; others redirect), module chunks, a replica's logs, and the leader's nudges.
//!
//! ```text
//!   Enroll ── relayed for another? the caller must be enrolled ──▶ member: precheck the token
//!             (a forged or used one costs no raft entry) ──▶ propose as Actor::Node(caller)
//!             non-member: relay to a member
//!   Report ── member: propose as Actor::Node(caller)      Assigned, Enrolled ── member: read
//!   Module ── a chunk of a stored module    Logs ── this node's replica    Nudge ── pull now
//! ```

use std::time::UNIX_EPOCH;

use cloudless_api::node::{
    Assigned, AssignedList, Chunk, Enroll, Enrolled, EnrolledList, ModuleChunk, Nudge, Report,
};
use cloudless_api::user::{Line, Logs, MAX_LINES};
use cloudless_api::{Answer, ApiError, CHUNK, Command, NodeRequest, Reply};
use cloudless_consensus::Consistency;
use cloudless_consensus::state::{Actor, Request as RaftRequest};
use cloudless_mesh::rpc::InboundRequest;
use cloudless_runtime::Driver;
use cloudless_runtime::driver::Stream;
use cloudless_types::{NodeName, now_ms};

use super::{Api, read, read_error, reply, write_error};

impl Api {
    pub(super) async fn node_request(
        &self,
        caller: NodeName,
        n: NodeRequest,
        inbound: InboundRequest,
    ) {
        match n {
            NodeRequest::Enroll(e) => reply::<Enroll>(inbound, self.enroll(&caller, e).await),
            NodeRequest::Report(r) => reply::<Report>(inbound, self.report(&caller, r).await),
            NodeRequest::Assigned(a) => {
                reply::<Assigned>(inbound, self.assigned(&caller, a.known).await);
            }
            NodeRequest::Enrolled(e) => reply::<Enrolled>(inbound, self.enrolled(e.known).await),
            NodeRequest::Module(m) => reply::<ModuleChunk>(inbound, self.module(&m)),
            NodeRequest::Logs(l) => reply::<Logs>(inbound, self.local_logs(&l).await),
            NodeRequest::Nudge(n) => reply::<Nudge>(inbound, self.nudge(caller, n.generation)),
        }
    }

    /// A command from node `caller`, proposed as that node.
    async fn propose(&self, caller: &NodeName, command: Command) -> Result<Reply, ApiError> {
        match self.facts.consensus.propose(Actor::Node(caller.clone()), command).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(write_error(e)),
        }
    }

    /// A device enrolls (itself, or relayed by the enrolled node `caller`).
    pub async fn enroll(&self, caller: &NodeName, e: Enroll) -> Answer<Enroll> {
        // Who may relay is the access table's business (an enrolled node, for another).
        let relayed = e.peer != *caller;
        let trusted = self.facts.trusts_own_state();
        if relayed && !trusted {
            return Err(self.redirect());
        }
        if !trusted {
            // The newcomer may not reach a member yet: relay (the state machine accepts an
            // enrolled node relaying a token-signed enrollment).
            return self.peers.node_to_member(e).await;
        }
        let command = Command::Enroll {
            token: e.token,
            signature: e.signature,
            proof: e.proof,
            peer: e.peer,
        };
        // A forged or used token is refused here, not after costing a raft entry.
        let check = RaftRequest {
            client: 0,
            serial: 0,
            actor: Actor::Node(caller.clone()),
            time_ms: now_ms(),
            command: command.clone(),
            proof: None,
        };
        match self.facts.consensus.read(Consistency::Stale, |s| s.precheck(&check)).await {
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(())) => {}
            Err(e) => return Err(read_error(e)),
        }
        let reply = self.propose(caller, command).await?;
        // The device is enrolled: this member's gate lets it in at once.
        self.facts.gate_refresh.notify_one();
        Ok(reply)
    }

    /// Status changes of replicas `caller` runs. Another node's report is proposed by the
    /// leader only (the actor comes from the caller's authenticated connection, and a
    /// follower's word for it is not taken); others send it there.
    pub async fn report(&self, caller: &NodeName, r: Report) -> Answer<Report> {
        if !self.facts.trusts_own_state() {
            return Err(self.redirect());
        }
        if *caller != self.facts.name && !self.facts.consensus.is_leader() {
            return Err(match self.facts.consensus.leader() {
                Some((_, leader)) => ApiError {
                    kind: cloudless_api::ErrorKind::Redirect,
                    message: "only the raft leader takes another node's report".into(),
                    redirect: vec![leader.peer],
                },
                None => ApiError::unavailable("no raft leader to take the report now"),
            });
        }
        self.propose(caller, Command::Report(r.0)).await
    }

    /// The replicas `caller` should run, unless it holds generation `known` or newer.
    pub async fn assigned(
        &self,
        caller: &NodeName,
        known: Option<u64>,
    ) -> Result<AssignedList, ApiError> {
        if !self.facts.trusts_own_state() {
            return Err(self.redirect());
        }
        self.facts
            .consensus
            .read(Consistency::Stale, |s| read::assigned_since(s, caller, known))
            .await
            .map_err(read_error)
    }

    /// Who is enrolled, who is revoked (the changes after generation `known`), who votes.
    pub async fn enrolled(&self, known: Option<u64>) -> Result<EnrolledList, ApiError> {
        if !self.facts.trusts_own_state() {
            return Err(self.redirect());
        }
        let voters: Vec<NodeName> =
            self.facts.consensus.voter_members().into_iter().map(|m| m.peer).collect();
        let learners: Vec<NodeName> =
            self.facts.consensus.members().into_iter().filter(|m| !voters.contains(m)).collect();
        self.facts
            .consensus
            .read(Consistency::Stale, |s| read::enrolled(s, known, voters, learners))
            .await
            .map_err(read_error)
    }

    fn module(&self, m: &ModuleChunk) -> Answer<ModuleChunk> {
        match self.facts.wasi.module_chunk(&m.hash, m.offset, CHUNK) {
            Some((total, bytes)) => Ok(Chunk { total, bytes }),
            None => Err(ApiError::not_found(format!("module {} is not stored here", m.hash))),
        }
    }

    fn nudge(&self, caller: NodeName, generation: u64) -> Answer<Nudge> {
        self.nudged.send_modify(|n| {
            n.by = Some(caller);
            // Nudges can land out of order (a retry, two leaders around a handover): the
            // newest generation named is the one to pull.
            n.generation = n.generation.max(generation);
            n.count = n.count.wrapping_add(1);
        });
        Ok(())
    }

    /// Log lines of a replica this node runs.
    pub async fn local_logs(&self, l: &Logs) -> Answer<Logs> {
        let tail = l.tail.clamp(1, MAX_LINES);
        // With a cursor, read the whole ring and keep what is newer.
        let want = if l.after_ns > 0 { MAX_LINES } else { tail } as usize;
        // This node may not hold the state (not a raft member): ask the drivers in turn.
        let mut result = self.facts.wasi.logs(&l.replica, want).await;
        if result.is_err()
            && let Some(c) = &self.facts.containers
        {
            result = c.logs(&l.replica, want).await;
        }
        let lines = result.map_err(|e| ApiError::not_found(format!("{}: {e}", l.replica)))?;
        let mut out: Vec<Line> = lines
            .into_iter()
            .map(|line| Line {
                at_ns: line
                    .at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                stream: match line.stream {
                    Stream::Stdout => "stdout".into(),
                    Stream::Stderr => "stderr".into(),
                },
                text: line.text,
            })
            .filter(|line| line.at_ns > l.after_ns)
            .collect();
        // With a cursor every newer line counts (up to MAX_LINES), so a follower misses none.
        let skip = out.len().saturating_sub(want);
        out.drain(..skip);
        Ok(out)
    }
}
