//! The phases of the boot, one function each over [`Boot`]: early mounts, the
//! command line, kernel modules, identity (local, or from cloud metadata once the
//! network is up), network, and the agent's bootstrap. [`crate::boot::PHASES`]
//! lists them in order.

use powernode_agent::identity::cloud::CloudIdentity;
use powernode_proto::node::{Phase, TimelineEntry};
use serde_json::{json, Value};

use super::error::PhaseError;
use super::persist;
use super::state::Boot;
use super::test_root;
use crate::agent::BootstrapInput;
use crate::cloud;
use crate::cmdline;
use crate::failure;
use crate::identity::{self, Found};
use crate::modules;
use crate::mounts::{self, EARLY_MOUNTS};
use crate::net;

const CMDLINE_PATH: &str = powernode_sysfmt::cmdline::PATH;
/// Unlimited userspace writes to `/dev/kmsg` (the default rate limit drops lines).
const PRINTK_DEVKMSG: &str = "/proc/sys/kernel/printk_devkmsg";

pub fn early_mounts(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
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

pub fn read_cmdline(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
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

pub fn load_modules(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
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

pub fn find_identity(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
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
    identity_found(boot, found, |_| json!({}))
}

/// Marks `identity_found`, reports it on the console and keeps the identity, with the
/// module keys built into the initramfs as its pins; `more` (given the mark's time)
/// adds the source's own fields to the event.
fn identity_found(
    boot: &mut Boot<'_>,
    mut found: Found,
    more: impl FnOnce(u64) -> Value,
) -> Result<(), PhaseError> {
    let builtin = identity::builtin_trust_keys(boot.sys)?;
    let builtin_count = builtin.len();
    let dropped = identity::pin_builtin_keys(&mut found.document, builtin);
    if builtin_count > 0 {
        log::info!("module keys pinned by the initramfs: {builtin_count}");
    }
    if dropped > 0 {
        log::warn!(
            "the identity named {dropped} module key(s) the initramfs does not pin: ignored"
        );
    }
    if found.document.module_trust_keys.is_empty() {
        log::warn!("no module keys pinned: the control plane's keys will be trusted");
    }
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
        "module_keys_pinned": doc.module_trust_keys.len(),
        "timeline": timeline,
    });
    if let (Some(fields), Value::Object(more)) = (fields.as_object_mut(), more(at_ms)) {
        fields.extend(more);
    }
    boot.event(fields);
    boot.identity = Some(found);
    Ok(())
}

/// The `cloud_identity` phase: nothing to do when an identity was already found.
pub fn find_cloud_identity(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    find_cloud_identity_with(boot, &cloud::real_probe)
}

/// [`find_cloud_identity`] with a given prober (tests run it against a fake).
pub fn find_cloud_identity_with(
    boot: &mut Boot<'_>,
    probe: &cloud::Prober,
) -> Result<(), PhaseError> {
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
    )
}

/// The identity's network config (DHCP unless it says static). Runs after the
/// identity phase because a static config comes from the identity document.
pub fn bring_up_network(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
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
    // The lease is renewed by whatever runs the agent after the boot.
    if let Some(lease) = &up.lease {
        if let Err(e) = crate::dhcp_renew::save(boot.sys, lease) {
            log::warn!(
                "keeping the DHCP lease in {}: {e}; it will not be renewed",
                crate::dhcp_renew::LEASE_FILE
            );
        }
    }
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

/// The agent library's bootstrap: state directory, entropy, enrollment (or stored
/// credentials), first handshake with the init's timeline. Pull / verify / mount
/// of signed modules come here once they exist.
pub fn bootstrap(boot: &mut Boot<'_>) -> Result<(), PhaseError> {
    let Some(found) = boot.identity.clone() else {
        return Err(PhaseError::IdentityMissing);
    };
    if boot.options.test_switch_root {
        return test_root::test_switch_root(boot);
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
            let d = persist::prepare_state_dir(boot.sys, boot.options.persist.as_deref())?;
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
