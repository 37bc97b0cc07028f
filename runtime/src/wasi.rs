//! The WASI driver: WebAssembly modules (WASI preview 1) and components (preview 2,
//! `wasi:cli/command`) on wasmtime, on every device including phones.
//!
//! ```text
//!   store_module(bytes) ──▶ <data>/modules/<sha256>.wasm
//!   start(spec) ──▶ compiled? (memory LRU ─miss─▶ Module/Component::new, wasmtime's disk
//!                   cache keyed by content and engine settings) ──▶ InstancePre / CommandPre
//!               ──▶ Store { WASI ctx: args, env, stdin closed, stdout/stderr ─▶ LogBook,
//!                            preopened <data>/replicas/<id>/work as "/", sockets only if
//!                            allowed; limiter: memory; epoch callback: CPU share, stop }
//!               ──▶ disk watch: the work dir measured every 250 ms against the disk limit
//!                  (over it: stopped, its files removed)
//!               ──▶ task on the guest runtime ──▶ Exit (code, or why it was stopped)
//! ```
//!
//! Guests run on their own tokio runtime so a busy guest never delays the node's networking.
//! A ticker thread advances the engine's epoch every [`TICK`] while a guest runs (with none,
//! it sleeps until one starts: an idle node is not woken 100 times a second); at each tick a
//! running guest yields, and a guest over its CPU share (`cpu_millis`) sleeps long enough to bring its
//! average back to the share. A guest that grows memory past its limit traps and is reported
//! as out of memory; one past its wall-clock limit is cancelled and reported as timed out.
//! Neither can take the node down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};
use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::driver::{
    Driver, DriverError, Exit, ExitReason, LogLine, LogStream, Observed, RunState, Stats, Stream,
};
use crate::logs::LogBook;
use cloudless_types::{Image, ModuleHash};

use crate::spec::{ReplicaId, ReplicaSpec};

/// How often the epoch advances: the granularity of CPU throttling, stop requests and
/// fairness between guests. 10 ms is a scheduler quantum; finer ticks cost more interruptions.
pub const TICK: Duration = Duration::from_millis(10);

/// Settings of the WASI driver.
#[derive(Clone, Debug)]
pub struct WasiConfig {
    /// Where modules, the compile cache and replica directories live.
    pub data_dir: PathBuf,
    /// Whether this node lets guests use the network at all (a spec must also ask).
    pub allow_network: bool,
    /// The largest memory limit a replica may have, in MiB (the pooling allocator's slot size).
    pub max_memory_mib: u32,
    /// Replicas that can run at once (the pooling allocator's capacity).
    pub max_replicas: u32,
    /// Compiled modules kept in memory for instant starts.
    pub compiled_cache: usize,
    /// Threads running guests: at most the cores the owner gives to Cloudless.
    pub guest_threads: usize,
    /// The largest disk limit a replica may have, in MiB (what the node offers).
    pub max_disk_mib: u32,
}

impl WasiConfig {
    /// Defaults for a node whose data lives in `data_dir`: no network, replicas up to 1 GiB,
    /// 64 at once, 32 compiled modules cached, one guest thread per core, 64 MiB of scratch
    /// files for a replica that asks for no disk and at most 1 GiB for one that does.
    pub fn new(data_dir: &Path) -> Self {
        WasiConfig {
            data_dir: data_dir.to_path_buf(),
            allow_network: false,
            max_memory_mib: 1024,
            max_replicas: 64,
            compiled_cache: 32,
            guest_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_disk_mib: 1024,
        }
    }
}

/// The longest wait between two measures of a running replica's files against its disk limit
/// (Kubernetes measures ephemeral storage the same way, far less often). The wait shrinks as
/// the files near the limit: see [`over_disk`].
const DISK_CHECK: Duration = Duration::from_millis(250);
/// The shortest wait between two measures.
const DISK_CHECK_MIN: Duration = Duration::from_millis(10);
/// How fast a guest with a whole core can write, in bytes per second: writes into the page
/// cache, on a fast machine. A guest writes at most its CPU share of this (file calls count
/// in the share), so a wait of `room / (share × rate)` cannot be overrun by more than what it
/// writes in [`DISK_CHECK_MIN`].
const WRITE_RATE: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;
/// Files and directories a replica's directory may hold: each costs an inode and time in the
/// measuring walk, so a million empty files cannot fill a file system's inodes.
const MAX_FILES: u64 = 10_000;
/// What an entry costs at least, whatever its length (an inode and a directory slot).
const ENTRY_COST: u64 = 4096;

