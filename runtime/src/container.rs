//! The container driver: any Docker Engine API socket (dockerd, or podman's service) through
//! bollard.
//!
//! ```text
//!   start(spec) ──▶ existing container with our name? same fingerprint and running: adopt
//!                                                     otherwise: remove it
//!              ──▶ image present? else pull (with registry credentials if configured)
//!              ──▶ create (labels, limits, read-only rootfs, no capabilities, no network
//!                  unless asked) ──▶ start ──▶ watchdog for the wall-clock limit
//!   wait / status ──▶ inspect: exit code, OOM-killed, finished at
//!   logs / follow ──▶ the engine's logs API      stats ──▶ one-shot stats
//! ```
//!
//! Containers carry labels (`cloudless.node`, `cloudless.replica`, `cloudless.fingerprint`) so
//! a restarted node finds what it started and adopts it instead of starting duplicates.
//! Several nodes may share an engine (tests, or a PC running two nodes): each only sees the
//! containers labelled with its own scope.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, HostConfigLogConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions,
    InspectContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptions,
};
use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::driver::{
    Driver, DriverError, Exit, ExitReason, LogLine, LogStream, Observed, RunState, Stats, Stream,
};
use cloudless_types::Image;

use crate::spec::{ReplicaId, ReplicaSpec};

/// Label naming the node (scope) that owns a container.
pub const LABEL_NODE: &str = "cloudless.node";
/// Label naming the replica a container runs.
pub const LABEL_REPLICA: &str = "cloudless.replica";
/// Label holding the spec fingerprint a container was created from.
pub const LABEL_FINGERPRINT: &str = "cloudless.fingerprint";

/// Processes one container may have: stops a fork bomb from taking the device down, and is
/// far above what a normal service runs.
const PIDS_LIMIT: i64 = 1024;
/// Mount options of the writable `/tmp` a read-only container gets; its size is the replica's
/// disk limit, which the kernel enforces (a write past it fails with "no space left").
const TMPFS: &str = "rw,nosuid,nodev";
/// How often a container with a writable root file system is measured against its disk
/// limit (the engine walks its writable layer to answer, so not often).
const DISK_CHECK: Duration = Duration::from_secs(2);

/// Settings of the container driver.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    /// Engine address (`unix:///path`, `tcp://…`); `None` uses `DOCKER_HOST`, then the
    /// engine's default socket.
    pub host: Option<String>,
    /// Names this node's containers apart from other nodes' on the same engine (the node's
    /// PeerId, or part of it).
    pub scope: String,
    /// Credentials for pulling from registries.
    pub credentials: Option<DockerCredentials>,
    /// Whether this node lets containers use the network (a spec must also ask, or publish
    /// ports).
    pub allow_network: bool,
    /// Keep the root filesystem writable (off: read-only, with a small writable `/tmp`).
    pub writable_rootfs: bool,
    /// The largest disk limit a replica may have, in MiB (what the node offers); `None`: no
    /// cap beyond the spec's own.
    pub max_disk_mib: Option<u32>,
}

/// Runs containers on a Docker Engine API. Cheap to clone.
#[derive(Clone)]
pub struct ContainerDriver {
    docker: Docker,
    config: Arc<ContainerConfig>,
    /// Containers (by id) we stopped, or killed at their deadline: their exit is reported as
    /// such rather than as whatever signal code the engine saw.
    ended_by_us: Arc<Mutex<HashMap<String, ExitReason>>>,
}

fn engine(e: impl std::fmt::Display) -> DriverError {
    DriverError::Engine(format!("container engine: {e}"))
}

fn not_found(e: &BollardError) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code: 404, .. })
}

impl ContainerDriver {
    /// Connects to the engine and checks that it answers.
    pub async fn connect(config: ContainerConfig) -> Result<Self, DriverError> {
        let host = config
            .host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let unreachable = |e: &dyn std::fmt::Display| {
            DriverError::Engine(format!(
                "no container engine answers at {host}: {e}; start dockerd (or `podman system \
                 service`) or set DOCKER_HOST"
            ))
        };
        let docker = match &config.host {
            Some(h) => Docker::connect_with_host(h),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| unreachable(&e))?;
        let docker = docker.negotiate_version().await.map_err(|e| unreachable(&e))?;
        docker.ping().await.map_err(|e| unreachable(&e))?;
        Ok(ContainerDriver { docker, config: Arc::new(config), ended_by_us: Arc::default() })
    }

