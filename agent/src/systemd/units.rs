//! Module services as systemd units: each [`ServiceSpec`] becomes a unit file in
//! `/run/systemd/system` (runtime-only: gone at reboot, like the module mounts),
//! started with `--no-block` so a slow unit never holds up the agent. A spec that
//! names an existing unit (`docker.service`) is started, stopped and reported,
//! never written or removed.
//!
//! The agent decides when a service dies, not systemd: units get
//! `TimeoutStopSec=infinity`, so a drain's stop never turns into a kill behind the
//! operator's back; a stop that must kill (reboot, module swap) sends SIGKILL itself
//! after the service's stop timeout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use powernode_proto::node::ServiceState;
use tokio::time::Instant;

use super::{args, checked, Systemctl, SystemdError};
use crate::backoff::Backoff;
use crate::supervisor::{RestartPolicy, ServiceSpec, StopFuture, StopReport, Supervisor};

/// Where runtime unit files go.
pub const DEFAULT_UNIT_DIR: &str = "/run/systemd/system";

/// The least time a unit gets after its stop, even past the overall budget.
const MIN_GRACE: Duration = Duration::from_millis(500);
/// How long a SIGKILLed unit gets to become inactive.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `powernode-MODULE-NAME.service`, with anything systemd would not take in a unit
/// name replaced by `_`.
pub fn unit_name(module: &str, service: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut name = String::from("powernode-");
    if !module.is_empty() {
        name.push_str(&clean(module));
        name.push('-');
    }
    name.push_str(&clean(service));
    // systemd's limit is 255 with the suffix.
    name.truncate(255 - ".service".len());
    name.push_str(".service");
    name
}

/// Escapes `%` (specifiers), which systemd expands in almost every setting.
fn no_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// One word of a command line or an `Environment=` assignment, double-quoted with
/// C escapes; `$` doubled where systemd would expand variables.
fn quote(s: &str, dollars: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '%' => out.push_str("%%"),
            '$' if dollars => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The unit file for `spec`. Errors name what systemd could not be told (an empty
/// command, a newline in a path).
pub fn unit_text(spec: &ServiceSpec) -> Result<String, SystemdError> {
    let bad = |reason: &str| SystemdError::Spec {
        service: spec.name.clone(),
        reason: reason.to_string(),
    };
    if spec.argv.first().is_none_or(|a| a.is_empty()) {
        return Err(bad("empty command"));
    }
    let module = if spec.module.is_empty() {
        "(command line)".to_string()
    } else {
        spec.module.clone()
    };
    let one_line = |s: &str| !s.contains(['\n', '\r']);
    if !one_line(&module) || !one_line(&spec.name) {
        return Err(bad("a newline in the module or service name"));
    }
    let mut t = String::new();
    t.push_str("# Written by the powernode agent; removed with its module.\n");
    t.push_str("[Unit]\n");
    t.push_str(&format!(
        "Description=Powernode module {}: {}\n",
        no_specifiers(&module),
        no_specifiers(&spec.name)
    ));
    // The agent's restart policy has no give-up; systemd's start limit would.
    t.push_str("StartLimitIntervalSec=0\n");
    t.push_str("\n[Service]\n");
    t.push_str("Type=simple\n");
    let exec: Vec<String> = spec.argv.iter().map(|a| quote(a, true)).collect();
    t.push_str(&format!("ExecStart={}\n", exec.join(" ")));
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\n']) {
            return Err(bad("a bad environment variable name"));
        }
        t.push_str(&format!(
            "Environment={}\n",
            quote(&format!("{k}={v}"), false)
        ));
    }
    if let Some(dir) = &spec.cwd {
        let dir = dir.to_string_lossy();
        if !dir.starts_with('/') || !one_line(&dir) {
            return Err(bad(
                "the working directory is not an absolute one-line path",
            ));
        }
        t.push_str(&format!("WorkingDirectory={}\n", no_specifiers(&dir)));
    }
    let restart = match spec.restart {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "no",
    };
    t.push_str(&format!("Restart={restart}\n"));
    t.push_str("RestartSec=1\n");
    t.push_str("TimeoutStopSec=infinity\n");
    t.push_str("KillMode=control-group\n");
    Ok(t)
}

/// One service the supervisor knows.
#[derive(Debug, Clone)]
struct Unit {
    spec: ServiceSpec,
    unit: String,
    /// Written by us (removed with its module), not a unit the root has.
    owned: bool,
    /// Declared while held: not started until start_all.
    held: bool,
    /// Could not be set up (the unit file): reported `failed` with this.
    error: Option<String>,
    /// systemctl did not take the start (or the daemon-reload before it): tried
    /// again, reported `backoff` meanwhile.
    retry: Option<Retry>,
}

