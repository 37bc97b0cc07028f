//! The node's HTTP endpoint: Prometheus metrics and the health and readiness probes.
//!
//! This module owns the metric registry ([`Metrics`]) and the HTTP server ([`serve`]); it
//! knows nothing about the mesh, raft or the runtime. Data flows one way:
//!
//! ```text
//!   daemon loops ──Metrics::decision / set_raft / set_members / ...──▶ atomics in the registry
//!   scraper ──GET /metrics──▶ Metrics::encode ──▶ OpenMetrics text
//!   orchestrator / operator ──GET /health, GET /ready──▶ Readiness (the daemon) ──▶ 200 or 503
//! ```
//!
//! Recording a value is a lock-free atomic update (labelled families take a short read lock
//! once the label set exists), so the daemon's loops can record on every round without
//! contending with a scrape. The registry is built once in [`Metrics::new`] and never changes
//! shape afterwards, so encoding needs no lock of its own.
//!
//! Label values are not free text: every labelled method documents the small fixed set of
//! values its callers pass, which keeps the number of series bounded whatever the pool does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::warn;

/// The content type of [`Metrics::encode`]'s output: the OpenMetrics text format, which is what
/// `prometheus_client::encoding::text` writes (it ends with `# EOF`).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Smallest placement-latency bucket: 5 ms, about the cost of one scheduling pass on a small
/// pool, so a placement made in the first leader round after a workload appears lands here.
const LATENCY_START: f64 = 0.005;
/// Each bucket doubles the last: latency spans orders of magnitude (one leader round versus
/// waiting for capacity), and doubling keeps the relative error of a quantile under 2x.
const LATENCY_FACTOR: f64 = 2.0;
/// Twelve doublings from 5 ms reach about 10 s (5 ms * 2^11 = 10.24 s); anything slower is a
/// stuck placement that `+Inf` and the `unschedulable` counter already show.
const LATENCY_BUCKETS: u16 = 12;

/// Why the HTTP endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listening socket could not be bound (address in use, not permitted, no such
    /// interface).
    #[error("cannot listen for http on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Labels of `cloudless_scheduler_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// Labels of `cloudless_membership_members`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// Labels of `cloudless_replicas`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// Labels of `cloudless_api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The registry and handles to every metric in it; built once, shared by [`Metrics`].
#[derive(Debug)]
struct Inner {
    registry: Registry,
    decisions: Family<OutcomeLabels, Counter>,
    placement_latency: Histogram,
    cpu_utilization: Gauge<f64, AtomicU64>,
    members: Family<StateLabels, Gauge>,
    member_failures: Counter,
    directory_entries: Gauge<u64, AtomicU64>,
    raft_term: Gauge<u64, AtomicU64>,
    raft_applied: Gauge<u64, AtomicU64>,
    raft_is_leader: Gauge<i64, AtomicI64>,
    raft_voters: Gauge<u64, AtomicU64>,
    replicas: Family<PhaseLabels, Gauge>,
    api_requests: Family<KindLabels, Counter>,
}

