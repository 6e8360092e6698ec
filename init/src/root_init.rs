//! Who runs as PID 1 of the composed root.
//!
//! A root whose `/sbin/init` is systemd gets systemd: the init execs it after
//! switch_root, and the agent runs as `powernode-agent.service`, a runtime unit this
//! module writes under `/run/systemd/system` before the switch (`/run` moves into the
//! new root, and systemd reads runtime units from there on its first load; a unit
//! shipped in the root module would tie every root to one agent path and state
//! directory). A root that brings no `/sbin/init` at all keeps the agent as PID 1, as
//! before. A root that names an init which cannot run (a dangling link, a file
//! without the exec bit) is refused before the switch, with a code and a recovery,
//! instead of a kernel panic after it.
//!
//! A systemd root must carry the running kernel's modules
//! (`/lib/modules/<release>/modules.dep`): udev, `modprobe` and Docker load drivers
//! and netfilter from there, and without them the node would come up half working.

use powernode_proto::ErrorCode;

use crate::sys::{Errno, Sys};

/// What the composed root names as its init.
pub const ROOT_INIT: &str = "/sbin/init";
/// The agent's unit name under systemd.
pub const AGENT_UNIT: &str = "powernode-agent.service";
/// Runtime units: systemd reads them at its first start and they vanish at power-off.
pub const RUNTIME_UNIT_DIR: &str = "/run/systemd/system";
/// How long systemd lets the agent go without a watchdog ping before restarting it.
pub const WATCHDOG_SECONDS: u64 = 30;
/// Mode argument of the init binary that runs the agent as a systemd service.
pub const AGENT_SERVICE_MODE: &str = "agent-service";

/// How the composed root is run after switch_root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootInit {
    /// The root brings no init: the agent is its PID 1.
    Agent,
    /// `/sbin/init` is systemd (at `path` inside the root).
    Systemd { path: String },
}

impl RootInit {
    /// The name reported upstream as `root.init`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Systemd { .. } => "systemd",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootInitError {
    #[error("{ROOT_INIT} in the composed root is a symlink to nothing")]
    Dangling,
    #[error("{ROOT_INIT} in the composed root ({path}) is not an executable file")]
    NotExecutable { path: String },
    #[error("inspecting {ROOT_INIT} in the composed root")]
    Inspect(#[source] Errno),
    #[error("the composed root has systemd but no modules for the running kernel {release} (/lib/modules/{release}/modules.dep)")]
    KernelModulesMissing { release: String },
    #[error("reading the running kernel's release")]
    Release(#[source] Errno),
}

impl RootInitError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Dangling | Self::NotExecutable { .. } => ErrorCode::RootInitInvalid,
            Self::KernelModulesMissing { .. } => ErrorCode::KernelModulesMissing,
            Self::Inspect(_) | Self::Release(_) => ErrorCode::Internal,
        }
    }

    /// What the operator can do about it.
    pub fn recovery(&self) -> Option<String> {
        match self {
            Self::Dangling | Self::NotExecutable { .. } => Some(format!(
                "the root module's {ROOT_INIT} cannot run: publish a root module whose {ROOT_INIT} \
                 is an executable (systemd), or none at all (the agent then runs as PID 1), \
                 set-template-modules, then provision-instance again"
            )),
            Self::KernelModulesMissing { release } => Some(format!(
                "add the kernel modules for {release} to the template's root modules \
                 (powernode-initramfs kernel-modules --out DIR, publish-module DIR --kind root), \
                 then provision-instance again"
            )),
            Self::Inspect(_) | Self::Release(_) => None,
        }
    }
}

