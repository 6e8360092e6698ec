//! The pinned Debian kernel: which package, which bytes, and where it is unpacked.
//!
//! The `.deb` is fetched with `scripts/debs` (a private apt list; apt itself checks the
//! signed archive index), then checked against the sha256 pinned in `kernel.toml`
//! before anything reads it, then unpacked with `dpkg -x` into
//! `CACHE/kernel/VERSION/`. The unpacked tree is only created after the check passes,
//! so its presence means "verified".

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The pin shipped with the builder.
pub const DEFAULT_PIN: &str = include_str!("../kernel.toml");

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel pin is not valid TOML")]
    PinSyntax(#[source] toml::de::Error),
    #[error("kernel pin field `{field}` is invalid: {reason}")]
    PinField { field: &'static str, reason: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("kernel package {path} has sha256 {actual}, but the pin expects {expected}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("kernel package {0} is missing after the fetch")]
    DebMissing(PathBuf),
    #[error("unpacked kernel lacks {0}")]
    TreeIncomplete(PathBuf),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `kernel.toml`: the exact package, version, release and .deb digest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPin {
    /// Versioned package name, e.g. `linux-image-6.12.117+deb13-cloud-amd64`.
    pub package: String,
    /// Debian version, e.g. `6.12.117-1`.
    pub version: String,
    /// `uname -r` of the kernel, the folder name under `/usr/lib/modules`.
    pub release: String,
    /// Lowercase hex sha256 of the `.deb`.
    pub deb_sha256: String,
    /// Modules the init loads (the closure is added at build time). One with
    /// device aliases is loaded only when such a device is present.
    pub modules: Vec<String>,
    /// Of `modules`, those loaded only when asked for (the composefs filesystems,
    /// before the first EROFS mount), not at boot.
    #[serde(default)]
    pub on_demand: Vec<String>,
}

impl KernelPin {
    pub fn parse(text: &str) -> Result<Self, KernelError> {
        let pin: Self = toml::from_str(text).map_err(KernelError::PinSyntax)?;
        pin.validate()?;
        Ok(pin)
    }

    fn validate(&self) -> Result<(), KernelError> {
        let digest_ok = self.deb_sha256.len() == 64
            && self
                .deb_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !digest_ok {
            return Err(KernelError::PinField {
                field: "deb_sha256",
                reason: "must be 64 lowercase hex digits".into(),
            });
        }
        // These go into file names and an apt command line.
        for (field, value) in [
            ("package", &self.package),
            ("version", &self.version),
            ("release", &self.release),
        ] {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.~_".contains(&b));
            if !ok {
                return Err(KernelError::PinField {
                    field,
                    reason: format!(
                        "{value:?} is empty or has characters outside [A-Za-z0-9+-.~_]"
                    ),
                });
            }
        }
        if !self.package.ends_with(&self.release) {
            return Err(KernelError::PinField {
                field: "release",
                reason: format!("package {} does not end with it", self.package),
            });
        }
        if let Some(m) = self.on_demand.iter().find(|m| !self.modules.contains(m)) {
            return Err(KernelError::PinField {
                field: "on_demand",
                reason: format!("{m} is not one of `modules`"),
            });
        }
        if self.modules.is_empty() {
            return Err(KernelError::PinField {
                field: "modules",
                reason: "lists no module".into(),
            });
        }
        Ok(())
    }

    /// The file name apt gives the downloaded package.
    pub fn deb_file_name(&self) -> String {
        format!("{}_{}_amd64.deb", self.package, self.version)
    }
}

/// An unpacked, verified kernel.
#[derive(Debug, Clone)]
pub struct KernelTree {
    pub pin: KernelPin,
    pub root: PathBuf,
}

impl KernelTree {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.pin.release))
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.root
            .join(format!("usr/lib/modules/{}", self.pin.release))
    }
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, KernelError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks a downloaded package against the pin.
pub fn verify_deb(pin: &KernelPin, deb: &Path) -> Result<(), KernelError> {
    let actual = sha256_file(deb)?;
    if actual != pin.deb_sha256 {
        return Err(KernelError::DigestMismatch {
            path: deb.to_path_buf(),
            expected: pin.deb_sha256.clone(),
            actual,
        });
    }
    Ok(())
}