/// What `dir` takes on disk: allocated blocks (a sparse file costs what it wrote), every entry
/// at least [`ENTRY_COST`]; how many entries; and how many vanished while they were counted.
/// Stops counting past [`MAX_FILES`]. Symlinks are not followed. An entry that exists but
/// cannot be measured (a path past the system's limit, which a guest can build from nested
/// directories) is an error: files the host cannot see are files it cannot bound.
fn disk_usage(dir: &Path) -> Result<(u64, u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut files, mut vanished) = (0u64, 0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    let unmeasurable = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                vanished += 1;
                continue;
            }
            Err(e) => return Err(unmeasurable(&d, e)),
        };
        for e in entries {
            let e = e.map_err(|e| unmeasurable(&d, e))?;
            files += 1;
            if files > MAX_FILES {
                return Ok((bytes, files, vanished));
            }
            let m = match std::fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    vanished += 1;
                    continue;
                }
                Err(err) => return Err(unmeasurable(&e.path(), err)),
            };
            bytes = bytes.saturating_add(m.blocks().saturating_mul(512).max(ENTRY_COST));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, files, vanished))
}

/// What [`over_disk`] reports for files it cannot measure.
pub const UNMEASURABLE: u64 = u64::MAX;

/// Walks again while entries vanish during a walk (a guest moving a tree around to keep it
/// out of the count), up to this many times, and keeps the largest count.
const DISK_REWALKS: usize = 3;

/// Resolves when the files under `work` take more than `limit_mib` (or too many entries):
/// with what they took, in MiB. Measures again after the time a guest with `cpu_millis`
/// would need to fill the room left, within [`DISK_CHECK_MIN`]..[`DISK_CHECK`].
async fn over_disk(work: PathBuf, limit_mib: u32, cpu_millis: u32) -> u64 {
    let limit = u64::from(limit_mib) << 20;
    let rate = WRITE_RATE * f64::from(cpu_millis.clamp(1, 1000)) / 1000.0;
    loop {
        let w = work.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let mut most = (0u64, 0u64);
            for _ in 0..DISK_REWALKS {
                let (bytes, files, vanished) = disk_usage(&w)?;
                most = (most.0.max(bytes), most.1.max(files));
                if vanished == 0 {
                    break;
                }
            }
            Ok::<_, String>(most)
        })
        .await;
        let (bytes, files) = match measured {
            Ok(Ok(m)) => m,
            Ok(Err(why)) => {
                warn!(error = %why, "a replica's files cannot be measured: stopped as out of disk");
                return UNMEASURABLE;
            }
            Err(_) => {
                tokio::time::sleep(DISK_CHECK).await;
                continue;
            }
        };
        if bytes > limit || files > MAX_FILES {
            return bytes >> 20;
        }
        #[allow(clippy::cast_precision_loss)]
        let room = (limit - bytes) as f64;
        let wait = Duration::from_secs_f64(room / rate).clamp(DISK_CHECK_MIN, DISK_CHECK);
        tokio::time::sleep(wait).await;
    }
}

/// A compiled guest, ready to instantiate.
#[derive(Clone)]
enum Compiled {
    Core(InstancePre<P1Guest>),
    Component(CommandPre<P2Guest>),
}

/// What the host shares with a running guest's callbacks.
#[derive(Default)]
struct Control {
    /// CPU time the guest's task has used so far: every poll of it, in WebAssembly and in
    /// host calls alike (a host call that waits, such as a sleep, returns to the runtime and
    /// is not counted). Finished polls only; see [`Control::busy`].
    cpu_nanos: AtomicU64,
    /// When the poll in progress began, if one is.
    polling_since: Mutex<Option<Instant>>,
    /// Linear memory in use.
    memory_bytes: AtomicU64,
    /// The limiter refused a growth: the run ends as out of memory.
    oom: AtomicBool,
}

