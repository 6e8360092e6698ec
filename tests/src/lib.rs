//! Test harness shared by the host-integration and VM end-to-end tiers: process
//! guards, port-0 servers, helpers that walk the runbook.
//!
//! - this file: [`ProcessGuard`], the workspace paths and builds ([`binary`],
//!   [`build_musl_inits`]), the one `powernode-stub serve` start ([`spawn_serve`])
//!   and admin CLI call ([`stub_cli`]), the host tier's [`Server`] and [`Agent`];
//! - [`direct`]: VMs a test boots itself (netboot image, specs, the guest-facing
//!   [`direct::stub::Stub`], serial events, runtime and root module trees);
//! - [`proxy`]: [`proxy::LossyProxy`], a loopback relay that loses one answer;
//! - [`vm`]: VMs the server's real provider boots ([`vm::RealServer`], the Debian
//!   root), and the `vm_test` frame that keeps their files.
//!
//! Every child process is owned by a [`ProcessGuard`] that kills it by its own pid
//! when dropped, also when a test panics; the agent and the server lead sessions of
//! their own, and what is left in them (services, VMs) is killed with them. Servers
//! bind 127.0.0.1 only. Each test keeps its data and logs under
//! `target/powernode-tests/<test>/<pid>/` so a failure can be read afterwards
//! (`server.log`, `<agent>.log`, the server's `data/`).
//!
//! This crate must never talk to anything but loopback, and never leave a process
//! running after a test.

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::Value;

pub use powernode_proto as proto;

pub mod direct;
pub mod proxy;
pub mod vm;

/// Kills its child (by the child's own pid) on drop.
#[derive(Debug)]
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
    /// The child leads its own session ([`ProcessGuard::spawn_session`]): what is
    /// left of the session is killed too before the child is reaped.
    session: bool,
    /// The session's processes when the leader was reaped by
    /// [`ProcessGuard::signal_alone`] (a VM meant to outlive a killed server); killed
    /// on drop if still in the session.
    left: Vec<(u32, u32)>,
}

impl ProcessGuard {
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Self {
            name: name.into(),
            child: Some(child),
            session: false,
            left: Vec::new(),
        }
    }

    /// Spawns `cmd` as the leader of a new session, for a child that starts processes
    /// of its own (the agent's services, the real provider's VMs): on drop, and when
    /// the child's exit is seen, every process still in that session is killed, by its
    /// pid and its process group.
    ///
    /// Why a session: the agent puts each service in its own process group, so
    /// killing the agent's group misses them, and once the agent is dead neither the
    /// server's instance view nor the agent can name their pids. The session id is
    /// inherited through fork and process-group changes and outlives its leader, a
    /// scan of `/proc` finds it without asking anyone, and it needs no root (a cgroup
    /// would). Its number cannot be reused while any process of the session is left or
    /// while the unreaped leader holds it, so the scan runs before the reap and finds
    /// exactly what the child left. Only a process that calls setsid itself escapes;
    /// nothing the tests start does.
    pub fn spawn_session(name: impl Into<String>, cmd: &mut Command) -> Result<Self> {
        let name = name.into();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setsid(2), which is async-signal-safe and touches no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let mut guard = Self::new(name, child);
        guard.session = true;
        Ok(guard)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (with what is left of its session) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.session {
                kill_session(child.id(), None);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for (sid, pid) in std::mem::take(&mut self.left) {
            kill_session(sid, Some(pid));
        }
    }

    /// Sends `sig` (`-TERM`, `-KILL`) to the child alone, not its session, and reaps
    /// it: what the session still holds (a VM a test means to outlive a killed
    /// server) lives on until the guard drops. The session is read before the reap,
    /// while its number is surely the child's.
    pub fn signal_alone(&mut self, sig: &str) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already reaped", self.name))?;
        let pid = child.id();
        let sent = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        ensure!(sent.success(), "kill {sig} {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.session {
            self.left = session_members(pid)
                .into_iter()
                .filter_map(|(p, _)| Some((pid, u32::try_from(p).ok()?)))
                .collect();
        }
        Ok(child.wait()?)
    }

    /// The exit status if the process has ended (it is reaped then).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => bail!("{} was already reaped", self.name),
            Some(c) => {
                // The last moment the session id surely is ours: sweep before the reap.
                if self.session && is_zombie(c.id()) {
                    kill_session(c.id(), None);
                }
                Ok(c.try_wait()?)
            }
        }
    }

    /// Waits for the process to end by itself within `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (by pid), then up to `timeout` for a clean exit, then SIGKILL.
    /// Returns whether the process exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let clean = self.wait_timeout(timeout).is_ok();
        self.kill();
        clean
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `/proc/PID/stat` split after the command name (which may hold spaces and
/// parentheses): state, ppid, pgrp, session, ...
fn proc_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn is_zombie(pid: u32) -> bool {
    proc_stat(&pid.to_string()).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
}

/// The live processes of session `sid` (zombies are dead already), with their groups.
fn session_members(sid: u32) -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|pid| member(sid, &pid))
        .collect()
}

