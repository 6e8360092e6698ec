//! KVM when it really works, TCG otherwise. `/dev/kvm` existing is not enough (a
//! container can have the node without the permission, a nested host without VMX),
//! so [`probe_kvm`] opens it, checks the API version and creates a throw-away VM.
//!
//! Even that is not enough on some nested hosts: the canary boot that settles it
//! ([`Accel::detect_for_kernel`]) needs a running VM and lives in `canary`,
//! so this module (which the pure `VmSpec -> argv` builder uses) stays below `vm`.

use rustix::io::Errno;

use crate::sys;

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

    pub fn args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
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
