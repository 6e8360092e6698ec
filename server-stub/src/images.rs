//! Netboot image publications: a folder written by `powernode-initramfs build`
//! (`vmlinuz`, `initramfs.img`, `cmdline`, `manifest.json`) becomes a publication
//! (platform, arch, kernel version, digests, path) that `real` provisioning boots.
//! When the builder also wrote the UEFI disk image (`disk.raw`, the manifest's
//! `disk_image`), the publication lists it too: kind `uefi_disk`, format `raw`, its
//! digest and the command line baked into it, the file a cloud imports.
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
    /// The UEFI disk image built from the same kernel and initramfs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<DiskImage>,
}

/// Kind of a published disk image: GPT + EFI system partition booting a UKI.
pub const DISK_KIND_UEFI: &str = "uefi_disk";

/// A published disk image, as data: what it is, where, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    /// `uefi_disk`.
    pub kind: String,
    /// Container format clouds import: `raw`.
    pub format: String,
    #[serde(default)]
    pub partition_table: String,
    #[serde(default)]
    pub firmware: String,
    /// How the ESP boots: `uki`.
    #[serde(default)]
    pub boot: String,
    /// The file (absolute).
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    #[serde(default)]
    pub uki_sha256: String,
    /// The kernel command line baked into the image.
    #[serde(default)]
    pub cmdline: String,
}

/// The builder's `disk_image` manifest entry (fields as `powernode-initramfs` writes).
#[derive(Debug, Deserialize)]
struct DiskManifest {
    file: String,
    format: String,
    #[serde(default)]
    partition_table: String,
    #[serde(default)]
    firmware: String,
    #[serde(default)]
    boot: String,
    bytes: u64,
    sha256: String,
    #[serde(default)]
    uki_sha256: String,
    #[serde(default)]
    cmdline: String,
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
    pub disk_image: Option<DiskImage>,
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
    #[serde(default)]
    disk_image: Option<DiskManifest>,
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
    #[error("disk image file name {0:?} must be a plain name inside the image folder")]
    BadDiskFile(String),
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

/// What identifies one version of a file without reading it: a rewrite or a
/// replacement (rename over it) changes the size, a time or the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Result<Self, ImageError> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// SHA-256 digests of image files, kept while the file is unchanged (same size,
/// times and inode): provisioning re-reads the image folder on every call, and
/// hashing a disk image of hundreds of MiB each time is the slow part.
#[derive(Debug, Default)]
pub struct DigestCache {
    entries: std::sync::Mutex<std::collections::HashMap<PathBuf, (FileStamp, String)>>,
    hashed: std::sync::atomic::AtomicU64,
}

impl DigestCache {
    /// The file's SHA-256 (hex), read only when the cache has no digest for this
    /// version of it.
    pub fn sha256(&self, path: &Path) -> Result<String, ImageError> {
        let before = FileStamp::of(path)?;
        if let Some((stamp, digest)) = self.lock().get(path) {
            if *stamp == before {
                return Ok(digest.clone());
            }
        }
        let digest = sha256_file(path)?;
        self.hashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Changed while being read: answer this digest but do not keep it.
        if FileStamp::of(path)? == before {
            self.lock()
                .insert(path.to_path_buf(), (before, digest.clone()));
        }
        Ok(digest)
    }