/// Reads what `root` (mounted) names as its init; for systemd, checks that the
/// running kernel's modules are there.
pub fn inspect(sys: &mut dyn Sys, root: &str) -> Result<RootInit, RootInitError> {
    let init = match sys.resolve_in_root(root, ROOT_INIT) {
        Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(RootInit::Agent),
        Err(e) => return Err(RootInitError::Inspect(e)),
        Ok(None) => return Err(RootInitError::Dangling),
        Ok(Some(f)) => f,
    };
    if !init.executable {
        return Err(RootInitError::NotExecutable { path: init.path });
    }
    let is_systemd = init.path.rsplit('/').next() == Some("systemd");
    if !is_systemd {
        return Ok(RootInit::Agent);
    }
    let release = sys
        .read_file("/proc/sys/kernel/osrelease", 256)
        .map_err(RootInitError::Release)?;
    let release = String::from_utf8_lossy(&release).trim().to_string();
    let dep = format!("/lib/modules/{release}/modules.dep");
    match sys.resolve_in_root(root, &dep) {
        Ok(Some(_)) => Ok(RootInit::Systemd { path: init.path }),
        Ok(None) | Err(_) => Err(RootInitError::KernelModulesMissing { release }),
    }
}

/// The agent's unit: the init binary (copied to `/run`, which moves into the root)
/// in service mode over `state_dir`. `Type=notify`: the agent says `READY=1` after
/// its first handshake, and `multi-user.target` (which wants it) waits for that.
/// Restarted whatever ends it; the watchdog catches a hung agent. Module services
/// are units of their own, so a restart of the agent never stops a workload.
pub fn agent_unit(bin: &str, state_dir: &str) -> String {
    format!(
        "# Written by powernode-init at boot (runtime unit; gone at power-off).\n\
         [Unit]\n\
         Description=Powernode node agent\n\
         After=local-fs.target systemd-journald.socket\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={bin} {AGENT_SERVICE_MODE} {state_dir}\n\
         Restart=always\n\
         RestartSec=1s\n\
         TimeoutStartSec=180s\n\
         TimeoutStopSec=30s\n\
         WatchdogSec={WATCHDOG_SECONDS}s\n\
         KillMode=mixed\n"
    )
}