/// `(pid, process group)` if `pid` is alive in session `sid`.
fn member(sid: u32, pid: &str) -> Option<(i32, i32)> {
    let f = proc_stat(pid)?;
    if f.first()? == "Z" || *f.get(3)? != sid.to_string() {
        return None;
    }
    Some((pid.parse().ok()?, f.get(2)?.parse().ok()?))
}

/// SIGKILLs every process of session `sid` (or only `pid`, if it is still in it:
/// once the leader is reaped the number may go to a new session, so a scan would not
/// be ours) and its process group, in rounds until none is left alive (a member may
/// fork between the scan and the kill), for up to 5 s.
fn kill_session(sid: u32, only: Option<u32>) {
    use rustix::process::{kill_process, kill_process_group, Pid, Signal};
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let members = match only {
            None => session_members(sid),
            Some(pid) => member(sid, &pid.to_string()).into_iter().collect(),
        };
        if members.is_empty() || Instant::now() > deadline {
            return;
        }
        for (pid, pgrp) in members {
            if let Some(group) = Pid::from_raw(pgrp) {
                let _ = kill_process_group(group, Signal::KILL);
            }
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Root of the workspace (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo` (the one running the tests when known), in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// The workspace's `target/` (or `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the static musl inits (`powernode-init`, `powernode-baseline-init`) with
/// the `release-init` profile, a no-op when they are fresh; returns their folder.
pub fn build_musl_inits() -> Result<PathBuf> {
    let status = cargo()
        .args([
            "build",
            "-q",
            "-p",
            "powernode-init",
            "--target",
            "x86_64-unknown-linux-musl",
            "--profile",
            "release-init",
        ])
        .status()
        .context("running cargo")?;
    ensure!(status.success(), "building the musl init failed");
    Ok(target_dir().join("x86_64-unknown-linux-musl/release-init"))
}

/// The profile directory this test binary was built into (`target/debug`).
fn profile_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test-binary>
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile) = deps.parent() {
                    return profile.to_path_buf();
                }
            }
        }
    }
    target_dir().join("debug")
}

