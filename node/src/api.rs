//! The `api` service every node serves (protocol in `cloudless_consensus::api`).
//!
//! ```text
//!   caller ──▶ serve ──▶ answer
//!     Module, Logs ── enrolled callers only
//!     Query, Node(…) ── not a raft member? Redirect(members) ── enrolled callers only
//!     Node(Enroll) ── a peer for itself; relayed to a member by non-members
//!     User(signed) ── signature and clock ──▶ not a raft member? forward verbatim to one
//!                                           └▶ member: role ──▶ command │ read │ upload
//! ```
//!
//! Reads are answered from this member's applied state and its view of the pool, without a
//! round through the leader: a CLI sees what this member knows, at most a heartbeat old.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use cloudless_consensus::Consistency;
use cloudless_consensus::api::{
    ApiRequest, ApiResponse, CHUNK, ClusterStatus, Line, MAX_MODULE, NodeInfo, Query, Read,
    ReplicaInfo, SignedRequest, UserRequest, WorkloadInfo,
};
use cloudless_consensus::state::{
    Actor, Command, NodeRole, Phase as RaftPhase, ReplicaKey, Role, State, UserKey,
};
use cloudless_mesh::membership;
use cloudless_mesh::rpc::{InboundRequest, RemoteError, RemoteErrorKind};
use cloudless_runtime::driver::Stream;
use cloudless_runtime::{Driver, ReplicaId};
use cloudless_sched::model::ReplicaId as SchedReplica;
use libp2p::PeerId;
use tokio::sync::mpsc;

use crate::daemon::{Inner, ask_member, call, trusts_own_state};
use crate::leader::{self, Seen};
use cloudless_types::now_ms;

/// Api requests handled at once; more wait for a slot (the mesh queue in front is bounded).
const CONCURRENT: usize = 64;
/// Uploads in progress at once, per node.
const MAX_UPLOADS: usize = 4;
/// An upload that received nothing for this long is dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// Most log lines in one answer: a 64 KiB ring holds about this many short lines.
const MAX_LINES: u32 = 2_000;

/// Modules being uploaded, by hash.
#[derive(Default)]
pub(crate) struct Uploads(BTreeMap<(UserKey, String), Upload>);

struct Upload {
    total: u64,
    bytes: Vec<u8>,
    touched: Instant,
}

/// Serves the api service.
pub(crate) async fn serve(inner: Arc<Inner>, mut requests: mpsc::Receiver<InboundRequest>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    while let Some(req) = requests.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let caller = req.peer;
            let answer = match postcard::from_bytes::<ApiRequest>(&req.body) {
                Ok(r) => {
                    inner.metrics.api_request(kind(&r));
                    answer(&inner, caller, r).await
                }
                Err(e) => {
                    req.fail(RemoteError::new(
                        RemoteErrorKind::BadRequest,
                        format!("malformed api request: {e}"),
                    ));
                    return;
                }
            };
            match postcard::to_allocvec(&answer) {
                Ok(bytes) => req.respond_bytes(bytes),
                Err(e) => req.fail(RemoteError::new(RemoteErrorKind::Failed, e.to_string())),
            }
        });
    }
}

/// The metric label of a request (a fixed, small set).
fn kind(r: &ApiRequest) -> &'static str {
    match r {
        ApiRequest::Node(Command::Enroll { .. }) => "enroll",
        ApiRequest::Node(_) => "node",
        ApiRequest::User(s) => match s.request {
            UserRequest::Command(_) => "user_command",
            UserRequest::Read(_) => "user_read",
            UserRequest::Upload { .. } => "upload",
        },
        ApiRequest::Query(_) => "query",
        ApiRequest::Module { .. } => "module",
        ApiRequest::Nudge => "nudge",
        ApiRequest::Logs { .. } => "logs",
    }
}

