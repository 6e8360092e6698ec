//! The published UEFI disk image (`disk.raw`): the raw format clouds import.
//!
//! Layout: GPT (protective MBR, 128 entries), one EFI system partition (FAT32) from
//! 1 MiB holding `\EFI\BOOT\BOOTX64.EFI`, the removable-media path firmware boots
//! without any boot entry. That file is a unified kernel image ([`crate::uki`]):
//! systemd-stub + our kernel, initramfs and command line, so there is no boot loader
//! to configure and nothing outside the one signed-able file.
//!
//! Reproducible: the disk and partition GUIDs and the FAT volume id are derived from
//! the UKI's sha256 (as systemd-repart derives its UUIDs), FAT timestamps are zero,
//! and everything is assembled in memory, so the same inputs give the same bytes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Cursor, Read as _, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::BASE_CMDLINE;
use crate::uki::{self, UkiError, UkiInputs};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
/// The ESP starts at 1 MiB; the last MiB holds the backup GPT.
const ESP_START: u64 = MIB;
/// FAT32 needs at least 65525 clusters; with 512-byte clusters that is ~33 MiB.
const MIN_ESP_MIB: u64 = 40;
/// Where UEFI firmware looks for a boot file on removable media (and on a disk
/// without boot entries, as a fresh cloud VM has).
pub const BOOT_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// File name beside the netboot files.
pub const DISK_FILE: &str = "disk.raw";
pub const ESP_LABEL: &str = "EFI System";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("building the unified kernel image")]
    Uki(#[from] UkiError),
    #[error("writing the FAT32 EFI system partition")]
    Fat(#[source] std::io::Error),
    #[error("writing the GPT")]
    Gpt(#[source] gpt::GptError),
    #[error("writing the protective MBR")]
    Mbr(#[source] gpt::mbr::MBRError),
    #[error("{what} is {have} MiB, less than the {need} MiB it needs")]
    TooSmall {
        what: &'static str,
        have: u64,
        need: u64,
    },
    #[error("the disk image has no EFI system partition")]
    NoEsp,
    #[error("{path} is not a valid image manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A version-4-shaped UUID derived from `seed` and a purpose label.
fn derived_uuid(seed: &[u8; 32], label: &str) -> uuid::Uuid {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(label.as_bytes());
    let d: [u8; 32] = h.finalize().into();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// The EFI system partition: FAT32 of `bytes` holding `files` (path, contents).
pub fn esp_image(
    bytes: u64,
    volume_id: u32,
    files: &[(&str, &[u8])],
) -> Result<Vec<u8>, DiskError> {
    // 512-byte clusters keep small ESPs FAT32 (>= 65525 clusters); large ones use 4K.
    let cluster = if bytes < 256 * MIB { 512 } else { 4096 };
    fat_image(
        bytes,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(cluster)
            .volume_id(volume_id)
            .volume_label(*b"POWERNODE  "),
        files,
    )
}

/// A FAT filesystem of `bytes` labelled `label` (FAT12/16/32 as the size asks)
/// holding `files`: e.g. an OpenStack config drive (`CONFIG-2`).
pub fn fat_volume(
    bytes: u64,
    volume_id: u32,
    label: [u8; 11],
    files: &[(&str, &[u8])],
) -> Result<Vec<u8>, DiskError> {
    fat_image(
        bytes,
        fatfs::FormatVolumeOptions::new()
            .volume_id(volume_id)
            .volume_label(label),
        files,
    )
}

fn fat_image(
    bytes: u64,
    format: fatfs::FormatVolumeOptions,
    files: &[(&str, &[u8])],
) -> Result<Vec<u8>, DiskError> {
    let mut cursor = Cursor::new(vec![0u8; bytes as usize]);
    fatfs::format_volume(&mut cursor, format).map_err(DiskError::Fat)?;
    cursor.seek(SeekFrom::Start(0)).map_err(DiskError::Fat)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut cursor, fatfs::FsOptions::new()).map_err(DiskError::Fat)?;
        for (path, data) in files {
            let root = fs.root_dir();
            let parts: Vec<&str> = path.split('/').collect();
            let (name, dirs) = parts.split_last().ok_or(DiskError::NoEsp)?;
            let mut dir = root;
            for d in dirs {
                dir = match dir.open_dir(d) {
                    Ok(existing) => existing,
                    Err(_) => dir.create_dir(d).map_err(DiskError::Fat)?,
                };
            }
            let mut f = dir.create_file(name).map_err(DiskError::Fat)?;
            f.truncate().map_err(DiskError::Fat)?;
            f.write_all(data).map_err(DiskError::Fat)?;
            f.flush().map_err(DiskError::Fat)?;
        }
        fs.unmount().map_err(DiskError::Fat)?;
    }
    Ok(cursor.into_inner())
}

/// The whole disk: GPT + ESP holding the UKI at [`BOOT_PATH`]. `min_mib` pads the
/// disk (clouds such as GCE want whole GiB); the ESP grows with the UKI.
pub fn disk_image(uki: &[u8], min_mib: u64) -> Result<Vec<u8>, DiskError> {
    let seed = sha256(uki);
    let uki_mib = (uki.len() as u64).div_ceil(MIB);
    // Room for the file plus FAT overhead (two FATs of 4 bytes per 512-byte cluster).
    let esp_mib = (uki_mib + uki_mib / 32 + 8).max(MIN_ESP_MIB);
    let total_mib = (esp_mib + 2).max(min_mib);
    let total = total_mib * MIB;
    let esp_bytes = total - ESP_START - MIB;
    let volume_id = u32::from_le_bytes([seed[0], seed[1], seed[2], seed[3]]);
    let esp = esp_image(esp_bytes, volume_id, &[(BOOT_PATH, uki)])?;

    let mut disk = Cursor::new(vec![0u8; total as usize]);
    let last_lba = total / SECTOR - 1;
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(last_lba).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut disk).map_err(DiskError::Mbr)?;
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(disk, Some(derived_uuid(&seed, "disk")))
        .map_err(DiskError::Gpt)?;
    let first_lba = ESP_START / SECTOR;
    let partition = Partition {
        part_type_guid: partition_types::EFI,
        part_guid: derived_uuid(&seed, "esp"),
        first_lba,
        last_lba: first_lba + esp_bytes / SECTOR - 1,
        flags: 0,
        name: ESP_LABEL.to_string(),
    };
    gpt.update_partitions(BTreeMap::from([(1, partition)]))
        .map_err(DiskError::Gpt)?;
    let mut disk = gpt.write().map_err(DiskError::Gpt)?;
    disk.seek(SeekFrom::Start(ESP_START))
        .and_then(|_| disk.write_all(&esp))
        .map_err(DiskError::Fat)?;
    Ok(disk.into_inner())
}

/// Reads a file from the ESP of a disk image (tests, and the builder's own check).
pub fn read_esp_file(disk: &[u8], path: &str) -> Result<Vec<u8>, DiskError> {
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        // The crate wants a writable device even to read; a copy keeps `disk` shared.
        .open_from_device(Cursor::new(disk.to_vec()))
        .map_err(DiskError::Gpt)?;
    let esp = gpt
        .partitions()
        .values()
        .find(|p| p.part_type_guid == partition_types::EFI)
        .ok_or(DiskError::NoEsp)?;
    let start = (esp.first_lba * SECTOR) as usize;
    let end = ((esp.last_lba + 1) * SECTOR) as usize;
    let slice = disk.get(start..end).ok_or(DiskError::NoEsp)?.to_vec();
    let fs = fatfs::FileSystem::new(Cursor::new(slice), fatfs::FsOptions::new())
        .map_err(DiskError::Fat)?;
    if fs.fat_type() != fatfs::FatType::Fat32 {
        return Err(DiskError::Fat(std::io::Error::other(format!(
            "the ESP is {:?}, not FAT32",
            fs.fat_type()
        ))));
    }
    let mut out = Vec::new();
    fs.root_dir()
        .open_file(path)
        .and_then(|mut f| f.read_to_end(&mut out))
        .map_err(DiskError::Fat)?;
    Ok(out)
}

/// What the disk image holds, recorded as `disk_image` in `manifest.json` (the
/// server lists it as a publication from there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskManifest {
    /// File name in the image folder.
    pub file: String,
    /// `raw`: a plain disk image, what clouds import (qcow2/vhd/vmdk are conversions).
    pub format: String,
    pub partition_table: String,
    pub firmware: String,
    /// How the ESP boots: `uki` (systemd-stub unified kernel image).
    pub boot: String,
    pub bytes: u64,
    pub sha256: String,
    pub esp_bytes: u64,
    pub boot_path: String,
    pub uki_sha256: String,
    pub uki_bytes: u64,
    pub stub_sha256: String,
    /// The kernel command line baked into the UKI.
    pub cmdline: String,
}

#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// The folder `build` wrote (`vmlinuz`, `initramfs.img`, `manifest.json`).
    pub image_dir: PathBuf,
    /// The systemd EFI stub (see [`crate::stub::ensure_stub`]).
    pub stub: PathBuf,
    /// Kernel arguments after [`BASE_CMDLINE`], baked into the UKI.
    pub extra_cmdline: Vec<String>,
    /// Where to write; default `image_dir/disk.raw`.
    pub out: Option<PathBuf>,
    /// Pad the disk to at least this many MiB.
    pub min_mib: u64,
    /// Record the disk in `image_dir/manifest.json` (off for scratch images).
    pub record_in_manifest: bool,
}