/// The node's metrics. Cloning is cheap (one `Arc`) and every clone records into the same
/// registry, so each loop of the daemon can hold its own.
///
/// Exposed series (the `_total` suffix of counters is added by the encoder):
///
/// | name | type | labels |
/// | --- | --- | --- |
/// | `cloudless_scheduler_decisions_total` | counter | `outcome` |
/// | `cloudless_workload_placement_latency_seconds` | histogram | |
/// | `cloudless_node_cpu_utilization` | gauge | |
/// | `cloudless_membership_members` | gauge | `state` |
/// | `cloudless_membership_failures_total` | counter | |
/// | `cloudless_directory_entries` | gauge | |
/// | `cloudless_raft_term`, `cloudless_raft_applied_index`, `cloudless_raft_is_leader`, `cloudless_raft_voters` | gauge | |
/// | `cloudless_replicas` | gauge | `phase` |
/// | `cloudless_api_requests_total` | counter | `kind` |
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered and at zero (labelled families are empty until
    /// a label value is first recorded).
    pub fn new() -> Self {
        Self::with_registry(Registry::default())
    }

    /// As [`Metrics::new`], adding ours to `registry`, which may already hold others (the
    /// mesh registers libp2p's there).
    pub fn with_registry(mut registry: Registry) -> Self {
        let decisions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cloudless_scheduler_decisions",
            "Scheduling decisions made by this node as raft leader, by outcome",
            decisions.clone(),
        );
        let placement_latency =
            Histogram::new(exponential_buckets(LATENCY_START, LATENCY_FACTOR, LATENCY_BUCKETS));
        registry.register(
            "cloudless_workload_placement_latency_seconds",
            "Seconds from a replica becoming wanted to its placement on a node",
            placement_latency.clone(),
        );
        let cpu_utilization = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cloudless_node_cpu_utilization",
            "Share (0 to 1) of this node's offered CPU requested by the replicas assigned to it",
            cpu_utilization.clone(),
        );
        let members = Family::<StateLabels, Gauge>::default();
        registry.register(
            "cloudless_membership_members",
            "Members of the mesh as seen by this node, by membership state",
            members.clone(),
        );
        let member_failures = Counter::default();
        registry.register(
            "cloudless_membership_failures",
            "Times this node saw a member declared dead (a live member declared dead and back \
             counts each time)",
            member_failures.clone(),
        );
        let directory_entries = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "cloudless_directory_entries",
            "Node directory entries held by this node (members' signed descriptors)",
            directory_entries.clone(),
        );
        let raft_term = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "cloudless_raft_term",
            "Current raft term seen by this node",
            raft_term.clone(),
        );
        let raft_applied = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "cloudless_raft_applied_index",
            "Index of the last raft log entry applied to this node's state",
            raft_applied.clone(),
        );
        let raft_is_leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "cloudless_raft_is_leader",
            "1 if this node is the raft leader, else 0",
            raft_is_leader.clone(),
        );
        let raft_voters = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "cloudless_raft_voters",
            "Voting members of the raft group as seen by this node",
            raft_voters.clone(),
        );
        let replicas = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "cloudless_replicas",
            "Replicas assigned to this node, by phase",
            replicas.clone(),
        );
        let api_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "cloudless_api_requests",
            "Api requests served by this node, by kind",
            api_requests.clone(),
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                decisions,
                placement_latency,
                cpu_utilization,
                members,
                member_failures,
                directory_entries,
                raft_term,
                raft_applied,
                raft_is_leader,
                raft_voters,
                replicas,
                api_requests,
            }),
        }
    }

    /// Counts `n` scheduling decisions with the given outcome.
    ///
    /// `outcome` is one of `"placed"`, `"unschedulable"` or `"moved"`; callers pass only these
    /// so the series stay bounded.
    pub fn decision(&self, outcome: &str, n: u64) {
        self.inner
            .decisions
            .get_or_create(&OutcomeLabels { outcome: outcome.to_owned() })
            .inc_by(n);
    }

    /// Records one placement that took `seconds` from the replica becoming wanted.
    pub fn placement_latency(&self, seconds: f64) {
        self.inner.placement_latency.observe(seconds);
    }

    /// Sets the share (0 to 1) of this node's offered CPU requested by its assigned replicas.
    pub fn set_cpu_utilization(&self, share: f64) {
        self.inner.cpu_utilization.set(share);
    }

    /// Sets how many mesh members are in `state`.
    ///
    /// `state` is one of `"alive"`, `"suspect"`, `"dead"` or `"left"`; callers pass only these
    /// so the series stay bounded.
    pub fn set_members(&self, state: &str, n: i64) {
        self.inner.members.get_or_create(&StateLabels { state: state.to_owned() }).set(n);
    }

    /// Counts one member this node saw declared dead.
    pub fn member_failed(&self) {
        self.inner.member_failures.inc();
    }

    /// Sets how many directory entries this node holds.
    pub fn set_directory_entries(&self, n: usize) {
        self.inner.directory_entries.set(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Sets the raft gauges: the current term, the last applied log index, whether this node
    /// leads, and how many voters the group has.
    pub fn set_raft(&self, term: u64, applied: u64, leader: bool, voters: usize) {
        let inner = &self.inner;
        inner.raft_term.set(term);
        inner.raft_applied.set(applied);
        inner.raft_is_leader.set(i64::from(leader));
        inner.raft_voters.set(u64::try_from(voters).unwrap_or(u64::MAX));
    }

    /// Sets how many replicas this node's runtimes hold in `phase`.
    ///
    /// `phase` is `"running"` or `"exited"` (what the drivers report), never a failure reason,
    /// so the series stay bounded.
    pub fn set_replicas(&self, phase: &str, n: i64) {
        self.inner.replicas.get_or_create(&PhaseLabels { phase: phase.to_owned() }).set(n);
    }

    /// Counts one api request of the given kind.
    ///
    /// `kind` is the name of an api request variant (a fixed set defined by the api); callers
    /// never pass request contents, so the series stay bounded.
    pub fn api_request(&self, kind: &str) {
        self.inner.api_requests.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    /// The whole registry in the OpenMetrics text format (see [`METRICS_CONTENT_TYPE`]),
    /// ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail and every name and label is well formed, so an error
        // here would be a bug in the encoder; serve what was written rather than nothing.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// What the node says about itself to `/health` and `/ready`. The daemon implements it.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` while the process works (its loops run); `Err` with the reason otherwise. A failing
    /// health check means "restart me".
    fn health(&self) -> Result<(), String>;
    /// `Ok` when the node can do its job (joined the mesh, knows a raft leader, ...); `Err`
    /// with what is missing otherwise. A failing readiness check means "don't count on me
    /// yet".
    fn ready(&self) -> Result<(), String>;
}

/// What each request handler gets.
#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Arc<dyn Readiness>,
}

/// Serves `GET /metrics`, `GET /health` and `GET /ready` on `bind` (port 0 picks a free
/// port); every other path or method gets 404.
///
/// Returns the address actually bound and the server task, which runs until aborted.
///
/// # Errors
///
/// [`HttpError::Bind`] if the address cannot be listened on.
pub async fn serve(
    bind: SocketAddr,
    metrics: Metrics,
    readiness: Arc<dyn Readiness>,
) -> Result<(SocketAddr, JoinHandle<()>), HttpError> {
    let bind_error = |source| HttpError::Bind { addr: bind, source };
    let listener = TcpListener::bind(bind).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let app = router(AppState { metrics, readiness });
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, %addr, "http endpoint stopped");
        }
    });
    Ok((addr, task))
}

