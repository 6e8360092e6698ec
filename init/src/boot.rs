//! The boot as a list of named phases. Each phase is a plain function over [`Boot`];
//! a failing phase is reported (console JSON + log) and the failure policy decides:
//! power off, reboot, or retry the same phase with backoff. Phases are idempotent
//! (an existing mount is `EBUSY`, a loaded module `EEXIST`), so a retry is safe.
//!
//! Console lines starting `POWERNODE-INIT ` carry one JSON object each: the
//! structured channel that VM tests and the benchmark read (the timeline uses the
//! wire types of `powernode_proto::node`, the same the agent sends upstream).

use powernode_agent::identity::cloud::CloudIdentity;
use powernode_proto::node::{Phase, TimelineEntry};
use powernode_proto::ErrorCode;
use serde_json::{json, Value};

use crate::agent::{AgentDriver, AgentEnd, BootstrapError, BootstrapInput};
use crate::cloud;
use crate::cmdline::{self, Options};
use crate::console::EVENT_PREFIX;
use crate::failure::{self, Outcome};
use crate::identity::{self, Found, IdentityProbeError};
use crate::layout::{PERSIST_MOUNT, PERSIST_STATE_DIR, RUN_STATE_DIR};
use crate::modules::{self, LoadReport, ModuleError};
use crate::mounts::{self, MountError, EARLY_MOUNTS};
use crate::net::{self, Configured, NetError};
use crate::root_init::{self, RootInit, RootInitError};
use crate::switch_root::{self, SwitchRootError};
use crate::sys::{Errno, RebootKind, Sys};

const CMDLINE_PATH: &str = "/proc/cmdline";
/// This init's own binary, copied for agent mode.
const SELF_EXE: &str = "/proc/self/exe";
/// Unlimited userspace writes to `/dev/kmsg` (the default rate limit drops lines).
const PRINTK_DEVKMSG: &str = "/proc/sys/kernel/printk_devkmsg";

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot read {CMDLINE_PATH}")]
    Cmdline(#[source] Errno),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Identity(#[from] IdentityProbeError),
    #[error("no identity: not on the command line (powernode.identity=), not in fw_cfg, not from cloud metadata")]
    IdentityMissing,
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    SwitchRoot(#[from] SwitchRootError),
    #[error("preparing the test root")]
    TestRoot(#[source] Errno),
    /// Leaving what agent mode needs before switch_root.
    #[error("hand-off to the composed root: {step} {path}")]
    HandOff {
        step: &'static str,
        path: String,
        #[source]
        errno: Errno,
    },
    #[error(
        "powernode.persist={0:?} is neither a block device path /dev/NAME nor LABEL=NAME \
         (an ext4 label: 1-16 of A-Z a-z 0-9 _ . -)"
    )]
    PersistSpec(String),
    /// More than one disk carries the label: taking either could mount the wrong one.
    #[error("the /persist label {label:?} (powernode.persist=) is on more than one disk: {}", devices.join(", "))]
    PersistAmbiguous { label: String, devices: Vec<String> },
    /// The named disk is not there (not attached, or its driver found no device).
    #[error("the /persist disk {device} (powernode.persist=) is not present")]
    PersistMissing {
        device: String,
        #[source]
        errno: Errno,
    },
    #[error("preparing the agent state directory {path}")]
    StateDir {
        path: String,
        #[source]
        errno: Errno,
    },
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("the agent failed: {message}")]
    Agent { code: ErrorCode, message: String },
    /// A file of the composed root could not be read in full before switch_root.
    /// `EIO` under `verity=require` is the kernel refusing a block whose content
    /// does not match the object's fs-verity digest.
    #[error("reading {path} in the composed root{}{}",
        if *verity { " (fs-verity required)" } else { "" },
        repaired_note(moved))]
    RootRead {
        path: String,
        verity: bool,
        /// Corrupt objects moved out of the store (fetched again next boot).
        moved: Vec<String>,
        #[source]
        errno: Errno,
    },
    #[error(transparent)]
    RootInit(#[from] RootInitError),
}

impl PhaseError {
    /// The stable reason code reported upstream.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Identity(_) => ErrorCode::IdentityInvalid,
            Self::IdentityMissing => ErrorCode::IdentityMissing,
            Self::Network(_) => ErrorCode::Network,
            Self::Bootstrap(e) => e.code(),
            Self::Agent { code, .. } => *code,
            Self::RootInit(e) => e.code(),
            Self::RootRead {
                verity: true,
                errno: Errno::IO,
                ..
            } => ErrorCode::VerityMismatch,
            Self::RootRead { .. }
            | Self::Mount(_)
            | Self::StateDir { .. }
            | Self::PersistSpec(_)
            | Self::PersistAmbiguous { .. }
            | Self::PersistMissing { .. }
            | Self::Cmdline(_)
            | Self::Modules(_)
            | Self::SwitchRoot(_)
            | Self::TestRoot(_)
            | Self::HandOff { .. } => ErrorCode::Internal,
        }
    }

    /// What the operator can do about it, where the init knows.
    pub fn recovery(&self) -> Option<String> {
        match self {
            Self::RootInit(e) => e.recovery(),
            _ => None,
        }
    }

    /// The control plane refused this node for good: no later attempt, under any
    /// policy, can succeed with this boot's identity.
    pub fn refused_for_good(&self) -> bool {
        matches!(self, Self::Bootstrap(e) if e.refused_for_good())
    }

    /// Whether a later attempt may succeed on its own (the network comes up, the
    /// control plane comes back). Others (a bad identity, a missing module) apply
    /// the failure policy at once, except `retry` which retries all but a refusal
    /// for good.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Network(_)
            | Self::Agent { .. }
            | Self::StateDir { .. }
            | Self::PersistMissing { .. } => true,
            Self::Bootstrap(e) => e.retryable(),
            _ => false,
        }
    }

    /// The message with its whole cause chain, for the console and upstream.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

/// One named phase; `marks` is the timeline phase reached when it succeeds.
pub struct NamedPhase {
    pub name: &'static str,
    pub marks: Option<Phase>,
    pub run: fn(&mut Boot<'_>) -> Result<(), PhaseError>,
}

impl std::fmt::Debug for NamedPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedPhase")
            .field("name", &self.name)
            .field("marks", &self.marks)
            .finish()
    }
}

/// The boot, in order.
pub const PHASES: &[NamedPhase] = &[
    NamedPhase {
        name: "early_mounts",
        marks: None,
        run: early_mounts,
    },
    NamedPhase {
        name: "cmdline",
        marks: None,
        run: read_cmdline,
    },
    NamedPhase {
        name: "modules",
        marks: Some(Phase::ModulesLoaded),
        run: load_modules,
    },
    NamedPhase {
        name: "identity",
        // Marks `identity_found` itself: a cloud identity is only found after DHCP.
        marks: None,
        run: find_identity,
    },
    NamedPhase {
        name: "network",
        marks: Some(Phase::NetworkUp),
        run: bring_up_network,
    },
    NamedPhase {
        name: "cloud_identity",
        marks: None,
        run: find_cloud_identity,
    },
    NamedPhase {
        name: "bootstrap",
        // Marks `enrolled` itself, with the agent's timestamp, only when it enrolled.
        marks: None,
        run: bootstrap,
    },
];

/// Boot state shared by the phases.
pub struct Boot<'a> {
    pub sys: &'a mut dyn Sys,
    pub options: Options,
    pub cmdline: String,
    pub timeline: Vec<TimelineEntry>,
    pub modules: LoadReport,
    pub identity: Option<Found>,
    pub network: Option<Configured>,
    /// The agent library; `None` keeps `bootstrap` identity-only (unit tests of
    /// the other phases).
    pub agent: Option<&'a mut dyn AgentDriver>,
    /// Where the agent keeps its key, certificate and identity.
    pub state_dir: Option<String>,
    /// Set once enrollment and the first handshake succeeded.
    pub enrolled: bool,
}

impl std::fmt::Debug for Boot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boot")
            .field("options", &self.options)
            .field("timeline", &self.timeline)
            .finish_non_exhaustive()
    }
}

impl<'a> Boot<'a> {
    pub fn new(sys: &'a mut dyn Sys) -> Self {
        Self {
            sys,
            options: Options::default(),
            cmdline: String::new(),
            timeline: Vec::new(),
            modules: LoadReport::default(),
            identity: None,
            network: None,
            agent: None,
            state_dir: None,
            enrolled: false,
        }
    }

    /// The same boot with the agent library wired into `bootstrap` and the hand-off.
    pub fn with_agent(mut self, agent: &'a mut dyn AgentDriver) -> Self {
        self.agent = Some(agent);
        self
    }

    /// Records `phase` now (first time only) and returns its timestamp.
    pub fn mark(&mut self, phase: Phase) -> u64 {
        if let Some(e) = self.timeline.iter().find(|e| e.phase == phase) {
            return e.at_ms;
        }
        let at_ms = self.sys.boot_ms();
        self.timeline.push(TimelineEntry { phase, at_ms });
        at_ms
    }

