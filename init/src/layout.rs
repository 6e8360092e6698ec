//! Where things live inside the initramfs. The builder (`powernode-initramfs`) writes
//! these paths and the init reads them, so both take them from here. Also the places
//! the init makes at run time that more than one of its files use (the persist disk,
//! the state directories): they live here, below all of them.

/// The init itself; the kernel runs `/init` from an initramfs without `rdinit=`.
pub const INIT: &str = "/init";
/// The agent binary, when the initramfs carries one.
pub const AGENT: &str = "/usr/bin/powernode-agent";
/// Folder of the decompressed kernel modules (`NAME.ko`).
pub const MODULE_DIR: &str = "/lib/modules";
/// One module file name per line (relative to [`MODULE_DIR`]), dependencies first.
pub const MODULE_LOAD_ORDER: &str = "/lib/modules/load-order";
/// The kernel needs this character device in the initramfs to give PID 1 its stdio.
pub const CONSOLE: &str = "/dev/console";
/// Major and minor of `/dev/console`.
pub const CONSOLE_DEV: (u32, u32) = (5, 1);
/// Folders that must exist before the early mounts (mount points).
pub const MOUNT_POINTS: &[&str] = &["/dev", "/proc", "/sys", "/run", "/tmp"];
/// Kernel modules a composefs mount needs (EROFS image on a loop device under an
/// overlay): loaded on demand before the first such mount, not at boot.
pub const COMPOSEFS_MODULES: &[&str] = &["erofs", "overlay", "loop"];
/// The accelerated sha256 (SHA-NI, AVX2) fs-verity hashes with: loaded on demand
/// before a module store opens, not at boot.
pub const VERITY_MODULES: &[&str] = &["sha256_ssse3"];
/// Kernel modules each filesystem the agent library mounts needs, beyond the kernel's
/// built-ins: the config drive's ISO 9660 (Joliet names: the default NLS, utf8) or
/// VFAT (its default codepage and iocharset).
pub const FS_MODULES: &[(&str, &[&str])] = &[
    ("iso9660", &["isofs", "nls_utf8"]),
    ("vfat", &["vfat", "nls_cp437", "nls_ascii"]),
];

/// Where the disk `powernode.persist=` names is mounted.
pub const PERSIST_MOUNT: &str = "/persist";
/// The agent's state directory on a persistent node (on [`PERSIST_MOUNT`]).
pub const PERSIST_STATE_DIR: &str = "/persist/powernode";
/// The state directory of an ephemeral node (tmpfs `/run`).
pub const RUN_STATE_DIR: &str = "/run/powernode";
/// Where the kernel lists this process's mounts (the shutdown and the loop-device
/// mounter read it).
pub const MOUNTINFO: &str = powernode_sysfmt::mountinfo::PATH;
/// Far above any mount table this node has; a bigger one is refused (`EFBIG`).
pub const MOUNTINFO_LIMIT: usize = 1 << 20;
/// Module trust keys built into the initramfs (`initramfs build --module-trust-key`),
/// one PEM per `*.pem` file: the node's pins (see `identity::pin_builtin_keys`).
pub const BUILTIN_TRUST_KEYS: &str = "/etc/powernode/module-trust-keys";
