//! What users ask through cloudlessctl: the signature and clock are checked on arrival; a node
//! that does not trust its own raft state relays the request, signature intact, to a member
//! (at most once: a relayed request is never relayed again); a member looks the key's role up
//! and checks it against the access table, then answers.
//!
//! ```text
//!   SignedRequest ── verify (key, contents, clock) ──▶ trusted member?
//!        no:  came from another node? redirect : relay to a member ──▶ its answer
//!        yes: role of the key ──check(access table)──▶ command │ upload │ read
//! ```

use std::time::Instant;

use cloudless_api::user::{
    ClusterStatus, Explain, GetWorkload, Line, Logs, NodeInfo, Nodes, Status, Upload, Uploaded,
    Whoami, WorkloadInfo, Workloads,
};
use cloudless_api::{Answer, ApiError, Call, Command, Request, Role, SignedRequest, UserRequest};
use cloudless_consensus::Consistency;
use cloudless_consensus::state::Request as RaftRequest;
use cloudless_mesh::rpc::InboundRequest;
use cloudless_types::{WorkloadName, now_ms};

use super::uploads::Progress;
use super::{Api, read, read_error, refuse, reply, write_error};
use crate::access::{Access, Caller, Refusal, check};
use crate::peers::CALL_TIMEOUT;

/// Where a user request goes after its signature checked out.
enum Route {
    /// Answer here, as a user with this role.
    Here(Option<Role>),
    /// Relay to a raft member.
    Relay,
}

/// What a workload's environment values read as to a role that may not change the workload.
pub const HIDDEN: &str = "(hidden: needs the deployer role)";

/// `list` as a user with `role` may see it: environment values (where secrets are passed
/// today) only for those who may write the workload anyway.
fn redacted(mut list: Vec<WorkloadInfo>, role: Option<Role>) -> Vec<WorkloadInfo> {
    if role.is_none_or(|r| r < Role::Deployer) {
        for w in &mut list {
            for v in w.spec.env.values_mut() {
                HIDDEN.clone_into(v);
            }
        }
    }
    list
}

/// The first bytes of a user key, to name it in messages.
fn who(key: &[u8; 32]) -> String {
    format!("{}…", cloudless_types::hex(&key[..8]))
}

impl Api {
    /// Checks `signed` and decides where it is answered.
    async fn route(
        &self,
        forwarded: bool,
        need: Access,
        signed: &SignedRequest,
    ) -> Result<Route, ApiError> {
        signed.verify(now_ms()).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        if !self.facts.trusts_own_state() {
            // Forwarded at most once: a node that received it from another node points at
            // the members, so leaderless members cannot pass a request around in circles.
            return if forwarded { Err(self.redirect()) } else { Ok(Route::Relay) };
        }
        let (role, root) = self
            .facts
            .consensus
            .read(Consistency::Stale, |s| {
                (s.user_role(&signed.key), s.settings().map(|s| s.root_key))
            })
            .await
            .map_err(read_error)?;
        // Signed for this cluster, not replayed from another where the key is known too.
        let root = root.ok_or_else(|| ApiError::unavailable("the cluster is not bootstrapped"))?;
        signed.check_cluster(&root).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        match check(need, Caller { role, ..Caller::default() }) {
            Ok(()) => Ok(Route::Here(role)),
            Err(Refusal::Unknown) => Err(ApiError::unauthorized(format!(
                "user key {} is not known to this cluster",
                who(&signed.key)
            ))),
            Err(Refusal::Role { has, needs }) => Err(ApiError::forbidden(format!(
                "user key {} has role {has}; this needs {needs}",
                who(&signed.key)
            ))),
            Err(Refusal::Never) => Err(ApiError::forbidden(match &signed.request {
                UserRequest::Command(c) => format!("users may not {}", c.name()),
                other => format!("users may not send {}", other.kind()),
            })),
        }
    }