impl Control {
    /// CPU time used so far, the poll in progress included.
    fn busy(&self, now: Instant) -> Duration {
        let done = Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed));
        let current = self
            .polling_since
            .lock()
            .ok()
            .and_then(|s| *s)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        done + current
    }

    fn begin_poll(&self, now: Instant) {
        if let Ok(mut s) = self.polling_since.lock() {
            *s = Some(now);
        }
    }

    fn end_poll(&self, now: Instant) {
        let started = self.polling_since.lock().ok().and_then(|mut s| s.take());
        if let Some(t) = started {
            let nanos = u64::try_from(now.saturating_duration_since(t).as_nanos()).unwrap_or(0);
            self.cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

/// A guest's run, timed poll by poll: a poll is the guest on a thread, in WebAssembly or in
/// the host (a log write, a file call, hashing a large `random_get`); between polls it waits.
struct Timed<F: ?Sized> {
    run: std::pin::Pin<Box<F>>,
    control: Arc<Control>,
}

impl<F: std::future::Future + ?Sized> std::future::Future for Timed<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.control.begin_poll(Instant::now());
        let r = self.run.as_mut().poll(cx);
        self.control.end_poll(Instant::now());
        r
    }
}

/// Per-store accounting: the limiter and the CPU throttle.
struct Meter {
    control: Arc<Control>,
    memory_limit: usize,
    memory: usize,
    /// [`Control::busy`] at the last tick.
    busy_at_tick: Duration,
    /// The CPU share, in millicores.
    cpu_millis: u32,
}

impl Meter {
    fn new(control: Arc<Control>, memory_mib: u32, cpu_millis: u32) -> Self {
        Meter {
            control,
            memory_limit: (memory_mib as usize) << 20,
            memory: 0,
            busy_at_tick: Duration::ZERO,
            cpu_millis,
        }
    }

    /// At an epoch tick: yield, and sleep off the CPU used beyond the share since the last
    /// tick (host calls included), so that over any few ticks the guest runs
    /// `cpu_millis / 1000` of the time. The pause itself is a wait: it is not counted.
    fn tick(&mut self) -> UpdateDeadline {
        let busy = self.control.busy(Instant::now());
        let ran = busy.saturating_sub(self.busy_at_tick);
        self.busy_at_tick = busy;
        let millis = self.cpu_millis.clamp(1, 1000);
        let pause = ran.mul_f64(f64::from(1000 - millis) / f64::from(millis));
        if pause.is_zero() {
            UpdateDeadline::Yield(1)
        } else {
            UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(pause)))
        }
    }
}

impl ResourceLimiter for Meter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory.saturating_sub(current).saturating_add(desired);
        if total > self.memory_limit {
            self.control.oom.store(true, Ordering::Relaxed);
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} MiB exceeded",
                self.memory_limit >> 20
            )));
        }
        self.memory = total;
        self.control.memory_bytes.store(total as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million entries is far beyond any real program.
        Ok(desired <= 1_000_000)
    }
}

/// Store data of a preview 1 guest.
struct P1Guest {
    wasi: WasiP1Ctx,
    meter: Meter,
}

/// Store data of a preview 2 guest.
struct P2Guest {
    ctx: WasiCtx,
    table: ResourceTable,
    meter: Meter,
}

impl WasiView for P2Guest {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

trait Metered {
    fn meter(&mut self) -> &mut Meter;
}

impl Metered for P1Guest {
    fn meter(&mut self) -> &mut Meter {
        &mut self.meter
    }
}

impl Metered for P2Guest {
    fn meter(&mut self) -> &mut Meter {
        &mut self.meter
    }
}

/// A guest's stdout or stderr, into its log.
#[derive(Clone)]
struct Output {
    book: Arc<LogBook>,
    stream: Stream,
}

impl IsTerminal for Output {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Output {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.book.writer(self.stream))
    }
}

/// One replica the driver has.
struct Run {
    fingerprint: String,
    since: SystemTime,
    logs: Arc<LogBook>,
    control: Arc<Control>,
    exit: watch::Receiver<Option<Exit>>,
    kill: Arc<Notify>,
    network: bool,
}

struct Inner {
    config: WasiConfig,
    engine: Engine,
    p1: Linker<P1Guest>,
    p2: ComponentLinker<P2Guest>,
    compiled: Mutex<VecDeque<(ModuleHash, Compiled)>>,
    compiling: tokio::sync::Mutex<()>,
    runs: Mutex<HashMap<ReplicaId, Arc<Run>>>,
    guests: Option<tokio::runtime::Runtime>,
    ticker: Arc<Ticker>,
}

