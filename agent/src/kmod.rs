//! Kernel filesystems the agent library is about to mount. In an initramfs there is
//! no `modprobe` for the kernel to call when a mount names a filesystem it lacks, so
//! the init registers a loader for the modules it ships; elsewhere none is
//! registered and the kernel's own module autoloading applies.

use std::sync::OnceLock;

/// Loads what filesystem `fstype` needs; the error says what failed.
pub type FsLoader = dyn Fn(&str) -> Result<(), String> + Send + Sync;

static FS_LOADER: OnceLock<Box<FsLoader>> = OnceLock::new();

const PROC_FILESYSTEMS: &str = "/proc/filesystems";

/// Registers the loader (once per process); `false` when one already was.
pub fn set_fs_loader(loader: Box<FsLoader>) -> bool {
    FS_LOADER.set(loader).is_ok()
}

/// Whether `/proc/filesystems` text lists `fstype` (`nodev\tNAME` or `\tNAME`).
pub fn listed(filesystems: &str, fstype: &str) -> bool {
    filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

/// Makes sure the kernel has `fstype` before a mount: nothing when it is already
/// registered or no loader is; else the registered loader's answer.
pub fn ensure_fs(fstype: &str) -> Result<(), String> {
    let known = std::fs::read_to_string(PROC_FILESYSTEMS)
        .map(|t| listed(&t, fstype))
        .unwrap_or(false);
    match FS_LOADER.get() {
        Some(load) if !known => load(fstype),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_filesystems_lines_are_matched_by_name() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n\tvfat\n";
        for fs in ["ext4", "vfat", "overlay", "tmpfs"] {
            assert!(listed(text, fs), "{fs}");
        }
        for fs in ["iso9660", "fat", "nodev", "ext"] {
            assert!(!listed(text, fs), "{fs}");
        }
    }
}