/// Builds the disk image from a built image folder.
pub fn build_disk(opts: &DiskOptions) -> Result<DiskManifest, DiskError> {
    let read = |p: PathBuf| fs::read(&p).map_err(io(&p));
    let kernel = read(opts.image_dir.join("vmlinuz"))?;
    let initrd = read(opts.image_dir.join("initramfs.img"))?;
    let stub = read(opts.stub.clone())?;
    let manifest_path = opts.image_dir.join("manifest.json");
    let manifest_text = read(manifest_path.clone())?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_text).map_err(|source| DiskError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
    let release = manifest["kernel_release"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut cmdline = BASE_CMDLINE.to_string();
    for a in &opts.extra_cmdline {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    let os_release = uki::os_release(env!("CARGO_PKG_VERSION"), &release);
    let uki = uki::build(
        &stub,
        &UkiInputs {
            kernel: &kernel,
            initrd: &initrd,
            cmdline: &cmdline,
            os_release: &os_release,
            uname: &release,
        },
    )?;
    let disk = disk_image(&uki, opts.min_mib)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| opts.image_dir.join(DISK_FILE));
    let tmp = out.with_extension("partial");
    fs::write(&tmp, &disk).map_err(io(&tmp))?;
    fs::rename(&tmp, &out).map_err(io(&out))?;
    let m = DiskManifest {
        file: out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format: "raw".into(),
        partition_table: "gpt".into(),
        firmware: "uefi".into(),
        boot: "uki".into(),
        bytes: disk.len() as u64,
        sha256: hex::encode(sha256(&disk)),
        esp_bytes: disk.len() as u64 - ESP_START - MIB,
        boot_path: format!("/{BOOT_PATH}"),
        uki_sha256: hex::encode(sha256(&uki)),
        uki_bytes: uki.len() as u64,
        stub_sha256: hex::encode(sha256(&stub)),
        cmdline,
    };
    if opts.record_in_manifest {
        manifest["disk_image"] =
            serde_json::to_value(&m).map_err(|source| DiskError::Manifest {
                path: manifest_path.clone(),
                source,
            })?;
        let text = serde_json::to_vec_pretty(&manifest).map_err(|source| DiskError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        let tmp = manifest_path.with_extension("partial");
        fs::write(&tmp, text).map_err(io(&tmp))?;
        fs::rename(&tmp, &manifest_path).map_err(io(&manifest_path))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uki_is_readable_from_a_fat32_esp_in_a_gpt_disk() {
        let uki: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let disk = disk_image(&uki, 0).unwrap();
        assert_eq!(disk.len() as u64 % MIB, 0);
        assert_eq!(read_esp_file(&disk, BOOT_PATH).unwrap(), uki);
        // Protective MBR, GPT header at LBA 1, and its backup at the last LBA.
        assert_eq!(&disk[510..512], &[0x55, 0xaa]);
        assert_eq!(disk[446 + 4], 0xee);
        assert_eq!(&disk[512..520], b"EFI PART");
        let last = disk.len() - 512;
        assert_eq!(&disk[last..last + 8], b"EFI PART");
        let gpt = gpt::GptConfig::new()
            .open_from_device(Cursor::new(disk.clone()))
            .unwrap();
        let p = &gpt.partitions()[&1];
        assert_eq!(p.first_lba, 2048);
        assert_eq!(p.name, ESP_LABEL);
        assert_eq!(p.part_type_guid, partition_types::EFI);
    }

    #[test]
    fn same_uki_same_bytes_and_another_uki_other_guids() {
        let a = disk_image(b"uki-one", 0).unwrap();
        assert_eq!(a, disk_image(b"uki-one", 0).unwrap());
        let b = disk_image(b"uki-two", 0).unwrap();
        let guid = |d: &[u8]| {
            *gpt::GptConfig::new()
                .open_from_device(Cursor::new(d.to_vec()))
                .unwrap()
                .guid()
        };
        assert_ne!(guid(&a), guid(&b));
        assert_eq!(guid(&a), guid(&disk_image(b"uki-one", 0).unwrap()));
    }

    #[test]
    fn padding_and_minimum_sizes() {
        let d = disk_image(b"x", 64).unwrap();
        assert_eq!(d.len() as u64, 64 * MIB);
        let small = disk_image(b"x", 0).unwrap();
        assert_eq!(small.len() as u64, (MIN_ESP_MIB + 2) * MIB);
        assert!(matches!(
            read_esp_file(&vec![0u8; 4 << 20], BOOT_PATH),
            Err(DiskError::Gpt(_))
        ));
    }
}
