//! A cluster of real `cloudless` processes on loopback, driven through real `cloudlessctl`
//! invocations: what the end-to-end tests and the workload report run.
//!
//! ```text
//!   Procs::init ──▶ cloudless init (node 0; writes ctl.toml with the admin's keys)
//!   Procs::join ──▶ cloudlessctl token create ──▶ cloudless join <invite> (node i)
//!   ctl / ctl_via(i) ──▶ cloudlessctl … (through node 0, or node i) ──▶ stdout, stderr
//!   kill(i) = SIGKILL · stop(i) = SIGTERM (leave) · Drop kills whatever still runs
//! ```
//!
//! Every node listens on port 0 on 127.0.0.1 and writes where it listens (`addresses`) and
//! where it serves HTTP (`http`) into its data dir; the harness reads those files. Each node's
//! output goes to `node-<i>.log` in the cluster's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::joins::{self, JoinTimes, Marks};

/// How long a node may take to start, enroll and show up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the `cloudless` and `cloudlessctl` binaries are: `$CLOUDLESS_BIN_DIR`, else the
/// directory of the running executable or its parent (`target/<profile>/deps/…` for tests).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CLOUDLESS_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        if dir.join("cloudless").exists() && dir.join("cloudlessctl").exists() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "cannot find the cloudless and cloudlessctl binaries near {}; build them \
         (`cargo build --bins`) or set CLOUDLESS_BIN_DIR",
        exe.display()
    )
}

/// One node process.
pub struct Proc {
    child: Option<Child>,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its PeerId.
    pub peer: String,
    /// An address to reach it (with `/p2p/<id>`).
    pub addr: String,
    /// Where it serves /metrics, /health, /ready.
    pub http: String,
}

