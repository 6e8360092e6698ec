//! The composed root, before the hand-off: the agent composes the root modules at
//! [`COMPOSED_ROOT`], the init reads the files a hand-off would run in full (so a
//! corrupt object fails here, with its path, not later), finds the root's init,
//! and leaves what agent mode needs (a copy of itself, the hand-off file).

use powernode_proto::node::{Phase, RootFacts, RunningModule};
use powernode_proto::ErrorCode;
use serde_json::json;

use super::error::PhaseError;
use super::state::Boot;
use crate::agent::{Handoff, AGENT_MODE, AGENT_MODE_BIN, HANDOFF_FILE};
use crate::layout::RUN_STATE_DIR;
use crate::root_init::{self, RootInit};
use crate::sys::{ok_if_exists, Errno, Sys};

/// This init's own binary, copied for agent mode.
const SELF_EXE: &str = "/proc/self/exe";

/// Where the union of the root modules is mounted before switch_root.
pub const COMPOSED_ROOT: &str = "/sysroot";

/// Files of the composed root read in full before switch_root, where present: what
/// a systemd hand-off would exec, and the shell. The kernel checks every page of an
/// fs-verity object as it is read, so a corrupt object fails the boot here, reported
/// upstream with its path, instead of as a random `EIO` once the node is running.
pub const ROOT_CHECKS: &[&str] = &["/sbin/init", "/bin/sh"];

/// Reads each of [`ROOT_CHECKS`] that exists (resolved inside `root`); returns the
/// paths read.
pub fn check_root(sys: &mut dyn Sys, root: &str, verity: bool) -> Result<Vec<String>, PhaseError> {
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

pub fn try_compose_root(boot: &mut Boot<'_>) -> Result<ComposedRoot, PhaseError> {
    let Some(agent) = boot.agent.as_deref_mut() else {
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
    let checked = match check_root(boot.sys, COMPOSED_ROOT, verity) {
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
    let init = root_init::inspect(boot.sys, COMPOSED_ROOT)?;
    boot.mark(Phase::RootMounted);
    if let Some(f) = facts.as_mut() {
        f.init = init.name().to_string();
        if let Some(c) = f.compose.as_mut() {
            c.checked = checked;
        }
    }
    boot.event(json!({"event": "root_composed", "root": facts}));
    prepare_agent_mode(boot, &modules, facts.as_ref())?;
    let bin = AGENT_MODE_BIN;
    match init {
        RootInit::Agent => {
            let state_dir = boot.state_dir.clone().unwrap_or_default();
            Ok(ComposedRoot::Mounted {
                path: COMPOSED_ROOT.into(),
                init: bin.into(),
                args: vec![AGENT_MODE.into(), state_dir],
            })
        }
        RootInit::Systemd { path } => {
            let state_dir = boot.state_dir.clone().unwrap_or_default();
            root_init::install_agent_unit(boot.sys, bin, &state_dir).map_err(|(path, errno)| {
                PhaseError::HandOff {
                    step: "writing the agent's unit",
                    path,
                    errno,
                }
            })?;
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

/// Copies this init to [`AGENT_MODE_BIN`] and leaves the timeline
/// and root module digests for agent mode in the state directory.
fn prepare_agent_mode(
    boot: &mut Boot<'_>,
    modules: &[RunningModule],
    facts: Option<&RootFacts>,
) -> Result<(), PhaseError> {
    let handoff_err = |step: &'static str, path: &str| {
        let path = path.to_string();
        move |errno| PhaseError::HandOff { step, path, errno }
    };
    let state_dir = boot
        .state_dir
        .clone()
        .ok_or_else(|| handoff_err("finding the state directory", "(none)")(Errno::NOENT))?;
    ok_if_exists(boot.sys.mkdir(RUN_STATE_DIR, 0o700))
        .map_err(handoff_err("creating", RUN_STATE_DIR))?;
    boot.sys
        .copy_file(SELF_EXE, AGENT_MODE_BIN, 0o755)
        .map_err(handoff_err("copying the init to", AGENT_MODE_BIN))?;
    let handoff = Handoff {
        timeline: boot.timeline.clone(),
        root_modules: modules.to_vec(),
        root_facts: facts.cloned(),
        root_images: boot
            .agent
            .as_deref()
            .map(|a| a.root_images())
            .unwrap_or_default(),
    };
    let path = format!("{state_dir}/{}", HANDOFF_FILE);
    let body =
        serde_json::to_vec(&handoff).map_err(|_| handoff_err("encoding", &path)(Errno::INVAL))?;
    boot.sys
        .create_file(&path, &body, 0o600)
        .map_err(handoff_err("writing", &path))?;
    Ok(())
}