/// Whether `peer` is this node or a raft voter as this node last learned.
fn is_voter(inner: &Inner, peer: &PeerId) -> bool {
    *peer == inner.me || inner.members.lock().is_ok_and(|m| m.contains(peer))
}

/// Points the caller at the raft members this node knows.
fn redirect(inner: &Inner) -> ApiResponse {
    ApiResponse::Redirect(
        inner.members.lock().map(|m| m.iter().map(|p| p.to_string()).collect()).unwrap_or_default(),
    )
}

fn refused(why: impl Into<String>) -> ApiResponse {
    ApiResponse::Refused(why.into())
}

/// Answers one request from `caller` (this node itself when a loop asks locally).
pub(crate) async fn answer(inner: &Inner, caller: PeerId, req: ApiRequest) -> ApiResponse {
    // A voter replaced while it was down still lists itself as one: it must not answer from
    // its frozen state.
    let member = trusts_own_state(inner);
    match req {
        ApiRequest::User(signed) => user(inner, caller, signed).await,
        ApiRequest::Node(Command::Enroll { token, signature, peer }) => {
            let relayed = peer != caller.to_string();
            if relayed && !member {
                return redirect(inner);
            }
            if relayed && !inner.gate.is_enrolled(&caller) {
                return refused(format!("{caller} may only enroll itself, not {peer}"));
            }
            let enroll = Command::Enroll { token, signature, peer };
            if member {
                // A forged or used token is refused here, not after costing a raft entry.
                let req = cloudless_consensus::state::Request {
                    client: 0,
                    serial: 0,
                    actor: Actor::Node(caller.to_string()),
                    time_ms: now_ms(),
                    command: enroll.clone(),
                };
                if let Ok(Err(e)) =
                    inner.consensus.read(Consistency::Stale, |s| s.precheck(&req)).await
                {
                    return ApiResponse::Applied(Err(e));
                }
                propose(inner, caller, enroll).await
            } else {
                // The newcomer may not reach a member yet: relay (the state machine accepts
                // an enrolled node relaying a token-signed enrollment).
                ask_member(inner, ApiRequest::Node(enroll)).await.unwrap_or_else(refused)
            }
        }
        // Served by any node, to enrolled nodes only.
        ApiRequest::Module { .. } | ApiRequest::Logs { .. } | ApiRequest::Nudge
            if !inner.gate.is_enrolled(&caller) =>
        {
            refused(format!("{caller} is not an enrolled node of this cluster"))
        }
        ApiRequest::Module { hash, offset } => {
            match inner.wasi.module_chunk(&hash, offset, CHUNK) {
                Some((total, bytes)) => ApiResponse::Module { total, bytes },
                None => refused(format!("module {hash} is not stored here")),
            }
        }
        // Relayed by a raft member that checked the user's role; other nodes may not read
        // what their peers' replicas print.
        ApiRequest::Logs { .. } if !is_voter(inner, &caller) => {
            refused(format!("{caller} is not a raft member; ask one for logs"))
        }
        ApiRequest::Logs { workload, index, after_ns, tail } => {
            local_logs(inner, &workload, index, after_ns, tail).await
        }
        ApiRequest::Nudge => {
            if let Ok(mut n) = inner.nudged_by.lock() {
                *n = Some(caller);
            }
            inner.nudge.notify_one();
            ApiResponse::Done
        }
        // Only a member knows for sure who is enrolled: the rest point at the members they
        // know (perhaps none, and the caller tries its next peer).
        _ if !member => redirect(inner),
        _ if !inner.gate.is_enrolled(&caller) => {
            refused(format!("{caller} is not an enrolled node of this cluster"))
        }
        ApiRequest::Query(Query::Members) => ApiResponse::Members(
            inner.consensus.voter_members().into_iter().map(|m| m.peer).collect(),
        ),
        ApiRequest::Query(Query::Enrolled) => {
            let lists = inner.consensus.read(Consistency::Stale, crate::gate::lists).await;
            let voters = inner.consensus.voter_members().into_iter().map(|m| m.peer).collect();
            match lists {
                Ok((nodes, revoked)) => ApiResponse::Enrolled { nodes, revoked, voters },
                Err(e) => refused(e.to_string()),
            }
        }
        ApiRequest::Query(Query::Assigned { node }) if node != caller.to_string() => {
            refused(format!("{caller} may only ask for its own assignments, not {node}'s"))
        }
        ApiRequest::Query(Query::Assigned { node }) => {
            match inner.consensus.read(Consistency::Stale, |s| assigned(s, &node)).await {
                Ok(a) => ApiResponse::Assigned(a),
                Err(e) => refused(e.to_string()),
            }
        }
        ApiRequest::Node(command) => propose(inner, caller, command).await,
    }
}

