//! The `/persist` disk of a persistent node: a raw image made with `qemu-img`, then
//! ext4 with the `verity` feature so the node can enable fs-verity on its objects.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{0} already exists; refusing to overwrite a disk")]
    Exists(PathBuf),
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn run(mut cmd: Command) -> Result<(), DiskError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| DiskError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DiskError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The ext4 label of the `/persist` disks made here; the VM finds its disk by it
/// (`powernode.persist=LABEL=pn-persist`), whatever the device is called.
pub const PERSIST_LABEL: &str = "pn-persist";

/// Creates `path` (`size_mib` MiB, raw) with an ext4 file system labelled
/// [`PERSIST_LABEL`] that has the verity feature. Refuses to overwrite an existing
/// file.
///
/// The block size is pinned to 4096: mke2fs picks 1024 for small disks, and the
/// node enables fs-verity with 4096-byte Merkle blocks (its objects are named by
/// those digests); older kernels accept that only when it equals the fs block size.
///
/// The file is created 0600 before anything is written to it (a node's credentials
/// and workload data live on it), and `qemu-img` keeps that mode.
pub fn make_persist_disk(path: &Path, size_mib: u32) -> Result<(), DiskError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => DiskError::Exists(path.to_path_buf()),
            _ => DiskError::Create {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let mut img = Command::new("qemu-img");
    img.args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(format!("{size_mib}M"));
    run(img)?;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-b",
        "4096",
        "-O",
        "verity",
        "-L",
        PERSIST_LABEL,
    ])
    .arg(path);
    run(mkfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_disk_is_ext4_with_verity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("persist.img");
        make_persist_disk(&path, 32).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "readable by its owner only"
        );
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let features = text
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or_default();
        assert!(features.contains("verity"), "{text}");
        let label = text
            .lines()
            .find(|l| l.starts_with("Filesystem volume name:"))
            .unwrap_or_default();
        assert!(label.ends_with(&format!(" {PERSIST_LABEL}")), "{label}");
        let block = text
            .lines()
            .find(|l| l.starts_with("Block size:"))
            .unwrap_or_default();
        assert!(block.ends_with(" 4096"), "{block}");
        assert!(matches!(
            make_persist_disk(&path, 32),
            Err(DiskError::Exists(_))
        ));
    }
}
