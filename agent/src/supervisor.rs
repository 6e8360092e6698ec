//! Service supervision: the processes a node runs for its modules (declared in a
//! module's OCI config, see `crate::modules::config`) and the ones given on the
//! command line. Each service has a monitor task that starts it, restarts it after a
//! crash by its restart policy with a capped exponential backoff, and stops it on
//! request: SIGTERM to its process group, then SIGKILL after a timeout, or (for a
//! drain) left running and reported stuck so the operator decides.
//!
//! Services start in the order they were added and stop in reverse order. After
//! [`Supervisor::stop_all`] (drain, reboot) the supervisor is *held*: services added
//! later are declared but not started until [`Supervisor::start_all`].
//!
//! PID 1 reaps orphans; it must never reap a supervised child, or the monitor loses
//! the exit status. Every spawn registers its pid under one lock
//! ([`with_supervised`]) that the reaper takes too.
//!
//! A service's stdout and stderr go to the agent's own (the console, as PID 1), each
//! line prefixed with the service name (written by one console thread that never holds
//! up the runtime), and its last lines are kept for
//! `collect_diagnostics` ([`Supervisor::output`]).
//!
//! It must never panic on a bad service declaration: a spawn failure is a `failed`
//! service, not an error that stops the agent.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use powernode_proto::node::ServiceState;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What a stop did, by service name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StopReport {
    /// Exited within their time after SIGTERM (or were not running).
    pub stopped: Vec<String>,
    /// Killed (SIGKILL) after their time ran out.
    pub killed: Vec<String>,
    /// Still running when the time ran out and not killed (a drain): state `stopping`.
    pub stuck: Vec<String>,
}

pub type StopFuture<'a> = Pin<Box<dyn Future<Output = StopReport> + Send + 'a>>;

pub trait Supervisor: Send + Sync {
    fn services(&self) -> Vec<ServiceState>;
    /// Holds the supervisor and stops every service in reverse start order within
    /// `budget` overall: SIGTERM, then SIGKILL when `kill`, else reported `stuck`.
    /// Dropping the future part way (a cancelled drain) leaves the services it had
    /// not finished stopping `stopping`, for [`Supervisor::start_all`].
    fn stop_all(&self, budget: Duration, kill: bool) -> StopFuture<'_>;
    /// Releases the hold and starts again every service that was stopped, stopping
    /// or held (a cancelled drain); returns their names.
    fn start_all(&self) -> Vec<String>;
    /// The last `lines` lines each service wrote (stdout and stderr), by name.
    fn output(&self, _lines: usize) -> std::collections::BTreeMap<String, Vec<String>> {
        std::collections::BTreeMap::new()
    }
    /// Declares services and starts them, unless held (after a stop_all).
    fn add(&self, specs: Vec<ServiceSpec>);
    /// Stops (killing past each one's stop timeout) and forgets a module's services,
    /// in reverse start order.
    fn remove_module<'a>(&'a self, module: &'a str) -> StopFuture<'a>;
    /// Names of a module's services, in start order.
    fn module_services(&self, module: &str) -> Vec<String>;
}

/// A node with no supervised services.
#[derive(Debug, Default)]
pub struct NoServices;

impl Supervisor for NoServices {
    fn services(&self) -> Vec<ServiceState> {
        Vec::new()
    }
    fn stop_all(&self, _budget: Duration, _kill: bool) -> StopFuture<'_> {
        Box::pin(async { StopReport::default() })
    }
    fn start_all(&self) -> Vec<String> {
        Vec::new()
    }
    fn add(&self, specs: Vec<ServiceSpec>) {
        if !specs.is_empty() {
            tracing::warn!(
                services = specs.len(),
                "no supervisor on this node: services not run"
            );
        }
    }
    fn remove_module<'a>(&'a self, _module: &'a str) -> StopFuture<'a> {
        Box::pin(async { StopReport::default() })
    }
    fn module_services(&self, _module: &str) -> Vec<String> {
        Vec::new()
    }
}

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After any exit.
    Always,
    /// After a non-zero exit or a signal.
    #[default]
    OnFailure,
    /// Never: an exit is final (`stopped` or `failed`).
    Never,
}

impl RestartPolicy {
    fn restarts(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "on-failure" => Ok(Self::OnFailure),
            "never" | "no" => Ok(Self::Never),
            other => Err(format!(
                "restart policy {other:?} is not always, on-failure or never"
            )),
        }
    }
}