    /// Writes one structured line to the console.
    pub fn event(&mut self, mut fields: Value) {
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("at_ms".into(), json!(self.sys.boot_ms()));
        }
        self.sys.console(&format!("{EVENT_PREFIX}{fields}"));
    }

    /// Runs every phase, then finishes. Returns only when the boot is over (reset
    /// requested or failed, or nothing left to do).
    pub fn run(mut self) -> Outcome {
        self.timeline.push(TimelineEntry {
            phase: Phase::KernelStart,
            at_ms: 0,
        });
        self.mark(Phase::InitStart);
        for phase in PHASES {
            let mut attempt: u32 = 0;
            loop {
                attempt = attempt.saturating_add(1);
                match (phase.run)(&mut self) {
                    Ok(()) => break,
                    Err(error) => {
                        if let Some(outcome) = self.failed(phase.name, &error, attempt) {
                            return outcome;
                        }
                    }
                }
            }
            if let Some(mark) = phase.marks {
                self.mark(mark);
            }
        }
        self.finish()
    }

    /// Reports a failed phase (console, log, upstream when the node has
    /// credentials) and applies the policy; `None` means "retry now".
    fn failed(&mut self, name: &str, error: &PhaseError, attempt: u32) -> Option<Outcome> {
        let policy = self.options.on_failure;
        log::error!("phase {name} failed (attempt {attempt}): {}", error.chain());
        let failure = powernode_proto::node::FailureReport {
            phase: upstream_phase(name),
            code: error.code(),
            message: format!("{name}: {}", error.chain()),
            attempt,
            recovery: error.recovery(),
        };
        let timeline = self.timeline.clone();
        let reported = match self.agent.as_deref_mut() {
            Some(agent) => agent.report_failure(&timeline, failure),
            None => false,
        };
        // A node refused for good (decommissioned, its token spent) powers off under
        // every policy, as when the agent is refused later: retrying or rebooting
        // would only knock again with the same identity.
        let refused = error.refused_for_good();
        let will_retry = !refused
            && (policy == cmdline::FailurePolicy::Retry
                || (error.retryable() && attempt < self.options.attempts));
        self.event(json!({
            "event": "phase_failed",
            "phase": name,
            "code": error.code(),
            "error": error.chain(),
            "recovery": error.recovery(),
            "attempt": attempt,
            "on_failure": policy.as_str(),
            "retrying": will_retry,
            "refused_for_good": refused,
            "reported_upstream": reported,
        }));
        if refused {
            log::warn!("the control plane refused this node for good; powering off");
            return Some(failure::reset(self.sys, RebootKind::PowerOff));
        }
        if will_retry && policy != cmdline::FailurePolicy::Retry {
            let delay = failure::backoff(attempt);
            log::warn!(
                "retrying phase {name} in {} s (attempt {attempt} of {})",
                delay.as_secs(),
                self.options.attempts
            );
            self.sys.sleep(delay);
            return None;
        }
        match policy {
            cmdline::FailurePolicy::Poweroff => {
                Some(failure::reset(self.sys, RebootKind::PowerOff))
            }
            cmdline::FailurePolicy::Reboot => Some(failure::reset(self.sys, RebootKind::Restart)),
            cmdline::FailurePolicy::Retry => {
                let delay = failure::backoff(attempt);
                log::warn!("retrying phase {name} in {} s", delay.as_secs());
                self.sys.sleep(delay);
                None
            }
        }
    }

    fn finish(&mut self) -> Outcome {
        let timeline = self.timeline.clone();
        self.event(json!({
            "event": "init_done",
            "timeline": timeline,
            "modules_loaded": self.modules.loaded,
            "modules_already_loaded": self.modules.already,
            "modules_no_device": self.modules.no_device,
            "modules_unsupported": self.modules.unsupported,
            "modalias_scan": {"ms": self.modules.scan_ms, "devices": self.modules.scanned},
            "module_ms": self.modules.ms.iter().map(|(n, ms)| json!([n, ms])).collect::<Vec<_>>(),
        }));
        if self.options.test_poweroff {
            log::info!("powernode.test_poweroff=1: powering off");
            return failure::reset(self.sys, RebootKind::PowerOff);
        }
        if !self.enrolled {
            log::info!("boot phases done; no agent to hand off to");
            return Outcome::Idle;
        }
        match self.compose_root() {
            Ok(root) => self.hand_off(root),
            Err(outcome) => outcome,
        }
    }

    /// Root modules from the desired set, composed at [`COMPOSED_ROOT`]: then the
    /// hand-off is a switch_root into it, with a copy of this init (in `/run`, which
    /// moves along) run there in agent mode. No root modules: the initramfs stays.
    /// A failure (signature, digest, registry, a corrupt file, the hand-off files)
    /// goes upstream with its code and the policy applies; a retry starts again from
    /// nothing mounted. The node never switches to an unverified root.
    fn compose_root(&mut self) -> Result<ComposedRoot, Outcome> {
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            match self.try_compose_root() {
                Ok(root) => return Ok(root),
                Err(error) => {
                    if let Some(outcome) = self.failed("switch_root", &error, attempt) {
                        return Err(outcome);
                    }
                    if let Some(agent) = self.agent.as_deref_mut() {
                        agent.undo_compose();
                    }
                }
            }
        }
    }

    fn try_compose_root(&mut self) -> Result<ComposedRoot, PhaseError> {
        let Some(agent) = self.agent.as_deref_mut() else {
            return Ok(ComposedRoot::Initramfs);
        };
        let modules = match agent.compose_root(COMPOSED_ROOT) {
            Ok(None) => return Ok(ComposedRoot::Initramfs),
            Ok(Some(m)) => m,
            Err(e) => {
                return Err(PhaseError::Agent {
                    code: e.code,
                    message: e.message,
                })
            }
        };
        let mut facts = agent.root_facts();
        let verity = facts.as_ref().is_some_and(|f| f.verity == "require");
        let checked = match check_root(self.sys, COMPOSED_ROOT, verity) {
            Ok(c) => c,
            Err(mut error) => {
                // The kernel refused a block: find the corrupt objects and move them
                // out of the store, so the next attempt (or boot) fetches them again.
                if error.code() == ErrorCode::VerityMismatch {
                    if let PhaseError::RootRead { moved, .. } = &mut error {
                        match agent.repair_root() {
                            Ok(m) => *moved = m,
                            Err(e) => log::error!("scrubbing the store failed: {}", e.message),
                        }
                    }
                }
                return Err(error);
            }
        };
        let init = root_init::inspect(self.sys, COMPOSED_ROOT)?;
        self.mark(Phase::RootMounted);
        if let Some(f) = facts.as_mut() {
            f.init = init.name().to_string();
            if let Some(c) = f.compose.as_mut() {
                c.checked = checked;
            }
        }
        self.event(json!({"event": "root_composed", "root": facts}));
        self.prepare_agent_mode(&modules, facts.as_ref())?;
        let bin = crate::agent::AGENT_MODE_BIN;
        match init {
            RootInit::Agent => {
                let state_dir = self.state_dir.clone().unwrap_or_default();
                Ok(ComposedRoot::Mounted {
                    path: COMPOSED_ROOT.into(),
                    init: bin.into(),
                    args: vec![crate::agent::AGENT_MODE.into(), state_dir],
                })
            }
            RootInit::Systemd { path } => {
                let state_dir = self.state_dir.clone().unwrap_or_default();
                root_init::install_agent_unit(self.sys, bin, &state_dir).map_err(
                    |(path, errno)| PhaseError::HandOff {
                        step: "writing the agent's unit",
                        path,
                        errno,
                    },
                )?;
                log::info!(
                    "the composed root's init is systemd ({path}): the agent runs as {}",
                    root_init::AGENT_UNIT
                );
                // Exec'd by its resolved path: Debian's `/sbin/init` is an absolute
                // link, which the switch's checks (made before the chroot) would
                // resolve against the initramfs.
                Ok(ComposedRoot::Mounted {
                    path: COMPOSED_ROOT.into(),
                    init: path,
                    args: Vec::new(),
                })
            }
        }
    }

    /// Copies this init to [`crate::agent::AGENT_MODE_BIN`] and leaves the timeline
    /// and root module digests for agent mode in the state directory.
    fn prepare_agent_mode(
        &mut self,
        modules: &[powernode_proto::node::RunningModule],
        facts: Option<&powernode_proto::node::RootFacts>,
    ) -> Result<(), PhaseError> {
        let handoff_err = |step: &'static str, path: &str| {
            let path = path.to_string();
            move |errno| PhaseError::HandOff { step, path, errno }
        };
        let state_dir = self
            .state_dir
            .clone()
            .ok_or_else(|| handoff_err("finding the state directory", "(none)")(Errno::NOENT))?;
        ok_if_exists(self.sys.mkdir(RUN_STATE_DIR, 0o700))
            .map_err(handoff_err("creating", RUN_STATE_DIR))?;
        self.sys
            .copy_file(SELF_EXE, crate::agent::AGENT_MODE_BIN, 0o755)
            .map_err(handoff_err(
                "copying the init to",
                crate::agent::AGENT_MODE_BIN,
            ))?;
        let handoff = crate::agent::Handoff {
            timeline: self.timeline.clone(),
            root_modules: modules.to_vec(),
            root_facts: facts.cloned(),
            root_images: self
                .agent
                .as_deref()
                .map(|a| a.root_images())
                .unwrap_or_default(),
        };
        let path = format!("{state_dir}/{}", crate::agent::HANDOFF_FILE);
        let body = serde_json::to_vec(&handoff)
            .map_err(|_| handoff_err("encoding", &path)(Errno::INVAL))?;
        self.sys
            .create_file(&path, &body, 0o600)
            .map_err(handoff_err("writing", &path))?;
        Ok(())
    }

    /// The hand-off seam. `Initramfs`: the init becomes the agent in place (PID 1,
    /// reaping children) until the control plane refuses the node or PID 1 is
    /// told to stop, then powers off. `Mounted`: switch_root into the composed
    /// root and exec its init (systemd running the agent as a service, or the
    /// agent as PID 1 there); the agent finds its state in the state directory.
    pub fn hand_off(&mut self, root: ComposedRoot) -> Outcome {
        match root {
            ComposedRoot::Initramfs => self.run_agent(),
            ComposedRoot::Mounted { path, init, args } => {
                let timeline = self.timeline.clone();
                self.event(json!({"event": "switch_root", "new_root": path, "init": init, "timeline": timeline}));
                let state_dir = self.state_dir.clone().unwrap_or_default();
                // The agent's state and the store the root reads from live on /persist.
                let extra: &[&str] = if state_dir.starts_with(PERSIST_MOUNT) {
                    &[PERSIST_MOUNT]
                } else {
                    &[]
                };
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let error: PhaseError =
                    switch_root::switch_root_moving(self.sys, &path, &init, &args, extra).into();
                match self.failed("switch_root", &error, 1) {
                    Some(outcome) => outcome,
                    None => self.run_agent(),
                }
            }
        }
    }

    /// Runs the agent runtime until it ends; a local failure follows the policy.
    fn run_agent(&mut self) -> Outcome {
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let timeline = self.timeline.clone();
            let Some(agent) = self.agent.as_deref_mut() else {
                return Outcome::Idle;
            };
            log::info!("handing off: the init runs the agent as PID 1 of the initramfs");
            let end = agent.run(&timeline);
            match end {
                AgentEnd::Stopped => {
                    self.event(json!({"event": "agent_stopped", "reason": "signal"}));
                    return failure::reset(self.sys, RebootKind::PowerOff);
                }
                AgentEnd::Reboot => {
                    // A reboot task: services are stopped; netboot brings the node back.
                    self.event(json!({"event": "agent_stopped", "reason": "reboot"}));
                    return failure::reset(self.sys, RebootKind::Restart);
                }
                AgentEnd::Refused { code, message } => {
                    log::warn!("the control plane refused this node for good ({code}): {message}; powering off");
                    self.event(json!({
                        "event": "agent_stopped",
                        "reason": "refused",
                        "code": code,
                        "message": message,
                    }));
                    return failure::reset(self.sys, RebootKind::PowerOff);
                }
                AgentEnd::Failed { code, message } => {
                    let error = PhaseError::Agent { code, message };
                    if let Some(outcome) = self.failed("agent", &error, attempt) {
                        return outcome;
                    }
                }
            }
        }
    }
}

