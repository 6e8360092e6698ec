//! OpenStack: the config drive first (a filesystem labelled `config-2`, ISO 9660 or
//! VFAT, with `openstack/latest/meta_data.json`, `user_data` and
//! `network_data.json`), then the metadata service at
//! `http://169.254.169.254/openstack/latest/` serving the same files.
//!
//! A config drive that is attached but unreadable (cannot be mounted, no
//! `meta_data.json`, malformed JSON) is an error: unlike afterburn, the metadata
//! service is not asked instead, since a broken drive is a misconfiguration to
//! report. When a drive is attached its answer is the answer; the service is only
//! asked when there is none.
//!
//! Facts: `uuid` (instance id), `availability_zone` (reported as the region:
//! OpenStack's metadata names no region), and the static addresses of
//! `network_data.json`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use powernode_proto::identity::MAX_IDENTITY_BYTES;

use super::http::{Fetcher, MAX_METADATA_BYTES};
use super::metadata::{optional_list, Addresses, BaseUrl};
use super::{CloudFuture, CloudProvider, Dmi, ProviderFacts, SourceError, SourceErrorKind};

pub const NAME: &str = "openstack";
pub const DEFAULT_BASE: &str = "http://169.254.169.254";
pub const LABEL: &str = "config-2";

/// Where the config drive is looked for.
#[derive(Debug, Clone)]
pub enum ConfigDrive {
    /// Scan `sys_block` (`/sys/class/block`) for a device whose filesystem label
    /// is `config-2`, open it under `dev`, mount it read-only at `mount_point`
    /// for the read, then unmount it.
    Scan {
        sys_block: PathBuf,
        dev: PathBuf,
        mount_point: PathBuf,
    },
    /// Already mounted here (tests, or a system that mounts it itself). A missing
    /// folder means no drive.
    Dir(PathBuf),
    /// Do not look for a drive.
    Off,
}

impl Default for ConfigDrive {
    fn default() -> Self {
        Self::Scan {
            sys_block: PathBuf::from("/sys/class/block"),
            dev: PathBuf::from("/dev"),
            mount_point: PathBuf::from("/run/powernode/config-2"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Iso9660,
    Vfat,
}

impl FsType {
    fn name(self) -> &'static str {
        match self {
            Self::Iso9660 => "iso9660",
            Self::Vfat => "vfat",
        }
    }
}

/// The label of an ISO 9660 or FAT filesystem from its first 36 KiB.
pub fn fs_label(head: &[u8]) -> Option<(FsType, String)> {
    let clean = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    // ISO 9660: the primary volume descriptor at 32 KiB: type 1, "CD001", and the
    // volume identifier at offset 40 (32 bytes, space padded).
    if let Some(pvd) = head.get(0x8000..0x8000 + 72) {
        if pvd[0] == 1 && &pvd[1..6] == b"CD001" {
            return Some((FsType::Iso9660, clean(&pvd[40..72])));
        }
    }
    // FAT: boot signature 0x55AA; the label is at 0x2B (FAT12/16, type string at
    // 0x36) or 0x47 (FAT32, type string at 0x52).
    let boot = head.get(..512)?;
    if boot[510..512] != [0x55, 0xAA] {
        return None;
    }
    if &boot[0x52..0x57] == b"FAT32" {
        return Some((FsType::Vfat, clean(&boot[0x47..0x52])));
    }
    if &boot[0x36..0x39] == b"FAT" {
        return Some((FsType::Vfat, clean(&boot[0x2B..0x36])));
    }
    None
}

/// The first block device labelled `config-2` (case ignored: FAT labels are
/// upper case). Devices that cannot be opened (not root, no medium) are skipped.
pub fn find_labelled(sys_block: &Path, dev: &Path) -> Option<(PathBuf, FsType)> {
    use std::io::Read as _;
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Loop and RAM devices never hold a config drive.
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .collect();
    names.sort();
    for name in names {
        let path = dev.join(&name);
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let mut head = Vec::with_capacity(0x9000);
        if file.take(0x9000).read_to_end(&mut head).is_err() {
            continue;
        }
        if let Some((fs, label)) = fs_label(&head) {
            if label.eq_ignore_ascii_case(LABEL) {
                return Some((path, fs));
            }
        }
    }
    None
}

#[derive(Debug, Clone)]
enum Located {
    Dir(PathBuf),
    Device {
        device: PathBuf,
        fs: FsType,
        mount_point: PathBuf,
    },
}

#[derive(Debug)]
pub struct OpenStack {
    base: BaseUrl,
    drive: ConfigDrive,
    located: OnceLock<Option<Located>>,
}

impl Default for OpenStack {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, ConfigDrive::default())
    }
}

