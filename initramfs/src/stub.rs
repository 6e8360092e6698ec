//! The pinned systemd EFI stub (`linuxx64.efi.stub` from Debian's `systemd-boot-efi`)
//! that the unified kernel image is built on. Fetched, checked and unpacked the same
//! way as the kernel (see [`crate::kernel`]): `scripts/debs` downloads, the `.deb`
//! must match `stub.toml`'s sha256, and only then is it unpacked under
//! `CACHE/stub/VERSION/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::kernel::{self, KernelError};

/// The pin shipped with the builder.
pub const DEFAULT_STUB_PIN: &str = include_str!("../stub.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StubPin {
    pub package: String,
    pub version: String,
    pub deb_sha256: String,
    /// Path of the stub inside the package.
    pub stub: String,
}

impl StubPin {
    pub fn parse(text: &str) -> Result<Self, KernelError> {
        let pin: Self = toml::from_str(text).map_err(KernelError::PinSyntax)?;
        let hex_ok = pin.deb_sha256.len() == 64
            && pin
                .deb_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(KernelError::PinField {
                field: "deb_sha256",
                reason: "must be 64 lowercase hex digits".into(),
            });
        }
        for (field, value) in [("package", &pin.package), ("version", &pin.version)] {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.~_".contains(&b));
            if !ok {
                return Err(KernelError::PinField {
                    field,
                    reason: format!("{value:?} has characters outside [A-Za-z0-9+-.~_]"),
                });
            }
        }
        let stub_ok = !pin.stub.starts_with('/')
            && !pin.stub.is_empty()
            && pin.stub.split('/').all(|c| !c.is_empty() && c != "..");
        if !stub_ok {
            return Err(KernelError::PinField {
                field: "stub",
                reason: format!("{:?} must be a relative path inside the package", pin.stub),
            });
        }
        Ok(pin)
    }

    pub fn deb_file_name(&self) -> String {
        format!("{}_{}_amd64.deb", self.package, self.version)
    }
}

/// Makes sure the pinned stub is unpacked under `cache` and returns its path.
pub fn ensure_stub(
    pin: &StubPin,
    cache: &Path,
    debs_script: &Path,
) -> Result<PathBuf, KernelError> {
    let root = cache.join("stub").join(&pin.version);
    let stub = root.join(&pin.stub);
    if root.is_dir() {
        return if stub.is_file() {
            Ok(stub)
        } else {
            Err(KernelError::TreeIncomplete(stub))
        };
    }
    let deb = cache.join("debs").join(pin.deb_file_name());
    if !deb.is_file() {
        let mut cmd = Command::new(debs_script);
        cmd.env("POWERNODE_CACHE", cache)
            .arg(format!("{}={}", pin.package, pin.version));
        kernel::run(cmd)?;
        if !deb.is_file() {
            return Err(KernelError::DebMissing(deb));
        }
    }
    let actual = kernel::sha256_file(&deb)?;
    if actual != pin.deb_sha256 {
        return Err(KernelError::DigestMismatch {
            path: deb,
            expected: pin.deb_sha256.clone(),
            actual,
        });
    }
    let partial = cache.join("stub").join(format!("{}.partial", pin.version));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KernelError::Io { path: p, source }
    };
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    let mut cmd = Command::new("dpkg");
    cmd.arg("-x").arg(&deb).arg(&partial);
    kernel::run(cmd)?;
    fs::rename(&partial, &root).map_err(io(&root))?;
    if stub.is_file() {
        Ok(stub)
    } else {
        Err(KernelError::TreeIncomplete(stub))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pin_parses_and_bad_fields_are_named() {
        let pin = StubPin::parse(DEFAULT_STUB_PIN).unwrap();
        assert_eq!(pin.package, "systemd-boot-efi");
        assert!(pin.stub.ends_with("linuxx64.efi.stub"));
        let bad = DEFAULT_STUB_PIN.replace("stub = \"usr", "stub = \"/usr");
        assert!(matches!(
            StubPin::parse(&bad),
            Err(KernelError::PinField { field: "stub", .. })
        ));
        let bad = DEFAULT_STUB_PIN.replace("deb_sha256 = \"3", "deb_sha256 = \"X");
        assert!(matches!(
            StubPin::parse(&bad),
            Err(KernelError::PinField {
                field: "deb_sha256",
                ..
            })
        ));
    }

    #[test]
    fn a_tampered_deb_is_never_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let pin = StubPin::parse(DEFAULT_STUB_PIN).unwrap();
        fs::create_dir_all(dir.path().join("debs")).unwrap();
        fs::write(dir.path().join("debs").join(pin.deb_file_name()), b"x").unwrap();
        let err = ensure_stub(&pin, dir.path(), Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(err, KernelError::DigestMismatch { .. }), "{err}");
        assert!(!dir.path().join("stub").join(&pin.version).exists());
    }
}
