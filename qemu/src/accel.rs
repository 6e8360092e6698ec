//! KVM when it really works, TCG otherwise. `/dev/kvm` existing is not enough (a
//! container can have the node without the permission, a nested host without VMX),
//! so [`probe_kvm`] opens it, checks the API version and creates a throw-away VM.
//!
//! Even that is not enough: on some nested hosts (this project's build machine among
//! them) `KVM_CREATE_VM` works and the firmware runs, but the kernel's switch to
//! protected mode stops QEMU with "KVM internal error ... emulation failure", and the
//! VM hangs paused. So [`Accel::detect_for_kernel`] also boots the actual kernel
//! under KVM for a moment (a canary) and takes KVM only if the kernel printed its
//! banner; the answer is cached for the process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use crate::sys;
use crate::vm::Vm;

/// The only KVM API version Linux has ever shipped.
const KVM_API_VERSION: i32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// `-accel kvm -cpu host`
    Kvm,
    /// `-accel tcg -cpu max`: software emulation, slow but everywhere.
    Tcg,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvmError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        errno: Errno,
    },
    #[error("KVM_GET_API_VERSION failed")]
    ApiVersionCall(#[source] Errno),
    #[error("KVM API version {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] Errno),
}

/// Tries KVM through `path` (normally `/dev/kvm`).
pub fn probe_kvm(path: &str) -> Result<(), KvmError> {
    let kvm = sys::open_rw(path).map_err(|errno| KvmError::Open {
        path: path.to_string(),
        errno,
    })?;
    let version = sys::kvm_api_version(&kvm).map_err(KvmError::ApiVersionCall)?;
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    sys::kvm_create_vm(&kvm).map_err(KvmError::CreateVm)?;
    Ok(())
}

impl Accel {
    /// KVM if a VM can be created right now, else TCG. `POWERNODE_ACCEL=tcg|kvm`
    /// overrides the probe (e.g. to measure TCG on a KVM host).
    pub fn detect() -> Self {
        match std::env::var("POWERNODE_ACCEL").as_deref() {
            Ok("tcg") => return Self::Tcg,
            Ok("kvm") => return Self::Kvm,
            _ => {}
        }
        match probe_kvm("/dev/kvm") {
            Ok(()) => Self::Kvm,
            Err(_) => Self::Tcg,
        }
    }

    /// [`Accel::detect`], then, if KVM looks usable, a canary boot of `kernel` under
    /// KVM (up to `CANARY_DEADLINE`): KVM only if the kernel printed its banner.
    pub fn detect_for_kernel(qemu: &Path, kernel: &Path) -> Self {
        if Self::detect() == Self::Tcg {
            return Self::Tcg;
        }
        if std::env::var("POWERNODE_ACCEL").as_deref() == Ok("kvm") {
            return Self::Kvm;
        }
        // The lock is held across the canary: concurrent callers wait for one probe.
        static CACHE: OnceLock<Mutex<BTreeMap<PathBuf, Accel>>> = OnceLock::new();
        let mut cache = match CACHE.get_or_init(|| Mutex::new(BTreeMap::new())).lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(hit) = cache.get(kernel) {
            return *hit;
        }
        let accel = match kvm_canary(qemu, kernel) {
            Ok(()) => Self::Kvm,
            Err(reason) => {
                eprintln!("powernode-qemu: KVM unusable, using TCG: {reason}");
                Self::Tcg
            }
        };
        cache.insert(kernel.to_path_buf(), accel);
        accel
    }

    pub fn args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

const CANARY_DEADLINE: Duration = Duration::from_secs(20);

/// Boots `kernel` (no initramfs) under KVM until its banner appears on the serial
/// console; any KVM error, early exit or timeout is the reason KVM is not usable.
pub fn kvm_canary(qemu: &Path, kernel: &Path) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("powernode-kvm-canary-{}", std::process::id()));
    let serial = dir.join("serial.log");
    let argv: Vec<String> = [
        qemu.to_string_lossy().as_ref(),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-machine",
        "q35",
        "-m",
        "128",
        "-serial",
        &format!("file:{}", serial.to_string_lossy()),
        "-kernel",
        kernel.to_string_lossy().as_ref(),
        "-append",
        "console=ttyS0 panic=-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let result = (|| {
        let mut vm = Vm::spawn_argv(&argv, &serial).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + CANARY_DEADLINE;
        loop {
            if vm.serial().contains("Linux version") {
                return Ok(());
            }
            let stderr = vm.stderr();
            if stderr.contains("KVM internal error") || stderr.contains("emulation failure") {
                return Err(format!(
                    "QEMU: {}",
                    stderr.lines().next().unwrap_or_default()
                ));
            }
            if let Ok(Some(status)) = vm.try_wait() {
                return Err(format!(
                    "QEMU exited with {status} before the kernel banner: {stderr}"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("no kernel banner within {CANARY_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_an_open_error() {
        assert_eq!(
            probe_kvm("/nonexistent/kvm"),
            Err(KvmError::Open {
                path: "/nonexistent/kvm".into(),
                errno: Errno::NOENT
            })
        );
    }

    #[test]
    fn a_device_that_is_not_kvm_fails_the_ioctl() {
        assert!(matches!(
            probe_kvm("/dev/null"),
            Err(KvmError::ApiVersionCall(Errno::NOTTY))
        ));
    }

    #[test]
    fn detect_agrees_with_the_probe() {
        if std::env::var_os("POWERNODE_ACCEL").is_some() {
            return;
        }
        let probed = probe_kvm("/dev/kvm");
        eprintln!("kvm probe on this host: {probed:?}");
        assert_eq!(Accel::detect() == Accel::Kvm, probed.is_ok());
    }
}