impl Proc {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// The result of one `cloudlessctl` invocation.
#[derive(Debug)]
pub struct Ctl {
    /// Exit status was success.
    pub ok: bool,
    /// The exit code (`None` when killed by a signal or never started).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ctl {
    /// What a finished command printed, or why it could not run.
    fn of(out: std::io::Result<Output>) -> Ctl {
        match out {
            Ok(o) => o.into(),
            Err(e) => Ctl { ok: false, code: None, stdout: String::new(), stderr: e.to_string() },
        }
    }
}

impl From<Output> for Ctl {
    fn from(o: Output) -> Ctl {
        Ctl {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Waits until `f` returns `Some`, up to `deadline`.
pub fn until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that `f` holds for the whole of `window` (every 250 ms): what an attack must not
/// make happen, watched for long enough that it would have.
pub fn throughout(what: &str, window: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if !f() {
            bail!("{what} stopped holding after {:?}", start.elapsed());
        }
        if start.elapsed() >= window {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A cluster of node processes.
pub struct Procs {
    dir: PathBuf,
    bin: PathBuf,
    /// The nodes, node 0 (the one that created the cluster) first.
    pub nodes: Vec<Proc>,
    extra: Vec<String>,
}

impl Procs {
    /// Creates a cluster under `dir` with `cloudless init`; `extra` flags go to every node.
    pub fn init(dir: &Path, extra: &[&str]) -> Result<Procs> {
        let mut p = Procs {
            dir: dir.to_path_buf(),
            bin: bin_dir()?,
            nodes: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let admin = p.ctl_dir();
        p.spawn(&["init", "--name", "e2e", "--admin-dir", &admin.display().to_string()])?;
        until("ctl.toml is written", START_TIMEOUT, || {
            admin.join("ctl.toml").exists().then_some(())
        })?;
        Ok(p)
    }

    /// cloudlessctl's config directory (the admin's keys).
    pub fn ctl_dir(&self) -> PathBuf {
        self.dir.join("ctl")
    }

    /// Starts `cloudless <args>` as node `nodes.len()`, waits until it listens.
    fn spawn(&mut self, args: &[&str]) -> Result<usize> {
        self.spawn_as(self.nodes.len(), args)
    }

    /// Starts node `i` again from its data dir (`cloudless run`) after a kill or a stop;
    /// returns once the cluster lists it alive.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.restart_with(i, &[])
    }

    /// As [`Procs::restart`], with `cloudless run <extra>`.
    pub fn restart_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.run_detached(i, extra)?;
        self.wait_listening(i, true)?;
        let peer = self.nodes[i].peer.clone();
        until("the restarted node is listed alive", START_TIMEOUT, || {
            let out = self.ctl(&["node", "list"]);
            out.stdout.lines().any(|l| l.starts_with(&peer) && l.contains(" alive ")).then_some(())
        })
        .with_context(|| self.not_listed(i))
    }

    /// What a node that was never listed alive leaves to go on: the node list and the
    /// ends of both logs (the temporary directory, and with it the logs, is gone once the
    /// test fails, so a CI failure would otherwise say nothing).
    fn not_listed(&self, i: usize) -> String {
        let list = self.ctl(&["node", "list"]);
        format!(
            "node {i} ({}) is not listed alive\n--- node list (first running node):\n{}{}\n\
             --- node {i}'s log:\n{}\n--- node 0's log:\n{}",
            self.nodes[i].peer,
            list.stdout,
            list.stderr,
            self.tail(i, 40),
            self.tail(0, 40),
        )
    }

    /// Starts `cloudless <args>` as node `i` (a new one, or one that stopped).
    fn spawn_as(&mut self, i: usize, args: &[&str]) -> Result<usize> {
        self.spawn_waiting(i, args, true)
    }

    /// Starts node `i` again from its data dir with `cloudless run <extra>` after a kill or a
    /// stop, without waiting for anything (for runs expected to be refused).
    pub fn run_detached(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.kill(i);
        let data_dir = self.nodes[i].data_dir.clone();
        let _ = std::fs::remove_file(data_dir.join("addresses"));
        let _ = std::fs::remove_file(data_dir.join("http"));
        let args: Vec<&str> = std::iter::once("run").chain(extra.iter().copied()).collect();
        let (peer, addr) = (self.nodes[i].peer.clone(), self.nodes[i].addr.clone());
        self.spawn_child(i, &args)?;
        (self.nodes[i].peer, self.nodes[i].addr) = (peer, addr);
        Ok(())
    }

    /// Spawns `cloudless <args>` as node `i` (a new one, or one that stopped), logging to
    /// `node-<i>.log`.
    fn spawn_child(&mut self, i: usize, args: &[&str]) -> Result<()> {
        let data_dir = self.dir.join(format!("node-{i}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{i}.log")))?;
        let mut cmd = Command::new(self.bin.join("cloudless"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--no-mdns"])
            // No relay unless the test asks for one (`extra` then says which).
            .args(if self.extra.iter().any(|a| a == "--relay") {
                &[][..]
            } else {
                &["--relay", "never"]
            })
            .args(["--http", "127.0.0.1:0", "--zone", &format!("zone-{}", i % 2)])
            .args(&self.extra)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("cannot start cloudless")?;
        let proc = Proc {
            child: Some(child),
            data_dir: data_dir.clone(),
            peer: String::new(),
            addr: String::new(),
            http: String::new(),
        };
        if i < self.nodes.len() {
            self.nodes[i] = proc;
        } else {
            self.nodes.push(proc);
        }
        Ok(())
    }

    /// Starts `cloudless <args>` as node `i`; waits until it listens and, with `serving`,
    /// until it serves HTTP (which a node does once it is in the cluster).
    fn spawn_waiting(&mut self, i: usize, args: &[&str], serving: bool) -> Result<usize> {
        self.spawn_child(i, args)?;
        self.wait_listening(i, serving)?;
        Ok(i)
    }

    /// Waits until node `i` listens and, with `serving`, serves HTTP; records its addresses.
    fn wait_listening(&mut self, i: usize, serving: bool) -> Result<()> {
        let data_dir = self.nodes[i].data_dir.clone();
        let (addr, http) = until("the node listens", START_TIMEOUT, || {
            let addr = std::fs::read_to_string(data_dir.join("addresses")).ok()?;
            let http = if serving {
                std::fs::read_to_string(data_dir.join("http")).ok()?
            } else {
                String::new()
            };
            let addr = addr.lines().next()?.to_string();
            Some((addr, http.trim().to_string()))
        })
        .with_context(|| format!("node {i}: see {}", self.log(i).display()))?;
        let peer = addr.rsplit("/p2p/").next().unwrap_or_default().to_string();
        let node = &mut self.nodes[i];
        node.peer = peer;
        node.addr = addr;
        node.http = http;
        Ok(())
    }

    /// Node `i`'s log file.
    pub fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}.log"))
    }

    /// The last `n` lines of node `i`'s log (for failure messages).
    pub fn tail(&self, i: usize, n: usize) -> String {
        let log = std::fs::read_to_string(self.log(i)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Creates an invite (`extra`: more `token create` flags).
    pub fn invite(&self, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let out = self.ctl(&args);
        if !out.ok {
            bail!("token create failed: {}", out.stderr);
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Adds a node with a fresh invite; returns its index once the cluster lists it alive.
    pub fn join(&mut self) -> Result<usize> {
        let invite = self.invite(&[])?;
        self.join_with(&invite)
    }

    /// Adds a node with `invite`; returns its index once the cluster lists it alive.
    pub fn join_with(&mut self, invite: &str) -> Result<usize> {
        let i = self.spawn(&["join", invite])?;
        let peer = self.nodes[i].peer.clone();
        until("the new node is listed alive", START_TIMEOUT, || {
            let out = self.ctl(&["node", "list"]);
            out.stdout.lines().any(|l| l.starts_with(&peer) && l.contains(" alive ")).then_some(())
        })
        .with_context(|| self.not_listed(i))?;
        Ok(i)
    }

    /// Adds a node with a fresh invite and waits until every running node lists it alive;
    /// returns its index and how long each step of its join took (from its nodes' logs).
    pub fn join_timed(&mut self) -> Result<(usize, JoinTimes)> {
        let invite = self.invite(&[])?;
        let logs: Vec<PathBuf> = (0..=self.nodes.len()).map(|i| self.log(i)).collect();
        let marks = Marks::now(&logs);
        let i = self.spawn(&["join", &invite])?;
        let peer = format!("peer={}", self.nodes[i].peer);
        let others: Vec<usize> = (0..i).filter(|j| self.nodes[*j].running()).collect();
        let read = |j: usize| joins::read_from(&self.log(j), marks.offset(j));
        let times = until("every node lists the new node alive", START_TIMEOUT, || {
            let (mut last, mut slowest) = (marks.start(), 0);
            for j in &others {
                let t = joins::first(&read(*j), "member joined", &[&peer], &[])?;
                if t > last {
                    (last, slowest) = (t, *j);
                }
            }
            let own = read(i);
            let at = |t: SystemTime| joins::since(marks.start(), t);
            Some(JoinTimes {
                enrolled: at(joins::first(&own, ": enrolled", &[], &[])?),
                admitted: at(joins::first(&own, "the cluster lets this node in", &[], &[])?),
                joined: at(joins::first(&own, "member joined", &[], &[&peer])?),
                capacity: at(joins::first(
                    &read(0),
                    "first capacity of member seen",
                    &[&peer],
                    &[],
                )?),
                alive_everywhere: at(last),
                last: slowest,
            })
        })
        .with_context(|| self.not_listed(i))?;
        Ok((i, times))
    }

    /// Starts `cloudless join <invite>` as a new node and returns as soon as it listens (it
    /// may never enroll: the hostile suite's joiners).
    pub fn start_join(&mut self, invite: &str) -> Result<usize> {
        self.spawn_waiting(self.nodes.len(), &["join", invite], false)
    }

    /// Freezes node `i` (SIGSTOP): it holds its address and state but answers nothing.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets a frozen node `i` go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(pid) = self.nodes[i].pid() {
            let _ = Command::new("kill").arg(signal).arg(pid.to_string()).status();
        }
    }

    /// Starts a node that never enrolled (`cloudless run` pointed at node 0).
    pub fn run_unenrolled(&mut self) -> Result<usize> {
        let boot = self.nodes[0].addr.clone();
        self.spawn(&["run", "--bootstrap", &boot])
    }

    /// Runs `cloudless <args>` to completion (a join that is expected to fail, say).
    pub fn cloudless(&self, args: &[&str], data_dir: &Path) -> Ctl {
        let out = Command::new(self.bin.join("cloudless"))
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--no-mdns", "--http", ""])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output();
        Ctl::of(out)
    }

    /// Runs `cloudlessctl <args>` through the first running node.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        match self.nodes.iter().position(Proc::running) {
            Some(i) => self.ctl_via(i, args),
            None => {
                Ctl { ok: false, code: None, stdout: String::new(), stderr: "no node runs".into() }
            }
        }
    }

    /// Runs `cloudlessctl <args>` through node `i`.
    pub fn ctl_via(&self, i: usize, args: &[&str]) -> Ctl {
        let out = Command::new(self.bin.join("cloudlessctl"))
            .args(args)
            .arg("--peer")
            .arg(&self.nodes[i].addr)
            .env("CLOUDLESS_CONFIG_DIR", self.ctl_dir())
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output();
        Ctl::of(out)
    }

    /// `cloudlessctl -o json <args>`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        if !out.ok {
            bail!("cloudlessctl {}: {}", args.join(" "), out.stderr.trim());
        }
        serde_json::from_str(&out.stdout).context("cloudlessctl printed no JSON")
    }

    /// `GET path` on node `i`'s HTTP endpoint: the status line and body, or `None` when it
    /// does not answer.
    pub fn get(&self, i: usize, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.nodes[i].http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    }

    /// The value of metric line `name` (with labels, as exposed) on node `i`.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let (_, body) = self.get(i, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l[name.len()..].trim().parse().ok())
    }