/// What the boot hands off to (see [`Boot::hand_off`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComposedRoot {
    /// No composed root yet: stay in the initramfs.
    Initramfs,
    /// A composed root mounted at `path`, whose `init` (with `args`) takes over as
    /// PID 1: systemd, or a copy of this init in agent mode.
    Mounted {
        path: String,
        init: String,
        args: Vec<String>,
    },
}

fn repaired_note(moved: &[String]) -> String {
    match moved {
        [] => String::new(),
        [one] => format!("; corrupt object {one} moved out of the store, fetched again next boot"),
        more => format!(
            "; {} corrupt objects moved out of the store, fetched again next boot",
            more.len()
        ),
    }
}

/// The proto phase a failure of the init's phase `name` is reported under: the
/// phase the node was trying to reach.
pub fn upstream_phase(name: &str) -> Phase {
    match name {
        "modules" => Phase::ModulesLoaded,
        "identity" | "cloud_identity" => Phase::IdentityFound,
        "network" => Phase::NetworkUp,
        "bootstrap" => Phase::Enrolled,
        "switch_root" => Phase::RootMounted,
        "agent" => Phase::Ready,
        _ => Phase::InitStart,
    }
}

fn early_mounts(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    for m in EARLY_MOUNTS {
        mounts::mount_one(boot.sys, m)?;
        // `/dev` comes first in the table: log from here on.
        if m.target == "/dev" {
            boot.sys.start_logging();
            log::info!("powernode-init {} starting", env!("CARGO_PKG_VERSION"));
        }
    }
    if let Err(errno) = boot.sys.write_file(PRINTK_DEVKMSG, b"on\n") {
        log::warn!("cannot lift the /dev/kmsg rate limit: {errno}");
    }
    Ok(())
}

fn read_cmdline(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let raw = boot
        .sys
        .read_file(CMDLINE_PATH, 64 * 1024)
        .map_err(PhaseError::Cmdline)?;
    boot.cmdline = String::from_utf8_lossy(&raw).trim().to_string();
    boot.options = cmdline::parse(&boot.cmdline);
    failure::set_policy(boot.options.on_failure);
    crate::logger::set_console_echo(boot.options.quiet);
    for word in &boot.options.unknown {
        log::warn!("ignoring unknown value {word:?} on the kernel command line");
    }
    log::info!(
        "on_failure={} test_poweroff={}",
        boot.options.on_failure,
        boot.options.test_poweroff
    );
    if boot.options.test_panic {
        deliberate_panic();
    }
    Ok(())
}

/// The one panic in the init: asked for on the command line, to test the hook.
#[allow(clippy::panic)]
fn deliberate_panic() {
    panic!("powernode.test_panic=1 asked for a panic");
}

fn load_modules(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let report = modules::load_boot(boot.sys)?;
    log::info!(
        "kernel modules loaded: {} (already loaded: {}; no device for: {}; unsupported here: {})",
        report.timing(),
        report.already.join(" "),
        report.no_device.join(" "),
        report.unsupported.join(" ")
    );
    boot.modules = report;
    Ok(())
}

fn find_identity(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let cmdline = boot.cmdline.clone();
    let Some(found) = identity::probe(boot.sys, &cmdline)? else {
        if cloud::may_probe(&cmdline) {
            log::info!("no identity on the command line or in fw_cfg: cloud metadata after DHCP");
            return Ok(());
        }
        return Err(PhaseError::IdentityMissing);
    };
    let doc = &found.document;
    log::info!(
        "identity from {}: node {} instance {} ({})",
        found.source,
        doc.node_id,
        doc.instance_id,
        doc.hostname
    );
    identity_found(boot, found, |_| json!({}));
    Ok(())
}

/// Marks `identity_found`, reports it on the console and keeps the identity; `more`
/// (given the mark's time) adds the source's own fields to the event.
fn identity_found(boot: &mut Boot<'_>, found: Found, more: impl FnOnce(u64) -> Value) {
    let at_ms = boot.mark(Phase::IdentityFound);
    let timeline = boot.timeline.clone();
    let doc = &found.document;
    let mut fields = json!({
        "event": "phase",
        "phase": Phase::IdentityFound,
        "phase_at_ms": at_ms,
        "source": found.source,
        "node_id": doc.node_id,
        "instance_id": doc.instance_id,
        "hostname": doc.hostname,
        "control_plane_url": doc.control_plane_url,
        "timeline": timeline,
    });
    if let (Some(fields), Value::Object(more)) = (fields.as_object_mut(), more(at_ms)) {
        fields.extend(more);
    }
    boot.event(fields);
    boot.identity = Some(found);
}

/// The `cloud_identity` phase: nothing to do when an identity was already found.
fn find_cloud_identity(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    find_cloud_identity_with(boot, &cloud::real_probe)
}

/// [`find_cloud_identity`] with a given prober (tests run it against a fake).
fn find_cloud_identity_with(boot: &mut Boot<'_>, probe: &cloud::Prober) -> Result<(), PhaseError> {
    if boot.identity.is_some() {
        return Ok(());
    }
    let started = boot.sys.boot_ms();
    let Some(found) = cloud::find_identity(&boot.cmdline, probe)? else {
        return Err(PhaseError::IdentityMissing);
    };
    let CloudIdentity {
        source,
        document,
        facts,
    } = found;
    let found = Found {
        source,
        document,
        provider: Some(facts.clone()),
    };
    identity_found(
        boot,
        found,
        |at_ms| json!({"provider": facts, "probe_ms": at_ms.saturating_sub(started)}),
    );
    Ok(())
}