async fn propose(inner: &Inner, caller: PeerId, command: Command) -> ApiResponse {
    match inner.consensus.propose(Actor::Node(caller.to_string()), command).await {
        Ok(r) => ApiResponse::Applied(r),
        Err(e) => refused(e.to_string()),
    }
}

/// The replicas assigned to `node`, with their workloads' specs.
pub(crate) fn assigned(
    state: &State,
    node: &str,
) -> Vec<(ReplicaKey, cloudless_types::WorkloadSpec)> {
    state
        .assigned_to(node)
        .filter_map(|(k, _)| {
            state.workloads().get(&k.workload).map(|w| (k.clone(), w.spec.clone()))
        })
        .collect()
}

/// A user's signed request: checked here, then handled by a raft member.
async fn user(inner: &Inner, caller: PeerId, signed: SignedRequest) -> ApiResponse {
    if let Err(e) = signed.verify(now_ms()) {
        return refused(e.to_string());
    }
    // Forwarded at most once: a node that received it from another node answers or points
    // at the members, so leaderless members cannot pass a request around in circles.
    let forwarded = caller != inner.me && inner.gate.is_enrolled(&caller);
    if !forwarded && !trusts_own_state(inner) {
        return ask_member(inner, ApiRequest::User(signed)).await.unwrap_or_else(refused);
    }
    if forwarded && !trusts_own_state(inner) {
        return redirect(inner);
    }
    let need = match &signed.request {
        // Known users only: a stranger's command must not cost a raft entry (the state
        // machine then decides what the user's role allows).
        UserRequest::Command(_) => Some(Role::Viewer),
        UserRequest::Read(_) => Some(Role::Viewer),
        UserRequest::Upload { .. } => Some(Role::Deployer),
    };
    let role = inner.consensus.read(Consistency::Stale, |s| s.user_role(&signed.key)).await;
    let role = match role {
        Ok(r) => r,
        Err(e) => return refused(e.to_string()),
    };
    if let Some(need) = need
        && role.is_none_or(|r| r < need)
    {
        let who = cloudless_types::hex(&signed.key[..8]);
        return refused(match role {
            None => format!("user key {who}… is not known to this cluster"),
            Some(r) => format!("user key {who}… has role {r:?}; this needs {need:?}"),
        });
    }
    match signed.request {
        UserRequest::Command(command) => {
            let request = cloudless_consensus::state::Request {
                client: signed.client,
                serial: signed.serial,
                actor: Actor::User(signed.key),
                time_ms: now_ms(),
                command,
            };
            match inner.consensus.submit(request).await {
                Ok(r) => ApiResponse::Applied(r),
                Err(e) => refused(e.to_string()),
            }
        }
        UserRequest::Upload { hash, total, offset, bytes } => {
            upload(inner, signed.key, hash, total, offset, bytes)
        }
        UserRequest::Read(Read::Whoami) => match role {
            Some(r) => ApiResponse::Role(r),
            None => refused("unknown user"),
        },
        UserRequest::Read(read) => self::read(inner, read).await,
    }
}

