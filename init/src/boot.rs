//! The boot as a list of named phases. Each phase is a plain function over [`Boot`];
//! a failing phase is reported (console JSON + log) and the failure policy decides:
//! power off, reboot, or retry the same phase with backoff. Phases are idempotent
//! (an existing mount is `EBUSY`, a loaded module `EEXIST`), so a retry is safe.
//!
//! Console lines starting `POWERNODE-INIT ` carry one JSON object each: the
//! structured channel that VM tests and the benchmark read (the timeline uses the
//! wire types of `powernode_proto::node`, the same the agent sends upstream).

use powernode_proto::node::{Phase, TimelineEntry};
use powernode_proto::ErrorCode;
use serde_json::{json, Value};

use crate::cmdline::{self, Options};
use crate::failure::{self, Outcome};
use crate::identity::{self, Found, IdentityProbeError};
use crate::modules::{self, LoadReport, ModuleError};
use crate::mounts::{self, MountError, EARLY_MOUNTS};
use crate::net::{self, Configured, NetError};
use crate::switch_root::{self, SwitchRootError};
use crate::sys::{Errno, RebootKind, Sys};

/// Prefix of the init's structured console lines.
pub const EVENT_PREFIX: &str = "POWERNODE-INIT ";
const CMDLINE_PATH: &str = "/proc/cmdline";
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
    #[error("no identity: neither powernode.identity= on the command line nor the fw_cfg entry")]
    IdentityMissing,
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    SwitchRoot(#[from] SwitchRootError),
    #[error("preparing the test root")]
    TestRoot(#[source] Errno),
}

impl PhaseError {
    /// The stable reason code reported upstream.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Identity(_) => ErrorCode::IdentityInvalid,
            Self::IdentityMissing => ErrorCode::IdentityMissing,
            Self::Network(_) => ErrorCode::Network,
            Self::Mount(_)
            | Self::Cmdline(_)
            | Self::Modules(_)
            | Self::SwitchRoot(_)
            | Self::TestRoot(_) => ErrorCode::Internal,
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
        marks: Some(Phase::IdentityFound),
        run: find_identity,
    },
    NamedPhase {
        name: "network",
        marks: Some(Phase::NetworkUp),
        run: bring_up_network,
    },
    NamedPhase {
        name: "bootstrap",
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
        }
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

    /// Reports a failed phase and applies the policy; `None` means "retry now".
    fn failed(&mut self, name: &str, error: &PhaseError, attempt: u32) -> Option<Outcome> {
        let policy = self.options.on_failure;
        log::error!("phase {name} failed (attempt {attempt}): {}", error.chain());
        self.event(json!({
            "event": "phase_failed",
            "phase": name,
            "code": error.code(),
            "error": error.chain(),
            "attempt": attempt,
            "on_failure": policy.as_str(),
        }));
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
            "module_ms": self.modules.ms.iter().map(|(n, ms)| json!([n, ms])).collect::<Vec<_>>(),
        }));
        if self.options.test_poweroff {
            log::info!("powernode.test_poweroff=1: powering off");
            return failure::reset(self.sys, RebootKind::PowerOff);
        }
        // The switch into the composed root comes with the agent's bootstrap; until
        // then there is nothing to hand off to.
        log::info!("boot phases done; nothing to hand off to yet");
        Outcome::Idle
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
    let report = modules::load_all(boot.sys)?;
    let timing: Vec<String> = report
        .ms
        .iter()
        .map(|(n, ms)| format!("{n}={ms}ms"))
        .collect();
    log::info!(
        "kernel modules loaded: {} (already loaded: {})",
        timing.join(" "),
        report.already.join(" ")
    );
    boot.modules = report;
    Ok(())
}

fn find_identity(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let cmdline = boot.cmdline.clone();
    let found = identity::probe(boot.sys, &cmdline)?.ok_or(PhaseError::IdentityMissing)?;
    let doc = &found.document;
    log::info!(
        "identity from {}: node {} instance {} ({})",
        found.source,
        doc.node_id,
        doc.instance_id,
        doc.hostname
    );
    let at_ms = boot.mark(Phase::IdentityFound);
    let timeline = boot.timeline.clone();
    boot.event(json!({
        "event": "phase",
        "phase": Phase::IdentityFound,
        "phase_at_ms": at_ms,
        "source": found.source,
        "node_id": doc.node_id,
        "instance_id": doc.instance_id,
        "hostname": doc.hostname,
        "control_plane_url": doc.control_plane_url,
        "timeline": timeline,
    }));
    boot.identity = Some(found);
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

/// The seam for the agent library's bootstrap (enroll -> pull / verify -> mount ->
/// switch root). For now it only checks that the identity it will need is there.
fn bootstrap(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    if boot.identity.is_none() {
        return Err(PhaseError::IdentityMissing);
    }
    log::info!("bootstrap: agent library not wired in yet; identity only");
    if boot.options.test_switch_root {
        return test_switch_root(boot);
    }
    Ok(())
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
        // Modules load before fw_cfg is read; the power-off comes last, after a sync.
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
        assert_eq!(
            &sys.calls[sys.calls.len() - 2..],
            [Call::Sync, Call::Reboot(RebootKind::PowerOff)]
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
            .any(|c| matches!(c, Call::Read(p) if p.contains("fw_cfg"))));
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
            .with_file("/proc/cmdline", "powernode.on_failure=poweroff")
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
}