/// A start systemctl did not take. At boot systemd can be too busy to answer within
/// the call's bound (seen under TCG while Docker started): that is no reason to give
/// the service up, so it is asked again, with the agent's backoff, from
/// [`Supervisor::services`] (every heartbeat).
#[derive(Debug, Clone)]
struct Retry {
    reason: String,
    backoff: Backoff,
    next: Instant,
}

impl Retry {
    fn new(reason: String) -> Self {
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let next = Instant::now() + backoff.next_delay();
        Self {
            reason,
            backoff,
            next,
        }
    }

    fn again(&mut self, reason: String) {
        self.reason = reason;
        self.next = Instant::now() + self.backoff.next_delay();
    }
}

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Inner {
    units: Vec<Unit>,
    held: bool,
    /// Unit files were written but systemctl did not answer the daemon-reload: the
    /// retried starts reload first.
    reload_pending: bool,
}

/// A [`Supervisor`] whose services are systemd units.
pub struct SystemdSupervisor {
    runner: Arc<dyn Systemctl>,
    unit_dir: PathBuf,
    poll: Duration,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SystemdSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdSupervisor")
            .field("unit_dir", &self.unit_dir)
            .finish_non_exhaustive()
    }
}

/// One unit's properties from `systemctl show`.
#[derive(Debug, Default, Clone)]
struct Shown {
    load: String,
    active: String,
    sub: String,
    pid: u32,
    restarts: u32,
    exit_code: String,
    exit_status: String,
}

impl SystemdSupervisor {
    /// A supervisor asking systemd through `runner`, writing unit files to
    /// `unit_dir` ([`DEFAULT_UNIT_DIR`] on a node).
    pub fn new(runner: Arc<dyn Systemctl>, unit_dir: impl Into<PathBuf>) -> Self {
        Self {
            runner,
            unit_dir: unit_dir.into(),
            poll: Duration::from_millis(200),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The node's systemd: the real `systemctl`, units in `/run/systemd/system`.
    pub fn system() -> Self {
        Self::new(Arc::new(super::RealSystemctl::default()), DEFAULT_UNIT_DIR)
    }

    /// How often a stop asks whether its units are down (tests shorten it).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn systemctl(&self, a: &[&str]) -> Result<super::CmdOutput, SystemdError> {
        checked(&*self.runner, "systemctl", &args(a))
    }

    fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.systemctl(&["daemon-reload"]).map(|_| ())
    }

    fn unit_path(&self, unit: &str) -> PathBuf {
        self.unit_dir.join(unit)
    }