/// Stores one chunk of an upload; the module once it is complete and matches its hash.
fn upload(
    inner: &Inner,
    user: UserKey,
    hash: String,
    total: u64,
    offset: u64,
    bytes: Vec<u8>,
) -> ApiResponse {
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return refused(format!("{hash:?} is not a module hash (64 lowercase hex digits)"));
    }
    if inner.wasi.has_module(&hash) {
        return ApiResponse::Uploaded { received: total };
    }
    if total == 0 || total > MAX_MODULE {
        return refused(format!("a module must be 1 byte to {MAX_MODULE} bytes, not {total}"));
    }
    if bytes.len() > CHUNK {
        return refused(format!("chunks are at most {CHUNK} bytes, not {}", bytes.len()));
    }
    let Ok(mut uploads) = inner.uploads.lock() else { return refused("upload table poisoned") };
    let now = Instant::now();
    uploads.0.retain(|_, u| now.duration_since(u.touched) < UPLOAD_IDLE);
    // Per uploader: one user restarting an upload does not reset another's.
    let slot = (user, hash.clone());
    if offset == 0 {
        if !uploads.0.contains_key(&slot) && uploads.0.len() >= MAX_UPLOADS {
            return refused(format!("{MAX_UPLOADS} uploads are in progress here; retry shortly"));
        }
        uploads.0.insert(slot.clone(), Upload { total, bytes: Vec::new(), touched: now });
    }
    let Some(u) = uploads.0.get_mut(&slot) else {
        return refused(format!("no upload of {hash} in progress; start at offset 0"));
    };
    if u.total != total || u.bytes.len() as u64 != offset {
        return refused(format!(
            "upload of {hash}: expected offset {} of {}, got offset {offset} of {total}",
            u.bytes.len(),
            u.total
        ));
    }
    if offset + bytes.len() as u64 > total {
        return refused(format!("upload of {hash}: chunk goes past the total of {total} bytes"));
    }
    u.bytes.extend_from_slice(&bytes);
    u.touched = now;
    let received = u.bytes.len() as u64;
    if received < total {
        return ApiResponse::Uploaded { received };
    }
    let Some(done) = uploads.0.remove(&slot) else { return refused("upload vanished") };
    drop(uploads);
    match inner.wasi.store_module(&done.bytes) {
        Ok(stored) if stored == hash => ApiResponse::Uploaded { received },
        Ok(stored) => refused(format!("the uploaded bytes hash to {stored}, not {hash}")),
        Err(e) => refused(format!("cannot store module {hash}: {e}")),
    }
}

/// The word for a replica phase (CLI output, metric labels), and the failure reason.
pub(crate) fn phase_word(p: &RaftPhase) -> (&'static str, Option<String>) {
    match p {
        RaftPhase::Pending => ("pending", None),
        RaftPhase::Running => ("running", None),
        RaftPhase::Succeeded => ("succeeded", None),
        RaftPhase::Failed(why) => ("failed", Some(why.clone())),
        RaftPhase::Restarting => ("restarting", None),
    }
}

/// The word for a membership state (CLI output, metric labels).
pub(crate) fn state_word(s: membership::State) -> &'static str {
    match s {
        membership::State::Alive => "alive",
        membership::State::Suspect => "suspect",
        membership::State::Dead => "dead",
        membership::State::Left => "left",
    }
}

fn workload_info(state: &State, name: &str, unschedulable: Option<String>) -> Option<WorkloadInfo> {
    let w = state.workloads().get(name)?;
    let replicas: Vec<ReplicaInfo> = (0..w.spec.replicas)
        .map(|index| {
            let key = ReplicaKey { workload: name.to_string(), index };
            let node = state.assignments().get(&key).map(|a| a.node.clone());
            // A report from a node the replica has since left describes the old run.
            let status = state.statuses().get(&key).filter(|s| Some(&s.node) == node.as_ref());
            let (phase, reason) = match (&node, status) {
                (None, _) => ("unassigned", None),
                (Some(_), None) => ("pending", None),
                (Some(_), Some(s)) => phase_word(&s.phase),
            };
            ReplicaInfo {
                index,
                node,
                phase: phase.into(),
                reason,
                restarts: status.map_or(0, |s| s.restarts),
            }
        })
        .collect();
    let running = replicas.iter().filter(|r| r.phase == "running").count() as u32;
    Some(WorkloadInfo {
        spec: w.spec.clone(),
        version: w.version,
        running,
        replicas,
        unschedulable,
    })
}