pub(crate) fn run(mut cmd: Command) -> Result<(), KernelError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| KernelError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(KernelError::CommandFailed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Makes sure the pinned kernel is unpacked under `cache`, fetching it with
/// `debs_script` (the project's `scripts/debs`) when the `.deb` is not there yet.
pub fn ensure_kernel(
    pin: &KernelPin,
    cache: &Path,
    debs_script: &Path,
) -> Result<KernelTree, KernelError> {
    let root = cache.join("kernel").join(&pin.version);
    let tree = KernelTree {
        pin: pin.clone(),
        root: root.clone(),
    };
    if root.is_dir() {
        return check_tree(tree);
    }
    let deb = cache.join("debs").join(pin.deb_file_name());
    if !deb.is_file() {
        let mut cmd = Command::new(debs_script);
        cmd.env("POWERNODE_CACHE", cache)
            .arg(format!("{}={}", pin.package, pin.version));
        run(cmd)?;
        if !deb.is_file() {
            return Err(KernelError::DebMissing(deb));
        }
    }
    verify_deb(pin, &deb)?;
    // Unpack beside the final folder and rename, so an interrupted unpack is never
    // mistaken for a verified tree.
    let partial = cache
        .join("kernel")
        .join(format!("{}.partial", pin.version));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    let mut cmd = Command::new("dpkg");
    cmd.arg("-x").arg(&deb).arg(&partial);
    run(cmd)?;
    fs::rename(&partial, &root).map_err(io(&root))?;
    check_tree(tree)
}

fn check_tree(tree: KernelTree) -> Result<KernelTree, KernelError> {
    for path in [tree.vmlinuz(), tree.modules_dir()] {
        if !path.exists() {
            return Err(KernelError::TreeIncomplete(path));
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pin_parses() {
        let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
        assert!(pin.package.starts_with("linux-image-6.12."));
        assert!(pin.release.ends_with("-cloud-amd64"));
        assert!(pin.modules.iter().any(|m| m == "qemu_fw_cfg"));
    }

    /// What the init and the agent library ask for by name is shipped, and waits
    /// to be asked for.
    #[test]
    fn modules_asked_for_at_run_time_are_on_demand() {
        let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
        let asked = powernode_init::layout::COMPOSEFS_MODULES
            .iter()
            .chain(powernode_init::layout::VERITY_MODULES)
            .chain(
                powernode_init::layout::FS_MODULES
                    .iter()
                    .flat_map(|(_, names)| names.iter()),
            );
        for name in asked {
            assert!(
                pin.on_demand.iter().any(|m| m == name),
                "{name} is asked for at run time but not in kernel.toml's on_demand"
            );
        }
        let bad = DEFAULT_PIN.replace("on_demand = [", "on_demand = [\"nosuch\",");
        assert!(matches!(
            KernelPin::parse(&bad),
            Err(KernelError::PinField {
                field: "on_demand",
                ..
            })
        ));
    }

    #[test]
    fn pin_rejects_bad_digest_and_names() {
        let bad = DEFAULT_PIN.replace("deb_sha256 = \"e", "deb_sha256 = \"E");
        assert!(matches!(
            KernelPin::parse(&bad),
            Err(KernelError::PinField {
                field: "deb_sha256",
                ..
            })
        ));
        let bad = DEFAULT_PIN.replace("version = \"", "version = \"1 ; rm -rf /");
        assert!(matches!(
            KernelPin::parse(&bad),
            Err(KernelError::PinField {
                field: "version",
                ..
            })
        ));
        let bad = format!("{DEFAULT_PIN}\nextra = 1\n");
        assert!(matches!(
            KernelPin::parse(&bad),
            Err(KernelError::PinSyntax(_))
        ));
    }

    #[test]
    fn digest_mismatch_names_expected_and_actual() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("k.deb");
        fs::write(&deb, b"not the kernel").unwrap();
        let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
        let err = verify_deb(&pin, &deb).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&pin.deb_sha256), "{text}");
        assert!(
            text.contains(&hex::encode(Sha256::digest(b"not the kernel"))),
            "{text}"
        );
    }

    #[test]
    fn tampered_deb_is_never_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
        fs::create_dir_all(dir.path().join("debs")).unwrap();
        fs::write(
            dir.path().join("debs").join(pin.deb_file_name()),
            b"tampered",
        )
        .unwrap();
        let err = ensure_kernel(&pin, dir.path(), Path::new("/nonexistent/debs")).unwrap_err();
        assert!(matches!(err, KernelError::DigestMismatch { .. }), "{err}");
        assert!(!dir.path().join("kernel").join(&pin.version).exists());
    }

    #[test]
    fn fetch_failure_is_reported_with_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let pin = KernelPin::parse(DEFAULT_PIN).unwrap();
        let err = ensure_kernel(&pin, dir.path(), Path::new("false")).unwrap_err();
        assert!(matches!(err, KernelError::CommandFailed { .. }), "{err}");
    }
}