/// The epoch ticker's switch: it ticks while at least one guest task is in flight and sleeps
/// otherwise, until a guest starts or the driver is dropped.
#[derive(Default)]
struct Ticker {
    state: Mutex<TickerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TickerState {
    guests: usize,
    stopped: bool,
}

/// What the ticker thread is to do next.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    /// A guest runs: advance the epoch after a [`TICK`].
    Run,
    /// No guest ran within the wait: ask again.
    Idle,
    /// The driver is gone.
    Stopped,
}

impl Ticker {
    /// Counts a guest in until the guard is dropped, and wakes the ticker.
    fn enter(self: &Arc<Self>) -> TickerGuard {
        let mut s = self.lock();
        s.guests = s.guests.saturating_add(1);
        drop(s);
        self.wake.notify_all();
        TickerGuard(self.clone())
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// The counts; a panic elsewhere while they were held leaves them usable (two integers
    /// are never half-written), so a guest is never left without ticks because of it.
    fn lock(&self) -> std::sync::MutexGuard<'_, TickerState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits (at most `wait`) until a guest runs or the driver stops.
    fn next(&self, wait: Duration) -> Tick {
        let (s, _) = self
            .wake
            .wait_timeout_while(self.lock(), wait, |s| s.guests == 0 && !s.stopped)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.stopped {
            Tick::Stopped
        } else if s.guests > 0 {
            Tick::Run
        } else {
            Tick::Idle
        }
    }
}

/// A guest counted by the [`Ticker`] while it lives.
struct TickerGuard(Arc<Ticker>);

impl Drop for TickerGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.guests = s.guests.saturating_sub(1);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker.stop();
        if let Some(rt) = self.guests.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs WASI guests. Cheap to clone.
#[derive(Clone)]
pub struct WasiDriver {
    inner: Arc<Inner>,
}

fn engine_error(e: impl std::fmt::Display) -> DriverError {
    DriverError::Engine(e.to_string())
}

impl WasiDriver {
    /// Builds the engine (pooling allocator, epoch interruption, disk compile cache under
    /// `<data>/cache`) and the guest runtime.
    pub fn new(config: WasiConfig) -> Result<Self, DriverError> {
        for d in ["modules", "cache", "replicas"] {
            std::fs::create_dir_all(config.data_dir.join(d))
                .map_err(|e| engine_error(format!("{}: {e}", config.data_dir.join(d).display())))?;
        }
        let slots = config.max_replicas.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            // A command component is the program plus the WASI adapter and shims.
            .total_core_instances(slots * 4)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .total_stacks(slots)
            .max_memory_size((config.max_memory_mib as usize) << 20);
        let mut cache = CacheConfig::new();
        cache.with_directory(config.data_dir.join("cache"));
        let mut c = Config::new();
        c.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .cache(Some(Cache::new(cache).map_err(engine_error)?));
        let engine = Engine::new(&c).map_err(engine_error)?;
        let mut p1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |g: &mut P1Guest| &mut g.wasi)
            .map_err(engine_error)?;
        let mut p2 = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2).map_err(engine_error)?;
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.guest_threads.max(1))
            .thread_name("wasi-guest")
            .enable_time()
            .build()
            .map_err(engine_error)?;
        let ticker = Arc::new(Ticker::default());
        let weak = engine.weak();
        let t = ticker.clone();
        std::thread::Builder::new()
            .name("wasi-epoch".into())
            .spawn(move || {
                loop {
                    match t.next(Duration::from_secs(60)) {
                        Tick::Run => std::thread::sleep(TICK),
                        Tick::Idle => continue,
                        Tick::Stopped => break,
                    }
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(engine_error)?;
        Ok(WasiDriver {
            inner: Arc::new(Inner {
                config,
                engine,
                p1,
                p2,
                compiled: Mutex::new(VecDeque::new()),
                compiling: tokio::sync::Mutex::new(()),
                runs: Mutex::new(HashMap::new()),
                guests: Some(guests),
                ticker,
            }),
        })
    }

    /// Stores a module or component (binary, or WAT text) and returns the hash a spec names it
    /// by. Storing the same bytes twice is harmless.
    pub fn store_module(&self, bytes: &[u8]) -> Result<ModuleHash, DriverError> {
        let hash = ModuleHash::of(bytes);
        let path = self.module_path(&hash);
        if !path.exists() {
            // Synced before it is renamed into place: a module counts as present (and is
            // served to peers) only whole, also after a crash.
            let tmp = path.with_extension("tmp");
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                match path.parent() {
                    Some(dir) => std::fs::File::open(dir)?.sync_all(),
                    None => Ok(()),
                }
            };
            write().map_err(|e| engine_error(format!("{}: {e}", path.display())))?;
        }
        Ok(hash)
    }

    /// Up to `max` bytes of a stored module from `offset`, and its total size; `None` when it
    /// is not stored here.
    pub fn module_chunk(
        &self,
        hash: &ModuleHash,
        offset: u64,
        max: usize,
    ) -> Option<(u64, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(self.module_path(hash)).ok()?;
        let total = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(offset.min(total))).ok()?;
        let mut bytes = Vec::new();
        f.take(max as u64).read_to_end(&mut bytes).ok()?;
        Some((total, bytes))
    }

    /// Whether a module is stored here.
    pub fn has_module(&self, hash: &ModuleHash) -> bool {
        self.module_path(hash).exists()
    }

    fn module_path(&self, hash: &ModuleHash) -> PathBuf {
        self.inner.config.data_dir.join("modules").join(format!("{hash}.wasm"))
    }

    fn replica_dir(&self, id: &ReplicaId) -> PathBuf {
        self.inner.config.data_dir.join("replicas").join(id.to_string())
    }

    /// The compiled guest for `hash`: from memory, else compiled (wasmtime's disk cache makes
    /// that a load when the module was compiled before with the same engine settings).
    pub fn compile(&self, hash: &ModuleHash) -> Result<(), DriverError> {
        self.compiled(hash).map(|_| ())
    }

    /// [`Self::compiled`] without blocking the caller's runtime on a compile.
    async fn compiled_off_thread(&self, hash: &ModuleHash) -> Result<Compiled, DriverError> {
        if let Some(c) = self.cached(hash) {
            return Ok(c);
        }
        // One compile at a time: replicas of one module starting together compile it once
        // and the others find it in memory.
        let _one = self.inner.compiling.lock().await;
        if let Some(c) = self.cached(hash) {
            return Ok(c);
        }
        let (this, hash) = (self.clone(), hash.clone());
        tokio::task::spawn_blocking(move || this.compiled(&hash)).await.map_err(engine_error)?
    }

    fn cached(&self, hash: &ModuleHash) -> Option<Compiled> {
        let mut cache = self.inner.compiled.lock().ok()?;
        let i = cache.iter().position(|(h, _)| h == hash)?;
        // Most recently used at the back.
        let entry = cache.remove(i)?;
        let c = entry.1.clone();
        cache.push_back(entry);
        Some(c)
    }

    fn compiled(&self, hash: &ModuleHash) -> Result<Compiled, DriverError> {
        if let Some(c) = self.cached(hash) {
            return Ok(c);
        }
        let missing = |reason: String| DriverError::MissingArtifact {
            artifact: format!("wasi module {hash}"),
            reason,
        };
        let bytes = std::fs::read(self.module_path(hash)).map_err(|e| missing(e.to_string()))?;
        if ModuleHash::of(&bytes) != *hash {
            return Err(missing("stored bytes do not match their hash".into()));
        }
        let started = Instant::now();
        let compiled = if is_component(&bytes) {
            let component = Component::new(&self.inner.engine, &bytes)
                .map_err(|e| missing(format!("not a valid component: {e:#}")))?;
            let pre = self
                .inner
                .p2
                .instantiate_pre(&component)
                .map_err(|e| missing(format!("cannot link: {e:#}")))?;
            Compiled::Component(
                CommandPre::new(pre)
                    .map_err(|e| missing(format!("not a wasi:cli command: {e:#}")))?,
            )
        } else {
            let module = Module::new(&self.inner.engine, &bytes)
                .map_err(|e| missing(format!("not a valid module: {e:#}")))?;
            if module.get_export("_start").is_none() {
                return Err(missing("a WASI command module must export _start".into()));
            }
            Compiled::Core(
                self.inner
                    .p1
                    .instantiate_pre(&module)
                    .map_err(|e| missing(format!("cannot link: {e:#}")))?,
            )
        };
        debug!(module = %hash, took = ?started.elapsed(), "compiled");
        if let Ok(mut cache) = self.inner.compiled.lock() {
            cache.push_back((hash.clone(), compiled.clone()));
            while cache.len() > self.inner.config.compiled_cache.max(1) {
                cache.pop_front();
            }
        }
        Ok(compiled)
    }

    /// Instantiates a stored guest in a fresh store with an empty WASI context (no arguments,
    /// directory or log) and runs it to completion: the cost of a start without the replica's
    /// bookkeeping. Compiles first if needed. For benchmarks and health checks.
    pub async fn run_bare(&self, hash: &ModuleHash) -> Result<Exit, DriverError> {
        let compiled = self.compiled_off_thread(hash).await?;
        // The epoch ticks while it runs: it yields, and a loop that never ends is stopped.
        let _ticking = self.inner.ticker.enter();
        let control = Arc::new(Control::default());
        let meter = || Meter::new(control.clone(), self.inner.config.max_memory_mib, 1000);
        let engine = &self.inner.engine;
        let outcome = match compiled {
            Compiled::Core(pre) => {
                let data = P1Guest { wasi: WasiCtxBuilder::new().build_p1(), meter: meter() };
                Timed {
                    run: Box::pin(run_core(pre, new_store(engine, data))),
                    control: control.clone(),
                }
                .await
            }
            Compiled::Component(pre) => {
                let data = P2Guest {
                    ctx: WasiCtxBuilder::new().build(),
                    table: ResourceTable::new(),
                    meter: meter(),
                };
                Timed {
                    run: Box::pin(run_component(pre, new_store(engine, data))),
                    control: control.clone(),
                }
                .await
            }
        };
        Ok(classify(outcome, &control))
    }

    fn run(&self, id: &ReplicaId) -> Result<Arc<Run>, DriverError> {
        self.inner
            .runs
            .lock()
            .ok()
            .and_then(|r| r.get(id).cloned())
            .ok_or_else(|| DriverError::NotFound(id.clone()))
    }

    fn wasi_builder(
        &self,
        spec: &ReplicaSpec,
        book: &Arc<LogBook>,
        work: &Path,
    ) -> Result<WasiCtxBuilder, DriverError> {
        let mut b = WasiCtxBuilder::new();
        let argv0 = spec.command.first().cloned().unwrap_or_else(|| spec.id.workload.to_string());
        let args: Vec<&String> =
            std::iter::once(&argv0).chain(spec.command.iter().skip(1)).chain(&spec.args).collect();
        // File calls run on the guest's own thread, inside its timed polls, so that they
        // count in its CPU share (on tokio's blocking pool they were nobody's).
        b.allow_blocking_current_thread(true);
        b.args(&args)
            .envs(&spec.env.iter().collect::<Vec<_>>())
            .stdout(Output { book: book.clone(), stream: Stream::Stdout })
            .stderr(Output { book: book.clone(), stream: Stream::Stderr })
            .preopened_dir(work, "/", FsPerms::ReadWrite)
            .map_err(|e| engine_error(format!("cannot open {}: {e}", work.display())))?;
        if spec.network {
            b.inherit_network().allow_tcp(true).allow_udp(true).allow_ip_name_lookup(true);
        } else {
            b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        }
        Ok(b)
    }
}