/// Answers a user's read from this member's state and view.
async fn read(inner: &Inner, read: Read) -> ApiResponse {
    let seen: Vec<Seen> = inner.seen.lock().map(|s| s.clone()).unwrap_or_default();
    match read {
        Read::Status => status(inner, &seen).await,
        Read::Nodes => {
            let dir = inner.mesh.directory().await.unwrap_or_default();
            let voters: Vec<String> =
                inner.consensus.voter_members().into_iter().map(|m| m.peer).collect();
            let seen_by: BTreeMap<&str, &Seen> =
                seen.iter().map(|v| (v.peer.as_str(), v)).collect();
            let r = inner.consensus.read(Consistency::Stale, |s| {
                // What each node's replicas request, in one pass over the assignments.
                let mut used: BTreeMap<&str, (u32, u64, u32)> = BTreeMap::new();
                for (k, a) in s.assignments() {
                    if let Some(w) = s.workloads().get(&k.workload) {
                        let u = used.entry(a.node.as_str()).or_default();
                        u.0 += w.spec.requests.cpu_millis;
                        u.1 += u64::from(w.spec.requests.memory_mib);
                        u.2 += 1;
                    }
                }
                s.nodes()
                    .iter()
                    .map(|(peer, rec)| {
                        let view = seen_by.get(peer.as_str()).copied();
                        let d = peer
                            .parse::<PeerId>()
                            .ok()
                            .and_then(|p| dir.get(&p).cloned())
                            .or_else(|| view.and_then(|v| v.descriptor.clone()))
                            .unwrap_or_default();
                        let (cpu, mem, count) =
                            used.get(peer.as_str()).copied().unwrap_or_default();
                        let mut labels = d.labels.clone();
                        labels.extend(rec.labels.clone());
                        NodeInfo {
                            peer: peer.clone(),
                            state: view.map_or("unknown", |v| state_word(v.state)).into(),
                            voter: voters.contains(peer),
                            roles: rec
                                .roles
                                .iter()
                                .map(|r| match r {
                                    NodeRole::Worker => "worker".to_string(),
                                    NodeRole::Voter => "voter".to_string(),
                                })
                                .collect(),
                            schedulable: rec.schedulable.as_str().into(),
                            revoked: rec.revoked,
                            labels,
                            zone: d.zone.clone(),
                            class: d.device_class.map(|c| c.as_str().to_string()),
                            runtimes: d.runtimes.iter().map(|r| r.as_str().to_string()).collect(),
                            cpu_millis: view
                                .and_then(|v| v.capacity)
                                .map_or(d.cpu_millis, |c| c.cpu_total_millis),
                            memory_mib: u64::from(
                                view.and_then(|v| v.capacity)
                                    .map_or(d.memory_mib, |c| c.memory_total_mib),
                            ),
                            cpu_used_millis: cpu,
                            memory_used_mib: mem,
                            replicas: count,
                            addresses: d.addrs.clone(),
                        }
                    })
                    .collect()
            });
            match r.await {
                Ok(nodes) => ApiResponse::Nodes(nodes),
                Err(e) => refused(e.to_string()),
            }
        }
        Read::Workloads | Read::Workload { .. } => {
            let only = match &read {
                Read::Workload { name } => Some(name.clone()),
                _ => None,
            };
            let cached = inner.unschedulable.lock().map(|u| u.clone()).unwrap_or_default();
            let leads = inner.consensus.is_leader();
            let r = inner.consensus.read(Consistency::Stale, |s| {
                // The leader keeps why its last round left replicas unplaced; another member
                // works it out only when some replica has no node (rare, and then wanted).
                let unplaced = s.workloads().iter().any(|(n, w)| {
                    s.assignments()
                        .range(ReplicaKey { workload: n.clone(), index: 0 }..)
                        .take_while(|(k, _)| k.workload == *n)
                        .count()
                        < w.spec.replicas as usize
                });
                let why = if leads || !unplaced {
                    cached
                } else {
                    leader::round(s, &seen, &inner.scheduler).unschedulable
                };
                let names: Vec<String> = match &only {
                    Some(n) => vec![n.clone()],
                    None => s.workloads().keys().cloned().collect(),
                };
                names
                    .iter()
                    .filter_map(|n| workload_info(s, n, why.get(n).cloned()))
                    .collect::<Vec<_>>()
            });
            match (r.await, only) {
                (Ok(list), Some(name)) if list.is_empty() => {
                    refused(format!("no workload named {name}"))
                }
                (Ok(list), _) => ApiResponse::Workloads(list),
                (Err(e), _) => refused(e.to_string()),
            }
        }
        Read::Explain { name } => {
            let r = inner.consensus.read(Consistency::Stale, |s| explain(s, &seen, inner, &name));
            match r.await {
                Ok(Some(lines)) => ApiResponse::Explain(lines),
                Ok(None) => refused(format!("no workload named {name}")),
                Err(e) => refused(e.to_string()),
            }
        }
        Read::Logs { workload, index, after_ns, tail } => {
            let key = ReplicaKey { workload: workload.clone(), index };
            let host = inner
                .consensus
                .read(Consistency::Stale, |s| s.assignments().get(&key).map(|a| a.node.clone()))
                .await;
            let host = match host {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return refused(format!("{workload}.{index} is not assigned to any node"));
                }
                Err(e) => return refused(e.to_string()),
            };
            if host == inner.me.to_string() {
                return local_logs(inner, &workload, index, after_ns, tail).await;
            }
            let Ok(peer) = host.parse::<PeerId>() else {
                return refused(format!("{host} is not a peer id"));
            };
            let req = ApiRequest::Logs { workload, index, after_ns, tail };
            call(inner, peer, &req).await.unwrap_or_else(|e| refused(format!("{host}: {e}")))
        }
        Read::Whoami => refused("whoami is answered before reads"),
    }
}