/// Installs [`agent_unit`] under [`RUNTIME_UNIT_DIR`], wanted by
/// `multi-user.target` (a drop-in: no symlink needed).
pub fn install_agent_unit(
    sys: &mut dyn Sys,
    bin: &str,
    state_dir: &str,
) -> Result<(), (String, Errno)> {
    let dropin_dir = format!("{RUNTIME_UNIT_DIR}/multi-user.target.d");
    for dir in ["/run/systemd", RUNTIME_UNIT_DIR, dropin_dir.as_str()] {
        sys.mkdir(dir, 0o755).map_err(|e| (dir.to_string(), e))?;
    }
    let unit = format!("{RUNTIME_UNIT_DIR}/{AGENT_UNIT}");
    sys.create_file(&unit, agent_unit(bin, state_dir).as_bytes(), 0o644)
        .map_err(|e| (unit.clone(), e))?;
    let dropin = format!("{dropin_dir}/powernode-agent.conf");
    let body = format!("[Unit]\nWants={AGENT_UNIT}\n");
    sys.create_file(&dropin, body.as_bytes(), 0o644)
        .map_err(|e| (dropin.clone(), e))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    const ROOT: &str = "/sysroot";

    fn with_osrelease(sys: FakeSys) -> FakeSys {
        sys.with_file("/proc/sys/kernel/osrelease", "6.12.57+deb13-cloud-amd64\n")
    }

    /// `sys` with a Debian root at `/sysroot`, as the kernel would resolve it:
    /// `/sbin/init` an absolute link to systemd, the running kernel's modules under
    /// `/usr/lib/modules` (reached through `/lib`). Shared with the boot's tests.
    pub(crate) fn with_debian_root(sys: FakeSys) -> FakeSys {
        let release = "6.12.57+deb13-cloud-amd64";
        let mut sys = with_osrelease(sys)
            .with_file("/sysroot/usr/lib/systemd/systemd", "ELF")
            .with_file(
                &format!("/sysroot/usr/lib/modules/{release}/modules.dep"),
                "",
            );
        sys.executables
            .insert("/sysroot/usr/lib/systemd/systemd".into());
        sys.links
            .insert("/sysroot/sbin/init".into(), "/lib/systemd/systemd".into());
        sys.links.insert(
            "/sysroot/lib/systemd/systemd".into(),
            "/usr/lib/systemd/systemd".into(),
        );
        sys.links.insert(
            format!("/sysroot/lib/modules/{release}/modules.dep"),
            format!("/usr/lib/modules/{release}/modules.dep"),
        );
        sys
    }

    fn debian_root() -> FakeSys {
        with_debian_root(FakeSys::default())
    }

    #[test]
    fn a_root_whose_init_is_systemd_gets_systemd() {
        let mut sys = debian_root();
        assert_eq!(
            inspect(&mut sys, ROOT),
            Ok(RootInit::Systemd {
                path: "/usr/lib/systemd/systemd".into()
            })
        );
    }

    #[test]
    fn a_root_without_an_init_keeps_the_agent_as_pid_1() {
        let mut sys = with_osrelease(FakeSys::default()).with_file("/sysroot/bin/sh", "ELF");
        assert_eq!(inspect(&mut sys, ROOT), Ok(RootInit::Agent));
    }

    #[test]
    fn another_init_keeps_the_agent_as_pid_1() {
        let mut sys = FakeSys::default().with_file("/sysroot/bin/busybox", "ELF");
        sys.executables.insert("/sysroot/bin/busybox".into());
        sys.links
            .insert("/sysroot/sbin/init".into(), "/bin/busybox".into());
        assert_eq!(inspect(&mut sys, ROOT), Ok(RootInit::Agent));
    }

    #[test]
    fn a_dangling_init_is_refused_with_a_recovery() {
        let mut sys = FakeSys::default();
        sys.links
            .insert("/sysroot/sbin/init".into(), "/lib/systemd/systemd".into());
        let e = inspect(&mut sys, ROOT).unwrap_err();
        assert_eq!(e, RootInitError::Dangling);
        assert_eq!(e.code(), ErrorCode::RootInitInvalid);
        assert!(e.recovery().unwrap().contains("set-template-modules"));
    }

    #[test]
    fn an_init_without_the_exec_bit_is_refused_naming_it() {
        let mut sys = debian_root();
        sys.executables.clear();
        let e = inspect(&mut sys, ROOT).unwrap_err();
        assert_eq!(
            e,
            RootInitError::NotExecutable {
                path: "/usr/lib/systemd/systemd".into()
            }
        );
        assert!(e.to_string().contains("/usr/lib/systemd/systemd"));
    }

    #[test]
    fn a_systemd_root_without_the_kernels_modules_is_refused_naming_the_release() {
        let mut sys = debian_root();
        sys.files
            .remove("/sysroot/usr/lib/modules/6.12.57+deb13-cloud-amd64/modules.dep");
        let e = inspect(&mut sys, ROOT).unwrap_err();
        assert_eq!(e.code(), ErrorCode::KernelModulesMissing);
        assert!(e.to_string().contains("6.12.57+deb13-cloud-amd64"));
        assert!(e.recovery().unwrap().contains("kernel-modules"));
    }

    #[test]
    fn the_agent_unit_is_a_notify_service_with_a_watchdog_wanted_by_multi_user() {
        let mut sys = FakeSys::default();
        install_agent_unit(
            &mut sys,
            "/run/powernode/powernode-init",
            "/persist/powernode",
        )
        .unwrap();
        let unit = String::from_utf8(
            sys.files
                .get("/run/systemd/system/powernode-agent.service")
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert!(unit.contains("Type=notify\n"));
        assert!(unit.contains("WatchdogSec=30s\n"));
        assert!(unit.contains("Restart=always\n"));
        assert!(unit.contains(
            "ExecStart=/run/powernode/powernode-init agent-service /persist/powernode\n"
        ));
        let dropin = sys
            .files
            .get("/run/systemd/system/multi-user.target.d/powernode-agent.conf")
            .unwrap();
        assert_eq!(
            dropin.as_slice(),
            b"[Unit]\nWants=powernode-agent.service\n"
        );
    }
}