    /// The container name of a replica.
    pub fn container_name(&self, id: &ReplicaId) -> String {
        format!("cloudless-{}-{id}", self.config.scope)
    }

    async fn inspect(
        &self,
        id: &ReplicaId,
    ) -> Result<Option<ContainerInspectResponse>, DriverError> {
        match self
            .docker
            .inspect_container(&self.container_name(id), None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    /// Pulls `image` if it is missing; returns the volumes it declares.
    async fn ensure_image(&self, image: &str) -> Result<Vec<String>, DriverError> {
        let volumes =
            |i: bollard::models::ImageInspect| i.config.and_then(|c| c.volumes).unwrap_or_default();
        match self.docker.inspect_image(image).await {
            Ok(i) => return Ok(volumes(i)),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(engine(e)),
        }
        info!(image, "pulling image");
        let (from, tag) = split_tag(image);
        let options = CreateImageOptionsBuilder::new().from_image(from).tag(tag).build();
        let mut pull =
            self.docker.create_image(Some(options), None, self.config.credentials.clone());
        while let Some(progress) = pull.next().await {
            if let Err(e) = progress {
                return Err(DriverError::MissingArtifact {
                    artifact: format!("image {image}"),
                    reason: format!("not on this node and the pull failed: {e}"),
                });
            }
        }
        self.docker.inspect_image(image).await.map(volumes).map_err(engine)
    }

    /// What the engine creates for `spec`. `volumes` are the paths the image declares: each
    /// gets a tmpfs of the disk limit instead of an anonymous volume, which would be outside
    /// every limit (and outlive the container).
    fn create_body(
        &self,
        spec: &ReplicaSpec,
        image: &str,
        volumes: &[String],
    ) -> ContainerCreateBody {
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), self.config.scope.clone()),
            (LABEL_REPLICA.to_string(), spec.id.to_string()),
            (LABEL_FINGERPRINT.to_string(), spec.fingerprint()),
        ]);
        let port_key =
            |p: &cloudless_types::Port| format!("{}/{}", p.port, if p.udp { "udp" } else { "tcp" });
        let networked = spec.network || !spec.ports.is_empty();
        let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|p| {
                // The engine picks a free host port; `address` reports it.
                let binding = PortBinding { host_ip: Some("0.0.0.0".into()), host_port: None };
                (port_key(p), Some(vec![binding]))
            })
            .collect();
        let memory = i64::from(spec.memory_mib) << 20;
        let host_config = HostConfig {
            nano_cpus: Some(i64::from(spec.cpu_millis) * 1_000_000),
            memory: Some(memory),
            // No swap beyond the memory limit: over the limit means OOM, as on a phone.
            memory_swap: Some(memory),
            pids_limit: Some(PIDS_LIMIT),
            readonly_rootfs: Some(!self.config.writable_rootfs),
            tmpfs: {
                let options = format!("{TMPFS},size={}m", spec.disk_limit_mib());
                let tmp = (!self.config.writable_rootfs).then(|| "/tmp".to_string());
                let paths: HashMap<String, String> = tmp
                    .into_iter()
                    .chain(volumes.iter().cloned())
                    .map(|p| (p, options.clone()))
                    .collect();
                (!paths.is_empty()).then_some(paths)
            },
            cap_drop: Some(vec!["ALL".into()]),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges".into()]),
            network_mode: Some(if networked { "bridge".into() } else { "none".into() }),
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            // The engine keeps logs; bounded like ours.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), "1m".to_string()),
                    ("max-file".to_string(), "3".to_string()),
                ])),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: (!spec.ports.is_empty())
                .then(|| spec.ports.iter().map(port_key).collect()),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    fn observed(&self, c: &ContainerInspectResponse) -> Option<Observed> {
        let labels = c.config.as_ref()?.labels.as_ref()?;
        let id = ReplicaId::parse(labels.get(LABEL_REPLICA)?).ok()?;
        let fingerprint = labels.get(LABEL_FINGERPRINT).cloned().unwrap_or_default();
        Some(Observed { id, fingerprint, state: self.run_state(c) })
    }

    fn run_state(&self, c: &ContainerInspectResponse) -> RunState {
        let state = c.state.clone().unwrap_or_default();
        let parse = |t: &Option<String>| t.as_deref().and_then(crate::time::parse);
        if state.running == Some(true) || state.restarting == Some(true) {
            return RunState::Running {
                since: parse(&state.started_at).unwrap_or_else(SystemTime::now),
            };
        }
        let by_us =
            c.id.as_ref()
                .and_then(|cid| self.ended_by_us.lock().ok().and_then(|m| m.get(cid).cloned()));
        let code = state.exit_code.map(|c| i32::try_from(c).unwrap_or(i32::MAX));
        let reason = if let Some(r) = by_us {
            r
        } else if state.oom_killed == Some(true) {
            ExitReason::OutOfMemory
        } else if let Some(err) = state.error.filter(|e| !e.is_empty()) {
            ExitReason::Error(err)
        } else {
            ExitReason::Exited
        };
        let at = parse(&state.finished_at).unwrap_or_else(SystemTime::now);
        RunState::Exited(Exit { code, reason, at })
    }

    fn remember(&self, container: &str, reason: ExitReason) {
        if let Ok(mut m) = self.ended_by_us.lock() {
            // Bounded: entries of removed containers are useless; keep the map small.
            if m.len() > 4096 {
                m.clear();
            }
            m.insert(container.to_string(), reason);
        }
    }

    /// Stops a container with a writable root file system whose writable layer grows past
    /// `limit_mib`, as out of disk; ends when the container does.
    fn disk_watch(&self, container: String, limit_mib: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let limit = i64::from(limit_mib) << 20;
            loop {
                tokio::time::sleep(DISK_CHECK).await;
                let options = InspectContainerOptionsBuilder::new().size(true).build();
                let Ok(c) = this.docker.inspect_container(&container, Some(options)).await else {
                    return;
                };
                if c.state.as_ref().and_then(|s| s.running) != Some(true) {
                    return;
                }
                let used = c.size_rw.unwrap_or(0);
                if used > limit {
                    let used_mib = u64::try_from(used >> 20).unwrap_or(0);
                    this.remember(&container, ExitReason::OutOfDisk { used_mib, limit_mib });
                    let stop = StopContainerOptionsBuilder::new().t(0).build();
                    if let Err(e) = this.docker.stop_container(&container, Some(stop)).await {
                        warn!(container, error = %e, "cannot stop a container out of disk");
                    }
                    return;
                }
            }
        });
    }

    /// Kills the container at its wall-clock limit, unless it was replaced or ended before.
    fn watchdog(&self, container: String, timeout: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let running = matches!(
                this.docker.inspect_container(&container, None::<InspectContainerOptions>).await,
                Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true)
            );
            if running {
                this.remember(&container, ExitReason::Timeout);
                let stop = StopContainerOptionsBuilder::new().t(0).build();
                if let Err(e) = this.docker.stop_container(&container, Some(stop)).await {
                    warn!(container, error = %e, "cannot stop a container at its deadline");
                }
            }
        });
    }
}