/// The identity's network config (DHCP unless it says static). Runs after the
/// identity phase because a static config comes from the identity document.
fn bring_up_network(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let config = boot
        .identity
        .as_ref()
        .map(|f| f.document.network.clone())
        .unwrap_or_default();
    let up = net::bring_up(boot.sys, &config)?;
    log::info!(
        "network up ({}): {} {}/{} via {} dns {:?}",
        up.source,
        up.interface,
        up.address,
        up.prefix,
        up.gateway
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        up.dns
    );
    let at_ms = boot.mark(Phase::NetworkUp);
    boot.event(json!({
        "event": "phase",
        "phase": Phase::NetworkUp,
        "phase_at_ms": at_ms,
        "network": up,
    }));
    boot.network = Some(up);
    Ok(())
}

fn ok_if_exists(r: Result<(), Errno>) -> Result<(), Errno> {
    match r {
        Err(Errno::EXIST) => Ok(()),
        other => other,
    }
}

/// What `powernode.persist=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PersistDisk<'a> {
    /// `/dev/NAME`.
    Device(&'a str),
    /// `LABEL=NAME`: the one disk whose ext4 superblock carries that label. It
    /// stays right where device names do not (NVMe numbering across boots, a
    /// cloud's root volume taking `vda`), and an image's baked command line can
    /// carry it.
    Label(&'a str),
}

fn parse_persist(value: &str) -> Option<PersistDisk<'_>> {
    if let Some(label) = value.strip_prefix("LABEL=") {
        return (!label.is_empty()
            && label.len() <= EXT4_LABEL_MAX
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        .then_some(PersistDisk::Label(label));
    }
    let name = value.strip_prefix("/dev/")?;
    (!name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)))
    .then_some(PersistDisk::Device(name))
}

/// ext4's volume name field (`s_volume_name`, 16 bytes, NUL-padded).
const EXT4_LABEL_MAX: usize = 16;
/// The superblock starts 1024 bytes into the device; the fields we read end at
/// 0x88 (magic `s_magic` at 0x38, label `s_volume_name` at 0x78).
const EXT4_SUPERBLOCK: u64 = 1024;
const EXT4_SB_READ: usize = 0x88;

/// The ext4 label in a superblock's first bytes; `None` when it is not ext2/3/4.
fn ext4_label(sb: &[u8]) -> Option<&[u8]> {
    if sb.get(0x38..0x3a)? != [0x53, 0xef] {
        return None;
    }
    let name = sb.get(0x78..0x78 + EXT4_LABEL_MAX)?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    name.get(..end)
}

/// The block devices whose ext4 label is `label`. Devices that cannot be read (an
/// empty CD drive) are skipped; loop and RAM disks are never ours.
fn disks_labelled(sys: &mut dyn Sys, label: &str) -> Result<Vec<String>, Errno> {
    let mut names = sys.list_dir("/sys/class/block")?;
    names.sort();
    let mut found = Vec::new();
    for name in names {
        if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dev = format!("/dev/{name}");
        match sys.read_at(&dev, EXT4_SUPERBLOCK, EXT4_SB_READ) {
            Ok(sb) if ext4_label(&sb) == Some(label.as_bytes()) => found.push(dev),
            Ok(_) => {}
            Err(errno) => log::debug!("{dev}: superblock unreadable ({errno}); skipped"),
        }
    }
    Ok(found)
}

/// The device path `powernode.persist=` resolves to.
fn persist_device(sys: &mut dyn Sys, value: &str) -> Result<String, PhaseError> {
    let missing = |errno| PhaseError::PersistMissing {
        device: value.into(),
        errno,
    };
    match parse_persist(value).ok_or_else(|| PhaseError::PersistSpec(value.into()))? {
        PersistDisk::Device(name) => {
            sys.read_file(&format!("/sys/class/block/{name}/dev"), 64)
                .map_err(missing)?;
            Ok(value.into())
        }
        PersistDisk::Label(label) => {
            let mut found = disks_labelled(sys, label).map_err(missing)?;
            match found.len() {
                0 => Err(missing(Errno::NOENT)),
                1 => Ok(found.remove(0)),
                _ => Err(PhaseError::PersistAmbiguous {
                    label: label.into(),
                    devices: found,
                }),
            }
        }
    }
}

/// The agent's state directory: on the `/persist` disk (ext4) that
/// `powernode.persist=` names, so a persistent node keeps its credentials and
/// module store across boots; else on the tmpfs `/run`.
fn prepare_state_dir(sys: &mut dyn Sys, persist: Option<&str>) -> Result<String, PhaseError> {
    let err = |path: &str| {
        let path = path.to_string();
        move |errno| PhaseError::StateDir { path, errno }
    };
    let Some(value) = persist else {
        ok_if_exists(sys.mkdir(RUN_STATE_DIR, 0o700)).map_err(err(RUN_STATE_DIR))?;
        return Ok(RUN_STATE_DIR.into());
    };
    let device = persist_device(sys, value)?;
    ok_if_exists(sys.mkdir(PERSIST_MOUNT, 0o755)).map_err(err(PERSIST_MOUNT))?;
    match sys.mount(
        &device,
        PERSIST_MOUNT,
        "ext4",
        crate::sys::MountFlags::NOSUID | crate::sys::MountFlags::NODEV,
        "",
    ) {
        Ok(()) | Err(Errno::BUSY) => {}
        Err(errno) => return Err(err(PERSIST_MOUNT)(errno)),
    }
    log::info!("{device} ({value}) mounted at {PERSIST_MOUNT}");
    ok_if_exists(sys.mkdir(PERSIST_STATE_DIR, 0o700)).map_err(err(PERSIST_STATE_DIR))?;
    Ok(PERSIST_STATE_DIR.into())
}

/// The agent library's bootstrap: state directory, entropy, enrollment (or stored
/// credentials), first handshake with the init's timeline. Pull / verify / mount
/// of signed modules come here once they exist.
fn bootstrap(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let Some(found) = boot.identity.clone() else {
        return Err(PhaseError::IdentityMissing);
    };
    if boot.options.test_switch_root {
        return test_switch_root(boot);
    }
    if boot.options.test_poweroff {
        log::info!("powernode.test_poweroff=1: the init's own phases only, no enrollment");
        return Ok(());
    }
    if boot.agent.is_none() {
        log::info!("bootstrap: no agent driver; identity only");
        return Ok(());
    }
    // The node's name in its logs, the journal and what its root's systemd keeps.
    let hostname = &found.document.hostname;
    if !hostname.is_empty() {
        if let Err(e) = boot.sys.set_hostname(hostname) {
            log::warn!("setting the hostname {hostname:?}: {e}");
        }
    }
    let state_dir = match boot.state_dir.clone() {
        Some(d) => d,
        None => {
            let d = prepare_state_dir(boot.sys, boot.options.persist.as_deref())?;
            boot.state_dir = Some(d.clone());
            d
        }
    };
    let input = BootstrapInput {
        identity: found.document,
        source: found.source,
        provider: found.provider,
        state_dir: state_dir.clone().into(),
        timeline: boot.timeline.clone(),
    };
    let Some(agent) = boot.agent.as_deref_mut() else {
        return Ok(());
    };
    let done = agent.bootstrap(&input)?;
    boot.timeline.push(TimelineEntry {
        phase: Phase::Enrolled,
        at_ms: done.enrolled_at_ms,
    });
    boot.enrolled = true;
    let timeline = boot.timeline.clone();
    boot.event(json!({
        "event": "phase",
        "phase": Phase::Enrolled,
        "phase_at_ms": done.enrolled_at_ms,
        "state_dir": state_dir,
        "reused_credentials": done.reused_credentials,
        "entropy_wait_ms": done.entropy_wait_ms,
        "timeline": timeline,
    }));
    Ok(())
}

/// Where the union of the root modules is mounted before switch_root.
pub const COMPOSED_ROOT: &str = "/sysroot";

/// Files of the composed root read in full before switch_root, where present: what
/// a systemd hand-off would exec, and the shell. The kernel checks every page of an
/// fs-verity object as it is read, so a corrupt object fails the boot here, reported
/// upstream with its path, instead of as a random `EIO` once the node is running.
pub const ROOT_CHECKS: &[&str] = &["/sbin/init", "/bin/sh"];

/// Reads each of [`ROOT_CHECKS`] that exists (resolved inside `root`); returns the
/// paths read.
fn check_root(sys: &mut dyn Sys, root: &str, verity: bool) -> Result<Vec<String>, PhaseError> {
    let mut checked = Vec::new();
    for path in ROOT_CHECKS {
        match sys.read_through(root, path) {
            Ok(bytes) => {
                log::info!("composed root: read {path} in full ({bytes} bytes)");
                checked.push((*path).to_string());
            }
            Err(Errno::NOENT) => {}
            Err(errno) => {
                return Err(PhaseError::RootRead {
                    path: (*path).to_string(),
                    verity,
                    moved: Vec::new(),
                    errno,
                })
            }
        }
    }
    Ok(checked)
}

/// Where the test root is mounted, and the flag its init gets.
pub const TEST_ROOT: &str = "/sysroot";
pub const SWITCHED_ROOT_CHECK: &str = "--switched-root-check";