/// The routes of the endpoint.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/ready", get(ready_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(state)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], state.metrics.encode())
}

async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    probe(state.readiness.health())
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    probe(state.readiness.ready())
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}

/// 200 "ok" or 503 with the reason, one line either way.
fn probe(answer: Result<(), String>) -> (StatusCode, String) {
    match answer {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Answers that the test flips.
    #[derive(Default)]
    struct Flags {
        sick: AtomicBool,
        unready: AtomicBool,
    }

    struct Probe(Arc<Flags>);

    impl Readiness for Probe {
        fn health(&self) -> Result<(), String> {
            if self.0.sick.load(Ordering::SeqCst) {
                Err("agent loop stopped".to_owned())
            } else {
                Ok(())
            }
        }

        fn ready(&self) -> Result<(), String> {
            if self.0.unready.load(Ordering::SeqCst) {
                Err("no raft leader".to_owned())
            } else {
                Ok(())
            }
        }
    }

    /// One HTTP/1.1 request over a fresh connection: (status, head, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8(raw).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() {
        let metrics = Metrics::new();
        let flags = Arc::new(Flags::default());
        let (addr, task) = serve(
            "127.0.0.1:0".parse().expect("addr"),
            metrics.clone(),
            Arc::new(Probe(flags.clone())),
        )
        .await
        .expect("serve");
        assert_ne!(addr.port(), 0);

        metrics.decision("placed", 2);
        metrics.placement_latency(0.02);
        metrics.set_cpu_utilization(0.5);
        metrics.set_members("alive", 3);
        metrics.set_raft(7, 42, true, 3);
        metrics.set_replicas("running", 4);
        metrics.api_request("status");

        let (status, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase().contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
            "{head}"
        );
        for line in [
            "cloudless_scheduler_decisions_total{outcome=\"placed\"} 2",
            "cloudless_workload_placement_latency_seconds_bucket",
            "cloudless_workload_placement_latency_seconds_count 1",
            "cloudless_node_cpu_utilization 0.5",
            "cloudless_membership_members{state=\"alive\"} 3",
            "cloudless_raft_term 7",
            "cloudless_raft_applied_index 42",
            "cloudless_raft_is_leader 1",
            "cloudless_raft_voters 3",
            "cloudless_replicas{phase=\"running\"} 4",
            "cloudless_api_requests_total{kind=\"status\"} 1",
            "# EOF",
        ] {
            assert!(body.contains(line), "missing {line:?} in:\n{body}");
        }

        let (status, _, body) = request(addr, "GET", "/health").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        flags.sick.store(true, Ordering::SeqCst);
        let (status, _, body) = request(addr, "GET", "/health").await;
        assert_eq!((status, body.as_str()), (503, "agent loop stopped\n"));

        let (status, _, body) = request(addr, "GET", "/ready").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        flags.unready.store(true, Ordering::SeqCst);
        let (status, _, body) = request(addr, "GET", "/ready").await;
        assert_eq!((status, body.as_str()), (503, "no raft leader\n"));

        let (status, _, _) = request(addr, "GET", "/nope").await;
        assert_eq!(status, 404);
        let (status, _, _) = request(addr, "POST", "/metrics").await;
        assert_eq!(status, 404);

        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
    }

    #[test]
    fn histogram_has_twelve_exponential_buckets() {
        let metrics = Metrics::new();
        metrics.placement_latency(0.001);
        let text = metrics.encode();
        let bounds: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("cloudless_workload_placement_latency_seconds_bucket"))
            .collect();
        // Twelve finite bounds and +Inf.
        assert_eq!(bounds.len(), 13, "{text}");
        assert!(bounds[0].contains("le=\"0.005\""), "{text}");
        assert!(bounds[11].contains("le=\"10.24\""), "{text}");
        assert!(bounds[12].contains("le=\"+Inf\""), "{text}");
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let (addr, task) = serve(
            "127.0.0.1:0".parse().expect("addr"),
            Metrics::new(),
            Arc::new(Probe(Arc::default())),
        )
        .await
        .expect("serve");
        let error = serve(addr, Metrics::new(), Arc::new(Probe(Arc::default())))
            .await
            .expect_err("second bind fails");
        assert!(
            error.to_string().starts_with(&format!("cannot listen for http on {addr}: ")),
            "{error}"
        );
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
    }
}