    /// The units' properties, by unit name, in one `systemctl show`.
    fn show(&self, units: &[String]) -> BTreeMap<String, Shown> {
        if units.is_empty() {
            return BTreeMap::new();
        }
        let mut a = vec![
            "show",
            "-p",
            "Id,LoadState,ActiveState,SubState,MainPID,NRestarts,ExecMainCode,ExecMainStatus",
        ];
        a.extend(units.iter().map(String::as_str));
        match self.systemctl(&a) {
            Ok(out) => parse_show(&out.stdout),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "systemctl show failed");
                BTreeMap::new()
            }
        }
    }

    fn active_state(&self, unit: &str) -> String {
        self.show(&[unit.to_string()])
            .remove(unit)
            .map(|s| s.active)
            .unwrap_or_default()
    }

    /// Asks for `unit` to stop and waits until it is down or `grace` is gone; past
    /// it, SIGKILL when `kill`, else it is left stopping (stuck).
    async fn stop_unit(&self, unit: &str, grace: Duration, kill: bool) -> StopOutcome {
        // An unanswered `show` ("") is not "down": a drain must not report a
        // service stopped because systemctl failed.
        let down = |s: &str| matches!(s, "inactive" | "failed");
        if let Err(e) = self.systemctl(&["stop", "--no-block", unit]) {
            tracing::warn!(%unit, error = %crate::error_chain(&e), "systemctl stop failed");
        }
        let deadline = Instant::now() + grace;
        loop {
            if down(&self.active_state(unit)) {
                return StopOutcome::Stopped;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(
                self.poll
                    .min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        if !kill {
            tracing::warn!(%unit, "unit still stopping after its time; leaving it (drain)");
            return StopOutcome::Stuck;
        }
        tracing::warn!(%unit, "unit ignored its stop; killing it");
        if let Err(e) = self.systemctl(&["kill", "--signal=SIGKILL", unit]) {
            tracing::warn!(%unit, error = %crate::error_chain(&e), "systemctl kill failed");
        }
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            if down(&self.active_state(unit)) {
                return StopOutcome::Killed;
            }
            tokio::time::sleep(self.poll).await;
        }
        StopOutcome::Stuck
    }

    /// Starts `units` (one call).
    fn start_units(&self, units: &[String]) {
        if units.is_empty() {
            return;
        }
        let mut a = vec!["start", "--no-block"];
        a.extend(units.iter().map(String::as_str));
        let result = self.systemctl(&a).map(|_| ());
        self.settle(units, "start", result);
    }

    /// What a systemctl call about `units` came to: taken (a retry ends), not
    /// answered (asked again with backoff), or refused (`failed`, with systemd's
    /// reason).
    fn settle(&self, units: &[String], what: &str, result: Result<(), SystemdError>) {
        let mut inner = self.lock();
        let e = match result {
            Ok(()) => {
                for u in inner.units.iter_mut().filter(|u| units.contains(&u.unit)) {
                    u.retry = None;
                }
                return;
            }
            Err(e) => e,
        };
        let reason = crate::error_chain(&e);
        let transient = e.transient();
        tracing::warn!(?units, what, error = %reason, transient, "systemctl call failed");
        for u in inner.units.iter_mut().filter(|u| units.contains(&u.unit)) {
            match (&mut u.retry, transient) {
                (Some(r), true) => r.again(reason.clone()),
                (None, true) => u.retry = Some(Retry::new(reason.clone())),
                (_, false) => {
                    u.retry = None;
                    u.error = Some(reason.clone());
                }
            }
        }
    }

    /// Starts again the units whose start systemctl did not take, once their backoff
    /// is over (not while held: a drain stopped them on purpose).
    fn retry_due(&self) {
        let now = Instant::now();
        let due: Vec<String> = {
            let inner = self.lock();
            if inner.held {
                return;
            }
            inner
                .units
                .iter()
                .filter(|u| !u.held && u.retry.as_ref().is_some_and(|r| r.next <= now))
                .map(|u| u.unit.clone())
                .collect()
        };
        if due.is_empty() {
            return;
        }
        tracing::info!(units = ?due, "starting units again");
        self.start_after_reload(&due);
    }

    /// Starts `units`, after the daemon-reload an earlier add could not get through.
    fn start_after_reload(&self, units: &[String]) {
        if self.lock().reload_pending {
            match self.daemon_reload() {
                Ok(()) => self.lock().reload_pending = false,
                Err(e) => {
                    self.lock().reload_pending = e.transient();
                    return self.settle(units, "daemon-reload", Err(e));
                }
            }
        }
        self.start_units(units);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopOutcome {
    Stopped,
    Killed,
    Stuck,
}

fn record(report: &mut StopReport, name: &str, outcome: StopOutcome) {
    match outcome {
        StopOutcome::Stopped => report.stopped.push(name.to_string()),
        StopOutcome::Killed => report.killed.push(name.to_string()),
        StopOutcome::Stuck => report.stuck.push(name.to_string()),
    }
}

/// `systemctl show` output: blocks of `Key=Value` lines, one per unit, separated
/// by blank lines.
fn parse_show(text: &str) -> BTreeMap<String, Shown> {
    let mut out = BTreeMap::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut s = Shown::default();
        for line in block.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "Id" => id = Some(v.to_string()),
                "LoadState" => s.load = v.to_string(),
                "ActiveState" => s.active = v.to_string(),
                "SubState" => s.sub = v.to_string(),
                "MainPID" => s.pid = v.parse().unwrap_or(0),
                "NRestarts" => s.restarts = v.parse().unwrap_or(0),
                "ExecMainCode" => s.exit_code = v.to_string(),
                "ExecMainStatus" => s.exit_status = v.to_string(),
                _ => {}
            }
        }
        if let Some(id) = id {
            out.insert(id, s);
        }
    }
    out
}

/// A unit's state in the words [`crate::supervisor::ServiceSupervisor`] uses.
fn state_of(s: &Shown) -> (&'static str, Option<String>) {
    // ExecMainCode is a CLD_* code: 1 exited, 2 killed, 3 dumped.
    let last_exit = match s.exit_code.as_str() {
        "1" => Some(format!("exit {}", s.exit_status)),
        "2" | "3" => Some(format!("signal {}", s.exit_status)),
        _ => None,
    };
    if s.load == "not-found" {
        return ("failed", Some("unit not found".into()));
    }
    let state = match (s.active.as_str(), s.sub.as_str()) {
        ("activating", "auto-restart") => "backoff",
        ("active" | "reloading" | "activating", _) => "running",
        ("deactivating", _) => "stopping",
        ("failed", _) => "failed",
        _ => "stopped",
    };
    (state, last_exit)
}