    /// Files read and hashed so far (cache misses).
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<PathBuf, (FileStamp, String)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`read_image_dir_cached`] without a cache: every file is hashed.
pub fn read_image_dir(dir: &Path) -> Result<ImageFacts, ImageError> {
    read_image_dir_cached(dir, &DigestCache::default())
}

/// Reads `dir/manifest.json` and checks `vmlinuz`, `initramfs.img` and the disk
/// image against it; digests of unchanged files come from `digests`.
pub fn read_image_dir_cached(dir: &Path, digests: &DigestCache) -> Result<ImageFacts, ImageError> {
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
        let actual = digests.sha256(&path)?;
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
    let disk_image = match m.disk_image {
        None => None,
        Some(d) => {
            let plain =
                !d.file.is_empty() && !d.file.contains('/') && d.file != "." && d.file != "..";
            if !plain {
                return Err(ImageError::BadDiskFile(d.file));
            }
            let path = dir.join(&d.file);
            let actual = digests.sha256(&path)?;
            if actual != d.sha256 {
                return Err(ImageError::DigestMismatch {
                    file: path,
                    expected: d.sha256,
                    actual,
                });
            }
            Some(DiskImage {
                kind: DISK_KIND_UEFI.to_string(),
                format: d.format,
                partition_table: d.partition_table,
                firmware: d.firmware,
                boot: d.boot,
                path,
                bytes: d.bytes,
                sha256: d.sha256,
                uki_sha256: d.uki_sha256,
                cmdline: d.cmdline,
            })
        }
    };
    Ok(ImageFacts {
        platform: m.platform.unwrap_or_else(|| PLATFORM_NETBOOT.to_string()),
        arch,
        kernel_version: m.kernel_version,
        kernel_release: m.kernel_release,
        vmlinuz_sha256: m.vmlinuz_sha256,
        initramfs_sha256: m.initramfs_sha256,
        path: dir,
        cmdline,
        disk_image,
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
            && self.disk_image == f.disk_image
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

    fn disk_entry(file: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({"disk_image": {
            "file": file, "format": "raw", "partition_table": "gpt", "firmware": "uefi",
            "boot": "uki", "bytes": data.len(), "sha256": hex::encode(Sha256::digest(data)),
            "uki_sha256": "ab", "cmdline": "console=ttyS0 panic=-1",
        }})
    }

    #[test]
    fn a_disk_image_in_the_manifest_is_listed_as_data_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("disk.raw"), b"disk").unwrap();
        let f = read_image_dir(&folder(tmp.path(), disk_entry("disk.raw", b"disk"))).unwrap();
        let d = f.disk_image.clone().unwrap();
        assert_eq!(
            (d.kind.as_str(), d.format.as_str()),
            (DISK_KIND_UEFI, "raw")
        );
        assert_eq!(d.path, f.path.join("disk.raw"));
        assert_eq!(d.bytes, 4);
        assert_eq!(d.cmdline, "console=ttyS0 panic=-1");
        let p = Publication {
            id: "pub-1".into(),
            platform: f.platform.clone(),
            arch: f.arch.clone(),
            kernel_version: f.kernel_version.clone(),
            kernel_release: f.kernel_release.clone(),
            vmlinuz_sha256: f.vmlinuz_sha256.clone(),
            initramfs_sha256: f.initramfs_sha256.clone(),
            path: f.path.clone(),
            cmdline: f.cmdline.clone(),
            created_at: "t".into(),
            created_ms: 0,
            disk_image: f.disk_image.clone(),
        };
        assert!(p.same_as(&f));
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["disk_image"]["kind"], "uefi_disk");
        // A publication stored before disk images existed still loads.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("disk_image");
        let old: Publication = serde_json::from_value(old).unwrap();
        assert_eq!(old.disk_image, None);
        assert!(!old.same_as(&f), "a new disk image is a new publication");

        // Rebuilt disk, stale manifest: refused. A path outside the folder: refused.
        std::fs::write(tmp.path().join("disk.raw"), b"other").unwrap();
        assert!(matches!(
            read_image_dir(tmp.path()),
            Err(ImageError::DigestMismatch { .. })
        ));
        let tmp = tempfile::tempdir().unwrap();
        let dir = folder(tmp.path(), disk_entry("../disk.raw", b"disk"));
        assert!(matches!(
            read_image_dir(&dir),
            Err(ImageError::BadDiskFile(_))
        ));
    }

    /// Provisioning reads the folder each time: unchanged files are not hashed
    /// again; a rewritten one (other size, or same size and a new mtime) is, and a
    /// stale manifest is still refused.
    #[test]
    fn unchanged_files_are_hashed_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("disk.raw"), b"disk").unwrap();
        let dir = folder(tmp.path(), disk_entry("disk.raw", b"disk"));
        let cache = DigestCache::default();
        let first = read_image_dir_cached(&dir, &cache).unwrap();
        assert_eq!(cache.files_hashed(), 3);
        for _ in 0..3 {
            assert_eq!(read_image_dir_cached(&dir, &cache).unwrap(), first);
        }
        assert_eq!(cache.files_hashed(), 3, "unchanged files hashed again");

        std::fs::write(dir.join("disk.raw"), b"other").unwrap();
        assert!(matches!(
            read_image_dir_cached(&dir, &cache),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert_eq!(cache.files_hashed(), 4);
        // Same size, same content length: only the times tell it changed.
        std::fs::write(dir.join("disk.raw"), b"disk").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("disk.raw"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .unwrap();
        assert_eq!(read_image_dir_cached(&dir, &cache).unwrap(), first);
        assert_eq!(cache.files_hashed(), 5);
        std::fs::write(dir.join("disk.raw"), b"DISK").unwrap();
        assert!(
            matches!(
                read_image_dir_cached(&dir, &cache),
                Err(ImageError::DigestMismatch { .. })
            ),
            "a same-size rewrite was served from the cache"
        );
    }
}