    pub(super) async fn user_request(
        &self,
        forwarded: bool,
        need: Access,
        signed: SignedRequest,
        inbound: InboundRequest,
    ) {
        let role = match self.route(forwarded, need, &signed).await {
            Ok(Route::Here(role)) => role,
            Ok(Route::Relay) => return self.relay(signed, inbound).await,
            Err(e) => return refuse(inbound, e),
        };
        let key = signed.key;
        match signed.request.clone() {
            UserRequest::Command(c) => reply::<Command>(inbound, self.submit(&signed, c).await),
            UserRequest::Upload(u) => reply::<Upload>(inbound, self.upload(key, u)),
            UserRequest::Status(_) => reply::<Status>(inbound, self.status().await),
            UserRequest::Nodes(_) => reply::<Nodes>(inbound, self.nodes().await),
            UserRequest::Workloads(_) => {
                let list = self.workloads(None).await.map(|l| redacted(l, role));
                reply::<Workloads>(inbound, list)
            }
            UserRequest::Workload(g) => {
                let list = self.workloads(Some(&g.name)).await.map(|l| redacted(l, role));
                let one = list.and_then(|list| {
                    list.into_iter()
                        .next()
                        .ok_or_else(|| ApiError::not_found(format!("no workload named {}", g.name)))
                });
                reply::<GetWorkload>(inbound, one)
            }
            UserRequest::Logs(l) => reply::<Logs>(inbound, self.logs(l).await),
            UserRequest::Explain(e) => reply::<Explain>(inbound, self.explain(&e.name).await),
            UserRequest::Whoami(_) => reply::<Whoami>(
                inbound,
                role.ok_or_else(|| ApiError::unauthorized("unknown user key")),
            ),
        }
    }

    /// Which cluster this is: from this node's state, or a member's.
    pub async fn cluster_id(
        &self,
        c: cloudless_api::ClusterInfo,
    ) -> Answer<cloudless_api::ClusterInfo> {
        if !self.facts.trusts_own_state() {
            return self.peers.ask_member::<cloudless_api::ClusterInfo>(&Request::Cluster(c)).await;
        }
        let settings = self
            .facts
            .consensus
            .read(Consistency::Stale, |s| s.settings().cloned())
            .await
            .map_err(read_error)?;
        let s = settings.ok_or_else(|| ApiError::unavailable("the cluster is not bootstrapped"))?;
        Ok(cloudless_api::ClusterId { name: s.name, root_key: s.root_key })
    }

    /// Relays `signed` to a raft member and answers with what it answers.
    async fn relay(&self, signed: SignedRequest, inbound: InboundRequest) {
        async fn typed<C: Call>(api: &Api, request: Request, inbound: InboundRequest) {
            reply::<C>(inbound, api.peers.ask_member::<C>(&request).await);
        }
        let kind = signed.request.clone();
        let request = Request::User(signed);
        match kind {
            UserRequest::Command(_) => typed::<Command>(self, request, inbound).await,
            UserRequest::Upload(_) => typed::<Upload>(self, request, inbound).await,
            UserRequest::Status(_) => typed::<Status>(self, request, inbound).await,
            UserRequest::Nodes(_) => typed::<Nodes>(self, request, inbound).await,
            UserRequest::Workloads(_) => typed::<Workloads>(self, request, inbound).await,
            UserRequest::Workload(_) => typed::<GetWorkload>(self, request, inbound).await,
            UserRequest::Logs(_) => typed::<Logs>(self, request, inbound).await,
            UserRequest::Explain(_) => typed::<Explain>(self, request, inbound).await,
            UserRequest::Whoami(_) => typed::<Whoami>(self, request, inbound).await,
        }
    }

    /// A user's command, signed, from this node's own process (`cloudless dev`, tests): the
    /// same checks as one that arrived over the network.
    pub async fn user_command(&self, signed: SignedRequest) -> Answer<Command> {
        let UserRequest::Command(c) = signed.request.clone() else {
            return Err(ApiError::invalid("not a command"));
        };
        let need =
            crate::access::access(crate::access::Incoming::Api(&Request::User(signed.clone())));
        match self.route(false, need, &signed).await? {
            Route::Here(_) => self.submit(&signed, c).await,
            Route::Relay => self.peers.ask_member::<Command>(&Request::User(signed)).await,
        }
    }