impl Supervisor for SystemdSupervisor {
    fn services(&self) -> Vec<ServiceState> {
        self.retry_due();
        let units: Vec<Unit> = self.lock().units.clone();
        let names: Vec<String> = units.iter().map(|u| u.unit.clone()).collect();
        let shown = self.show(&names);
        units
            .iter()
            .map(|u| {
                let s = shown.get(&u.unit).cloned().unwrap_or_default();
                let (state, last_exit) = match (&u.error, u.held, &u.retry) {
                    (Some(e), _, _) => ("failed", Some(e.clone())),
                    (None, true, _) => ("held", None),
                    (None, false, Some(r)) => ("backoff", Some(r.reason.clone())),
                    (None, false, None) => state_of(&s),
                };
                ServiceState {
                    name: u.spec.name.clone(),
                    module: u.spec.module.clone(),
                    state: state.to_string(),
                    restarts: s.restarts,
                    pid: (s.pid > 0).then_some(s.pid),
                    last_exit,
                }
            })
            .collect()
    }

    fn stop_all(&self, budget: Duration, kill: bool) -> StopFuture<'_> {
        let order: Vec<(String, String, Duration)> = {
            let mut inner = self.lock();
            inner.held = true;
            inner
                .units
                .iter()
                .rev()
                .map(|u| (u.spec.name.clone(), u.unit.clone(), u.spec.stop_timeout))
                .collect()
        };
        Box::pin(async move {
            let deadline = Instant::now() + budget;
            let mut report = StopReport::default();
            for (name, unit, stop_timeout) in order {
                let left = deadline.saturating_duration_since(Instant::now());
                let grace = if kill { stop_timeout.min(left) } else { left }.max(MIN_GRACE);
                record(&mut report, &name, self.stop_unit(&unit, grace, kill).await);
            }
            report
        })
    }

    fn start_all(&self) -> Vec<String> {
        let units: Vec<Unit> = {
            let mut inner = self.lock();
            inner.held = false;
            for u in inner.units.iter_mut() {
                u.held = false;
            }
            inner.units.clone()
        };
        let names: Vec<String> = units.iter().map(|u| u.unit.clone()).collect();
        let shown = self.show(&names);
        let mut started = Vec::new();
        let mut to_start = Vec::new();
        for u in units.iter().filter(|u| u.error.is_none()) {
            let s = shown.get(&u.unit).cloned().unwrap_or_default();
            let (state, _) = state_of(&s);
            if state == "stopping" {
                // An abandoned drain stop never ends (TimeoutStopSec=infinity): end
                // it, as the agent's own supervisor does, so the start can run.
                if let Err(e) = self.systemctl(&["kill", "--signal=SIGKILL", &u.unit]) {
                    tracing::warn!(unit = %u.unit, error = %crate::error_chain(&e), "systemctl kill failed");
                }
            }
            if matches!(state, "stopping" | "stopped") || u.retry.is_some() {
                to_start.push(u.unit.clone());
                started.push(u.spec.name.clone());
            }
        }
        self.start_after_reload(&to_start);
        started
    }

    fn output(&self, lines: usize) -> BTreeMap<String, Vec<String>> {
        let units: Vec<Unit> = self.lock().units.clone();
        let n = lines.to_string();
        units
            .iter()
            .map(|u| {
                let text = checked(
                    &*self.runner,
                    "journalctl",
                    &args(&["-u", &u.unit, "-n", &n, "-o", "cat", "--no-pager"]),
                )
                .map(|o| o.stdout)
                .unwrap_or_else(|e| format!("(journalctl: {})", crate::error_chain(&e)));
                (
                    u.spec.name.clone(),
                    text.lines().map(str::to_string).collect(),
                )
            })
            .collect()
    }

    fn add(&self, specs: Vec<ServiceSpec>) {
        let held = self.lock().held;
        let mut added = Vec::new();
        let mut wrote = false;
        for spec in specs {
            let (unit, owned) = match &spec.unit {
                Some(u) => (u.clone(), false),
                None => (unit_name(&spec.module, &spec.name), true),
            };
            let mut error = None;
            if owned {
                let written = unit_text(&spec).and_then(|text| {
                    let path = self.unit_path(&unit);
                    write_unit(&path, &text).map_err(|source| SystemdError::Write { path, source })
                });
                match written {
                    Ok(()) => wrote = true,
                    Err(e) => {
                        tracing::error!(service = %spec.name, %unit, error = %crate::error_chain(&e), "unit not written");
                        error = Some(crate::error_chain(&e));
                    }
                }
            }
            added.push(Unit {
                spec,
                unit,
                owned,
                held,
                error,
                retry: None,
            });
        }
        for u in &added {
            tracing::info!(service = %u.spec.name, module = %u.spec.module, unit = %u.unit, held, "service declared as a systemd unit");
        }
        let written: Vec<String> = added
            .iter()
            .filter(|u| u.owned && u.error.is_none())
            .map(|u| u.unit.clone())
            .collect();
        let mut to_start: Vec<String> = added
            .iter()
            .filter(|u| u.error.is_none() && !held)
            .map(|u| u.unit.clone())
            .collect();
        self.lock().units.extend(added);
        if wrote {
            if let Err(e) = self.daemon_reload() {
                self.lock().reload_pending = e.transient();
                to_start.retain(|u| !written.contains(u));
                self.settle(&written, "daemon-reload", Err(e));
            }
        }
        self.start_units(&to_start);
    }

    fn remove_module<'a>(&'a self, module: &'a str) -> StopFuture<'a> {
        Box::pin(async move {
            let going: Vec<Unit> = self
                .lock()
                .units
                .iter()
                .filter(|u| u.spec.module == module)
                .cloned()
                .collect();
            let mut report = StopReport::default();
            for u in going.iter().rev() {
                let outcome = if u.error.is_some() {
                    StopOutcome::Stopped
                } else {
                    self.stop_unit(&u.unit, u.spec.stop_timeout.max(MIN_GRACE), true)
                        .await
                };
                record(&mut report, &u.spec.name, outcome);
            }
            let mut removed = false;
            for u in going.iter().filter(|u| u.owned) {
                match std::fs::remove_file(self.unit_path(&u.unit)) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(unit = %u.unit, error = %e, "removing the unit file failed")
                    }
                }
            }
            if removed {
                if let Err(e) = self.daemon_reload() {
                    tracing::warn!(error = %crate::error_chain(&e), "systemctl daemon-reload failed");
                }
                // A unit that had failed stays `failed` (not-found) in systemd's memory
                // after its file goes, and the node stays `degraded` for good.
                let units: Vec<&str> = going
                    .iter()
                    .filter(|u| u.owned)
                    .map(|u| u.unit.as_str())
                    .collect();
                let mut args = vec!["reset-failed"];
                args.extend(units);
                if let Err(e) = self.systemctl(&args) {
                    tracing::warn!(error = %crate::error_chain(&e), "systemctl reset-failed failed");
                }
            }
            self.lock().units.retain(|u| u.spec.module != module);
            report
        })
    }

    fn module_services(&self, module: &str) -> Vec<String> {
        self.lock()
            .units
            .iter()
            .filter(|u| u.spec.module == module)
            .map(|u| u.spec.name.clone())
            .collect()
    }
}

