//! The boot as a list of named phases. Each phase is a plain function over [`Boot`];
//! a failing phase is reported (console JSON + log) and the failure policy decides:
//! power off, reboot, or retry the same phase with backoff. Phases are idempotent
//! (an existing mount is `EBUSY`, a loaded module `EEXIST`), so a retry is safe.
//!
//! Console lines starting `POWERNODE-INIT ` carry one JSON object each: the
//! structured channel that VM tests and the benchmark read (the timeline uses the
//! wire types of `powernode_proto::node`, the same the agent sends upstream).
//!
//! This file is the runner: the table of phases ([`PHASES`]), the failure policy
//! around each, and the hand-off once they are done. Its rooms: [`state`] (what the
//! phases share), [`error`] (why one failed), [`phases`] (the phase functions),
//! [`persist`] (the `/persist` disk and the state directory), [`root`] (checking
//! the composed root and preparing the hand-off) and [`test_root`] (the VM tier's
//! switch_root check).

pub mod error;
pub mod persist;
pub mod phases;
pub mod root;
pub mod state;
pub mod test_root;

use powernode_proto::boot_report::ReportTarget;
use powernode_proto::node::{Phase, TimelineEntry};
use serde_json::json;

use crate::agent::AgentEnd;
use crate::cmdline;
use crate::failure::{self, Outcome};
use crate::layout::PERSIST_MOUNT;
use crate::switch_root;
use crate::sys::RebootKind;
use error::PhaseError;
use phases::{
    bootstrap, bring_up_network, early_mounts, find_cloud_identity, find_identity, load_modules,
    read_cmdline,
};
use root::ComposedRoot;
use state::Boot;

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