static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Builds `powernode-stub` and `powernode-agent` once per test process, so the
/// tests never run stale binaries (a no-op when they are fresh).
fn ensure_built() -> Result<()> {
    BUILT
        .get_or_init(|| {
            let mut cmd = cargo();
            cmd.args(["build", "-p", "powernode-stub", "-p", "powernode-agent"]);
            if profile_dir().file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let out = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "cargo build failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Path of a workspace binary, built if needed.
pub fn binary(name: &str) -> Result<PathBuf> {
    ensure_built()?;
    let path = profile_dir().join(name);
    if !path.exists() {
        bail!("{} is missing after cargo build", path.display());
    }
    Ok(path)
}

/// A fresh per-test folder, `target/powernode-tests/<name>/<pid>/`. The pid keeps
/// concurrent runs of the same test (two engineers, one target dir) apart; folders
/// of runs whose process is gone are removed, the latest one stays for reading.
pub fn test_dir(name: &str) -> Result<PathBuf> {
    let base = profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("powernode-tests")
        .join(name);
    std::fs::create_dir_all(&base)?;
    let me = std::process::id();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let stale = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| pid != me && !Path::new(&format!("/proc/{pid}")).exists());
            if stale {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(me.to_string());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// `powernode-stub serve` options used by the tests.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `None`: port 0.
    pub port: Option<u16>,
    pub silent_after_seconds: u64,
    pub cert_ttl_seconds: u64,
    pub token_ttl_seconds: u64,
    pub sensor_interval_ms: u64,
    pub heartbeat_interval_seconds: u64,
    pub extra: Vec<String>,
    /// Environment for the server process (e.g. `POWERNODE_VM_APPEND`).
    pub env: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            port: None,
            silent_after_seconds: 300,
            cert_ttl_seconds: 3600,
            token_ttl_seconds: 3600,
            sensor_interval_ms: 200,
            heartbeat_interval_seconds: 1,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `powernode-stub serve`.
#[derive(Debug)]
pub struct Server {
    pub guard: ProcessGuard,
    pub data: PathBuf,
    pub addr: String,
    pub url: String,
    pub opts: ServerOptions,
    http: reqwest::blocking::Client,
    token: String,
}

impl Server {
    /// Starts the server on `data` and waits for `{"listening": ...}`.
    pub fn start(data: &Path, opts: ServerOptions) -> Result<Self> {
        std::fs::create_dir_all(data)?;
        let listen = format!("127.0.0.1:{}", opts.port.unwrap_or(0));
        let log = data.parent().unwrap_or(data).join("server.log");
        let mut cmd = Command::new(binary("powernode-stub")?);
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", &listen])
            .args([
                "--silent-after-seconds",
                &opts.silent_after_seconds.to_string(),
            ])
            .args(["--cert-ttl-seconds", &opts.cert_ttl_seconds.to_string()])
            .args(["--token-ttl-seconds", &opts.token_ttl_seconds.to_string()])
            .args(["--sensor-interval-ms", &opts.sensor_interval_ms.to_string()])
            .args([
                "--heartbeat-interval-seconds",
                &opts.heartbeat_interval_seconds.to_string(),
            ])
            .args(&opts.extra)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .env("POWERNODE_LIBVIRT_MODE", "recorder")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log_file(&log)?);
        let (guard, addr) = spawn_serve(cmd, &log)?;
        let ca = std::fs::read_to_string(data.join("ca.pem")).context("reading DIR/ca.pem")?;
        let token = std::fs::read_to_string(data.join("admin-token"))
            .context("reading DIR/admin-token")?
            .trim()
            .to_string();
        Ok(Self {
            guard,
            data: data.to_path_buf(),
            url: format!("https://{addr}"),
            addr,
            opts,
            http: admin_client(&ca)?,
            token,
        })
    }

    pub fn port(&self) -> Result<u16> {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {}", self.addr))
    }

    /// SIGKILL, then start again on the same DIR and the same port.
    pub fn kill_and_restart(mut self) -> Result<Self> {
        let mut opts = self.opts.clone();
        opts.port = Some(self.port()?);
        let data = self.data.clone();
        self.guard.kill();
        drop(self);
        Self::start_retrying(&data, opts)
    }

    /// Stops the server by its pid (SIGTERM, SIGKILL after 10 s); returns its data
    /// directory and options with its port, for [`Server::start_retrying`].
    pub fn stop(mut self) -> Result<(PathBuf, ServerOptions)> {
        let mut opts = self.opts.clone();
        opts.port = Some(self.port()?);
        let data = self.data.clone();
        self.guard.terminate(Duration::from_secs(10));
        Ok((data, opts))
    }

    /// [`Server::start`] on a port that was just freed: retried briefly in case the
    /// kernel still holds it.
    pub fn start_retrying(data: &Path, opts: ServerOptions) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start(data, opts.clone()) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart failed ({e:#}); retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("{method} {path}: body {text:?}"))?
        };
        Ok((status, v))
    }

    /// Admin GET; fails on a non-2xx answer.
    pub fn get(&self, path: &str) -> Result<Value> {
        match self.request(reqwest::Method::GET, path, None)? {
            (s, v) if (200..300).contains(&s) => Ok(v),
            (s, v) => bail!("GET {path}: HTTP {s}: {v}"),
        }
    }

    /// Admin POST; fails on a non-2xx answer.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        match self.request(reqwest::Method::POST, path, Some(body))? {
            (s, v) if (200..300).contains(&s) => Ok(v),
            (s, v) => bail!("POST {path}: HTTP {s}: {v}"),
        }
    }

    /// Runs the admin CLI against this server and parses its `--json` output.
    pub fn cli(&self, args: &[&str]) -> Result<Value> {
        stub_cli(
            &binary("powernode-stub")?,
            &self.data,
            Some(&self.url),
            args,
        )
    }

    pub fn instance(&self, id: &str) -> Result<Value> {
        Ok(self.get(&proto::paths::admin_instance(id))?["instance"].clone())
    }

    pub fn node(&self, id: &str) -> Result<Value> {
        Ok(self.get(&proto::paths::admin_node(id))?["node"].clone())
    }

    pub fn task(&self, id: &str) -> Result<Value> {
        Ok(self.get(&proto::paths::admin_task(id))?["task"].clone())
    }

    pub fn signals(&self) -> Result<Vec<Value>> {
        Ok(self.get(proto::paths::ADMIN_SIGNALS)?["signals"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The identity document the recorder provider would hand the VM.
    pub fn identity(&self, instance_id: &str) -> Result<Value> {
        let v = self.get(&proto::paths::admin_instance_identity(instance_id))?;
        // Accept the document bare or wrapped in `{identity: ...}`.
        Ok(match v.get("identity") {
            Some(doc) if doc.is_object() => doc.clone(),
            _ => v,
        })
    }

    /// create-node + provision-instance through the admin API; returns
    /// `(node_id, instance_id)`.
    pub fn create_and_provision(&self, hostname: &str) -> Result<(String, String)> {
        let node = self.post(
            proto::paths::ADMIN_NODES,
            &serde_json::json!({"hostname": hostname, "lifecycle_class": "ephemeral"}),
        )?;
        let node_id = str_at(&node, "/node/id")?;
        let prov = self.post(
            &proto::paths::admin_provision(&node_id),
            &serde_json::json!({}),
        )?;
        let instance_id = str_at(&prov, "/instance/id")?;
        Ok((node_id, instance_id))
    }
}

/// Spawns `cmd`, a `powernode-stub serve` (stdout is taken here), under a guard and
/// waits for its first stdout line, `{"listening": ADDR}`; returns the guard and ADDR.
/// The line is read on a thread so a silent server cannot hang the test, and stdout
/// is drained afterwards so the server never blocks on a full pipe. `log` is where
/// its stderr goes, named in the errors.
pub fn spawn_serve(mut cmd: Command, log: &Path) -> Result<(ProcessGuard, String)> {
    // In a session: the VMs the real provider starts are the server's children.
    let mut guard = ProcessGuard::spawn_session("powernode-stub", cmd.stdout(Stdio::piped()))?;
    let stdout = guard
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        anyhow!(
            "powernode-stub printed nothing in 30 s (see {})",
            log.display()
        )
    })?;
    let v: Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "first stdout line is not JSON: {line:?} (see {})",
            log.display()
        )
    })?;
    let addr = v["listening"]
        .as_str()
        .ok_or_else(|| anyhow!("no `listening` in {line}"))?
        .to_string();
    Ok((guard, addr))
}