    /// The sum of every series of metric `name` (all its label sets) on node `i`.
    pub fn metric_sum(&self, i: usize, name: &str) -> Option<f64> {
        let (_, body) = self.get(i, "/metrics")?;
        let values = body.lines().filter(|l| {
            l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        });
        let sum = values.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        Some(sum)
    }

    /// CPU time node `i` has used since it started (user and system, all threads), from
    /// `/proc/<pid>/stat` (Linux), in clock ticks of `ticks_per_second`.
    pub fn cpu_ticks(&self, i: usize) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.nodes[i].pid()?)).ok()?;
        // The command name (field 2) may hold spaces: count fields after its closing paren.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime.saturating_add(stime))
    }

    /// The index of the node whose PeerId is `peer`.
    pub fn index(&self, peer: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer == peer)
    }

    /// Crashes node `i` (SIGKILL): no leave, nothing flushed beyond what it acknowledged.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node `i` gracefully (SIGTERM: it announces its leave), up to 20 s.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let done = until("the node stops", Duration::from_secs(20), || {
                c.try_wait().ok().flatten().map(|_| ())
            });
            if done.is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Whether node `i`'s process has exited (crashed) since it was started.
    pub fn exited(&mut self, i: usize) -> bool {
        self.nodes[i].child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Resident memory of node `i`, in KiB (Linux).
    pub fn rss_kib(&self, i: usize) -> Option<u64> {
        self.status_kib(i, "VmRSS:")
    }

    /// The most resident memory node `i` has had since it started, in KiB (Linux).
    pub fn peak_rss_kib(&self, i: usize) -> Option<u64> {
        self.status_kib(i, "VmHWM:")
    }

    fn status_kib(&self, i: usize, field: &str) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.nodes[i].pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 when it cannot
/// be asked, the value Linux fixes for user space on every architecture).
pub fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A tmpfs mounted for a test (a small disk to fill); unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `mib` MiB at `at` (created if missing). Without root it says so and
/// returns `None` (the test skips), unless `CLOUDLESS_REQUIRE_ROOT=1` (CI), which makes that a
/// failure.
pub fn tmpfs(at: &Path, mib: u32) -> Result<Option<Tmpfs>> {
    std::fs::create_dir_all(at).with_context(|| format!("cannot create {}", at.display()))?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(Some(Tmpfs(at.to_path_buf())));
    }
    if std::env::var("CLOUDLESS_REQUIRE_ROOT").is_ok_and(|v| v == "1") {
        bail!(
            "cannot mount a tmpfs at {} (root is needed), and CLOUDLESS_REQUIRE_ROOT=1",
            at.display()
        );
    }
    eprintln!("skipped: cannot mount a tmpfs (needs root; CLOUDLESS_REQUIRE_ROOT=1 fails instead)");
    Ok(None)
}