/// `name:tag` → (`name`, `tag`), `latest` when there is no tag (a `:` in a registry host's
/// port is not a tag).
fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

fn log_line(out: LogOutput) -> Vec<LogLine> {
    let (stream, message) = match out {
        LogOutput::StdErr { message } => (Stream::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => (Stream::Stdout, message),
        LogOutput::StdIn { .. } => return Vec::new(),
    };
    let text = String::from_utf8_lossy(&message);
    text.lines()
        .map(|l| LogLine {
            at: SystemTime::now(),
            stream,
            text: l.trim_end_matches('\r').chars().take(crate::logs::MAX_LINE).collect(),
        })
        .collect()
}

#[async_trait]
impl Driver for ContainerDriver {
    fn name(&self) -> &'static str {
        "container"
    }

    fn runs(&self, image: &Image) -> bool {
        matches!(image, Image::Container(_))
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<(), DriverError> {
        let Image::Container(image) = &spec.image else {
            return Err(DriverError::Refused {
                id: spec.id.clone(),
                reason: "not a container".into(),
            });
        };
        if (spec.network || !spec.ports.is_empty()) && !self.config.allow_network {
            return Err(DriverError::Refused {
                id: spec.id.clone(),
                reason: "it needs network access, which this node does not allow".into(),
            });
        }
        if let Some(max) = self.config.max_disk_mib
            && spec.disk_mib > max
        {
            return Err(DriverError::Refused {
                id: spec.id.clone(),
                reason: format!(
                    "its disk limit of {} MiB is above this node's {max} MiB",
                    spec.disk_mib
                ),
            });
        }
        let name = self.container_name(&spec.id);
        if let Some(existing) = self.inspect(&spec.id).await? {
            let same = self.observed(&existing).is_some_and(|o| {
                o.fingerprint == spec.fingerprint() && matches!(o.state, RunState::Running { .. })
            });
            if same {
                debug!(container = name, "adopted a running container");
                return Ok(());
            }
            let rm = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
            match self.docker.remove_container(&name, Some(rm)).await {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        let volumes = self.ensure_image(image).await?;
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), self.create_body(spec, image, &volumes))
            .await
            .map_err(|e| match e {
                BollardError::DockerResponseServerError { status_code: 404, message } => {
                    DriverError::MissingArtifact {
                        artifact: format!("image {image}"),
                        reason: message,
                    }
                }
                e => engine(e),
            })?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let rm = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
            let _ = self.docker.remove_container(&created.id, Some(rm)).await;
            return Err(DriverError::Refused {
                id: spec.id.clone(),
                reason: format!("it did not start: {e}"),
            });
        }
        if self.config.writable_rootfs {
            self.disk_watch(created.id.clone(), spec.disk_limit_mib());
        }
        if let Some(t) = spec.timeout {
            self.watchdog(created.id, t);
        }
        Ok(())
    }

    async fn stop(&self, id: &ReplicaId, grace: Duration) -> Result<(), DriverError> {
        let Some(c) = self.inspect(id).await? else { return Ok(()) };
        let name = self.container_name(id);
        if let Some(cid) = &c.id
            && c.state.as_ref().and_then(|s| s.running) == Some(true)
        {
            self.remember(cid, ExitReason::Stopped);
            let secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let stop = StopContainerOptionsBuilder::new().t(secs).build();
            match self.docker.stop_container(&name, Some(stop)).await {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                // 304: already stopped.
                Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        let rm = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self.docker.remove_container(&name, Some(rm)).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            // 409: removal already in progress.
            Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(engine(e)),
        }
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<Observed>, DriverError> {
        Ok(self.inspect(id).await?.and_then(|c| self.observed(&c)))
    }

    async fn list(&self) -> Result<Vec<Observed>, DriverError> {
        let filters =
            HashMap::from([("label", vec![format!("{LABEL_NODE}={}", self.config.scope)])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let found = self.docker.list_containers(Some(options)).await.map_err(engine)?;
        let mut out = Vec::new();
        for summary in found {
            let Some(cid) = summary.id else { continue };
            match self.docker.inspect_container(&cid, None::<InspectContainerOptions>).await {
                Ok(c) => out.extend(self.observed(&c)),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn wait(&self, id: &ReplicaId) -> Result<Exit, DriverError> {
        let name = self.container_name(id);
        let mut wait = self.docker.wait_container(&name, None::<WaitContainerOptions>);
        match wait.next().await {
            // A non-zero exit arrives as an error; either way, inspect tells the whole story.
            Some(Ok(_)) | Some(Err(BollardError::DockerContainerWaitError { .. })) | None => {}
            Some(Err(e)) if not_found(&e) => return Err(DriverError::NotFound(id.clone())),
            Some(Err(e)) => return Err(engine(e)),
        }
        match self.inspect(id).await? {
            Some(c) => match self.run_state(&c) {
                RunState::Exited(exit) => Ok(exit),
                RunState::Running { .. } => Err(engine(format!("{name} still runs after wait"))),
            },
            None => Err(DriverError::NotFound(id.clone())),
        }
    }

    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError> {
        let name = self.container_name(id);
        let options =
            LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&tail.to_string()).build();
        let mut logs = self.docker.logs(&name, Some(options));
        let mut lines = Vec::new();
        while let Some(out) = logs.next().await {
            match out {
                Ok(out) => lines.extend(log_line(out)),
                Err(e) if not_found(&e) => return Err(DriverError::NotFound(id.clone())),
                Err(e) => return Err(engine(e)),
            }
        }
        let skip = lines.len().saturating_sub(tail);
        Ok(lines.split_off(skip))
    }

    async fn follow(&self, id: &ReplicaId) -> Result<LogStream, DriverError> {
        if self.inspect(id).await?.is_none() {
            return Err(DriverError::NotFound(id.clone()));
        }
        let options =
            LogsOptionsBuilder::new().stdout(true).stderr(true).follow(true).tail("0").build();
        let logs = self.docker.logs(&self.container_name(id), Some(options));
        Ok(Box::pin(
            logs.take_while(|r| futures::future::ready(r.is_ok()))
                .flat_map(|r| futures::stream::iter(r.map(log_line).unwrap_or_default())),
        ))
    }

    async fn stats(&self, id: &ReplicaId) -> Result<Stats, DriverError> {
        let options = StatsOptionsBuilder::new().stream(false).one_shot(true).build();
        let mut stats = self.docker.stats(&self.container_name(id), Some(options));
        match stats.next().await {
            Some(Ok(s)) => Ok(Stats {
                cpu_nanos: s
                    .cpu_stats
                    .and_then(|c| c.cpu_usage)
                    .and_then(|u| u.total_usage)
                    .unwrap_or(0),
                memory_bytes: s.memory_stats.and_then(|m| m.usage).unwrap_or(0),
            }),
            Some(Err(e)) if not_found(&e) => Err(DriverError::NotFound(id.clone())),
            Some(Err(e)) => Err(engine(e)),
            None => Err(DriverError::NotFound(id.clone())),
        }
    }

    async fn address(&self, id: &ReplicaId, port: u16) -> Result<SocketAddr, DriverError> {
        let c = self.inspect(id).await?.ok_or_else(|| DriverError::NotFound(id.clone()))?;
        let bindings = c.network_settings.and_then(|n| n.ports).unwrap_or_default();
        let host_port = bindings
            .get(&format!("{port}/tcp"))
            .and_then(|b| b.as_ref())
            .and_then(|b| b.iter().find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok()));
        match host_port {
            Some(p) => Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, p))),
            None => Err(DriverError::Refused {
                id: id.clone(),
                reason: format!("port {port} is not published; list it in the spec's ports"),
            }),
        }
    }

    async fn exec(
        &self,
        id: &ReplicaId,
        command: &[String],
        timeout: Duration,
    ) -> Result<i32, DriverError> {
        let name = self.container_name(id);
        let run = async {
            let exec = self
                .docker
                .create_exec(
                    &name,
                    CreateExecOptions {
                        cmd: Some(command.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| {
                    if not_found(&e) { DriverError::NotFound(id.clone()) } else { engine(e) }
                })?;
            if let StartExecResults::Attached { mut output, .. } =
                self.docker.start_exec(&exec.id, None).await.map_err(engine)?
            {
                while output.next().await.is_some() {}
            }
            let inspected = self.docker.inspect_exec(&exec.id).await.map_err(engine)?;
            Ok(inspected.exit_code.map_or(-1, |c| i32::try_from(c).unwrap_or(i32::MAX)))
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            Err(DriverError::Engine(format!("exec in {name} took longer than {timeout:?}")))
        })
    }
}