/// Whether `bytes` is a component (layer 1) rather than a core module.
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

fn new_store<T: Metered + Send + 'static>(engine: &Engine, data: T) -> Store<T> {
    let mut store = Store::new(engine, data);
    store.limiter(|g| g.meter() as &mut dyn ResourceLimiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().meter().tick()));
    store
}

/// How a guest's run ended, before it is classified.
type Outcome = wasmtime::Result<Option<i32>>;

async fn run_core(pre: InstancePre<P1Guest>, mut store: Store<P1Guest>) -> Outcome {
    let instance = pre.instantiate_async(&mut store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    start.call_async(&mut store, ()).await?;
    Ok(Some(0))
}

async fn run_component(pre: CommandPre<P2Guest>, mut store: Store<P2Guest>) -> Outcome {
    let command = pre.instantiate_async(&mut store).await?;
    let result = command.wasi_cli_run().call_run(&mut store).await?;
    Ok(Some(if result.is_ok() { 0 } else { 1 }))
}

fn classify(outcome: Outcome, control: &Control) -> Exit {
    let at = SystemTime::now();
    let (code, reason) = match outcome {
        Ok(code) => (code, ExitReason::Exited),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                (Some(exit.0), ExitReason::Exited)
            } else if control.oom.load(Ordering::Relaxed) {
                (None, ExitReason::OutOfMemory)
            } else if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
                (None, ExitReason::Trap(trap.to_string()))
            } else {
                (None, ExitReason::Error(format!("{e:#}")))
            }
        }
    };
    Exit { code, reason, at }
}

