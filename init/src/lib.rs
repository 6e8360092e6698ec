//! `powernode-init`: the static PID 1 of the netboot initramfs. Early mounts, kernel
//! modules, identity (command line or fw_cfg), network (DHCPv4 or static), then the
//! `bootstrap` phase: the agent library's enrollment and first handshake with the
//! init's boot timeline ([`agent`]). Then the hand-off ([`boot::state::Boot::hand_off`]):
//! without signed modules yet, the init becomes the agent as PID 1 of the
//! initramfs and powers off when the control plane refuses the node; the seam for
//! [`switch_root`] into a composed root is there (VM-tested with a tmpfs root).
//!
//! It must never panic and never exit: PID 1 returning is a kernel panic. Every phase
//! returns a typed error, and the failure policy from the kernel command line
//! (`powernode.on_failure=poweroff|reboot|retry`) decides what happens next; a panic
//! hook applies the same policy should a bug slip through (the binary is built with
//! `panic = "abort"`).
//!
//! Every boot ends in [`failure::reset`]: sync, the disks left clean
//! ([`shutdown`]: writable block/loop-backed mounts and overlays remounted read-only
//! and unmounted), then `reboot(2)`.
//!
//! All syscalls go through [`sys`]; the rest of the crate has no `unsafe` and is
//! tested against a recording fake of that seam, without root.
//!
//! Files import downwards only. On top, [`boot`] (the runner: the table of phases,
//! the failure policy, the hand-off; its rooms under `boot/`) and [`agent`] (the seam
//! to the agent library; its rooms under `agent/`). Below them the pieces the phases
//! use ([`cloud`], [`identity`], [`net`], [`modules`], [`switch_root`],
//! [`root_init`], [`failure`], [`shutdown`], ...), and at the bottom [`sys`] (its
//! fake in `sys/fake.rs`), [`logger`], [`console`] (the console and kmsg without a
//! `Sys`), [`cmdline`] and [`layout`] (paths and constants more than one file uses).
//!
//! Test switches on the command line (used by the VM tier, harmless elsewhere):
//! `powernode.test_poweroff=1` (power off when done), `powernode.test_panic=1`,
//! `powernode.test_switch_root=1`.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
// Tests may unwrap: a failing unwrap is a failing test.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod agent;
pub mod boot;
pub mod cloud;
pub mod cmdline;
pub mod console;
pub mod dhcp;
pub mod dhcp_renew;
pub mod failure;
pub mod identity;
pub mod layout;
pub mod logger;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod netlink;
pub mod root_init;
pub mod shutdown;
pub mod switch_root;
pub mod sys;

/// The init's entry point: the boot, or (with [`boot::test_root::SWITCHED_ROOT_CHECK`]) the
/// test root's self-report. Never returns.
pub fn main() -> ! {
    if std::env::args().nth(1).as_deref() == Some(boot::test_root::SWITCHED_ROOT_CHECK) {
        let mut sys = sys::RealSys::new();
        failure::install_panic_hook();
        failure::set_policy(cmdline::FailurePolicy::Poweroff);
        let outcome = boot::test_root::switched_root_check(&mut sys);
        log::warn!("switched-root check ended with {outcome:?}; parking");
        failure::park(&mut sys)
    }
    if std::env::args().nth(1).as_deref() == Some(agent::AGENT_MODE) {
        agent_mode()
    }
    if std::env::args().nth(1).as_deref() == Some(root_init::AGENT_SERVICE_MODE) {
        agent_service()
    }
    run()
}

/// The agent as `powernode-agent.service` under the composed root's systemd: the
/// same runtime as [`agent_mode`], but systemd is PID 1, so it reaps, restarts this
/// process whatever ends it, and powers off or reboots when asked (`systemctl`). A
/// panic aborts (`panic = "abort"`) and systemd restarts the agent; it never takes
/// the machine down.
fn agent_service() -> ! {
    logger::start_stderr();
    std::panic::set_hook(Box::new(|info| log::error!("agent panic: {info}")));
    let state_dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "/run/powernode".into());
    log::info!(
        "agent as {} under systemd; state dir {state_dir}",
        root_init::AGENT_UNIT
    );
    let end = agent::run_as_service(std::path::Path::new(&state_dir));
    log::info!("agent ended: {end:?}");
    let verb = match &end {
        agent::AgentEnd::Reboot => Some("reboot"),
        agent::AgentEnd::Refused { .. } => Some("poweroff"),
        agent::AgentEnd::Stopped | agent::AgentEnd::Failed { .. } => None,
    };
    if let Some(verb) = verb {
        // Queued, not waited for: systemd stops this unit as part of the job, and
        // a unit being stopped is not restarted.
        match std::process::Command::new("systemctl")
            .args(["--no-block", verb])
            .status()
        {
            Ok(s) if s.success() => log::info!("systemctl {verb} queued"),
            Ok(s) => log::error!("systemctl {verb} failed: {s}"),
            Err(e) => log::error!("running systemctl {verb}: {e}"),
        }
    }
    logger::flush();
    // A failure exits non-zero so the journal says so; systemd restarts either way.
    std::process::exit(i32::from(matches!(end, agent::AgentEnd::Failed { .. })))
}

/// PID 1 of the composed root (re-executed by the init after switch_root): runs the
/// agent from the state directory given as argv\[2\], reaping orphans, and powers
/// off when it ends. Never returns.
fn agent_mode() -> ! {
    let mut sys = sys::RealSys::new();
    sys::Sys::start_logging(&mut sys);
    failure::install_panic_hook();
    failure::set_policy(cmdline::FailurePolicy::Poweroff);
    let state_dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "/run/powernode".into());
    log::info!("agent mode in the composed root; state dir {state_dir}");
    let end = agent::run_in_composed_root(std::path::Path::new(&state_dir));
    let fields = serde_json::json!({"event": "agent_stopped", "mode": "composed_root", "end": format!("{end:?}")});
    sys::Sys::console(&mut sys, &format!("{}{fields}", console::EVENT_PREFIX));
    // A reboot task ends in a reboot (netboot brings the node back); anything else
    // powers off.
    let kind = if end == agent::AgentEnd::Reboot {
        sys::RebootKind::Restart
    } else {
        sys::RebootKind::PowerOff
    };
    let outcome = failure::reset(&mut sys, kind);
    log::warn!("agent mode ended with {outcome:?}; parking");
    failure::park(&mut sys)
}

/// Runs the boot on the real kernel. Never returns.
pub fn run() -> ! {
    let mut sys = sys::RealSys::new();
    failure::install_panic_hook();
    register_fs_loader();
    let mut agent = agent::RealAgent::default();
    let outcome = boot::state::Boot::new(&mut sys)
        .with_agent(&mut agent)
        .run();
    // Only reached when power-off/reboot failed or there is nothing to hand off to
    // yet: PID 1 must not exit, so it parks.
    log::warn!("boot ended with {outcome:?}; parking PID 1");
    failure::park(&mut sys)
}

/// Lets the agent library load the filesystem modules this initramfs ships before it
/// mounts one (the config drive): the kernel has no `modprobe` to call here.
fn register_fs_loader() {
    powernode_agent::kmod::set_fs_loader(Box::new(|fstype: &str| {
        match layout::FS_MODULES.iter().find(|(fs, _)| *fs == fstype) {
            Some((_, names)) => modules::load_on_demand(fstype, names),
            None => Ok(()),
        }
    }));
}