async fn status(inner: &Inner, seen: &[Seen]) -> ApiResponse {
    let metrics = inner.consensus.raft().metrics().borrow().clone();
    let voters: Vec<String> = inner.consensus.voter_members().into_iter().map(|m| m.peer).collect();
    let dir = inner.mesh.directory().await.unwrap_or_default();
    let mut bootstrap: Vec<String> = Vec::new();
    let me = inner.me.to_string();
    let mine = inner.mesh.listen_addrs().await.unwrap_or_default();
    // Voters first (they are the steadiest devices), this node's own addresses among them.
    for v in &voters {
        let addrs: Vec<String> = if *v == me {
            mine.iter().map(|a| a.to_string()).collect()
        } else {
            v.parse::<PeerId>()
                .ok()
                .and_then(|p| dir.get(&p))
                .map(|d| d.addrs.clone())
                .unwrap_or_default()
        };
        for a in addrs.into_iter().filter(|a| !a.contains("/p2p-circuit")) {
            let full = if a.contains("/p2p/") { a } else { format!("{a}/p2p/{v}") };
            if bootstrap.len() < cloudless_consensus::invite::MAX_BOOTSTRAP {
                bootstrap.push(full);
            }
        }
    }
    let alive = seen.iter().filter(|s| s.state == membership::State::Alive).count() as u32;
    let r = inner.consensus.read(Consistency::Stale, |s| {
        let settings = s.settings().cloned();
        let nodes = s.nodes().values().filter(|n| !n.revoked).count() as u32;
        let replicas = s.workloads().values().map(|w| w.spec.replicas).sum::<u32>();
        let running = s.statuses().iter().filter(|(k, st)| {
            st.phase == RaftPhase::Running
                && s.assignments().get(*k).is_some_and(|a| a.node == st.node)
        });
        (settings, nodes, s.workloads().len() as u32, replicas, running.count() as u32)
    });
    match r.await {
        Ok((Some(settings), nodes, workloads, replicas, running)) => {
            ApiResponse::Status(ClusterStatus {
                name: settings.name,
                root_key: cloudless_types::hex(&settings.root_key),
                leader: inner.consensus.leader().map(|(_, m)| m.peer),
                voters,
                term: metrics.current_term,
                applied: metrics.last_applied.map_or(0, |l| l.index),
                nodes,
                alive,
                workloads,
                replicas,
                running,
                bootstrap,
            })
        }
        Ok((None, ..)) => refused("the cluster is not bootstrapped yet"),
        Err(e) => refused(e.to_string()),
    }
}