/// Default time a service gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A service to run: a name, the module it belongs to, an argv (no shell), extra
/// environment, working directory, restart policy and stop timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub module: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub restart: RestartPolicy,
    pub stop_timeout: Duration,
    /// An existing systemd unit this service is (`argv` is then empty): run by a
    /// systemd supervisor; [`ServiceSupervisor`] reports it `failed`.
    pub unit: Option<String>,
}

impl ServiceSpec {
    pub fn new(name: impl Into<String>, module: impl Into<String>, argv: Vec<String>) -> Self {
        Self {
            name: name.into(),
            module: module.into(),
            argv,
            env: Vec::new(),
            cwd: None,
            restart: RestartPolicy::default(),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            unit: None,
        }
    }
}

impl std::str::FromStr for ServiceSpec {
    type Err = String;
    /// `NAME=PROGRAM ARGS...` (split on whitespace).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, cmd) = s
            .split_once('=')
            .ok_or_else(|| format!("service {s:?} is not NAME=COMMAND"))?;
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        if name.is_empty() || argv.is_empty() {
            return Err(format!("service {s:?} needs a name and a command"));
        }
        Ok(Self::new(name, "", argv))
    }
}

/// Restart backoff: `base` doubling to `cap`; a process that ran `reset_after`
/// resets it.
#[derive(Debug, Clone, Copy)]
pub struct RestartBackoff {
    pub base: Duration,
    pub cap: Duration,
    pub reset_after: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

static SUPERVISED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn supervised() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    SUPERVISED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with the set of supervised pids locked: no service can be spawned (and
/// so no new supervised pid appear) until it returns. PID 1's reaper checks and
/// reaps inside it.
pub fn with_supervised<R>(f: impl FnOnce(&BTreeSet<u32>) -> R) -> R {
    f(&supervised())
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lines of output kept per service.
const OUTPUT_LINES: usize = 200;
/// A longer line is cut (and a line without a newline ends here): a runaway writer
/// must not grow the agent's memory.
const OUTPUT_LINE_BYTES: usize = 1024;

/// The last lines a service wrote, across its restarts.
#[derive(Debug, Default)]
struct OutputRing(std::collections::VecDeque<String>);

type Output = Arc<Mutex<OutputRing>>;

impl OutputRing {
    fn push(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        self.0
            .push_back(line.trim_end_matches(['\r', '\n']).to_string());
        if self.0.len() > OUTPUT_LINES {
            self.0.pop_front();
        }
    }

    fn tail(&self, n: usize) -> Vec<String> {
        self.0
            .iter()
            .skip(self.0.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

/// Copies a service's stream line by line to the agent's own stream (prefixed with
/// the service name) and into its ring, until the service (and anything that
/// inherited the pipe) closes it.
async fn forward(
    name: String,
    mut from: impl tokio::io::AsyncRead + Unpin,
    output: Output,
    stderr: bool,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &[u8]| {
        output.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        let mut out = Vec::with_capacity(name.len() + line.len() + 3);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(line);
        out.push(b'\n');
        out
    };
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut text = Vec::new();
        for &b in buf.iter().take(n) {
            if b == b'\n' {
                text.extend(emit(&line));
                line.clear();
            } else if line.len() < OUTPUT_LINE_BYTES {
                line.push(b);
            } else {
                text.extend(emit(&line));
                line.clear();
                line.push(b);
            }
        }
        echo(stderr, text);
    }
    if !line.is_empty() {
        echo(stderr, emit(&line));
    }
}

/// Batches of service output waiting for the console; past this many, batches are
/// dropped from the console (they are still in the rings).
const ECHO_QUEUE: usize = 256;

/// A batch for the console: (to stderr, prefixed lines).
type EchoTx = std::sync::mpsc::SyncSender<(bool, Vec<u8>)>;

/// Hands a batch of prefixed lines to the one console-writer thread, never waiting:
/// as PID 1 the agent's runtime is a single thread, and a console write (a serial
/// port, byte by byte under emulation) must not hold up its heartbeats because a
/// service is chatty. When the writer lags the batch is dropped from the console
/// only.
fn echo(stderr: bool, text: Vec<u8>) {
    static WRITER: OnceLock<Option<EchoTx>> = OnceLock::new();
    if text.is_empty() {
        return;
    }
    let writer = WRITER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(bool, Vec<u8>)>(ECHO_QUEUE);
        std::thread::Builder::new()
            .name("service-output".into())
            .spawn(move || {
                use std::io::Write;
                for (stderr, text) in rx {
                    // Nowhere to report a console that fails; the rings keep the lines.
                    let _ = if stderr {
                        std::io::stderr().lock().write_all(&text)
                    } else {
                        std::io::stdout().lock().write_all(&text)
                    };
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = writer {
        let _ = tx.try_send((stderr, text));
    }
}

/// Spawns the service in its own process group, registering its pid under the lock.
fn spawn_child(spec: &ServiceSpec) -> std::io::Result<tokio::process::Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let mut reg = supervised();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        reg.insert(pid);
    }
    Ok(child)
}

/// Spawns `cmd` with its pid registered as supervised, so PID 1's reaper leaves its
/// exit status to whoever waits on it; [`forget_supervised`] once waited.
pub(crate) fn spawn_supervised(
    cmd: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut reg = supervised();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        reg.insert(pid);
    }
    Ok(child)
}

pub(crate) fn forget_supervised(pid: u32) {
    supervised().remove(&pid);
}

pub(crate) fn signal_group(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        // The group may be gone already; the process may have left it: signal both.
        let _ = rustix::process::kill_process_group(p, sig);
        let _ = rustix::process::kill_process(p, sig);
    }
}

fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

#[derive(Debug, Clone, Default)]
struct Status {
    state: &'static str,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopOutcome {
    Stopped,
    Killed,
    Stuck,
}

enum Cmd {
    Start,
    Stop {
        grace: Duration,
        kill: bool,
        reply: oneshot::Sender<StopOutcome>,
    },
}

struct Handle {
    spec: ServiceSpec,
    status: Arc<Mutex<Status>>,
    output: Output,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Asks a service's monitor to stop and waits for its answer; a monitor that is
/// gone has nothing left to stop.
async fn send_stop(cmds: &mpsc::UnboundedSender<Cmd>, grace: Duration, kill: bool) -> StopOutcome {
    let (tx, rx) = oneshot::channel();
    if cmds
        .send(Cmd::Stop {
            grace,
            kill,
            reply: tx,
        })
        .is_err()
    {
        return StopOutcome::Stopped;
    }
    rx.await.unwrap_or(StopOutcome::Stopped)
}

/// The monitor of one service: owns its process, applies the restart policy and
/// answers stop/start commands. Ends (killing the process group) when its handle
/// is dropped.
struct Monitor {
    spec: ServiceSpec,
    status: Arc<Mutex<Status>>,
    output: Output,
    backoff: RestartBackoff,
}

impl Monitor {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn run(self, mut cmds: mpsc::UnboundedReceiver<Cmd>, start: bool) {
        let name = self.spec.name.clone();
        let mut child: Option<(tokio::process::Child, u32, Instant)> = None;
        let mut next_start: Option<Instant> = start.then(Instant::now);
        let mut delay = self.backoff.base;
        // A stop in progress: its deadline, whether to kill at it, who waits.
        let mut stopping: Option<(Option<Instant>, bool, Option<oneshot::Sender<StopOutcome>>)> =
            None;
        let mut killed = false;
        // Restart at once when the current process exits (a cancelled drain).
        let mut respawn = false;
        loop {
            let deadline = stopping.as_ref().and_then(|s| s.0);
            let idle = child.is_none();
            tokio::select! {
                exit = async { match child.as_mut() { Some((c, _, _)) => c.wait().await, None => std::future::pending().await } } => {
                    let Some((_, pid, started)) = child.take() else { continue };
                    supervised().remove(&pid);
                    let (desc, success) = match &exit {
                        Ok(s) => (describe_exit(s), s.success()),
                        Err(e) => (format!("wait failed: {e}"), false),
                    };
                    tracing::info!(service = %name, pid, exit = %desc, "service exited");
                    if let Some((_, _, reply)) = stopping.take() {
                        let outcome = if killed { StopOutcome::Killed } else { StopOutcome::Stopped };
                        if let Some(r) = reply { let _ = r.send(outcome); }
                        killed = false;
                        self.set(|s| { s.state = "stopped"; s.pid = None; s.last_exit = Some(desc); });
                        if respawn {
                            respawn = false;
                            next_start = Some(Instant::now());
                        }
                        continue;
                    }
                    if self.spec.restart.restarts(success) {
                        if started.elapsed() >= self.backoff.reset_after {
                            delay = self.backoff.base;
                        }
                        next_start = Some(Instant::now() + delay);
                        tracing::warn!(service = %name, exit = %desc, retry_in_ms = delay.as_millis() as u64, "service exited; restarting after backoff");
                        delay = (delay * 2).min(self.backoff.cap);
                        self.set(|s| { s.state = "backoff"; s.pid = None; s.restarts += 1; s.last_exit = Some(desc); });
                    } else {
                        self.set(|s| {
                            s.state = if success { "stopped" } else { "failed" };
                            s.pid = None;
                            s.last_exit = Some(desc);
                        });
                    }
                }
                _ = async { match next_start { Some(t) if idle => tokio::time::sleep_until(t).await, _ => std::future::pending().await } } => {
                    next_start = None;
                    match spawn_child(&self.spec) {
                        Ok(mut c) => {
                            let pid = c.id().unwrap_or(0);
                            if let Some(out) = c.stdout.take() {
                                tokio::spawn(forward(name.clone(), out, self.output.clone(), false));
                            }
                            if let Some(err) = c.stderr.take() {
                                tokio::spawn(forward(name.clone(), err, self.output.clone(), true));
                            }
                            tracing::info!(service = %name, module = %self.spec.module, pid, "service started");
                            self.set(|s| { s.state = "running"; s.pid = Some(pid); });
                            child = Some((c, pid, Instant::now()));
                        }
                        Err(e) => {
                            // A missing program will not appear by retrying.
                            tracing::error!(service = %name, error = %e, "service failed to start");
                            self.set(|s| { s.state = "failed"; s.pid = None; s.last_exit = Some(format!("spawn: {e}")); });
                        }
                    }
                }
                _ = async { match deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    let pid = child.as_ref().map(|c| c.1).unwrap_or(0);
                    if let Some(stop) = stopping.as_mut() {
                        stop.0 = None;
                        if stop.1 {
                            tracing::warn!(service = %name, pid, "service ignored SIGTERM; killing it");
                            signal_group(pid, rustix::process::Signal::KILL);
                            killed = true;
                        } else {
                            tracing::warn!(service = %name, pid, "service still running after its stop time; leaving it stopping");
                            if let Some(r) = stop.2.take() {
                                let _ = r.send(StopOutcome::Stuck);
                            }
                        }
                    }
                }
                cmd = cmds.recv() => match cmd {
                    None => {
                        if let Some((mut c, pid, _)) = child.take() {
                            signal_group(pid, rustix::process::Signal::KILL);
                            let _ = c.wait().await;
                            supervised().remove(&pid);
                        }
                        return;
                    }
                    Some(Cmd::Start) => {
                        delay = self.backoff.base;
                        match (&child, stopping.is_some()) {
                            (Some((_, pid, _)), true) => {
                                // An abandoned stop: end the old process, then start anew.
                                if let Some((_, _, Some(r))) = stopping.take() {
                                    let _ = r.send(StopOutcome::Stuck);
                                }
                                stopping = Some((None, true, None));
                                signal_group(*pid, rustix::process::Signal::KILL);
                                respawn = true;
                            }
                            (Some(_), false) => {}
                            (None, _) => next_start = Some(Instant::now()),
                        }
                    }
                    Some(Cmd::Stop { grace, kill, reply }) => {
                        next_start = None;
                        respawn = false;
                        match &child {
                            None => {
                                self.set(|s| if s.state != "failed" { s.state = "stopped" });
                                let _ = reply.send(StopOutcome::Stopped);
                            }
                            Some((_, pid, _)) => {
                                if stopping.is_none() {
                                    tracing::info!(service = %name, pid, "stopping service (SIGTERM)");
                                    signal_group(*pid, rustix::process::Signal::TERM);
                                    self.set(|s| s.state = "stopping");
                                }
                                if let Some((_, _, Some(old))) = stopping.take() {
                                    let _ = old.send(StopOutcome::Stuck);
                                }
                                stopping = Some((Some(Instant::now() + grace), kill, Some(reply)));
                            }
                        }
                    }
                },
            }
        }
    }
}

/// Runs services: per-service monitors, restart policy, ordered stops.
pub struct ServiceSupervisor {
    inner: Mutex<Inner>,
    backoff: RestartBackoff,
}

#[derive(Default)]
struct Inner {
    services: Vec<Handle>,
    /// Stopped for a drain or reboot: new services are declared, not started.
    held: bool,
}

impl std::fmt::Debug for ServiceSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSupervisor").finish_non_exhaustive()
    }
}

impl Default for ServiceSupervisor {
    fn default() -> Self {
        Self::new(RestartBackoff::default())
    }
}

impl ServiceSupervisor {
    pub fn new(backoff: RestartBackoff) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            backoff,
        }
    }

    /// A supervisor running `specs` (needs a tokio runtime).
    pub fn start(specs: Vec<ServiceSpec>) -> Self {
        let s = Self::default();
        s.add(specs);
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares services and starts them (unless held). Needs a tokio runtime.
    pub fn add(&self, specs: Vec<ServiceSpec>) {
        let mut inner = self.lock();
        let start = !inner.held;
        for spec in specs {
            if let Some(unit) = &spec.unit {
                // No monitor: its channel is closed, so stops answer at once and
                // start_all passes it by.
                tracing::error!(service = %spec.name, module = %spec.module, %unit,
                    "service names a systemd unit but the agent is not running under systemd");
                let status = Status {
                    state: "failed",
                    last_exit: Some(format!(
                        "names systemd unit {unit}, but this node does not run systemd"
                    )),
                    ..Status::default()
                };
                inner.services.push(Handle {
                    spec,
                    status: Arc::new(Mutex::new(status)),
                    output: Output::default(),
                    cmds: mpsc::unbounded_channel().0,
                });
                continue;
            }
            let status = Arc::new(Mutex::new(Status {
                state: if start { "stopped" } else { "held" },
                ..Status::default()
            }));
            let (tx, rx) = mpsc::unbounded_channel();
            let output = Output::default();
            let monitor = Monitor {
                spec: spec.clone(),
                status: status.clone(),
                output: output.clone(),
                backoff: self.backoff,
            };
            tokio::spawn(monitor.run(rx, start));
            inner.services.push(Handle {
                spec,
                status,
                output,
                cmds: tx,
            });
        }
    }

    /// Stops (SIGTERM, SIGKILL after each one's stop timeout) and forgets a
    /// module's services, in reverse start order.
    /// They stay listed (`stopping`) until stopped, so a slow stop during a module
    /// swap shows in heartbeats instead of the services vanishing at once.
    pub async fn remove_module(&self, module: &str) -> StopReport {
        type Stopping = (
            String,
            Duration,
            mpsc::UnboundedSender<Cmd>,
            Arc<Mutex<Status>>,
        );
        let stopping: Vec<Stopping> = self
            .lock()
            .services
            .iter()
            .filter(|h| h.spec.module == module)
            .map(|h| {
                let s = &h.spec;
                (
                    s.name.clone(),
                    s.stop_timeout,
                    h.cmds.clone(),
                    h.status.clone(),
                )
            })
            .collect();
        let mut report = StopReport::default();
        for (name, stop_timeout, cmds, _) in stopping.iter().rev() {
            let outcome = send_stop(cmds, *stop_timeout, true).await;
            record(&mut report, name, outcome);
        }
        self.lock()
            .services
            .retain(|h| !stopping.iter().any(|(.., st)| Arc::ptr_eq(st, &h.status)));
        report
    }

    /// Names of a module's services, in start order.
    pub fn module_services(&self, module: &str) -> Vec<String> {
        self.lock()
            .services
            .iter()
            .filter(|h| h.spec.module == module)
            .map(|h| h.spec.name.clone())
            .collect()
    }
}

fn record(report: &mut StopReport, name: &str, outcome: StopOutcome) {
    let list = match outcome {
        StopOutcome::Stopped => &mut report.stopped,
        StopOutcome::Killed => &mut report.killed,
        StopOutcome::Stuck => &mut report.stuck,
    };
    list.push(name.to_string());
}

/// The least time a service gets after SIGTERM, even past the overall budget.
const MIN_GRACE: Duration = Duration::from_millis(500);

impl Supervisor for ServiceSupervisor {
    fn services(&self) -> Vec<ServiceState> {
        self.lock()
            .services
            .iter()
            .map(|h| {
                let s = h.status();
                ServiceState {
                    name: h.spec.name.clone(),
                    module: h.spec.module.clone(),
                    state: s.state.to_string(),
                    restarts: s.restarts,
                    pid: s.pid,
                    last_exit: s.last_exit,
                }
            })
            .collect()
    }

    fn stop_all(&self, budget: Duration, kill: bool) -> StopFuture<'_> {
        let order: Vec<(String, Duration, mpsc::UnboundedSender<Cmd>)> = {
            let mut inner = self.lock();
            inner.held = true;
            inner
                .services
                .iter()
                .rev()
                .map(|h| (h.spec.name.clone(), h.spec.stop_timeout, h.cmds.clone()))
                .collect()
        };
        Box::pin(async move {
            let deadline = Instant::now() + budget;
            let mut report = StopReport::default();
            for (name, stop_timeout, cmds) in order {
                let left = deadline.saturating_duration_since(Instant::now());
                // A kill stop honours each service's own timeout within the budget; a
                // drain gives each what is left of the budget.
                let grace = if kill { stop_timeout.min(left) } else { left }.max(MIN_GRACE);
                record(&mut report, &name, send_stop(&cmds, grace, kill).await);
            }
            report
        })
    }

    fn output(&self, lines: usize) -> std::collections::BTreeMap<String, Vec<String>> {
        self.lock()
            .services
            .iter()
            .map(|h| {
                let ring = h.output.lock().unwrap_or_else(|p| p.into_inner());
                (h.spec.name.clone(), ring.tail(lines))
            })
            .collect()
    }

    fn start_all(&self) -> Vec<String> {
        let mut inner = self.lock();
        inner.held = false;
        let mut started = Vec::new();
        for h in &inner.services {
            if matches!(h.status().state, "stopping" | "stopped" | "held")
                && h.cmds.send(Cmd::Start).is_ok()
            {
                started.push(h.spec.name.clone());
            }
        }
        started
    }

    fn add(&self, specs: Vec<ServiceSpec>) {
        ServiceSupervisor::add(self, specs)
    }

    fn remove_module<'a>(&'a self, module: &'a str) -> StopFuture<'a> {
        Box::pin(ServiceSupervisor::remove_module(self, module))
    }

    fn module_services(&self, module: &str) -> Vec<String> {
        ServiceSupervisor::module_services(self, module)
    }
}

impl Drop for ServiceSupervisor {
    fn drop(&mut self) {
        // Dropping the handles closes the monitors' channels: they kill their groups.
        self.lock().services.clear();
    }
}

/// The supervisor is shared between the runtime (drain) and the module runtime
/// (services of attached modules).
impl Supervisor for Arc<ServiceSupervisor> {
    fn services(&self) -> Vec<ServiceState> {
        (**self).services()
    }
    fn stop_all(&self, budget: Duration, kill: bool) -> StopFuture<'_> {
        (**self).stop_all(budget, kill)
    }
    fn start_all(&self) -> Vec<String> {
        (**self).start_all()
    }
    fn output(&self, lines: usize) -> std::collections::BTreeMap<String, Vec<String>> {
        (**self).output(lines)
    }
    fn add(&self, specs: Vec<ServiceSpec>) {
        ServiceSupervisor::add(self, specs)
    }
    fn remove_module<'a>(&'a self, module: &'a str) -> StopFuture<'a> {
        Box::pin(ServiceSupervisor::remove_module(self, module))
    }
    fn module_services(&self, module: &str) -> Vec<String> {
        ServiceSupervisor::module_services(self, module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str) -> ServiceSpec {
        ServiceSpec::new(name, "m", vec!["sh".into(), "-c".into(), script.into()])
    }

    fn fast() -> RestartBackoff {
        RestartBackoff {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(400),
            reset_after: Duration::from_secs(60),
        }
    }

    async fn wait_for(sup: &ServiceSupervisor, what: &str, f: impl Fn(&[ServiceState]) -> bool) {
        let start = std::time::Instant::now();
        loop {
            let s = sup.services();
            if f(&s) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn states(sup: &ServiceSupervisor) -> Vec<String> {
        sup.services().into_iter().map(|s| s.state).collect()
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn service_output_is_kept_per_service_bounded_and_across_restarts() {
        let sup = ServiceSupervisor::new(fast());
        let long = OUTPUT_LINE_BYTES * 2 + 10;
        sup.add(vec![
            sh("talker", "echo out-1; echo err-1 >&2; sleep 30"),
            sh(
                "crasher",
                &format!("echo run; head -c {long} /dev/zero | tr '\\0' x; exit 3"),
            ),
        ]);
        let start = std::time::Instant::now();
        loop {
            let out = sup.output(OUTPUT_LINES);
            let talker = out.get("talker").cloned().unwrap_or_default();
            let crasher = out.get("crasher").cloned().unwrap_or_default();
            let runs = crasher.iter().filter(|l| *l == "run").count();
            if talker.contains(&"out-1".to_string())
                && talker.contains(&"err-1".to_string())
                && runs >= 2
            {
                // A line without a newline, longer than the cap, is cut into
                // capped lines and kept.
                assert!(crasher.iter().all(|l| l.len() <= OUTPUT_LINE_BYTES));
                assert!(crasher.iter().any(|l| l.len() == OUTPUT_LINE_BYTES));
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{out:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sup.output(1)["talker"].len(), 1);
        let mut ring = OutputRing::default();
        for i in 0..OUTPUT_LINES + 5 {
            ring.push(format!("{i}\n").as_bytes());
        }
        assert_eq!(ring.tail(usize::MAX).len(), OUTPUT_LINES);
        assert_eq!(ring.tail(1), ["204"]);
    }

    #[test]
    fn spec_parsing() {
        let s: ServiceSpec = "web=sleep 100".parse().unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.argv, vec!["sleep", "100"]);
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert!("nocommand".parse::<ServiceSpec>().is_err());
        assert!("x=  ".parse::<ServiceSpec>().is_err());
        assert!("=sleep 1".parse::<ServiceSpec>().is_err());
        assert_eq!("always".parse::<RestartPolicy>(), Ok(RestartPolicy::Always));
        assert!("sometimes".parse::<RestartPolicy>().is_err());
    }

    #[tokio::test]
    async fn stop_all_terms_in_reverse_order_then_kills() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let polite = sh(
            "polite",
            &format!(
                "trap 'echo polite >> {l}; exit 0' TERM; while :; do sleep 0.05; done",
                l = log.display()
            ),
        );
        let second = sh(
            "second",
            &format!(
                "trap 'echo second >> {l}; exit 0' TERM; while :; do sleep 0.05; done",
                l = log.display()
            ),
        );
        let stubborn = sh("stubborn", "trap '' TERM; while :; do sleep 0.1; done");
        let missing = ServiceSpec::new("missing", "m", vec!["/nonexistent/binary".into()]);
        let sup = ServiceSupervisor::new(fast());
        sup.add(vec![polite, second, stubborn, missing]);
        wait_for(&sup, "started", |s| {
            s.iter().map(|s| s.state.as_str()).collect::<Vec<_>>()
                == ["running", "running", "running", "failed"]
        })
        .await;
        // Give the shells time to install their traps.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stubborn_pid = sup.services()[2].pid.unwrap();
        let report = sup.stop_all(Duration::from_millis(600), true).await;
        assert_eq!(report.stopped, vec!["missing", "second", "polite"]);
        assert_eq!(report.killed, vec!["stubborn"]);
        assert!(report.stuck.is_empty());
        // Reverse start order: `second` got its SIGTERM before `polite`.
        let order = std::fs::read_to_string(&log).unwrap();
        assert_eq!(order, "second\npolite\n");
        assert!(!alive(stubborn_pid));
        assert_eq!(
            states(&sup),
            vec!["stopped", "stopped", "stopped", "failed"]
        );
        // Held: a service added now waits for start_all.
        sup.add(vec![sh("late", "sleep 100")]);
        assert_eq!(states(&sup)[4], "held");
        assert_eq!(
            sup.start_all(),
            vec!["polite", "second", "stubborn", "late"]
        );
        wait_for(&sup, "restarted", |s| {
            s.iter().filter(|s| s.state == "running").count() == 4
        })
        .await;
        sup.stop_all(Duration::from_millis(10), true).await;
    }

    #[tokio::test]
    async fn a_drain_stop_leaves_a_stubborn_service_stuck_and_an_abandoned_stop_can_be_undone() {
        let sup = ServiceSupervisor::new(fast());
        sup.add(vec![sh(
            "stubborn",
            "trap '' TERM; while :; do sleep 0.1; done",
        )]);
        wait_for(&sup, "running", |s| s[0].state == "running").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pid = sup.services()[0].pid.unwrap();
        let report = sup.stop_all(Duration::from_millis(300), false).await;
        assert_eq!(report.stuck, vec!["stubborn"]);
        assert_eq!(sup.services()[0].state, "stopping");
        assert!(alive(pid), "a drain must not kill");
        // A cancelled drain: the old process is killed and a new one started.
        assert_eq!(sup.start_all(), vec!["stubborn"]);
        wait_for(&sup, "new process", |s| {
            s[0].state == "running" && s[0].pid != Some(pid)
        })
        .await;
        assert!(!alive(pid));
        assert_eq!(sup.services()[0].restarts, 0, "not a crash");
        sup.stop_all(Duration::from_millis(10), true).await;
    }

    #[tokio::test]
    async fn crashes_restart_with_backoff_by_policy() {
        let sup = ServiceSupervisor::new(fast());
        sup.add(vec![
            sh("crasher", "sleep 0.05; exit 3"),
            {
                let mut s = sh("once", "exit 4");
                s.restart = RestartPolicy::Never;
                s
            },
            {
                let mut s = sh("clean", "exit 0");
                s.restart = RestartPolicy::OnFailure;
                s
            },
        ]);
        wait_for(&sup, "three restarts", |s| s[0].restarts >= 3).await;
        let s = sup.services();
        assert_eq!(s[0].last_exit.as_deref(), Some("exit 3"));
        assert_eq!((s[1].state.as_str(), s[1].restarts), ("failed", 0));
        assert_eq!(s[1].last_exit.as_deref(), Some("exit 4"));
        assert_eq!((s[2].state.as_str(), s[2].restarts), ("stopped", 0));
        // Capped: 100, 200, 400, 400 ms... so 3 restarts take at least 700 ms.
        let t = std::time::Instant::now();
        let before = sup.services()[0].restarts;
        wait_for(&sup, "two more", |s| s[0].restarts >= before + 2).await;
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // A stop ends the restart loop.
        sup.stop_all(Duration::from_millis(500), true).await;
        let n = sup.services()[0].restarts;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sup.services()[0].restarts, n);
        assert_eq!(sup.services()[0].state, "stopped");
    }

    /// A module's services stay listed as `stopping` while a slow stop runs (what
    /// heartbeats show during a module swap), and are gone once stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_module_lists_services_while_they_stop() {
        let sup = Arc::new(ServiceSupervisor::new(fast()));
        let script = "trap 'sleep 1; exit 0' TERM; while :; do sleep 0.1; done";
        let mut slow =
            ServiceSpec::new("slow", "one", vec!["sh".into(), "-c".into(), script.into()]);
        slow.stop_timeout = Duration::from_secs(10);
        sup.add(vec![slow]);
        wait_for(&sup, "running", |s| s.iter().all(|s| s.state == "running")).await;
        let bg = sup.clone();
        let removing = tokio::spawn(async move { bg.remove_module("one").await });
        wait_for(&sup, "stopping and still listed", |s| {
            s.len() == 1 && s[0].state == "stopping"
        })
        .await;
        let report = removing.await.unwrap();
        assert_eq!(report.stopped, vec!["slow"]);
        assert!(sup.services().is_empty(), "{:?}", sup.services());
    }

    #[tokio::test]
    async fn remove_module_stops_only_that_module_and_registers_pids() {
        let sup = ServiceSupervisor::new(fast());
        let mut a = ServiceSpec::new("a", "one", vec!["sleep".into(), "100".into()]);
        a.env.push(("X".into(), "1".into()));
        let b = ServiceSpec::new("b", "two", vec!["sleep".into(), "100".into()]);
        sup.add(vec![a, b]);
        wait_for(&sup, "running", |s| s.iter().all(|s| s.state == "running")).await;
        let pid_a = sup.services()[0].pid.unwrap();
        assert!(with_supervised(|set| set.contains(&pid_a)));
        let environ = std::fs::read(format!("/proc/{pid_a}/environ")).unwrap();
        assert!(environ.split(|b| *b == 0).any(|kv| kv == b"X=1"));
        let report = sup.remove_module("one").await;
        assert_eq!(report.stopped, vec!["a"]);
        assert_eq!(sup.module_services("one"), Vec::<String>::new());
        assert_eq!(sup.module_services("two"), vec!["b"]);
        assert!(!with_supervised(|set| set.contains(&pid_a)));
        assert!(!alive(pid_a));
        let pid_b = sup.services()[0].pid.unwrap();
        drop(sup);
        // Dropping the supervisor kills what it ran.
        let start = std::time::Instant::now();
        while alive(pid_b) && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid_b));
    }

    #[tokio::test]
    async fn a_service_naming_a_systemd_unit_is_failed_without_systemd() {
        let sup = ServiceSupervisor::new(fast());
        let mut docker = ServiceSpec::new("docker", "dockerhost", Vec::new());
        docker.unit = Some("docker.service".into());
        sup.add(vec![docker, sh("web", "sleep 100")]);
        wait_for(&sup, "web running", |s| s[1].state == "running").await;
        let s = &sup.services()[0];
        assert_eq!(s.state, "failed");
        assert!(s
            .last_exit
            .as_deref()
            .unwrap()
            .contains("does not run systemd"));
        let report = sup.stop_all(Duration::from_secs(5), true).await;
        assert_eq!(report.stopped, ["web", "docker"]);
        assert_eq!(sup.start_all(), ["web"]);
        assert_eq!(sup.services()[0].state, "failed");
        sup.stop_all(Duration::from_millis(10), true).await;
    }
}