/// The runner: the phases in order, then the hand-off.
impl Boot<'_> {
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
            Some(agent) => agent.report_failure(&timeline, failure.clone()),
            None => false,
        };
        // Without credentials, the bootstrap token still lets the node say why, once
        // it knows the token and has a network to send it on.
        let boot_report = !reported
            && !self.enrolled
            && self.report_boot(&failure, error.report_target().cloned());
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
            "reported_upstream": reported || boot_report,
            "boot_report": boot_report,
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

    /// Sends `failure` as a boot report with the identity's bootstrap token (or,
    /// without an identity, to `salvaged`: what a broken document still names); best
    /// effort, a few seconds at most. `false` when there is no token or network yet,
    /// or the control plane did not record it.
    fn report_boot(
        &mut self,
        failure: &powernode_proto::node::FailureReport,
        salvaged: Option<ReportTarget>,
    ) -> bool {
        let target = match &self.identity {
            Some(found) => Some(ReportTarget::from(&found.document)),
            None => salvaged,
        };
        let (Some(target), Some(_)) = (target, &self.network) else {
            log::info!("no bootstrap token or network yet: the failure stays on the console");
            return false;
        };
        match self.agent.as_deref_mut() {
            Some(agent) => agent.report_boot(&target, failure),
            None => false,
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
            match root::try_compose_root(self) {
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

#[cfg(test)]
mod tests {
    use super::phases::find_cloud_identity_with;
    use super::root::{check_root, COMPOSED_ROOT};
    use super::test_root::SWITCHED_ROOT_CHECK;
    use super::*;
    use crate::agent::{BootstrapError, BootstrapInput};
    use crate::console::EVENT_PREFIX;
    use crate::identity::tests::{doc_json, with_fw_cfg};
    use crate::identity::Found;
    use crate::layout;
    use crate::layout::{PERSIST_STATE_DIR, RUN_STATE_DIR};
    use crate::sys::fake::{Call, FakeSys};
    use crate::sys::Errno;
    use crate::sys::ModuleSysError;
    use powernode_proto::ErrorCode;
    use serde_json::Value;

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

    /// Refused before it has credentials, the node still says why: a boot report with
    /// the bootstrap token, before the policy powers it off. Failures before the
    /// identity and the network exist stay on the console.
    #[test]
    fn a_refusal_at_enrollment_goes_upstream_as_a_boot_report() {
        let mut sys = machine("powernode.on_failure=poweroff powernode.attempts=3");
        let mut agent = FakeAgent {
            boot_report_ok: true,
            ..FakeAgent::default()
        };
        agent.bootstrap_errors.push(BootstrapError::Enroll(
            powernode_agent::enroll::EnrollError::Client(
                powernode_agent::client::ClientError::Refused {
                    method: "POST",
                    path: "/v1/enrollment".into(),
                    status: 401,
                    code: ErrorCode::BootstrapTokenUsed,
                    message: "bootstrap token was already used".into(),
                },
            ),
        ));
        let outcome = Boot::new(&mut sys).with_agent(&mut agent).run();
        assert_eq!(outcome, Outcome::Reset(RebootKind::PowerOff));
        let [(instance, report)] = agent.boot_reports.as_slice() else {
            panic!("one boot report: {:?}", agent.boot_reports);
        };
        assert_eq!(instance, "inst-1");
        assert_eq!(
            (report.phase, report.code, report.attempt),
            (Phase::Enrolled, ErrorCode::BootstrapTokenUsed, 1)
        );
        assert!(report.message.contains("already used"), "{report:?}");
        let failed = events(&sys)
            .into_iter()
            .find(|e| e["event"] == "phase_failed")
            .unwrap();
        assert_eq!(failed["boot_report"], true);
        assert_eq!(failed["reported_upstream"], true);

        // A failure before there is a network (a module that will not load) cannot.
        let mut sys = machine("powernode.on_failure=poweroff");
        sys.module_errors.insert(
            "/lib/modules/failover.ko".into(),
            ModuleSysError::Load(Errno::NOEXEC),
        );
        let mut agent = FakeAgent {
            boot_report_ok: true,
            ..FakeAgent::default()
        };
        Boot::new(&mut sys).with_agent(&mut agent).run();
        assert!(agent.boot_reports.is_empty());
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
        ) -> Result<
            Option<Vec<powernode_proto::node::RunningModule>>,
            crate::agent::compose::ComposeError,
        > {
            self.composes += 1;
            Ok(Some(vec![powernode_proto::node::RunningModule {
                name: "base".into(),
                version: "1".into(),
                digest: "sha256:aa".into(),
            }]))
        }
        fn repair_root(&mut self) -> Result<Vec<String>, crate::agent::compose::ComposeError> {
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

    /// Cloud user data broken in one field still names the control plane and the
    /// token: with the network up, the failure goes upstream as a boot report for
    /// that instance. A document that names no usable token cannot.
    #[test]
    fn a_cloud_document_broken_in_one_field_is_still_reported_to_its_control_plane() {
        let mut doc: Value = serde_json::from_str(&doc_json()).unwrap();
        doc["hostname"] = json!("not a hostname!");
        let broken = doc.to_string();
        for (bytes, reported) in [
            (broken.clone(), true),
            ("{\"version\": 1}".to_string(), false),
        ] {
            let mut sys = FakeSys::default();
            let mut agent = FakeAgent {
                boot_report_ok: true,
                ..FakeAgent::default()
            };
            let mut boot = Boot::new(&mut sys).with_agent(&mut agent);
            boot.network = Some(crate::net::Configured {
                interface: "eth0".into(),
                address: std::net::Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: None,
                dns: Vec::new(),
                source: "dhcp",
                lease: None,
            });
            let err = find_cloud_identity_with(&mut boot, &move |_: &CloudOptions| {
                Err(
                    powernode_agent::identity::cloud::parse_user_data("aws", bytes.as_bytes())
                        .unwrap_err(),
                )
            })
            .unwrap_err();
            assert_eq!(err.code(), ErrorCode::IdentityInvalid, "{err}");
            boot.options.on_failure = cmdline::FailurePolicy::Poweroff;
            let outcome = boot.failed("cloud_identity", &err, 1);
            assert_eq!(outcome, Some(Outcome::Reset(RebootKind::PowerOff)));
            drop(boot);
            if reported {
                let [(instance, report)] = agent.boot_reports.as_slice() else {
                    panic!("one boot report: {:?}", agent.boot_reports);
                };
                assert_eq!(instance, "inst-1");
                assert_eq!(
                    (report.phase, report.code),
                    (Phase::IdentityFound, ErrorCode::IdentityInvalid)
                );
                assert!(report.message.contains("hostname"), "{}", report.message);
            } else {
                assert!(agent.boot_reports.is_empty(), "{:?}", agent.boot_reports);
            }
        }
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