/// Parsed config-drive / metadata-service files.
struct Files {
    meta_data: Vec<u8>,
    user_data: Option<Vec<u8>>,
    network_data: Option<Vec<u8>>,
}

impl OpenStack {
    pub fn new(base: impl Into<String>, drive: ConfigDrive) -> Self {
        Self {
            base: BaseUrl::new(base),
            drive,
            located: OnceLock::new(),
        }
    }

    fn locate(&self) -> Option<Located> {
        self.located
            .get_or_init(|| match &self.drive {
                ConfigDrive::Off => None,
                ConfigDrive::Dir(d) => d.is_dir().then(|| Located::Dir(d.clone())),
                ConfigDrive::Scan {
                    sys_block,
                    dev,
                    mount_point,
                } => find_labelled(sys_block, dev).map(|(device, fs)| Located::Device {
                    device,
                    fs,
                    mount_point: mount_point.clone(),
                }),
            })
            .clone()
    }

    async fn read(
        &self,
        http: &Fetcher,
    ) -> Result<Option<(powernode_proto::IdentityDocument, ProviderFacts)>, SourceError> {
        let files = match self.locate() {
            Some(located) => {
                let files = tokio::task::spawn_blocking(move || read_drive(&located))
                    .await
                    .map_err(|e| {
                        SourceError::new(
                            NAME,
                            SourceErrorKind::Config {
                                what: "config drive".into(),
                                reason: e.to_string(),
                            },
                        )
                    })??;
                tracing::debug!("identity from the OpenStack config drive");
                files
            }
            None => match self.read_service(http).await? {
                Some(f) => f,
                None => return Ok(None),
            },
        };
        let Some(user_data) = files.user_data else {
            return Ok(None);
        };
        let Some(document) = super::parse_user_data(NAME, &user_data)? else {
            return Ok(None);
        };
        let meta = super::parse_json(http, "meta_data.json", &files.meta_data)?;
        let uuid = super::json_str(http, "meta_data.json", &meta, "uuid")?
            .ok_or_else(|| http.field_error("meta_data.json.uuid", "is missing"))?;
        let zone = super::json_str(http, "meta_data.json", &meta, "availability_zone")?;
        let mut addresses = Addresses::new(http);
        if let Some(bytes) = files.network_data {
            let doc = "network_data.json";
            let net = super::parse_json(http, doc, &bytes)?;
            let at = format!("{doc}.networks");
            for (at, n) in optional_list(http, &at, net.get("networks"))? {
                addresses.member(&at, n, "ip_address")?;
            }
        }
        Ok(Some((document, addresses.facts(NAME, uuid, zone))))
    }

    async fn read_service(&self, http: &Fetcher) -> Result<Option<Files>, SourceError> {
        let url = |f: &str| self.base.join(&format!("openstack/latest/{f}"));
        let Some(meta_data) = http
            .get(&url("meta_data.json"), &[], MAX_METADATA_BYTES)
            .await?
        else {
            return Ok(None);
        };
        let user_data = http.get(&url("user_data"), &[], MAX_IDENTITY_BYTES).await?;
        let network_data = if user_data.is_some() {
            http.get(&url("network_data.json"), &[], MAX_METADATA_BYTES)
                .await?
        } else {
            None
        };
        Ok(Some(Files {
            meta_data,
            user_data,
            network_data,
        }))
    }
}

fn drive_error(reason: impl Into<String>) -> SourceError {
    SourceError::new(
        NAME,
        SourceErrorKind::Config {
            what: "config drive".into(),
            reason: reason.into(),
        },
    )
}

