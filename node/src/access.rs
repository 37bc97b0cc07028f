//! The one access table: who may send each request this node serves, on the api and raft
//! services alike. The serve loops look a request up here and check the caller before any
//! handler runs; the handlers never decide who may call them.
//!
//! ```text
//!   bytes (bounded by the mesh) ──decode──▶ Incoming::{Api, Raft}
//!        ──access()──▶ Anyone │ ItselfOrEnrolled │ Enrolled │ Member │ User(role) │ Nobody
//!        ──check against the caller (authenticated PeerId; signed user key)──▶ handler
//! ```
//!
//! - **Anyone**: which cluster this is (its name and root public key, public like an invite),
//!   so that a CLI knows what to sign its requests for.
//! - **ItselfOrEnrolled**: the node the request is about, or an enrolled node relaying for it
//!   (a device enrolls with a token, which is the credential, perhaps through a neighbour).
//! - **Enrolled**: a node committed state lists as enrolled and not revoked.
//! - **Member**: a raft member (voter or learner) as this node knows the group.
//! - **User(role)**: a request signed by a user key whose role is at least `role`; checked
//!   by a raft member (other nodes forward the request to one, signature intact).
//! - **Nobody**: never accepted from outside (the leader's own commands).
//!
//! The state machine checks commands again when it applies them; this table makes sure a
//! request that cannot be allowed costs nothing beyond its decoding.

use cloudless_api::{Command, NodeRequest, Request, Role, UserRequest};
use cloudless_consensus::Message;
use cloudless_types::NodeName;

/// Who may send a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any peer that reaches the service.
    Anyone,
    /// The node `peer` itself, or an enrolled node relaying for it.
    ItselfOrEnrolled {
        /// The node the request is about.
        peer: NodeName,
    },
    /// An enrolled, unrevoked node.
    Enrolled,
    /// A raft member.
    Member,
    /// A user with at least this role (after the signature is checked).
    User(Role),
    /// Nobody: only this node itself produces it.
    Nobody,
}

/// A request on one of the services this node serves.
#[derive(Clone, Copy, Debug)]
pub enum Incoming<'a> {
    /// On the `api` service.
    Api(&'a Request),
    /// On the `raft` service.
    Raft(&'a Message),
}

/// The table.
pub fn access(request: Incoming<'_>) -> Access {
    match request {
        Incoming::Api(Request::User(signed)) => user(&signed.request),
        Incoming::Api(Request::Cluster(_)) => Access::Anyone,
        Incoming::Api(Request::Node(n)) => match n {
            NodeRequest::Enroll(e) => Access::ItselfOrEnrolled { peer: e.peer.clone() },
            NodeRequest::Report(_)
            | NodeRequest::Assigned(_)
            | NodeRequest::Enrolled(_)
            | NodeRequest::Module(_) => Access::Enrolled,
            // Relayed by a member that checked the user's role; other nodes may not read
            // what their peers' replicas print.
            NodeRequest::Logs(_) => Access::Member,
            // Only the leader changes assignments, and the leader is a member.
            NodeRequest::Nudge(_) => Access::Member,
        },
        Incoming::Raft(m) => match m {
            Message::Append(_)
            | Message::Vote(_)
            | Message::Snapshot(_)
            | Message::Forward(_)
            | Message::ReadIndex => Access::Member,
        },
    }
}

/// What a user request needs.
fn user(r: &UserRequest) -> Access {
    match r {
        UserRequest::Command(c) => command(c),
        UserRequest::Upload(_) => Access::User(Role::Deployer),
        UserRequest::Status(_)
        | UserRequest::Nodes(_)
        | UserRequest::Workloads(_)
        | UserRequest::Workload(_)
        | UserRequest::Logs(_)
        | UserRequest::Explain(_)
        | UserRequest::Whoami(_) => Access::User(Role::Viewer),
    }
}

/// What a command sent by a user needs.
fn command(c: &Command) -> Access {
    match c {
        Command::PutWorkload(_) | Command::DeleteWorkload { .. } | Command::Scale { .. } => {
            Access::User(Role::Deployer)
        }
        Command::SetSettings(_)
        | Command::Revoke { .. }
        | Command::SetSchedulable { .. }
        | Command::SetNodeLabels { .. }
        | Command::PutUser { .. }
        | Command::RemoveUser { .. } => Access::User(Role::Admin),
        // The leader's and the nodes' own commands: a user never sends them.
        Command::Bootstrap { .. }
        | Command::Enroll { .. }
        | Command::Assign { .. }
        | Command::Report(_) => Access::Nobody,
    }
}

/// What is known about the caller of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// Who it is (the mesh connection authenticated it), when it is a node.
    pub name: Option<NodeName>,
    /// Committed state (as this node knows it) lists it enrolled and unrevoked.
    pub enrolled: bool,
    /// It is a raft member as this node knows the group.
    pub member: bool,
    /// The role of the user key that signed the request, where one did and it is known.
    pub role: Option<Role>,
}