    /// Submits a user's command with the signer's `(client, serial)`, so a retry through
    /// another node applies once; the state machine checks what the role allows.
    async fn submit(&self, signed: &SignedRequest, command: Command) -> Answer<Command> {
        // The leader believes the user only with what the user signed.
        let request = RaftRequest::from_signed(signed.clone(), command, now_ms());
        match self.facts.consensus.submit(request).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Stores one chunk of an upload; the module once it is complete and matches its hash.
    fn upload(&self, user: [u8; 32], up: Upload) -> Answer<Upload> {
        if self.facts.wasi.has_module(&up.hash) {
            return Ok(Uploaded { received: up.total });
        }
        let hash = up.hash.clone();
        let progress = match self.uploads.lock() {
            Ok(mut u) => u.chunk(user, up, Instant::now())?,
            Err(_) => return Err(ApiError::internal("the upload table is poisoned")),
        };
        match progress {
            Progress::Partial(received) => Ok(Uploaded { received }),
            Progress::Complete(bytes) => match self.facts.wasi.store_module(&bytes) {
                Ok(stored) if stored == hash => Ok(Uploaded { received: bytes.len() as u64 }),
                Ok(stored) => Err(ApiError::invalid(format!(
                    "the uploaded bytes hash to {stored}, not {hash}"
                ))),
                Err(e) => Err(ApiError::internal(format!("cannot store module {hash}: {e}"))),
            },
        }
    }

    /// The cluster at a glance.
    pub async fn status(&self) -> Result<ClusterStatus, ApiError> {
        let view = self.facts.view();
        let metrics = self.facts.consensus.raft().metrics().borrow().clone();
        let raft = read::Raft {
            leader: self.facts.consensus.leader().map(|(_, m)| m.peer),
            voters: self.facts.consensus.voter_members().into_iter().map(|m| m.peer).collect(),
            term: metrics.current_term,
            applied: metrics.last_applied.map_or(0, |l| l.index),
        };
        let me = &self.facts.name;
        self.facts
            .consensus
            .read(Consistency::Stale, |s| read::status(s, &raft, &view, me))
            .await
            .map_err(read_error)?
    }

    /// Every enrolled node.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let view = self.facts.view();
        let voters: Vec<_> =
            self.facts.consensus.voter_members().into_iter().map(|m| m.peer).collect();
        self.facts
            .consensus
            .read(Consistency::Stale, |s| read::nodes(s, &view, &voters))
            .await
            .map_err(read_error)
    }

    /// Every workload, or the one named, with why replicas are not placed.
    pub async fn workloads(
        &self,
        only: Option<&WorkloadName>,
    ) -> Result<Vec<WorkloadInfo>, ApiError> {
        let cached = self.facts.unschedulable.borrow().clone();
        let leads = self.facts.consensus.is_leader();
        let view = self.facts.view();
        let scheduler = &self.facts.scheduler;
        self.facts
            .consensus
            .read(Consistency::Stale, |s| {
                // The leader keeps why its last round left replicas unplaced; another member
                // works it out only when some replica has no node (rare, and then wanted).
                if leads || !read::any_unplaced(s) {
                    read::workloads(s, only, &cached)
                } else {
                    let why =
                        crate::round::round(s, &view, scheduler, Instant::now()).unschedulable;
                    read::workloads(s, only, &why)
                }
            })
            .await
            .map_err(read_error)?
    }

    /// Why each replica of a workload is where it is.
    pub async fn explain(&self, name: &WorkloadName) -> Result<Vec<String>, ApiError> {
        let view = self.facts.view();
        let scheduler = &self.facts.scheduler;
        self.facts
            .consensus
            .read(Consistency::Stale, |s| read::explain(s, &view, scheduler, name, Instant::now()))
            .await
            .map_err(read_error)?
            .ok_or_else(|| ApiError::not_found(format!("no workload named {name}")))
    }

    /// A replica's log lines, from its host.
    async fn logs(&self, l: Logs) -> Result<Vec<Line>, ApiError> {
        let host = self
            .facts
            .consensus
            .read(Consistency::Stale, |s| s.assignments().get(&l.replica).map(|a| a.node.clone()))
            .await
            .map_err(read_error)?
            .ok_or_else(|| {
                ApiError::not_found(format!("{} is not assigned to any node", l.replica))
            })?;
        if host == self.facts.name {
            return self.local_logs(&l).await;
        }
        self.peers
            .node(&host, l, CALL_TIMEOUT)
            .await
            .map_err(|e| ApiError { message: format!("{host}: {}", e.message), ..e })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cloudless_types::{Image, Resources, WorkloadSpec};

    use super::*;

    #[test]
    fn only_deployers_and_admins_read_environment_values() {
        let mut spec = WorkloadSpec::new(
            WorkloadName::new("web").unwrap(),
            Image::Container("busybox:1".into()),
            Resources { cpu_millis: 1, memory_mib: 1, disk_mib: 0, gpus: 0 },
            1,
        );
        spec.env.insert("TOKEN".into(), "s3cret".into());
        let info = WorkloadInfo {
            spec,
            version: 1,
            running: 0,
            replicas: Vec::new(),
            unschedulable: None,
        };
        for role in [None, Some(Role::Viewer)] {
            let seen = redacted(vec![info.clone()], role);
            assert_eq!(seen[0].spec.env["TOKEN"], HIDDEN, "{role:?}");
        }
        for role in [Role::Deployer, Role::Admin] {
            let seen = redacted(vec![info.clone()], Some(role));
            assert_eq!(seen[0].spec.env["TOKEN"], "s3cret");
        }
    }
}