/// Runs the admin CLI, `BIN ARGS --data DATA [--server URL] --json`, and parses its
/// answer; a failed call is an error carrying its stderr.
pub fn stub_cli(bin: &Path, data: &Path, server: Option<&str>, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("--data").arg(data);
    if let Some(url) = server {
        cmd.args(["--server", url]);
    }
    let out = cmd
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .context("running powernode-stub CLI")?;
    if !out.status.success() {
        bail!(
            "powernode-stub {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "powernode-stub {args:?} printed non-JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn admin_client(ca_pem: &str) -> Result<reqwest::blocking::Client> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = ca_pem.as_bytes();
    for cert in rustls_pemfile::certs(&mut reader) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?)
}

/// A string at a JSON pointer, or an error naming the pointer and the document.
pub fn str_at(v: &Value, pointer: &str) -> Result<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no string at {pointer} in {v}"))
}

/// Polls `f` until it returns `Some` or `timeout` passes; the error carries the
/// last value seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses an RFC 3339 timestamp.
pub fn timestamp(s: &str) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("bad timestamp {s:?}"))
}

/// A running `powernode-agent run`.
#[derive(Debug)]
pub struct Agent {
    pub guard: ProcessGuard,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `powernode-agent run --state-dir STATE ARGS...`, logging to `log`.
    pub fn start(state_dir: &Path, log: &Path, args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(binary("powernode-agent")?);
        cmd.arg("run")
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .env("RUST_LOG", "info,powernode_agent=debug")
            .stdin(Stdio::null())
            .stdout(log_file(log)?)
            .stderr(log_file(log)?);
        Ok(Self {
            // Its services run in process groups of their own: the session finds them.
            guard: ProcessGuard::spawn_session("powernode-agent", &mut cmd)?,
            state_dir: state_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// Starts the agent with the identity document in a file.
    pub fn with_identity(dir: &Path, name: &str, identity: &Value, extra: &[&str]) -> Result<Self> {
        let id_file = dir.join(format!("{name}-identity.json"));
        std::fs::write(&id_file, serde_json::to_vec_pretty(identity)?)?;
        let id = id_file.to_string_lossy().into_owned();
        let mut args = vec!["--identity", id.as_str()];
        args.extend_from_slice(extra);
        Self::start(
            &dir.join(format!("{name}-state")),
            &dir.join(format!("{name}.log")),
            &args,
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The state directory of a node enrolled for a fresh instance: `powernode-agent
/// run` until the instance runs, then stopped (SIGTERM). Its certificate is what
/// `powernode-agent module pull --state-dir` shows the embedded registry, which serves
/// enrolled nodes and the admin only, when the registry is the control plane the
/// node knows: `control_plane_url` replaces the identity's (a relay in front of the
/// server; its certificate names 127.0.0.1 too). Returns `(instance_id, state_dir)`.
pub fn enrolled_node(
    server: &Server,
    dir: &Path,
    name: &str,
    control_plane_url: Option<&str>,
) -> Result<(String, PathBuf)> {
    let (_node, instance) = server.create_and_provision(name)?;
    let modules = dir.join(format!("{name}-modules"));
    let modules = modules.to_string_lossy().into_owned();
    let mut identity = server.identity(&instance)?;
    if let Some(url) = control_plane_url {
        identity["control_plane_url"] = Value::String(url.to_string());
    }
    let mut agent = Agent::with_identity(dir, name, &identity, &["--modules-dir", &modules])?;
    wait_running(server, &instance, Duration::from_secs(60))
        .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    agent.guard.terminate(Duration::from_secs(10));
    Ok((instance, agent.state_dir.clone()))
}

/// Waits until the instance reports `running` with a heartbeat; returns it.
pub fn wait_running(server: &Server, instance_id: &str, timeout: Duration) -> Result<Value> {
    wait_for(&format!("instance {instance_id} running"), timeout, || {
        let inst = server.instance(instance_id)?;
        Ok((inst["status"] == "running" && inst["last_heartbeat_at"].is_string()).then_some(inst))
    })
}