/// Why a caller was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The caller is not who the request needs (not enrolled, not a member, an unknown key).
    Unknown,
    /// The caller is known, but its role is too low.
    Role {
        /// What it has.
        has: Role,
        /// What it needs.
        needs: Role,
    },
    /// Nobody may send this.
    Never,
}

/// Whether `caller` may send a request that needs `access`.
pub fn check(access: Access, caller: Caller) -> Result<(), Refusal> {
    match access {
        Access::Anyone => Ok(()),
        Access::ItselfOrEnrolled { peer } if caller.name.as_ref() == Some(&peer) => Ok(()),
        Access::ItselfOrEnrolled { .. } if caller.enrolled => Ok(()),
        Access::ItselfOrEnrolled { .. } => Err(Refusal::Unknown),
        Access::Enrolled if caller.enrolled => Ok(()),
        Access::Member if caller.member => Ok(()),
        Access::Enrolled | Access::Member => Err(Refusal::Unknown),
        Access::User(needs) => match caller.role {
            Some(has) if has >= needs => Ok(()),
            Some(has) => Err(Refusal::Role { has, needs }),
            None => Err(Refusal::Unknown),
        },
        Access::Nobody => Err(Refusal::Never),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use cloudless_api::invite::{Grant, Invite};
    use cloudless_api::node::{Assigned, Enroll, Enrolled, ModuleChunk, Nudge, Report};
    use cloudless_api::user::{
        Explain, GetWorkload, Logs, Nodes, Status, Upload, Whoami, Workloads,
    };
    use cloudless_api::{Change, Schedulable, Settings, SignedRequest};
    use cloudless_consensus::state::Batch;
    use cloudless_types::{
        Image, ModuleHash, NodeName, ReplicaId, Resources, WorkloadName, WorkloadSpec,
    };
    use ed25519_dalek::SigningKey;

    use super::*;

    fn name() -> WorkloadName {
        WorkloadName::new("web").unwrap()
    }

    fn peer() -> NodeName {
        NodeName::from_ed25519([5; 32])
    }

    fn settings() -> Settings {
        Settings { name: "c".into(), root_key: [7; 32], voter_target: None, phones_may_vote: false }
    }

    /// One command of every kind: the match makes a new kind fail to compile until it is
    /// listed here (and so in the table test below).
    fn every_command() -> Vec<Command> {
        let spec = WorkloadSpec::new(
            name(),
            Image::Wasi(ModuleHash::of(b"m")),
            Resources { cpu_millis: 1, memory_mib: 1, disk_mib: 0, gpus: 0 },
            1,
        );
        let invite = Invite::create(
            &SigningKey::from_bytes(&[7; 32]),
            "c",
            vec![],
            Grant {
                roles: Default::default(),
                labels: BTreeMap::new(),
                max_uses: 1,
                expires_ms: 1,
            },
            [0; 16],
        );
        let all = vec![
            Command::Bootstrap { settings: settings(), admin: [1; 32], node: peer() },
            Command::SetSettings(settings()),
            Command::Enroll {
                proof: invite.claim_proof(&peer()),
                token: invite.token,
                signature: invite.signature,
                peer: peer(),
            },
            Command::Revoke { peer: peer() },
            Command::SetSchedulable { peer: peer(), schedulable: Schedulable::Draining },
            Command::SetNodeLabels { peer: peer(), labels: BTreeMap::new() },
            Command::PutUser { key: [2; 32], name: "u".into(), role: Role::Viewer },
            Command::RemoveUser { key: [2; 32] },
            Command::PutWorkload(Box::new(spec)),
            Command::DeleteWorkload { name: name() },
            Command::Scale { name: name(), replicas: 2 },
            Command::Assign {
                epoch: 1,
                changes: vec![Change::Stop { replica: ReplicaId::new(&name(), 0) }],
            },
            Command::Report(vec![]),
        ];
        for c in &all {
            match c {
                Command::Bootstrap { .. }
                | Command::SetSettings(_)
                | Command::Enroll { .. }
                | Command::Revoke { .. }
                | Command::SetSchedulable { .. }
                | Command::SetNodeLabels { .. }
                | Command::PutUser { .. }
                | Command::RemoveUser { .. }
                | Command::PutWorkload(_)
                | Command::DeleteWorkload { .. }
                | Command::Scale { .. }
                | Command::Assign { .. }
                | Command::Report(_) => {}
            }
        }
        all
    }

    fn signed(r: UserRequest) -> Request {
        Request::User(SignedRequest::sign(&SigningKey::from_bytes(&[3; 32]), [7; 32], 1, 1, 1, r))
    }

    /// Every request kind of every service, with who may send it.
    fn table() -> Vec<(String, Access)> {
        let replica = ReplicaId::new(&name(), 0);
        let logs = Logs { replica, after_ns: 0, tail: 10 };
        let invite = Invite::create(
            &SigningKey::from_bytes(&[7; 32]),
            "c",
            vec![],
            Grant {
                roles: Default::default(),
                labels: BTreeMap::new(),
                max_uses: 1,
                expires_ms: 1,
            },
            [0; 16],
        );
        let mut api: Vec<Request> = vec![
            Request::Node(NodeRequest::Enroll(Enroll {
                proof: invite.claim_proof(&peer()),
                token: invite.token,
                signature: invite.signature,
                peer: peer(),
            })),
            Request::Node(NodeRequest::Report(Report(vec![]))),
            Request::Node(NodeRequest::Assigned(Assigned::default())),
            Request::Node(NodeRequest::Enrolled(Enrolled::default())),
            Request::Node(NodeRequest::Module(ModuleChunk {
                hash: ModuleHash::of(b"m"),
                offset: 0,
            })),
            Request::Node(NodeRequest::Logs(logs.clone())),
            Request::Node(NodeRequest::Nudge(Nudge::default())),
            signed(UserRequest::Upload(Upload {
                hash: ModuleHash::of(b"m"),
                total: 1,
                offset: 0,
                bytes: vec![0],
            })),
            signed(UserRequest::Status(Status)),
            signed(UserRequest::Nodes(Nodes)),
            signed(UserRequest::Workloads(Workloads)),
            signed(UserRequest::Workload(GetWorkload { name: name() })),
            signed(UserRequest::Logs(logs)),
            signed(UserRequest::Explain(Explain { name: name() })),
            signed(UserRequest::Whoami(Whoami)),
            Request::Cluster(cloudless_api::ClusterInfo),
        ];
        api.extend(every_command().into_iter().map(|c| signed(UserRequest::Command(c))));
        // The match makes a new request kind fail to compile until it is listed above.
        for r in &api {
            match r {
                Request::Node(
                    NodeRequest::Enroll(_)
                    | NodeRequest::Report(_)
                    | NodeRequest::Assigned(_)
                    | NodeRequest::Enrolled(_)
                    | NodeRequest::Module(_)
                    | NodeRequest::Logs(_)
                    | NodeRequest::Nudge(_),
                ) => {}
                Request::User(s) => match &s.request {
                    UserRequest::Command(_)
                    | UserRequest::Upload(_)
                    | UserRequest::Status(_)
                    | UserRequest::Nodes(_)
                    | UserRequest::Workloads(_)
                    | UserRequest::Workload(_)
                    | UserRequest::Logs(_)
                    | UserRequest::Explain(_)
                    | UserRequest::Whoami(_) => {}
                },
                Request::Cluster(_) => {}
            }
        }
        let vote = openraft::Vote::new(1, 1);
        let raft = [
            (
                "raft append",
                Message::Append(openraft::raft::AppendEntriesRequest {
                    vote,
                    prev_log_id: None,
                    entries: vec![],
                    leader_commit: None,
                }),
            ),
            ("raft vote", Message::Vote(openraft::raft::VoteRequest::new(vote, None))),
            (
                "raft snapshot",
                Message::Snapshot(openraft::raft::InstallSnapshotRequest {
                    vote,
                    meta: Default::default(),
                    offset: 0,
                    data: vec![],
                    done: true,
                }),
            ),
            ("raft forward", Message::Forward(Batch(vec![]))),
            ("raft read index", Message::ReadIndex),
        ];
        // The match makes a new raft message fail to compile until it is listed above.
        for (_, m) in &raft {
            match m {
                Message::Append(_)
                | Message::Vote(_)
                | Message::Snapshot(_)
                | Message::Forward(_)
                | Message::ReadIndex => {}
            }
        }
        let mut out: Vec<(String, Access)> = api
            .iter()
            .map(|r| {
                let label = match r {
                    Request::User(s) => match &s.request {
                        UserRequest::Command(c) => format!("user command {}", c.name()),
                        other => format!("user {}", other.kind()),
                    },
                    Request::Node(n) => format!("node {}", n.kind()),
                    Request::Cluster(_) => "cluster".to_string(),
                };
                (label, access(Incoming::Api(r)))
            })
            .collect();
        out.extend(raft.iter().map(|(l, m)| (l.to_string(), access(Incoming::Raft(m)))));
        out
    }

    #[test]
    fn the_table_says_who_may_send_every_request() {
        use Access::*;
        let want: Vec<(&str, Access)> = vec![
            ("node enroll", ItselfOrEnrolled { peer: peer() }),
            ("node report", Enrolled),
            ("node assigned", Enrolled),
            ("node enrolled", Enrolled),
            ("node module", Enrolled),
            ("node host_logs", Member),
            ("node nudge", Member),
            ("user upload", User(Role::Deployer)),
            ("user status", User(Role::Viewer)),
            ("user nodes", User(Role::Viewer)),
            ("user workloads", User(Role::Viewer)),
            ("user workload", User(Role::Viewer)),
            ("user logs", User(Role::Viewer)),
            ("user explain", User(Role::Viewer)),
            ("user whoami", User(Role::Viewer)),
            ("cluster", Anyone),
            ("user command bootstrap", Nobody),
            ("user command set settings", User(Role::Admin)),
            ("user command enroll", Nobody),
            ("user command revoke", User(Role::Admin)),
            ("user command set node schedulable", User(Role::Admin)),
            ("user command set node labels", User(Role::Admin)),
            ("user command put user", User(Role::Admin)),
            ("user command remove user", User(Role::Admin)),
            ("user command put workload", User(Role::Deployer)),
            ("user command delete workload", User(Role::Deployer)),
            ("user command scale", User(Role::Deployer)),
            ("user command assign", Nobody),
            ("user command report", Nobody),
            ("raft append", Member),
            ("raft vote", Member),
            ("raft snapshot", Member),
            ("raft forward", Member),
            ("raft read index", Member),
        ];
        let got = table();
        let got: Vec<(&str, Access)> = got.iter().map(|(l, a)| (l.as_str(), a.clone())).collect();
        assert_eq!(got, want);
        // The raft service checks its caller before decoding, which holds only while every
        // raft message needs the same caller.
        let raft: Vec<&Access> =
            got.iter().filter(|(l, _)| l.starts_with("raft ")).map(|(_, a)| a).collect();
        assert!(raft.iter().all(|a| **a == Access::Member), "{raft:?}");
    }

    #[test]
    fn callers_are_checked_against_the_table() {
        let stranger = Caller { name: Some(NodeName::from_ed25519([8; 32])), ..Caller::default() };
        let node = Caller { enrolled: true, ..Caller::default() };
        let member = Caller { enrolled: true, member: true, ..Caller::default() };
        let viewer = Caller { role: Some(Role::Viewer), ..Caller::default() };
        let admin = Caller { role: Some(Role::Admin), ..Caller::default() };
        assert_eq!(check(Access::Anyone, stranger.clone()), Ok(()));
        let itself = Access::ItselfOrEnrolled { peer: NodeName::from_ed25519([8; 32]) };
        let another = Access::ItselfOrEnrolled { peer: peer() };
        assert_eq!(check(itself, stranger.clone()), Ok(()), "a device enrolls itself");
        assert_eq!(check(another.clone(), stranger.clone()), Err(Refusal::Unknown));
        assert_eq!(check(another, node.clone()), Ok(()), "an enrolled node relays");
        assert_eq!(check(Access::Enrolled, stranger), Err(Refusal::Unknown));
        assert_eq!(check(Access::Enrolled, node.clone()), Ok(()));
        assert_eq!(check(Access::Member, node), Err(Refusal::Unknown));
        assert_eq!(check(Access::Member, member.clone()), Ok(()));
        assert_eq!(check(Access::User(Role::Viewer), member), Err(Refusal::Unknown));
        assert_eq!(
            check(Access::User(Role::Deployer), viewer),
            Err(Refusal::Role { has: Role::Viewer, needs: Role::Deployer })
        );
        assert_eq!(check(Access::User(Role::Deployer), admin.clone()), Ok(()));
        assert_eq!(check(Access::Nobody, admin), Err(Refusal::Never));
    }
}