/// Reads the three files from a located drive, mounting it first if needed.
fn read_drive(located: &Located) -> Result<Files, SourceError> {
    match located {
        Located::Dir(d) => read_dir(d),
        Located::Device {
            device,
            fs,
            mount_point,
        } => {
            std::fs::create_dir_all(mount_point)
                .map_err(|e| drive_error(format!("creating {}: {e}", mount_point.display())))?;
            crate::kmod::ensure_fs(fs.name()).map_err(|e| {
                drive_error(format!(
                    "{} (labelled {LABEL}) needs {} support: {e}",
                    device.display(),
                    fs.name()
                ))
            })?;
            rustix::mount::mount(
                device.as_path(),
                mount_point.as_path(),
                fs.name(),
                rustix::mount::MountFlags::RDONLY
                    | rustix::mount::MountFlags::NOSUID
                    | rustix::mount::MountFlags::NODEV
                    | rustix::mount::MountFlags::NOEXEC,
                None,
            )
            .map_err(|e| {
                drive_error(format!(
                    "{} (labelled {LABEL}) cannot be mounted as {}: {e}",
                    device.display(),
                    fs.name()
                ))
            })?;
            let files = read_dir(mount_point);
            if let Err(e) =
                rustix::mount::unmount(mount_point.as_path(), rustix::mount::UnmountFlags::DETACH)
            {
                tracing::warn!(mount_point = %mount_point.display(), error = %e, "config drive left mounted");
            }
            files
        }
    }
}

fn read_dir(root: &Path) -> Result<Files, SourceError> {
    let latest = root.join("openstack/latest");
    let read = |name: &str, max: usize| {
        crate::identity::read_bounded(&latest.join(name), max)
            .map_err(|kind| SourceError::new(NAME, kind))
    };
    let meta_data = read("meta_data.json", MAX_METADATA_BYTES)?.ok_or_else(|| {
        SourceError::new(
            NAME,
            SourceErrorKind::Metadata {
                field: "meta_data.json".into(),
                reason: format!("is missing from the config drive ({})", latest.display()),
            },
        )
    })?;
    Ok(Files {
        meta_data,
        user_data: read("user_data", MAX_IDENTITY_BYTES)?,
        network_data: read("network_data.json", MAX_METADATA_BYTES)?,
    })
}

impl CloudProvider for OpenStack {
    fn name(&self) -> &'static str {
        NAME
    }

    fn detect(&self, dmi: &Dmi) -> bool {
        dmi.product_name.starts_with("OpenStack")
            || dmi.sys_vendor.starts_with("OpenStack")
            || dmi.chassis_asset_tag == "OpenTelekomCloud"
            || self.locate().is_some()
    }

    fn fetch<'a>(&'a self, http: &'a Fetcher) -> CloudFuture<'a> {
        Box::pin(self.read(http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(label: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x9000];
        img[0x8000] = 1;
        img[0x8001..0x8006].copy_from_slice(b"CD001");
        let mut id = [b' '; 32];
        id[..label.len()].copy_from_slice(label.as_bytes());
        img[0x8028..0x8048].copy_from_slice(&id);
        img
    }

    fn fat32(label: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x9000];
        img[510] = 0x55;
        img[511] = 0xAA;
        img[0x52..0x57].copy_from_slice(b"FAT32");
        let mut l = [b' '; 11];
        l[..label.len()].copy_from_slice(label.as_bytes());
        img[0x47..0x52].copy_from_slice(&l);
        img
    }

    #[test]
    fn labels() {
        assert_eq!(
            fs_label(&iso("config-2")),
            Some((FsType::Iso9660, "config-2".into()))
        );
        assert_eq!(
            fs_label(&fat32("CONFIG-2")),
            Some((FsType::Vfat, "CONFIG-2".into()))
        );
        let mut fat16 = vec![0u8; 512];
        fat16[510] = 0x55;
        fat16[511] = 0xAA;
        fat16[0x36..0x39].copy_from_slice(b"FAT");
        fat16[0x2B..0x36].copy_from_slice(b"CONFIG-2   ");
        assert_eq!(fs_label(&fat16), Some((FsType::Vfat, "CONFIG-2".into())));
        assert_eq!(fs_label(&[0u8; 100]), None);
        assert_eq!(fs_label(&[0u8; 0x9000]), None);
    }

    #[test]
    fn scan_finds_the_labelled_device() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let dev = dir.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for name in ["vda", "vdb", "loop0"] {
            std::fs::create_dir_all(sys.join(name)).unwrap();
        }
        std::fs::write(dev.join("vda"), fat32("EFI")).unwrap();
        std::fs::write(dev.join("loop0"), iso("config-2")).unwrap();
        assert_eq!(find_labelled(&sys, &dev), None, "loop devices are skipped");
        std::fs::write(dev.join("vdb"), fat32("config-2")).unwrap();
        assert_eq!(
            find_labelled(&sys, &dev),
            Some((dev.join("vdb"), FsType::Vfat))
        );
        assert_eq!(find_labelled(&dir.path().join("none"), &dev), None);
    }
}