#[async_trait]
impl Driver for WasiDriver {
    fn name(&self) -> &'static str {
        "wasi"
    }

    fn runs(&self, image: &Image) -> bool {
        matches!(image, Image::Wasi(_))
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<(), DriverError> {
        let Image::Wasi(hash) = &spec.image else {
            return Err(DriverError::Refused {
                id: spec.id.clone(),
                reason: "not a WASI module".into(),
            });
        };
        let refuse = |reason: String| DriverError::Refused { id: spec.id.clone(), reason };
        if spec.network && !self.inner.config.allow_network {
            return Err(refuse(
                "it asks for network access, which this node does not allow".into(),
            ));
        }
        if spec.disk_mib > self.inner.config.max_disk_mib {
            return Err(refuse(format!(
                "its disk limit of {} MiB is above this node's {} MiB",
                spec.disk_mib, self.inner.config.max_disk_mib
            )));
        }
        if spec.memory_mib > self.inner.config.max_memory_mib {
            return Err(refuse(format!(
                "its memory limit of {} MiB is above this node's {} MiB",
                spec.memory_mib, self.inner.config.max_memory_mib
            )));
        }
        let fingerprint = spec.fingerprint();
        let previous = self.inner.runs.lock().ok().and_then(|r| r.get(&spec.id).cloned());
        if let Some(run) = &previous {
            if run.fingerprint == fingerprint && run.exit.borrow().is_none() {
                return Ok(());
            }
            run.kill.notify_one();
        }
        let compiled = self.compiled_off_thread(hash).await?;
        let dir = self.replica_dir(&spec.id);
        let work = dir.join("work");
        std::fs::create_dir_all(&work)
            .map_err(|e| engine_error(format!("{}: {e}", work.display())))?;
        // A restarted replica keeps its log (and its followers).
        let book =
            previous.map_or_else(|| LogBook::open(&dir.join("replica.log")), |r| r.logs.clone());
        let control = Arc::new(Control::default());
        let meter = || Meter::new(control.clone(), spec.memory_mib, spec.cpu_millis);
        let mut builder = self.wasi_builder(spec, &book, &work)?;
        let engine = &self.inner.engine;
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>> =
            match compiled {
                Compiled::Core(pre) => {
                    let store =
                        new_store(engine, P1Guest { wasi: builder.build_p1(), meter: meter() });
                    Box::pin(run_core(pre, store))
                }
                Compiled::Component(pre) => {
                    let data = P2Guest {
                        ctx: builder.build(),
                        table: ResourceTable::new(),
                        meter: meter(),
                    };
                    Box::pin(run_component(pre, new_store(engine, data)))
                }
            };
        let (tx, rx) = watch::channel(None);
        let kill = Arc::new(Notify::new());
        let timeout = spec.timeout;
        let disk_limit = spec.disk_limit_mib();
        let disk = over_disk(work.clone(), disk_limit, spec.cpu_millis);
        let work = work.clone();
        let (ctl, k, id) = (control.clone(), kill.clone(), spec.id.clone());
        // Counted from here, so the first tick is never missed.
        let ticking = self.inner.ticker.enter();
        let task = async move {
            let _ticking = ticking;
            let deadline = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let run = Timed { run, control: ctl.clone() };
            let exit = tokio::select! {
                outcome = run => classify(outcome, &ctl),
                () = k.notified() => Exit { code: None, reason: ExitReason::Stopped, at: SystemTime::now() },
                () = deadline => Exit { code: None, reason: ExitReason::Timeout, at: SystemTime::now() },
                used_mib = disk => Exit {
                    code: None,
                    reason: ExitReason::OutOfDisk { used_mib, limit_mib: disk_limit },
                    at: SystemTime::now(),
                },
            };
            info!(replica = %id, exit = %exit.describe(), "wasi replica ended");
            if matches!(exit.reason, ExitReason::OutOfDisk { .. }) {
                // The owner's disk comes first: what the guest wrote past its limit goes, as
                // an evicted pod's scratch volume does.
                let w = work.clone();
                let cleared = tokio::task::spawn_blocking(move || {
                    std::fs::remove_dir_all(&w).and_then(|()| std::fs::create_dir_all(&w))
                });
                if let Ok(Err(e)) = cleared.await {
                    warn!(replica = %id, error = %e, "cannot remove the files of a replica out of disk");
                }
            }
            let _ = tx.send(Some(exit));
        };
        let run = Arc::new(Run {
            fingerprint,
            since: SystemTime::now(),
            logs: book,
            control,
            exit: rx,
            kill,
            network: spec.network,
        });
        if let Ok(mut runs) = self.inner.runs.lock() {
            runs.insert(spec.id.clone(), run);
        }
        match &self.inner.guests {
            Some(rt) => {
                rt.spawn(task);
            }
            None => return Err(engine_error("the guest runtime is shut down")),
        }
        Ok(())
    }

    async fn stop(&self, id: &ReplicaId, grace: Duration) -> Result<(), DriverError> {
        let run = self.inner.runs.lock().ok().and_then(|mut r| r.remove(id));
        if let Some(run) = run {
            // WASI has no signals: a guest cannot be asked to stop, only stopped. It is
            // cancelled at its next tick or host call.
            run.kill.notify_one();
            let mut exit = run.exit.clone();
            if tokio::time::timeout(grace.max(TICK * 10), exit.wait_for(Option::is_some))
                .await
                .is_err()
            {
                warn!(replica = %id, "wasi replica did not stop in time");
            }
        }
        let dir = self.replica_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| engine_error(format!("{}: {e}", dir.display())))?;
        }
        Ok(())
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<Observed>, DriverError> {
        Ok(self.run(id).ok().map(|run| observed(id, &run)))
    }

    async fn list(&self) -> Result<Vec<Observed>, DriverError> {
        let runs: BTreeMap<ReplicaId, Arc<Run>> = self
            .inner
            .runs
            .lock()
            .map(|r| r.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(runs.iter().map(|(id, run)| observed(id, run)).collect())
    }

    async fn wait(&self, id: &ReplicaId) -> Result<Exit, DriverError> {
        let mut exit = self.run(id)?.exit.clone();
        let seen = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| DriverError::Engine(format!("replica {id} was removed while waiting")))?;
        seen.clone().ok_or_else(|| DriverError::NotFound(id.clone()))
    }

    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError> {
        Ok(self.run(id)?.logs.tail(tail))
    }

    async fn follow(&self, id: &ReplicaId) -> Result<LogStream, DriverError> {
        Ok(self.run(id)?.logs.follow())
    }

    async fn stats(&self, id: &ReplicaId) -> Result<Stats, DriverError> {
        let run = self.run(id)?;
        Ok(Stats {
            cpu_nanos: run.control.cpu_nanos.load(Ordering::Relaxed),
            memory_bytes: run.control.memory_bytes.load(Ordering::Relaxed),
        })
    }

    async fn address(&self, id: &ReplicaId, port: u16) -> Result<SocketAddr, DriverError> {
        let run = self.run(id)?;
        if !run.network {
            return Err(DriverError::Refused {
                id: id.clone(),
                reason: "it has no network access, so nothing can reach its ports".into(),
            });
        }
        // Guests share the host's network stack.
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    async fn exec(&self, _: &ReplicaId, _: &[String], _: Duration) -> Result<i32, DriverError> {
        Err(DriverError::Unsupported("exec in a WASI guest"))
    }
}

fn observed(id: &ReplicaId, run: &Run) -> Observed {
    let state = RunState::of(run.since, run.exit.borrow().clone());
    Observed { id: id.clone(), fingerprint: run.fingerprint.clone(), state }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_ticks_only_while_a_guest_runs() {
        let t = Arc::new(Ticker::default());
        assert_eq!(t.next(Duration::from_millis(5)), Tick::Idle, "no guest: nothing to tick");
        let a = t.enter();
        let b = t.enter();
        assert_eq!(t.next(Duration::from_secs(60)), Tick::Run);
        drop(a);
        assert_eq!(t.next(Duration::from_secs(60)), Tick::Run, "one guest still runs");
        drop(b);
        assert_eq!(t.next(Duration::from_millis(5)), Tick::Idle);
        // A guest that starts wakes a ticker that waits.
        let waiting = {
            let t = t.clone();
            std::thread::spawn(move || t.next(Duration::from_secs(60)))
        };
        let _c = t.enter();
        assert_eq!(waiting.join().unwrap(), Tick::Run);
        t.stop();
        assert_eq!(t.next(Duration::from_secs(60)), Tick::Stopped, "a stop ends it, guests or not");
    }
}