/// Why each replica of `name` is where it is, or why it is not placed.
fn explain(state: &State, seen: &[Seen], inner: &Inner, name: &str) -> Option<Vec<String>> {
    let record = state.workloads().get(name)?;
    let (cluster, _) = leader::occupied(state, seen);
    let w = leader::workload(name, &record.spec);
    let mut lines = Vec::new();
    let mut unplaced = 0;
    for index in 0..record.spec.replicas {
        let id = SchedReplica::new(&w.id, index);
        match inner.scheduler.explain_replica(&cluster, &w, &id) {
            Some(Ok(e)) => lines.push(format!("{name}.{index} on {e}")),
            Some(Err(reason)) => {
                let node = cluster.placement(&id).map(|a| a.node.to_string()).unwrap_or_default();
                lines
                    .push(format!("{name}.{index} on {node}, which would now be refused: {reason}"))
            }
            None => unplaced += 1,
        }
    }
    if unplaced > 0 {
        let ranking = inner.scheduler.rank(&cluster, &w, 3);
        match ranking.unschedulable {
            Some(why) => lines.push(format!("{unplaced} replica(s) not placed: {why}")),
            None => {
                lines.push(format!("{unplaced} replica(s) not placed yet; best candidates:"));
                lines.extend(ranking.candidates.iter().map(|c| format!("  {c}")));
            }
        }
    }
    Some(lines)
}

/// Log lines of a replica this node runs.
async fn local_logs(
    inner: &Inner,
    workload: &str,
    index: u32,
    after_ns: u64,
    tail: u32,
) -> ApiResponse {
    let tail = tail.clamp(1, MAX_LINES);
    let id = ReplicaId::new(workload, index);
    // With a cursor, read the whole ring and keep what is newer.
    let want = if after_ns > 0 { MAX_LINES } else { tail } as usize;
    // This node may not hold the state (not a raft member): ask the drivers in turn.
    let mut result = inner.wasi.logs(&id, want).await;
    if result.is_err()
        && let Some(c) = &inner.containers
    {
        result = c.logs(&id, want).await;
    }
    match result {
        Ok(lines) => {
            let mut out: Vec<Line> = lines
                .into_iter()
                .map(|l| Line {
                    at_ns: l.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
                    stream: match l.stream {
                        Stream::Stdout => "stdout".into(),
                        Stream::Stderr => "stderr".into(),
                    },
                    text: l.text,
                })
                .filter(|l| l.at_ns > after_ns)
                .collect();
            // With a cursor every newer line counts (up to MAX_LINES), so a follower misses none.
            let keep = if after_ns > 0 { MAX_LINES } else { tail } as usize;
            let skip = out.len().saturating_sub(keep);
            out.drain(..skip);
            ApiResponse::Logs(out)
        }
        Err(e) => refused(format!("{workload}.{index}: {e}")),
    }
}