/// `powernode.test_switch_root=1`: a tmpfs root with a copy of this init, then the
/// real switch_root into it. Returns only on failure.
fn test_switch_root(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let sys = &mut *boot.sys;
    sys.mkdir(TEST_ROOT, 0o755).map_err(PhaseError::TestRoot)?;
    sys.mount(
        "tmpfs",
        TEST_ROOT,
        "tmpfs",
        crate::sys::MountFlags::empty(),
        "mode=0755",
    )
    .map_err(PhaseError::TestRoot)?;
    sys.mkdir(&format!("{TEST_ROOT}/sbin"), 0o755)
        .map_err(PhaseError::TestRoot)?;
    let me = sys
        .read_file(crate::layout::INIT, 64 << 20)
        .map_err(PhaseError::TestRoot)?;
    sys.create_file(&format!("{TEST_ROOT}/sbin/init"), &me, 0o755)
        .map_err(PhaseError::TestRoot)?;
    let timeline = boot.timeline.clone();
    boot.event(json!({"event": "switch_root", "new_root": TEST_ROOT, "timeline": timeline}));
    Err(switch_root::switch_root(boot.sys, TEST_ROOT, "/sbin/init", &[SWITCHED_ROOT_CHECK]).into())
}

/// The test root's init (`--switched-root-check`): report where it runs, power off.
pub fn switched_root_check(sys: &mut dyn Sys) -> Outcome {
    let mounts = sys
        .read_file("/proc/self/mounts", 1 << 20)
        .unwrap_or_default();
    let mounts = String::from_utf8_lossy(&mounts);
    // The last mount on "/" is the one in effect.
    let root = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap_or_default()
        .to_string();
    let exists = |sys: &mut dyn Sys, p: &str| sys.read_file(p, 1 << 16).is_ok();
    let fields = json!({
        "event": "switched_root",
        "pid": std::process::id(),
        "root_mount": root,
        "initramfs_init_present": exists(sys, crate::layout::INIT),
        "initramfs_load_order_present": exists(sys, crate::layout::MODULE_LOAD_ORDER),
        "proc_mounted": exists(sys, "/proc/self/stat"),
        "at_ms": sys.boot_ms(),
    });
    sys.console(&format!("{EVENT_PREFIX}{fields}"));
    failure::reset(sys, RebootKind::PowerOff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{doc_json, with_fw_cfg};
    use crate::layout;
    use crate::sys::fake::{Call, FakeSys};
    use crate::sys::ModuleSysError;

    fn machine(cmdline: &str) -> FakeSys {
        let sys = FakeSys::default()
            .with_file("/proc/cmdline", format!("{cmdline}\n"))
            .with_file(
                layout::MODULE_LOAD_ORDER,
                "qemu_fw_cfg.ko\nfailover.ko\nnet_failover.ko\nvirtio_net.ko\n",
            );
        let mut sys = crate::net::tests::with_nic(with_fw_cfg(sys, &doc_json()));
        sys.dhcp_answers.extend([Some(2), Some(5)]);
        sys
    }

    fn events(sys: &FakeSys) -> Vec<Value> {
        sys.console_lines()
            .iter()
            .filter_map(|l| l.strip_prefix(EVENT_PREFIX))
            .map(|j| serde_json::from_str(j).unwrap())
            .collect()
    }

    #[test]
    fn the_exact_boot_sequence() {
        let mut sys =
            machine("console=ttyS0 powernode.on_failure=poweroff powernode.test_poweroff=1");
        let outcome = Boot::new(&mut sys).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));

        let mounts: Vec<(&str, &str)> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { fstype, target, .. } => Some((fstype.as_str(), target.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("devtmpfs", "/dev"),
                ("proc", "/proc"),
                ("sysfs", "/sys"),
                ("tmpfs", "/run"),
                ("tmpfs", "/tmp"),
                ("devpts", "/dev/pts"),
                ("cgroup2", "/sys/fs/cgroup"),
            ]
        );
        // Logging starts right after /dev, before any other mount.
        let pos = |want: &Call| sys.calls.iter().position(|c| c == want).unwrap();
        let first_other_mkdir = pos(&Call::Mkdir("/proc".into()));
        assert!(pos(&Call::StartLogging) < first_other_mkdir);
        assert_eq!(
            sys.modules(),
            [
                "/lib/modules/qemu_fw_cfg.ko",
                "/lib/modules/failover.ko",
                "/lib/modules/net_failover.ko",
                "/lib/modules/virtio_net.ko"
            ]
        );
        // Modules load before fw_cfg is read; the power-off comes last, after a sync
        // and the mounts settled.
        let last_module = sys
            .calls
            .iter()
            .rposition(|c| matches!(c, Call::FinitModule(_)))
            .unwrap();
        let fw_cfg = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::Read(p) if p.ends_with("identity/size")))
            .unwrap();
        assert!(last_module < fw_cfg);
        assert!(
            sys.ends_with_reset(RebootKind::PowerOff),
            "{:?}",
            sys.reset_calls()
        );

        let events = events(&sys);
        let found = events
            .iter()
            .find(|e| e["phase"] == "identity_found")
            .unwrap();
        assert_eq!(found["source"], "fw_cfg");
        assert_eq!(found["instance_id"], "inst-1");
        let phases: Vec<&str> = found["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["phase"].as_str().unwrap())
            .collect();
        assert_eq!(
            phases,
            [
                "kernel_start",
                "init_start",
                "modules_loaded",
                "identity_found"
            ]
        );
        let net = events.iter().find(|e| e["phase"] == "network_up").unwrap();
        assert_eq!(net["network"]["address"], "10.0.2.15");
        assert_eq!(net["network"]["source"], "dhcp");
        let done = events.iter().find(|e| e["event"] == "init_done").unwrap();
        assert_eq!(done["modules_loaded"].as_array().unwrap().len(), 4);
        let phases: Vec<&str> = done["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["phase"].as_str().unwrap())
            .collect();
        assert_eq!(
            phases,
            [
                "kernel_start",
                "init_start",
                "modules_loaded",
                "identity_found",
                "network_up"
            ]
        );
    }

    #[test]
    fn without_test_poweroff_the_init_idles() {
        let mut sys = machine("console=ttyS0");
        assert_eq!(Boot::new(&mut sys).run(), Outcome::Idle);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Reboot(_))));
    }

    #[test]
    fn poweroff_policy_reports_the_failed_phase_and_powers_off() {
        let mut sys = machine("powernode.on_failure=poweroff");
        sys.module_errors.insert(
            "/lib/modules/failover.ko".into(),
            ModuleSysError::Load(Errno::NOEXEC),
        );
        let outcome = Boot::new(&mut sys).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        let events = events(&sys);
        let failed = events
            .iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["phase"], "modules");
        assert_eq!(failed["code"], "internal");
        assert!(failed["error"].as_str().unwrap().contains("failover"));
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::Read(p) if p.starts_with("/sys/firmware/qemu_fw_cfg"))));
    }

    #[test]
    fn reboot_policy_reboots() {
        let mut sys = FakeSys::default().with_file("/proc/cmdline", "powernode.on_failure=reboot");
        // No load-order file: the modules phase fails.
        assert_eq!(
            Boot::new(&mut sys).run(),
            Outcome::Reset(RebootKind::Restart)
        );
    }

    #[test]
    fn retry_policy_retries_the_same_phase_with_backoff() {
        let mut sys = machine("powernode.test_poweroff=1");
        sys.module_failures_left
            .insert("/lib/modules/virtio_net.ko".into(), 2);
        let outcome = Boot::new(&mut sys).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        let sleeps: Vec<u64> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Sleep(d) => Some(d.as_secs()),
                _ => None,
            })
            .collect();
        assert_eq!(sleeps, [1, 2]);
        let net_loads = sys
            .modules()
            .iter()
            .filter(|m| m.ends_with("/virtio_net.ko"))
            .count();
        assert_eq!(net_loads, 3);
    }

    #[test]
    fn network_failure_is_reported_with_the_network_code() {
        let mut sys = machine("powernode.on_failure=poweroff");
        sys.dhcp_answers.clear();
        assert_eq!(
            Boot::new(&mut sys).run(),
            Outcome::Reset(RebootKind::PowerOff)
        );
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["phase"], "network");
        assert_eq!(failed["code"], "network");
        assert!(failed["error"].as_str().unwrap().contains("DISCOVER"));
    }

    #[test]
    fn test_switch_root_copies_the_init_and_switches() {
        let mut sys = machine("powernode.on_failure=poweroff powernode.test_switch_root=1")
            .with_file("/init", "INIT-BYTES");
        sys.executables.insert("/sysroot/sbin/init".into());
        let outcome = Boot::new(&mut sys).run();
        // The fake exec fails, so the phase fails and the policy powers off.
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        assert!(sys.calls.contains(&Call::Create(
            "/sysroot/sbin/init".into(),
            "INIT-BYTES".into()
        )));
        assert!(sys.calls.contains(&Call::Exec(
            "/sbin/init".into(),
            vec![SWITCHED_ROOT_CHECK.into()]
        )));
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["phase"], "bootstrap");
    }

    #[test]
    fn missing_identity_is_identity_missing() {
        let mut sys = FakeSys::default()
            .with_file(
                "/proc/cmdline",
                "powernode.on_failure=poweroff powernode.identity_source=fw_cfg",
            )
            .with_file(layout::MODULE_LOAD_ORDER, "");
        assert_eq!(
            Boot::new(&mut sys).run(),
            Outcome::Reset(RebootKind::PowerOff)
        );
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["phase"], "identity");
        assert_eq!(failed["code"], "identity_missing");
    }

    #[test]
    fn without_a_local_identity_the_network_comes_first_for_cloud_metadata() {
        // No pin, no cmdline or fw_cfg identity: the identity phase defers, so the
        // first failure here is the network (this fake machine has no NIC).
        let mut sys = FakeSys::default()
            .with_file("/proc/cmdline", "powernode.on_failure=poweroff")
            .with_file(layout::MODULE_LOAD_ORDER, "");
        Boot::new(&mut sys).run();
        let events = events(&sys);
        let failed = events
            .iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["phase"], "network");
        assert!(!events.iter().any(|e| e["phase"] == "identity_found"));
        assert_eq!(upstream_phase("cloud_identity"), Phase::IdentityFound);
        let names: Vec<&str> = PHASES.iter().map(|p| p.name).collect();
        let pos = |n| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("network") < pos("cloud_identity"));
        assert!(pos("cloud_identity") < pos("bootstrap"));
    }

    use crate::agent::fake::FakeAgent;
    use crate::agent::AgentEnd;

    #[test]
    fn bootstrap_enrolls_then_the_init_runs_the_agent_and_powers_off_when_refused() {
        let mut sys = machine("powernode.on_failure=poweroff");
        let mut agent = FakeAgent::default();
        agent.ends.push(AgentEnd::Refused {
            code: ErrorCode::InstanceTerminated,
            message: "terminated".into(),
        });
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        // Ephemeral node: state on the tmpfs /run.
        assert_eq!(agent.bootstraps.len(), 1);
        let input = &agent.bootstraps[0];
        assert_eq!(input.state_dir, std::path::PathBuf::from(RUN_STATE_DIR));
        assert_eq!(input.source, "fw_cfg");
        assert!(sys.calls.contains(&Call::Mkdir(RUN_STATE_DIR.into())));
        // The agent got the whole init timeline, enrolled last.
        let phases: Vec<Phase> = agent.runs[0].iter().map(|e| e.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::KernelStart,
                Phase::InitStart,
                Phase::ModulesLoaded,
                Phase::IdentityFound,
                Phase::NetworkUp,
                Phase::Enrolled
            ]
        );
        let stopped = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "agent_stopped")
            .unwrap();
        assert_eq!(stopped["reason"], "refused");
        assert_eq!(stopped["code"], "instance_terminated");
        assert!(
            sys.ends_with_reset(RebootKind::PowerOff),
            "{:?}",
            sys.reset_calls()
        );
    }

    #[test]
    fn a_persist_disk_holds_the_state_dir() {
        let mut sys = machine("powernode.on_failure=poweroff powernode.persist=/dev/vdb")
            .with_file("/sys/class/block/vdb/dev", "254:16\n");
        let mut agent = FakeAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        assert!(sys
            .mounts()
            .contains(&("/dev/vdb".into(), PERSIST_MOUNT.into(), "ext4".into())));
        assert_eq!(
            agent.bootstraps[0].state_dir,
            std::path::PathBuf::from(PERSIST_STATE_DIR)
        );
    }

    #[test]
    fn without_powernode_persist_no_disk_is_taken_for_persist() {
        // A cloud's root volume (vda) is there, even with our label; nothing names it.
        let mut sys = with_disks(
            machine("powernode.on_failure=poweroff")
                .with_file("/sys/class/block/vda/dev", "254:0\n"),
            &[("vda", ext4_device("pn-persist"))],
        );
        let mut agent = FakeAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        // No disk was even looked at.
        assert!(!sys.calls.iter().any(|c| matches!(c,
            Call::ListDir(d) if d == "/sys/class/block")));
        assert!(!sys.calls.iter().any(|c| matches!(c,
            Call::Read(p) if p.starts_with("/dev/") || p.starts_with("/sys/class/block"))));
        assert!(sys
            .mounts()
            .iter()
            .all(|(_, target, _)| target != PERSIST_MOUNT));
        assert_eq!(
            agent.bootstraps[0].state_dir,
            std::path::PathBuf::from(RUN_STATE_DIR)
        );
    }

    /// The first bytes of an ext4 superblock with `label` (what `disks_labelled`
    /// reads, 1024 bytes into the device).
    fn ext4_device(label: &str) -> Vec<u8> {
        let mut dev = vec![0u8; 4096];
        dev[1024 + 0x38..1024 + 0x3a].copy_from_slice(&[0x53, 0xef]);
        dev[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label.as_bytes());
        dev
    }

    fn with_disks(mut sys: FakeSys, disks: &[(&str, Vec<u8>)]) -> FakeSys {
        let mut names: Vec<String> = vec!["loop0".into()];
        for (name, bytes) in disks {
            names.push(name.to_string());
            sys = sys.with_file(&format!("/dev/{name}"), bytes.clone());
        }
        // A loop device is never read, even when it would match.
        sys = sys.with_file("/dev/loop0", ext4_device("pn-persist"));
        sys.dirs.insert("/sys/class/block".into(), names);
        sys
    }

    #[test]
    fn a_persist_label_finds_the_one_disk_that_carries_it() {
        let sys = machine("powernode.on_failure=poweroff powernode.persist=LABEL=pn-persist");
        let mut sys = with_disks(
            sys,
            &[
                ("vda", ext4_device("cloudimg-rootfs")),
                ("vdb", ext4_device("pn-persist")),
                // Not ext4 (no magic), though the label bytes match.
                ("vdc", {
                    let mut d = ext4_device("pn-persist");
                    d[1024 + 0x38] = 0;
                    d
                }),
                ("vdd", vec![0u8; 100]),
            ],
        );
        sys.read_errors.insert("/dev/sr0".into(), Errno::NOMEDIUM);
        sys.dirs
            .get_mut("/sys/class/block")
            .unwrap()
            .push("sr0".into());
        let mut agent = FakeAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        assert!(sys
            .mounts()
            .contains(&("/dev/vdb".into(), PERSIST_MOUNT.into(), "ext4".into())));
        assert!(!sys.calls.contains(&Call::Read("/dev/loop0".into())));
        assert_eq!(
            agent.bootstraps[0].state_dir,
            std::path::PathBuf::from(PERSIST_STATE_DIR)
        );
    }

    #[test]
    fn a_persist_label_on_two_disks_is_refused_naming_both() {
        let sys = machine(
            "powernode.on_failure=poweroff powernode.attempts=1 powernode.persist=LABEL=pn-persist",
        );
        let mut sys = with_disks(
            sys,
            &[
                ("nvme0n1", ext4_device("pn-persist")),
                ("nvme1n1", ext4_device("pn-persist")),
            ],
        );
        let mut agent = FakeAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        let error = failed["error"].as_str().unwrap();
        assert!(
            error.contains("more than one disk: /dev/nvme0n1, /dev/nvme1n1"),
            "{failed}"
        );
        assert!(!sys.mounts().iter().any(|m| m.1 == PERSIST_MOUNT));
        assert!(agent.bootstraps.is_empty());
    }

    #[test]
    fn a_bad_or_absent_persist_disk_fails_naming_it() {
        for (arg, code_text) in [
            ("powernode.persist=vdb", "neither a block device path"),
            (
                "powernode.persist=/dev/../etc",
                "neither a block device path",
            ),
            ("powernode.persist=LABEL=", "neither a block device path"),
            (
                "powernode.persist=LABEL=a-label-of-17-bytes",
                "neither a block device path",
            ),
            (
                "powernode.persist=LABEL=no/slash",
                "neither a block device path",
            ),
            (
                "powernode.persist=LABEL=pn-persist",
                "LABEL=pn-persist (powernode.persist=) is not present",
            ),
            (
                "powernode.persist=/dev/vdb",
                "/dev/vdb (powernode.persist=) is not present",
            ),
        ] {
            let mut sys = machine(&format!(
                "powernode.on_failure=poweroff powernode.attempts=1 {arg}"
            ));
            let mut agent = FakeAgent::default();
            let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
            assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff), "{arg}");
            let failed = events(&sys)
                .into_iter()
                .find(|e| e["event"] == "phase_failed")
                .unwrap_or_else(|| panic!("{arg}: no phase_failed"));
            assert_eq!(failed["phase"], "bootstrap", "{arg}");
            assert!(
                failed["error"].as_str().unwrap().contains(code_text),
                "{arg}: {failed}"
            );
            assert!(agent.bootstraps.is_empty(), "{arg}");
        }
    }

    #[test]
    fn a_transient_bootstrap_failure_is_retried_then_the_policy_applies() {
        let mut sys = machine("powernode.on_failure=poweroff powernode.attempts=3");
        let mut agent = FakeAgent::default();
        for _ in 0..3 {
            agent
                .bootstrap_errors
                .push(BootstrapError::Runtime(std::io::Error::other("boom")));
        }
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        assert_eq!(agent.bootstraps.len(), 3);
        assert!(agent.runs.is_empty());
        // Not enrolled: nothing could go upstream, but every attempt was offered.
        assert_eq!(agent.reports.len(), 3);
        assert!(agent.reports.iter().all(|r| r.phase == Phase::Enrolled));
        assert_eq!(agent.reports[2].attempt, 3);
        let failed: Vec<Value> = events(&sys)
            .into_iter()
            .filter(|e| e["event"] == "phase_failed")
            .collect();
        assert_eq!(failed.len(), 3);
        assert_eq!(failed[0]["retrying"], true);
        assert_eq!(failed[2]["retrying"], false);
        assert_eq!(failed[2]["reported_upstream"], false);
        let sleeps = sys
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Sleep(_)))
            .count();
        assert_eq!(sleeps, 2);
    }

    /// A refusal for good at enrollment powers off under every policy: `retry` and
    /// `reboot` would only knock again with the same spent token.
    #[test]
    fn a_refusal_for_good_at_enrollment_powers_off_under_every_policy() {
        for policy in ["retry", "reboot", "poweroff"] {
            let mut sys = machine(&format!(
                "powernode.on_failure={policy} powernode.attempts=5"
            ));
            let mut agent = FakeAgent::default();
            agent.bootstrap_errors.push(BootstrapError::Enroll(
                powernode_agent::enroll::EnrollError::Client(
                    powernode_agent::client::ClientError::Refused {
                        method: "POST",
                        path: "/v1/enrollment".into(),
                        status: 401,
                        code: ErrorCode::BootstrapTokenExpired,
                        message: "the bootstrap token expired".into(),
                    },
                ),
            ));
            let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
            assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff), "{policy}");
            assert_eq!(agent.bootstraps.len(), 1, "{policy}");
            let failed = events(&sys)
                .into_iter()
                .find(|e| e["event"] == "phase_failed")
                .unwrap();
            assert_eq!(failed["code"], "bootstrap_token_expired", "{policy}");
            assert_eq!(failed["retrying"], false, "{policy}");
            assert_eq!(failed["refused_for_good"], true, "{policy}");
        }
        // A transient failure under `retry` is still retried.
        let mut sys = machine("powernode.on_failure=retry");
        let mut agent = FakeAgent::default();
        agent
            .bootstrap_errors
            .push(BootstrapError::Runtime(std::io::Error::other("boom")));
        Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(agent.bootstraps.len(), 2);
    }

    #[test]
    fn an_agent_failure_after_enrollment_goes_upstream() {
        let mut sys = machine("powernode.on_failure=poweroff powernode.attempts=1");
        let mut agent = FakeAgent::default();
        agent.ends.push(AgentEnd::Failed {
            code: ErrorCode::Internal,
            message: "state dir gone".into(),
        });
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        assert_eq!(agent.reports.len(), 1);
        assert_eq!(agent.reports[0].phase, Phase::Ready);
        assert!(agent.reports[0].message.contains("state dir gone"));
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["reported_upstream"], true);
    }

    #[test]
    fn the_root_check_reads_what_exists_and_names_a_corrupt_file() {
        let mut sys = FakeSys::default().with_file("/sysroot/bin/sh", vec![0u8; 4096]);
        assert_eq!(
            check_root(&mut sys, COMPOSED_ROOT, true).unwrap(),
            ["/bin/sh"]
        );
        assert_eq!(
            sys.calls,
            [
                Call::ReadThrough("/sysroot/sbin/init".into()),
                Call::ReadThrough("/sysroot/bin/sh".into())
            ]
        );

        // EIO under verity=require: the kernel refused a block that does not match.
        sys.read_errors.insert("/sysroot/bin/sh".into(), Errno::IO);
        let err = check_root(&mut sys, COMPOSED_ROOT, true).unwrap_err();
        assert_eq!(err.code(), ErrorCode::VerityMismatch);
        assert!(!err.retryable());
        let text = err.chain();
        assert!(text.contains("/bin/sh"), "{text}");
        assert!(text.contains("fs-verity"), "{text}");
        // Without kernel verity an EIO is a plain read error, not a verity verdict.
        let err = check_root(&mut sys, COMPOSED_ROOT, false).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Internal);
        // Another errno is never called a verity mismatch.
        sys.read_errors
            .insert("/sysroot/bin/sh".into(), Errno::ACCESS);
        let err = check_root(&mut sys, COMPOSED_ROOT, true).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Internal);
    }

    /// A driver whose desired set has one root module, composed on a store with
    /// kernel fs-verity (what the real driver reports on /persist).
    #[derive(Default)]
    struct ComposingAgent {
        reports: Vec<powernode_proto::node::FailureReport>,
        repairs: u32,
        composes: u32,
        undos: u32,
    }

    impl crate::agent::AgentDriver for ComposingAgent {
        fn bootstrap(
            &mut self,
            _input: &BootstrapInput,
        ) -> Result<crate::agent::Bootstrapped, BootstrapError> {
            Ok(crate::agent::Bootstrapped {
                reused_credentials: true,
                enrolled_at_ms: 10,
                entropy_wait_ms: None,
            })
        }
        fn report_failure(
            &mut self,
            _timeline: &[TimelineEntry],
            failure: powernode_proto::node::FailureReport,
        ) -> bool {
            self.reports.push(failure);
            true
        }
        fn run(&mut self, _timeline: &[TimelineEntry]) -> AgentEnd {
            AgentEnd::Stopped
        }
        fn compose_root(
            &mut self,
            _target: &str,
        ) -> Result<Option<Vec<powernode_proto::node::RunningModule>>, crate::agent::ComposeError>
        {
            self.composes += 1;
            Ok(Some(vec![powernode_proto::node::RunningModule {
                name: "base".into(),
                version: "1".into(),
                digest: "sha256:aa".into(),
            }]))
        }
        fn repair_root(&mut self) -> Result<Vec<String>, crate::agent::ComposeError> {
            self.repairs += 1;
            Ok(vec!["sha256:bb".into()])
        }
        fn undo_compose(&mut self) {
            self.undos += 1;
        }
        fn root_images(&self) -> Vec<String> {
            vec![format!("sha256:{}", "cd".repeat(32))]
        }
        fn root_facts(&self) -> Option<powernode_proto::node::RootFacts> {
            Some(powernode_proto::node::RootFacts {
                verity: "require".into(),
                store: "/persist/powernode/store".into(),
                upper: "/persist/powernode/root".into(),
                compose: Some(Default::default()),
                ..Default::default()
            })
        }
    }

    fn persistent_machine() -> FakeSys {
        let mut sys = machine(
            "powernode.on_failure=poweroff powernode.attempts=1 powernode.persist=/dev/vda",
        )
        .with_file("/sys/class/block/vda/dev", "254:0\n")
        .with_file("/proc/self/exe", "INIT")
        .with_file("/sysroot/bin/sh", vec![1u8; 100]);
        sys.executables.insert(crate::agent::AGENT_MODE_BIN.into());
        sys
    }

    #[test]
    fn a_persistent_root_is_checked_then_persist_moves_into_it() {
        let mut sys = persistent_machine();
        let mut agent = ComposingAgent::default();
        // The fake exec fails, so the policy powers off after the whole sequence.
        Boot::new(&mut sys).with_agent(&mut agent).run();
        let handoff = sys
            .calls
            .iter()
            .find_map(|c| match c {
                Call::Create(p, body) if p == "/persist/powernode/handoff.json" => Some(body),
                _ => None,
            })
            .expect("handoff.json on /persist");
        let handoff: Value = serde_json::from_str(handoff).unwrap();
        assert_eq!(handoff["root_facts"]["verity"], "require");
        assert_eq!(handoff["root_facts"]["store"], "/persist/powernode/store");
        assert_eq!(
            handoff["root_facts"]["compose"]["checked"],
            json!(["/bin/sh"])
        );
        // The store collection in agent mode keeps exactly these.
        assert_eq!(
            handoff["root_images"],
            json!([format!("sha256:{}", "cd".repeat(32))])
        );
        let pos = |c: &Call| sys.calls.iter().position(|x| x == c);
        let check = pos(&Call::ReadThrough("/sysroot/bin/sh".into())).unwrap();
        let moved = pos(&Call::MoveMount(
            "/persist".into(),
            "/sysroot/persist".into(),
        ))
        .expect("/persist moved into the new root");
        assert!(check < moved);
        assert!(moved < pos(&Call::FreeInitramfs).unwrap());
        assert!(sys.calls.contains(&Call::Exec(
            crate::agent::AGENT_MODE_BIN.into(),
            vec!["agent".into(), PERSIST_STATE_DIR.into()]
        )));
        assert_eq!(agent.repairs, 0);
    }

    /// [`persistent_machine`] whose root is a Debian one: `/sbin/init` an absolute
    /// link to systemd, the kernel's modules under `/usr/lib/modules`.
    fn systemd_machine() -> FakeSys {
        crate::root_init::tests::with_debian_root(persistent_machine())
    }

    #[test]
    fn a_systemd_root_gets_systemd_as_pid_1_and_the_agent_as_its_unit() {
        let mut sys = systemd_machine();
        let mut agent = ComposingAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        let created = |path: &str| {
            sys.calls.iter().find_map(|c| match c {
                Call::Create(p, body) if p == path => Some(body.clone()),
                _ => None,
            })
        };
        let handoff: Value =
            serde_json::from_str(&created("/persist/powernode/handoff.json").unwrap()).unwrap();
        assert_eq!(handoff["root_facts"]["init"], "systemd");
        // The identity's hostname, which systemd keeps (the root has no /etc/hostname).
        assert!(
            sys.calls.contains(&Call::SetHostname("edge-1".into())),
            "{:?}",
            sys.calls
        );
        let unit =
            created("/run/systemd/system/powernode-agent.service").expect("the agent's unit");
        assert!(unit.contains(&format!(
            "ExecStart={} agent-service {PERSIST_STATE_DIR}",
            crate::agent::AGENT_MODE_BIN
        )));
        assert!(created("/run/systemd/system/multi-user.target.d/powernode-agent.conf").is_some());
        // The unit is written before /run moves into the new root; systemd is exec'd
        // by its resolved path, with no arguments.
        let pos = |c: &Call| sys.calls.iter().position(|x| x == c);
        let unit_at = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::Create(p, _) if p.ends_with("powernode-agent.service")))
            .unwrap();
        assert!(unit_at < pos(&Call::MoveMount("/run".into(), "/sysroot/run".into())).unwrap());
        assert!(sys
            .calls
            .contains(&Call::Exec("/usr/lib/systemd/systemd".into(), Vec::new())));
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::Exec(p, _) if p == crate::agent::AGENT_MODE_BIN)));
    }

    #[test]
    fn a_systemd_root_without_kernel_modules_is_reported_with_a_recovery_and_never_switched_to() {
        let mut sys = systemd_machine();
        sys.files.retain(|p, _| !p.ends_with("modules.dep"));
        let mut agent = ComposingAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        let failure = agent.reports.last().expect("reported upstream").clone();
        assert_eq!(failure.code, ErrorCode::KernelModulesMissing);
        assert_eq!(failure.phase, Phase::RootMounted);
        assert!(
            failure.message.contains("6.12.57+deb13-cloud-amd64"),
            "{}",
            failure.message
        );
        assert!(failure.recovery.unwrap().contains("kernel-modules"));
        assert!(!sys.calls.contains(&Call::FreeInitramfs));
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Exec(..))));
    }

    #[test]
    fn a_root_whose_init_dangles_is_refused_before_the_switch() {
        let mut sys = persistent_machine();
        sys.links
            .insert("/sysroot/sbin/init".into(), "/lib/systemd/systemd".into());
        let mut agent = ComposingAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        let failure = agent.reports.last().expect("reported upstream").clone();
        assert_eq!(failure.code, ErrorCode::RootInitInvalid);
        assert!(failure.recovery.is_some());
        assert!(!sys.calls.contains(&Call::FreeInitramfs));
    }

    #[test]
    fn a_corrupt_root_file_is_reported_as_verity_mismatch_and_never_switched_to() {
        let mut sys = persistent_machine();
        sys.read_errors.insert("/sysroot/bin/sh".into(), Errno::IO);
        let mut agent = ComposingAgent::default();
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        assert_eq!(agent.reports.len(), 1);
        let report = &agent.reports[0];
        assert_eq!(report.code, ErrorCode::VerityMismatch);
        assert_eq!(report.phase, Phase::RootMounted);
        assert!(report.message.contains("/bin/sh"), "{}", report.message);
        // The corrupt object was moved out of the store before the report.
        assert_eq!(agent.repairs, 1);
        assert!(
            report
                .message
                .contains("corrupt object sha256:bb moved out of the store"),
            "{}",
            report.message
        );
        assert!(!sys.calls.iter().any(|c| matches!(
            c,
            Call::FreeInitramfs | Call::MoveMount(..) | Call::Exec(..)
        )));
    }

    #[test]
    fn under_retry_a_corrupt_root_is_taken_down_repaired_and_composed_again() {
        let mut sys = persistent_machine();
        sys.files.insert(
            "/proc/cmdline".into(),
            b"powernode.on_failure=retry powernode.persist=/dev/vda".to_vec(),
        );
        sys.read_errors_once
            .insert("/sysroot/bin/sh".into(), Errno::IO);
        let mut agent = ComposingAgent::default();
        Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(agent.reports[0].code, ErrorCode::VerityMismatch);
        assert_eq!(
            (agent.repairs, agent.undos, agent.composes),
            (1, 1, 2),
            "repaired, taken down, composed again"
        );
        // The second attempt passed the check and went on to switch_root.
        assert!(sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::Create(p, _) if p == "/persist/powernode/handoff.json")));
        assert!(sys.calls.iter().any(|c| matches!(c, Call::Exec(..))));
    }

    #[test]
    fn a_hand_off_that_cannot_copy_the_init_names_the_file_and_never_switches() {
        let mut sys = persistent_machine();
        sys.files.remove("/proc/self/exe");
        let mut agent = ComposingAgent::default();
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        let report = &agent.reports[0];
        assert_eq!(report.code, ErrorCode::Internal);
        assert!(
            report
                .message
                .contains("copying the init to /run/powernode/powernode-init"),
            "{}",
            report.message
        );
        assert!(!sys
            .calls
            .iter()
            .any(|c| matches!(c, Call::MoveMount(..) | Call::Exec(..))));
    }

    #[test]
    fn the_handoff_file_round_trips() {
        let h = crate::agent::Handoff {
            timeline: vec![TimelineEntry {
                phase: Phase::RootMounted,
                at_ms: 7,
            }],
            root_modules: vec![powernode_proto::node::RunningModule {
                name: "base".into(),
                version: "1".into(),
                digest: "sha256:aa".into(),
            }],
            root_facts: None,
            root_images: vec![format!("sha256:{}", "ab".repeat(32))],
        };
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(
            serde_json::from_str::<crate::agent::Handoff>(&text).unwrap(),
            h
        );
    }

    #[test]
    fn phase_names_are_unique_and_bootstrap_follows_identity() {
        let names: Vec<&str> = PHASES.iter().map(|p| p.name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        let pos = |n| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("identity") < pos("network"));
        assert!(pos("network") < pos("bootstrap"));
        assert_eq!(names[0], "early_mounts");
    }

    use powernode_agent::identity::cloud::CloudOptions;

    #[test]
    fn a_found_cloud_identity_is_marked_and_kept_with_its_facts() {
        let mut sys = FakeSys::default();
        let mut boot = Boot::new(&mut sys);
        boot.cmdline = "console=ttyS0".into();
        find_cloud_identity_with(&mut boot, &|o: &CloudOptions| {
            assert_eq!(o.pinned, None);
            Ok(Some(crate::cloud::tests::aws_identity()))
        })
        .unwrap();
        let found = boot.identity.clone().unwrap();
        assert_eq!(found.source, "aws");
        assert_eq!(
            found.provider.unwrap().instance_id.as_deref(),
            Some("i-0abc")
        );
        assert!(boot
            .timeline
            .iter()
            .any(|e| e.phase == Phase::IdentityFound));
        drop(boot);
        let line = sys
            .console_lines()
            .into_iter()
            .find(|l| l.contains("identity_found"))
            .unwrap();
        assert!(
            line.contains("\"provider\":{\"addresses\":[\"10.1.2.3\"]"),
            "{line}"
        );
    }

    #[test]
    fn an_identity_already_found_skips_the_probe() {
        let mut sys = FakeSys::default();
        let mut boot = Boot::new(&mut sys);
        boot.identity = Some(Found {
            source: "fw_cfg",
            document: powernode_proto::IdentityDocument::parse(doc_json().as_bytes()).unwrap(),
            provider: None,
        });
        find_cloud_identity_with(&mut boot, &|_: &CloudOptions| {
            panic!("probed although an identity was found")
        })
        .unwrap();
    }

    #[test]
    fn absent_cloud_metadata_is_identity_missing() {
        let mut sys = FakeSys::default();
        let mut boot = Boot::new(&mut sys);
        let err = find_cloud_identity_with(&mut boot, &|_: &CloudOptions| Ok(None)).unwrap_err();
        assert!(matches!(err, PhaseError::IdentityMissing), "{err}");
        assert_eq!(err.code(), ErrorCode::IdentityMissing);
        let err = find_cloud_identity_with(&mut boot, &|_: &CloudOptions| {
            Err(powernode_agent::identity::SourceError::new(
                "aws",
                powernode_agent::identity::SourceErrorKind::Parameter {
                    key: "instance-id".into(),
                    reason: "is empty".into(),
                },
            ))
        })
        .unwrap_err();
        assert_eq!(err.code(), ErrorCode::IdentityInvalid);
        let text = err.chain();
        assert!(
            text.contains("aws") && text.contains("instance-id"),
            "{text}"
        );
    }
}
