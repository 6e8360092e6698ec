//! Netboot image publications: a folder written by `powernode-initramfs build`
//! (`vmlinuz`, `initramfs.img`, `cmdline`, `manifest.json`) becomes a publication
//! (platform, arch, kernel version, digests, path) that `real` provisioning boots.
//!
//! A publication is only recorded when the files on disk hash to what the manifest
//! says, so a half-rebuilt folder is refused rather than booted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::catalog::{ARCH_AMD64, PLATFORM_NETBOOT};

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub id: String,
    pub platform: String,
    pub arch: String,
    pub kernel_version: String,
    #[serde(default)]
    pub kernel_release: String,
    pub vmlinuz_sha256: String,
    pub initramfs_sha256: String,
    /// The image folder (absolute).
    pub path: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    pub created_at: String,
    pub created_ms: i64,
}

/// What the image folder says about itself, checked against its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub platform: String,
    pub arch: String,
    pub kernel_version: String,
    pub kernel_release: String,
    pub vmlinuz_sha256: String,
    pub initramfs_sha256: String,
    pub path: PathBuf,
    pub cmdline: String,
}

/// The manifest fields a publication needs (the builder writes more).
#[derive(Debug, Deserialize)]
struct Manifest {
    kernel_version: String,
    #[serde(default)]
    kernel_release: String,
    #[serde(default)]
    kernel_package: String,
    vmlinuz_sha256: String,
    initramfs_sha256: String,
    #[serde(default)]
    cmdline: String,
    /// Not written by today's builder; the catalog's netboot platform then.
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    arch: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid image manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file} hashes to {actual}, but the manifest says {expected} (rebuild the image)")]
    DigestMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot tell the architecture of kernel {0:?} (add \"arch\" to the manifest)")]
    UnknownArch(String),
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Reads `dir/manifest.json` and checks `vmlinuz` and `initramfs.img` against it.
pub fn read_image_dir(dir: &Path) -> Result<ImageFacts, ImageError> {
    let dir = std::path::absolute(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mpath = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&mpath).map_err(|source| ImageError::Io {
        path: mpath.clone(),
        source,
    })?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    for (file, expected) in [
        ("vmlinuz", &m.vmlinuz_sha256),
        ("initramfs.img", &m.initramfs_sha256),
    ] {
        let path = dir.join(file);
        let actual = sha256_file(&path)?;
        if &actual != expected {
            return Err(ImageError::DigestMismatch {
                file: path,
                expected: expected.clone(),
                actual,
            });
        }
    }
    let arch = match m.arch {
        Some(a) => a,
        None if m.kernel_release.ends_with("amd64") || m.kernel_package.ends_with("amd64") => {
            ARCH_AMD64.to_string()
        }
        None => return Err(ImageError::UnknownArch(m.kernel_release)),
    };
    // The builder writes the cmdline file too; it is what the VM gets.
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map(|s| s.trim().to_string())
        .unwrap_or(m.cmdline);
    Ok(ImageFacts {
        platform: m.platform.unwrap_or_else(|| PLATFORM_NETBOOT.to_string()),
        arch,
        kernel_version: m.kernel_version,
        kernel_release: m.kernel_release,
        vmlinuz_sha256: m.vmlinuz_sha256,
        initramfs_sha256: m.initramfs_sha256,
        path: dir,
        cmdline,
    })
}

impl Publication {
    /// Whether this publication already records exactly these facts.
    pub fn same_as(&self, f: &ImageFacts) -> bool {
        self.platform == f.platform
            && self.arch == f.arch
            && self.path == f.path
            && self.vmlinuz_sha256 == f.vmlinuz_sha256
            && self.initramfs_sha256 == f.initramfs_sha256
            && self.cmdline == f.cmdline
    }

    pub fn image_ref(&self) -> crate::provider::ImageRef {
        crate::provider::ImageRef {
            publication_id: self.id.clone(),
            dir: self.path.clone(),
            cmdline: self
                .cmdline
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(tmp: &Path, manifest_extra: serde_json::Value) -> PathBuf {
        std::fs::write(tmp.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(tmp.join("initramfs.img"), b"initramfs").unwrap();
        std::fs::write(tmp.join("cmdline"), "quiet powernode.x=1\n").unwrap();
        let mut m = serde_json::json!({
            "kernel_package": "linux-image-6.12.48+deb13-cloud-amd64",
            "kernel_version": "6.12.48-1",
            "kernel_release": "6.12.48+deb13-cloud-amd64",
            "vmlinuz_sha256": hex::encode(Sha256::digest(b"kernel")),
            "initramfs_sha256": hex::encode(Sha256::digest(b"initramfs")),
            "cmdline": "ignored when the file exists",
        });
        for (k, v) in manifest_extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        std::fs::write(tmp.join(MANIFEST_FILE), m.to_string()).unwrap();
        tmp.to_path_buf()
    }

    #[test]
    fn a_built_folder_reads_with_platform_arch_and_cmdline() {
        let tmp = tempfile::tempdir().unwrap();
        let f = read_image_dir(&folder(tmp.path(), serde_json::json!({}))).unwrap();
        assert_eq!(f.platform, PLATFORM_NETBOOT);
        assert_eq!(f.arch, ARCH_AMD64);
        assert_eq!(f.kernel_version, "6.12.48-1");
        assert_eq!(f.cmdline, "quiet powernode.x=1");
        assert!(f.path.is_absolute());
    }

    #[test]
    fn a_stale_manifest_or_unknown_arch_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = folder(tmp.path(), serde_json::json!({}));
        std::fs::write(dir.join("initramfs.img"), b"rebuilt").unwrap();
        assert!(matches!(
            read_image_dir(&dir),
            Err(ImageError::DigestMismatch { .. })
        ));
        let tmp = tempfile::tempdir().unwrap();
        let dir = folder(
            tmp.path(),
            serde_json::json!({"kernel_release": "6.12-arm64", "kernel_package": "x-arm64"}),
        );
        assert!(matches!(
            read_image_dir(&dir),
            Err(ImageError::UnknownArch(_))
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_image_dir(empty.path()),
            Err(ImageError::Io { .. })
        ));
    }
}
