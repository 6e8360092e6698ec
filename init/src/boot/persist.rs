//! The `/persist` disk and the agent's state directory. `powernode.persist=` names
//! the disk as `/dev/NAME` or `LABEL=NAME` (the one disk whose ext4 superblock
//! carries that label); it is mounted at [`PERSIST_MOUNT`] and holds the state
//! directory, so a persistent node keeps its credentials and module store across
//! boots. Without it the state directory is on the tmpfs `/run`.

use powernode_proto::ErrorCode;

use crate::layout::{PERSIST_MOUNT, PERSIST_STATE_DIR, RUN_STATE_DIR};
use crate::sys::{ok_if_exists, Errno, Sys};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "powernode.persist={0:?} is neither a block device path /dev/NAME nor LABEL=NAME \
         (an ext4 label: 1-16 of A-Z a-z 0-9 _ . -)"
    )]
    Spec(String),
    /// More than one disk carries the label: taking either could mount the wrong one.
    #[error("the /persist label {label:?} (powernode.persist=) is on more than one disk: {}", devices.join(", "))]
    Ambiguous { label: String, devices: Vec<String> },
    /// The named disk is not there (not attached, or its driver found no device).
    #[error("the /persist disk {device} (powernode.persist=) is not present")]
    Missing {
        device: String,
        #[source]
        errno: Errno,
    },
    #[error("preparing the agent state directory {path}")]
    StateDir {
        path: String,
        #[source]
        errno: Errno,
    },
}

impl PersistError {
    /// The stable reason code reported upstream.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }

    /// A disk that is not there yet, or a state directory that could not be made,
    /// may be there on a later attempt; a bad or ambiguous `powernode.persist=` not.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::StateDir { .. })
    }
}

/// What `powernode.persist=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PersistDisk<'a> {
    /// `/dev/NAME`.
    Device(&'a str),
    /// `LABEL=NAME`: the one disk whose ext4 superblock carries that label. It
    /// stays right where device names do not (NVMe numbering across boots, a
    /// cloud's root volume taking `vda`), and an image's baked command line can
    /// carry it.
    Label(&'a str),
}

fn parse_persist(value: &str) -> Option<PersistDisk<'_>> {
    if let Some(label) = value.strip_prefix("LABEL=") {
        return (!label.is_empty()
            && label.len() <= EXT4_LABEL_MAX
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        .then_some(PersistDisk::Label(label));
    }
    let name = value.strip_prefix("/dev/")?;
    (!name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)))
    .then_some(PersistDisk::Device(name))
}

/// ext4's volume name field (`s_volume_name`, 16 bytes, NUL-padded).
const EXT4_LABEL_MAX: usize = 16;
/// The superblock starts 1024 bytes into the device; the fields we read end at
/// 0x88 (magic `s_magic` at 0x38, label `s_volume_name` at 0x78).
const EXT4_SUPERBLOCK: u64 = 1024;
const EXT4_SB_READ: usize = 0x88;

/// The ext4 label in a superblock's first bytes; `None` when it is not ext2/3/4.
fn ext4_label(sb: &[u8]) -> Option<&[u8]> {
    if sb.get(0x38..0x3a)? != [0x53, 0xef] {
        return None;
    }
    let name = sb.get(0x78..0x78 + EXT4_LABEL_MAX)?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    name.get(..end)
}

/// The block devices whose ext4 label is `label`. Devices that cannot be read (an
/// empty CD drive) are skipped; loop and RAM disks are never ours.
fn disks_labelled(sys: &mut dyn Sys, label: &str) -> Result<Vec<String>, Errno> {
    let mut names = sys.list_dir("/sys/class/block")?;
    names.sort();
    let mut found = Vec::new();
    for name in names {
        if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dev = format!("/dev/{name}");
        match sys.read_at(&dev, EXT4_SUPERBLOCK, EXT4_SB_READ) {
            Ok(sb) if ext4_label(&sb) == Some(label.as_bytes()) => found.push(dev),
            Ok(_) => {}
            Err(errno) => log::debug!("{dev}: superblock unreadable ({errno}); skipped"),
        }
    }
    Ok(found)
}

/// The device path `powernode.persist=` resolves to.
fn persist_device(sys: &mut dyn Sys, value: &str) -> Result<String, PersistError> {
    let missing = |errno| PersistError::Missing {
        device: value.into(),
        errno,
    };
    match parse_persist(value).ok_or_else(|| PersistError::Spec(value.into()))? {
        PersistDisk::Device(name) => {
            sys.read_file(&format!("/sys/class/block/{name}/dev"), 64)
                .map_err(missing)?;
            Ok(value.into())
        }
        PersistDisk::Label(label) => {
            let mut found = disks_labelled(sys, label).map_err(missing)?;
            match found.len() {
                0 => Err(missing(Errno::NOENT)),
                1 => Ok(found.remove(0)),
                _ => Err(PersistError::Ambiguous {
                    label: label.into(),
                    devices: found,
                }),
            }
        }
    }
}

/// The agent's state directory: on the `/persist` disk (ext4) that
/// `powernode.persist=` names, so a persistent node keeps its credentials and
/// module store across boots; else on the tmpfs `/run`.
pub fn prepare_state_dir(sys: &mut dyn Sys, persist: Option<&str>) -> Result<String, PersistError> {
    let err = |path: &str| {
        let path = path.to_string();
        move |errno| PersistError::StateDir { path, errno }
    };
    let Some(value) = persist else {
        ok_if_exists(sys.mkdir(RUN_STATE_DIR, 0o700)).map_err(err(RUN_STATE_DIR))?;
        return Ok(RUN_STATE_DIR.into());
    };
    let device = persist_device(sys, value)?;
    ok_if_exists(sys.mkdir(PERSIST_MOUNT, 0o755)).map_err(err(PERSIST_MOUNT))?;
    match sys.mount(
        &device,
        PERSIST_MOUNT,
        "ext4",
        crate::sys::MountFlags::NOSUID | crate::sys::MountFlags::NODEV,
        "",
    ) {
        Ok(()) | Err(Errno::BUSY) => {}
        Err(errno) => return Err(err(PERSIST_MOUNT)(errno)),
    }
    log::info!("{device} ({value}) mounted at {PERSIST_MOUNT}");
    ok_if_exists(sys.mkdir(PERSIST_STATE_DIR, 0o700)).map_err(err(PERSIST_STATE_DIR))?;
    Ok(PERSIST_STATE_DIR.into())
}
