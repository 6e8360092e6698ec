//! The firmware's DMI strings (`/sys/class/dmi/id`), which every major cloud sets
//! to its own name: the local, instant evidence that decides which metadata
//! service to ask patiently. Unreadable files (`product_uuid` is root-only) read
//! as empty.

use std::path::Path;

pub const DEFAULT_ROOT: &str = "/sys/class/dmi/id";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dmi {
    pub sys_vendor: String,
    pub product_name: String,
    pub product_version: String,
    pub product_uuid: String,
    pub board_vendor: String,
    pub chassis_vendor: String,
    pub chassis_asset_tag: String,
    pub bios_vendor: String,
    pub bios_version: String,
}

impl Dmi {
    pub fn read(root: &Path) -> Self {
        let field = |name: &str| -> String {
            let Ok(bytes) = super::super::read_bounded(&root.join(name), 4096) else {
                return String::new();
            };
            bytes
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_default()
        };
        Self {
            sys_vendor: field("sys_vendor"),
            product_name: field("product_name"),
            product_version: field("product_version"),
            product_uuid: field("product_uuid"),
            board_vendor: field("board_vendor"),
            chassis_vendor: field("chassis_vendor"),
            chassis_asset_tag: field("chassis_asset_tag"),
            bios_vendor: field("bios_vendor"),
            bios_version: field("bios_version"),
        }
    }

    /// Whether any of the vendor-ish strings contains `needle` (ASCII case ignored).
    pub fn vendor_contains(&self, needle: &str) -> bool {
        let needle = needle.to_ascii_lowercase();
        [
            &self.sys_vendor,
            &self.product_name,
            &self.board_vendor,
            &self.chassis_vendor,
            &self.bios_vendor,
        ]
        .iter()
        .any(|s| s.to_ascii_lowercase().contains(&needle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sys_vendor"), "Amazon EC2\n").unwrap();
        let dmi = Dmi::read(dir.path());
        assert_eq!(dmi.sys_vendor, "Amazon EC2");
        assert_eq!(dmi.product_uuid, "");
        assert!(dmi.vendor_contains("amazon"));
        assert!(!dmi.vendor_contains("google"));
        assert_eq!(Dmi::read(&dir.path().join("none")), Dmi::default());
    }
}