/// Writes a unit file whole (temp file, then rename): systemd never reads half.
fn write_unit(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("service.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::super::fake::{ok, Recorder};
    use super::super::CmdOutput;
    use super::*;

    fn spec(name: &str, module: &str, argv: &[&str]) -> ServiceSpec {
        ServiceSpec::new(name, module, argv.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn unit_names_are_sanitized_and_bounded() {
        assert_eq!(unit_name("web", "api"), "powernode-web-api.service");
        assert_eq!(unit_name("", "cli"), "powernode-cli.service");
        assert_eq!(unit_name("a b", "x/y"), "powernode-a_b-x_y.service");
        assert_eq!(unit_name("m", &"x".repeat(400)).len(), 255);
    }

    #[test]
    fn the_unit_text_quotes_argv_and_maps_the_policy() {
        let mut s = spec(
            "api",
            "web",
            &["/opt/web/bin/server", "--greet", "it's \"100%\" $HOME\\"],
        );
        s.env = vec![("A".into(), "1 2".into()), ("P".into(), "50%$x".into())];
        s.cwd = Some("/opt/web".into());
        s.restart = RestartPolicy::Always;
        assert_eq!(
            unit_text(&s).unwrap(),
            "# Written by the powernode agent; removed with its module.\n\
             [Unit]\n\
             Description=Powernode module web: api\n\
             StartLimitIntervalSec=0\n\
             \n\
             [Service]\n\
             Type=simple\n\
             ExecStart=\"/opt/web/bin/server\" \"--greet\" \"it's \\\"100%%\\\" $$HOME\\\\\"\n\
             Environment=\"A=1 2\"\n\
             Environment=\"P=50%%$x\"\n\
             WorkingDirectory=/opt/web\n\
             Restart=always\n\
             RestartSec=1\n\
             TimeoutStopSec=infinity\n\
             KillMode=control-group\n"
        );
        s.restart = RestartPolicy::Never;
        assert!(unit_text(&s).unwrap().contains("Restart=no\n"));
        s.restart = RestartPolicy::OnFailure;
        assert!(unit_text(&s).unwrap().contains("Restart=on-failure\n"));
        assert!(unit_text(&spec("e", "m", &[])).is_err());
        let mut nl = spec("x", "m", &["/bin/true"]);
        nl.cwd = Some("/a\nb".into());
        assert!(unit_text(&nl).is_err());
    }

    fn show_block(id: &str, active: &str, sub: &str, pid: u32) -> String {
        format!(
            "Id={id}\nLoadState=loaded\nActiveState={active}\nSubState={sub}\nMainPID={pid}\n\
             NRestarts=2\nExecMainCode=1\nExecMainStatus=0\n"
        )
    }

    #[test]
    fn show_output_maps_to_service_states() {
        let text = [
            show_block("a.service", "active", "running", 10),
            show_block("b.service", "activating", "auto-restart", 0),
            show_block("c.service", "deactivating", "stop-sigterm", 11),
            show_block("d.service", "failed", "failed", 0),
            show_block("e.service", "inactive", "dead", 0),
        ]
        .join("\n");
        let shown = parse_show(&text);
        let states: Vec<&str> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|u| state_of(&shown[&format!("{u}.service")]).0)
            .collect();
        assert_eq!(
            states,
            ["running", "backoff", "stopping", "failed", "stopped"]
        );
        assert_eq!(shown["a.service"].pid, 10);
        assert_eq!(state_of(&shown["d.service"]).1.as_deref(), Some("exit 0"));
        let missing = parse_show("Id=x.service\nLoadState=not-found\nActiveState=inactive\n");
        assert_eq!(state_of(&missing["x.service"]).0, "failed");
    }

    /// A fake systemd that tracks which units are active: `start` activates,
    /// `stop` deactivates unless the unit is in `stubborn`, `kill` ends it.
    fn fake_systemd(stubborn: &[&str]) -> Arc<Recorder> {
        let r = Arc::new(Recorder::default());
        let active: Arc<Mutex<BTreeMap<String, &'static str>>> = Default::default();
        let stubborn: Vec<String> = stubborn.iter().map(|s| s.to_string()).collect();
        r.answer_with(move |line| {
            let words: Vec<&str> = line.split(' ').collect();
            let mut a = active.lock().unwrap();
            match words.get(1).copied() {
                Some("start") => {
                    for u in &words[3..] {
                        a.insert(u.to_string(), "active");
                    }
                }
                Some("stop") => {
                    let u = words[3].to_string();
                    let s = if stubborn.contains(&u) {
                        "deactivating"
                    } else {
                        "inactive"
                    };
                    a.insert(u, s);
                }
                Some("kill") => {
                    a.insert(words[3].to_string(), "inactive");
                }
                Some("show") => {
                    let blocks: Vec<String> = words[4..]
                        .iter()
                        .map(|u| {
                            let st = a.get(*u).copied().unwrap_or("inactive");
                            show_block(u, st, "x", if st == "inactive" { 0 } else { 42 })
                        })
                        .collect();
                    return Some(ok(&blocks.join("\n")));
                }
                _ => {}
            }
            None
        });
        r
    }

    fn non_show(r: &Recorder) -> Vec<String> {
        r.calls()
            .into_iter()
            .filter(|c| !c.starts_with("systemctl show"))
            .collect()
    }

    #[tokio::test]
    async fn services_become_units_started_then_stopped_in_reverse_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = fake_systemd(&[]);
        let sup = SystemdSupervisor::new(r.clone(), dir.path()).with_poll(Duration::from_millis(5));
        let mut docker = spec("docker", "web", &[]);
        docker.unit = Some("docker.service".into());
        sup.add(vec![spec("api", "web", &["/bin/sleep", "100"]), docker]);
        let text = std::fs::read_to_string(dir.path().join("powernode-web-api.service")).unwrap();
        assert!(
            text.contains("ExecStart=\"/bin/sleep\" \"100\"\n"),
            "{text}"
        );
        assert!(!dir.path().join("docker.service").exists(), "never written");
        assert_eq!(
            non_show(&r),
            [
                "systemctl daemon-reload",
                "systemctl start --no-block powernode-web-api.service docker.service",
            ]
        );
        let s = sup.services();
        assert_eq!(
            s.iter()
                .map(|s| (s.name.as_str(), s.state.as_str(), s.pid))
                .collect::<Vec<_>>(),
            [
                ("api", "running", Some(42)),
                ("docker", "running", Some(42))
            ]
        );
        assert_eq!(sup.module_services("web"), ["api", "docker"]);
        r.calls.lock().unwrap().clear();
        let report = sup.stop_all(Duration::from_secs(5), false).await;
        assert_eq!(report.stopped, ["docker", "api"]);
        assert_eq!(
            non_show(&r),
            [
                "systemctl stop --no-block docker.service",
                "systemctl stop --no-block powernode-web-api.service",
            ]
        );
        // Held: a service added now is declared, not started, until start_all.
        r.calls.lock().unwrap().clear();
        sup.add(vec![spec("late", "other", &["/bin/true"])]);
        assert_eq!(non_show(&r), ["systemctl daemon-reload"]);
        assert_eq!(sup.services()[2].state, "held");
        assert_eq!(sup.start_all(), ["api", "docker", "late"]);
        assert_eq!(
            non_show(&r).last().unwrap(),
            "systemctl start --no-block powernode-web-api.service docker.service powernode-other-late.service"
        );
        r.calls.lock().unwrap().clear();
        let report = sup.remove_module("web").await;
        assert_eq!(report.stopped, ["docker", "api"]);
        assert!(!dir.path().join("powernode-web-api.service").exists());
        assert_eq!(
            non_show(&r),
            [
                "systemctl stop --no-block docker.service",
                "systemctl stop --no-block powernode-web-api.service",
                "systemctl daemon-reload",
                // A failed unit would otherwise keep the node degraded after removal;
                // the adopted docker.service is not ours to reset.
                "systemctl reset-failed powernode-web-api.service",
            ]
        );
        assert_eq!(sup.module_services("web"), Vec::<String>::new());
        assert_eq!(sup.module_services("other"), ["late"]);
    }

    #[tokio::test]
    async fn a_drain_leaves_a_stubborn_unit_stuck_and_a_reboot_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = fake_systemd(&["powernode-m-stubborn.service"]);
        let sup = SystemdSupervisor::new(r.clone(), dir.path()).with_poll(Duration::from_millis(5));
        sup.add(vec![
            spec("polite", "m", &["/bin/true"]),
            spec("stubborn", "m", &["/bin/true"]),
        ]);
        let report = sup.stop_all(Duration::from_millis(600), false).await;
        assert_eq!(report.stuck, ["stubborn"]);
        assert_eq!(report.stopped, ["polite"]);
        assert_eq!(sup.services()[1].state, "stopping");
        assert!(
            !r.calls().iter().any(|c| c.contains("kill")),
            "a drain never kills"
        );
        // A cancelled drain: the stuck stop is ended, then both start again.
        r.calls.lock().unwrap().clear();
        assert_eq!(sup.start_all(), ["polite", "stubborn"]);
        assert_eq!(
            non_show(&r),
            [
                "systemctl kill --signal=SIGKILL powernode-m-stubborn.service",
                "systemctl start --no-block powernode-m-polite.service powernode-m-stubborn.service",
            ]
        );
        // A reboot's stop kills what outlives its time.
        r.calls.lock().unwrap().clear();
        let report = sup.stop_all(Duration::from_millis(600), true).await;
        assert_eq!(
            (report.killed.as_slice(), report.stopped.as_slice()),
            (&["stubborn".to_string()][..], &["polite".to_string()][..])
        );
        assert!(non_show(&r)
            .contains(&"systemctl kill --signal=SIGKILL powernode-m-stubborn.service".to_string()));
    }

    #[test]
    fn a_failing_systemctl_marks_the_services_failed_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(Recorder::default());
        r.answer_with(|line| {
            line.starts_with("systemctl start").then(|| CmdOutput {
                success: false,
                stdout: String::new(),
                stderr: "Unit docker.service not found.".into(),
            })
        });
        let sup = SystemdSupervisor::new(r.clone(), dir.path());
        let mut docker = spec("docker", "web", &[]);
        docker.unit = Some("docker.service".into());
        sup.add(vec![docker, spec("bad", "web", &[])]);
        let s = sup.services();
        assert_eq!(s[0].state, "failed");
        assert!(
            s[0].last_exit.as_deref().unwrap().contains("not found"),
            "{s:?}"
        );
        assert_eq!(s[1].state, "failed");
        assert!(
            s[1].last_exit.as_deref().unwrap().contains("empty command"),
            "{s:?}"
        );
    }

    #[test]
    fn a_start_systemctl_did_not_answer_is_retried_with_backoff_until_it_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(Recorder::default());
        // The first reload and the first start time out (systemd busy at boot).
        r.answer_with(|line| {
            line.starts_with("systemctl show").then(|| {
                ok(&show_block(
                    "powernode-web-api.service",
                    "active",
                    "running",
                    7,
                ))
            })
        });
        let timeouts = Arc::new(TimeoutOnce {
            inner: r.clone(),
            left: Mutex::new(vec!["systemctl daemon-reload", "systemctl start"]),
        });
        let sup = SystemdSupervisor::new(timeouts, dir.path());
        sup.add(vec![spec("api", "web", &["/bin/api"])]);
        let s = sup.services();
        assert_eq!(s[0].state, "backoff", "{s:?}");
        assert!(
            s[0].last_exit
                .as_deref()
                .unwrap()
                .contains("did not answer"),
            "{s:?}"
        );
        // Not before the backoff is over.
        assert!(!non_show(&r)
            .iter()
            .any(|c| c.starts_with("systemctl start")));
        std::thread::sleep(RETRY_FIRST + Duration::from_millis(50));
        // Reloaded and started: the start times out once more, backs off again.
        let s = sup.services();
        assert_eq!(s[0].state, "backoff", "{s:?}");
        std::thread::sleep(RETRY_FIRST * 2 + Duration::from_millis(50));
        let s = sup.services();
        assert_eq!(s[0].state, "running", "{s:?}");
        // (The timed-out calls never reached systemd.)
        assert_eq!(
            non_show(&r),
            [
                "systemctl daemon-reload",
                "systemctl start --no-block powernode-web-api.service",
            ]
        );
        assert!(sup.lock().units[0].retry.is_none());
    }

    /// Answers with a timeout for the first call starting with each prefix.
    struct TimeoutOnce {
        inner: Arc<Recorder>,
        left: Mutex<Vec<&'static str>>,
    }

    impl super::super::Systemctl for TimeoutOnce {
        fn run(&self, program: &str, args: &[String]) -> Result<CmdOutput, SystemdError> {
            let line = format!("{program} {}", args.join(" "));
            let mut left = self.left.lock().unwrap();
            if let Some(i) = left.iter().position(|p| line.starts_with(p)) {
                left.remove(i);
                return Err(SystemdError::Timeout {
                    program: program.into(),
                    timeout: Duration::from_secs(15),
                });
            }
            drop(left);
            self.inner.run(program, args)
        }
    }

    #[test]
    fn output_is_each_units_journal() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(Recorder::default());
        r.answer_with(|line| line.starts_with("journalctl").then(|| ok("one\ntwo\n")));
        let sup = SystemdSupervisor::new(r.clone(), dir.path());
        sup.add(vec![spec("api", "web", &["/bin/true"])]);
        let out = sup.output(5);
        assert_eq!(out["api"], ["one", "two"]);
        assert!(r.calls().contains(
            &"journalctl -u powernode-web-api.service -n 5 -o cat --no-pager".to_string()
        ));
    }

    /// systemd itself parses the unit: no warning about it, and its dump shows the
    /// argv and environment as meant (`$$` is shown before its exec-time `$`).
    #[test]
    #[ignore = "needs systemd-analyze (systemd 252, as in the Debian root)"]
    fn systemd_analyze_reads_the_unit_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(
            "api",
            "web",
            &[
                "/bin/echo",
                "a b",
                "$HOME",
                "100%",
                "q\"q",
                "back\\slash",
                "tab\tx",
            ],
        );
        s.env = vec![("P".into(), "50%$x".into())];
        s.cwd = Some(dir.path().to_path_buf());
        let path = dir.path().join(unit_name("web", "api"));
        std::fs::write(&path, unit_text(&s).unwrap()).unwrap();
        let verify = |level: &str| {
            let out = std::process::Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(&path)
                .env("SYSTEMD_LOG_LEVEL", level)
                .output()
                .expect("systemd-analyze");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout)
        };
        // Warnings name the file; there must be none about ours.
        let warnings = verify("warning");
        let mine: Vec<&str> = warnings
            .lines()
            .filter(|l| l.contains(&*path.to_string_lossy()))
            .collect();
        assert!(mine.is_empty(), "systemd complained: {mine:?}");
        // The debug log dumps the unit as loaded.
        let text = verify("debug");
        assert!(
            text.contains(
                r#"Command Line: /bin/echo "a b" "\$\$HOME" 100% "q\"q" "back\\slash" "tab\tx""#
            ),
            "{text}"
        );
        assert!(text.contains("Environment: P=50%$x"), "{text}");
        assert!(text.contains("TimeoutStopSec: infinity"), "{text}");
    }
}
