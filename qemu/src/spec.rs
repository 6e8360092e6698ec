//! `VmSpec -> argv`: pure, so every flag is unit-tested without starting QEMU.
//! Each [`Device`] contributes both its QEMU arguments and the kernel arguments that
//! tell the guest about it (e.g. the fw_cfg identity pins
//! `powernode.identity_source=fw_cfg`, so the node never probes a metadata address).
//!
//! Two ways to boot: direct kernel (`-kernel`/`-initrd`/`-append`, the netboot
//! path) or, with a [`Device::BootDisk`], UEFI firmware ([`Device::Firmware`], OVMF)
//! booting the published disk image, whose command line is baked into its unified
//! kernel image (so device kernel arguments do not reach the guest then).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use crate::accel::Accel;

/// fw_cfg entry that carries the identity document.
pub const IDENTITY_FW_CFG_NAME: &str = "opt/org.powernode/identity";
/// Where the guest reaches the host's loopback under user-mode networking.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";
/// Kernel arguments every boot gets (unless the caller already set the same key).
pub const BASE_KERNEL_ARGS: &[&str] = &["console=ttyS0", "panic=-1"];
/// The cloud metadata address (AWS, GCP, Azure, OpenStack, Hetzner, ...).
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The user network that can reach [`METADATA_ADDR`]: libslirp only forwards guest
/// addresses inside the virtual network, so a metadata VM lives in link-local space
/// like a cloud instance's metadata path does.
pub const METADATA_NET: &str = "169.254.0.0/16";
/// Where the guest reaches the host's loopback on [`METADATA_NET`]: QEMU puts the
/// host at the network address plus 0.0.2.2 (10.0.2.2 on the default network).
pub const HOST_FROM_GUEST_METADATA_NET: &str = "169.254.2.2";

/// One `guestfwd`: the guest's TCP connections to `guest` go to `127.0.0.1:host_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestForward {
    pub guest: SocketAddrV4,
    pub host_port: u16,
}

/// UEFI firmware as two pflash drives: the code read-only, the variable store a
/// per-VM copy (the firmware writes boot entries into it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A fw_cfg blob from a file (`-fw_cfg name=NAME,file=PATH`).
    FwCfgFile { name: String, path: PathBuf },
    /// User-mode networking on a virtio NIC; the guest reaches the host at 10.0.2.2.
    UserNet { id: String },
    /// virtio-rng, so the guest's RNG is seeded before key generation.
    Rng,
    /// The `/persist` disk: raw image on virtio-blk (the guest's `/dev/vda` when it
    /// is the only disk).
    PersistDisk { path: PathBuf },
    /// User-mode networking with a chosen virtual network (`net=`, slirp's default
    /// 10.0.2.0/24 when `None`) and guest forwards (see [`Device::metadata_net`]).
    UserNetWith {
        id: String,
        net: Option<String>,
        guestfwd: Vec<GuestForward>,
    },
    /// UEFI firmware (OVMF); needed by [`Device::BootDisk`].
    Firmware(Firmware),
    /// The disk the firmware boots (raw image, `snapshot=on`: guest writes never reach
    /// the published file). It sits on the q35's
    /// built-in AHCI controller, not virtio-blk; the kernel never reads it (the
    /// firmware loads the UKI).
    BootDisk { path: PathBuf },
    /// A read-only virtio disk (raw image) that is not `/persist`: a cloud's config
    /// drive, say. `id` names the drive (and its serial).
    DataDisk { path: PathBuf, id: String },
    /// SMBIOS system information (type 1): what a cloud's firmware tells the guest
    /// in `/sys/class/dmi/id` (`manufacturer` is `sys_vendor`, e.g. `Amazon EC2`).
    SmbiosSystem { fields: Vec<(String, String)> },
    /// A QMP control socket (unix, server, never waited for): how the host presses
    /// the VM's ACPI power button ([`crate::Vm::power_button`]), as a cloud's stop does.
    Qmp { path: PathBuf },
}

/// Escapes a value inside a QEMU `-opt key=value,...` list (`,` doubles).
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_str(path: &Path) -> String {
    qemu_escape(&path.to_string_lossy())
}

impl Device {
    /// User networking on [`METADATA_NET`] with [`METADATA_ADDR`]`:80` forwarded to
    /// the host's `127.0.0.1:host_port` (a mock metadata service in tests).
    pub fn metadata_net(id: &str, host_port: u16) -> Self {
        Self::UserNetWith {
            id: id.to_string(),
            net: Some(METADATA_NET.to_string()),
            guestfwd: vec![GuestForward {
                guest: SocketAddrV4::new(METADATA_ADDR, 80),
                host_port,
            }],
        }
    }

    /// The identity document as QEMU fw_cfg.
    pub fn identity(path: impl Into<PathBuf>) -> Self {
        Self::FwCfgFile {
            name: IDENTITY_FW_CFG_NAME.to_string(),
            path: path.into(),
        }
    }

    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            Device::FwCfgFile { name, path } => vec![
                "-fw_cfg".into(),
                format!("name={},file={}", qemu_escape(name), path_str(path)),
            ],
            Device::UserNet { id } => vec![
                "-netdev".into(),
                format!("user,id={}", qemu_escape(id)),
                "-device".into(),
                format!("virtio-net-pci,netdev={}", qemu_escape(id)),
            ],
            Device::Rng => vec!["-device".into(), "virtio-rng-pci".into()],
            Device::PersistDisk { path } => vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=persist,cache=unsafe",
                    path_str(path)
                ),
                "-device".into(),
                "virtio-blk-pci,drive=persist,serial=persist".into(),
            ],
            Device::UserNetWith { id, net, guestfwd } => {
                let mut netdev = format!("user,id={}", qemu_escape(id));
                if let Some(net) = net {
                    netdev.push_str(&format!(",net={}", qemu_escape(net)));
                }
                for f in guestfwd {
                    netdev.push_str(&format!(
                        ",guestfwd=tcp:{}:{}-tcp:127.0.0.1:{}",
                        f.guest.ip(),
                        f.guest.port(),
                        f.host_port
                    ));
                }
                vec![
                    "-netdev".into(),
                    netdev,
                    "-device".into(),
                    format!("virtio-net-pci,netdev={}", qemu_escape(id)),
                ]
            }
            Device::Firmware(fw) => vec![
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    path_str(&fw.code)
                ),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", path_str(&fw.vars)),
            ],
            Device::SmbiosSystem { fields } => {
                let mut arg = "type=1".to_string();
                for (k, v) in fields {
                    arg.push_str(&format!(",{}={}", qemu_escape(k), qemu_escape(v)));
                }
                vec!["-smbios".into(), arg]
            }
            Device::Qmp { path } => vec![
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", path_str(path)),
            ],
            Device::DataDisk { path, id } => vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id={},readonly=on",
                    path_str(path),
                    qemu_escape(id)
                ),
                "-device".into(),
                format!(
                    "virtio-blk-pci,drive={},serial={}",
                    qemu_escape(id),
                    qemu_escape(id)
                ),
            ],
            Device::BootDisk { path } => vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=boot,snapshot=on",
                    path_str(path)
                ),
                "-device".into(),
                "ide-hd,drive=boot,bus=ide.0,bootindex=0".into(),
            ],
        }
    }

    pub fn kernel_args(&self) -> Vec<String> {
        match self {
            Device::FwCfgFile { name, .. } if name == IDENTITY_FW_CFG_NAME => {
                vec!["powernode.identity_source=fw_cfg".into()]
            }
            Device::PersistDisk { .. } => vec![format!(
                "powernode.persist=LABEL={}",
                crate::disk::PERSIST_LABEL
            )],
            _ => Vec::new(),
        }
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel arguments (e.g. the image's `cmdline` file and test switches).
    pub kernel_args: Vec<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub devices: Vec<Device>,
    /// Where the guest's serial console goes.
    pub serial_log: PathBuf,
    /// What a guest reboot does: `false` (the default, `-no-reboot`) ends QEMU, so a
    /// test sees each boot as one process; `true` resets the machine in place, as real
    /// hardware does: same process, same kernel, initrd, fw_cfg and disks (the server's
    /// VMs, which must come back from a reboot whoever watches them).
    pub reset_in_place: bool,
}

impl VmSpec {
    /// A spec with the usual devices (user network, virtio-rng) and 512 MiB, 1 CPU.
    pub fn new(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        serial_log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: kernel.into(),
            initrd: initrd.into(),
            kernel_args: Vec::new(),
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Tcg,
            devices: vec![Device::UserNet { id: "n0".into() }, Device::Rng],
            serial_log: serial_log.into(),
            reset_in_place: false,
        }
    }

    /// A spec that boots `disk` with `firmware` (no `-kernel`), with the usual
    /// devices (user network, virtio-rng), 512 MiB, 1 CPU.
    pub fn disk(
        firmware: Firmware,
        disk: impl Into<PathBuf>,
        serial_log: impl Into<PathBuf>,
    ) -> Self {
        let mut spec = Self::new("", "", serial_log);
        spec.devices.push(Device::Firmware(firmware));
        spec.devices.push(Device::BootDisk { path: disk.into() });
        spec
    }

    /// Whether the firmware boots a disk (no direct kernel boot).
    pub fn boots_disk(&self) -> bool {
        self.devices
            .iter()
            .any(|d| matches!(d, Device::BootDisk { .. }))
    }

    /// The kernel command line: base arguments (unless overridden by key), then the
    /// caller's, then each device's, in order.
    pub fn kernel_cmdline(&self) -> String {
        let key = |arg: &str| arg.split('=').next().unwrap_or(arg).to_string();
        let mut args: Vec<String> = Vec::new();
        let caller_and_devices: Vec<String> = self
            .kernel_args
            .iter()
            .cloned()
            .chain(self.devices.iter().flat_map(Device::kernel_args))
            .collect();
        for base in BASE_KERNEL_ARGS {
            if !caller_and_devices.iter().any(|a| key(a) == key(base)) {
                args.push((*base).to_string());
            }
        }
        for arg in caller_and_devices {
            if !args.contains(&arg) {
                args.push(arg);
            }
        }
        args.join(" ")
    }

    /// The full argv, program first.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![self.qemu.to_string_lossy().into_owned()];
        let mut push = |items: &[&str]| argv.extend(items.iter().map(|s| s.to_string()));
        push(&["-nodefaults", "-no-user-config", "-nographic"]);
        if !self.reset_in_place {
            push(&["-no-reboot"]);
        }
        push(&self.accel.args());
        push(&["-machine", "q35"]);
        let mem = self.memory_mib.to_string();
        let cpus = self.cpus.to_string();
        push(&["-m", &mem, "-smp", &cpus]);
        push(&["-display", "none", "-monitor", "none", "-parallel", "none"]);
        let serial = format!("file:{}", self.serial_log.to_string_lossy());
        push(&["-serial", &serial]);
        if !self.boots_disk() {
            let kernel = self.kernel.to_string_lossy();
            let initrd = self.initrd.to_string_lossy();
            push(&["-kernel", &kernel, "-initrd", &initrd]);
            let cmdline = self.kernel_cmdline();
            push(&["-append", &cmdline]);
        }
        for device in &self.devices {
            argv.extend(device.qemu_args());
        }
        argv
    }
}

/// Quotes an argv for a shell, so a human can rerun the exact command.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("/img/vmlinuz", "/img/initramfs.img", "/out/serial.log");
        s.devices.push(Device::identity("/out/identity,1.json"));
        s.kernel_args = vec!["powernode.on_failure=poweroff".into()];
        s
    }

    fn window<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn direct_kernel_boot_with_base_flags() {
        let argv = spec().argv();
        assert_eq!(argv[0], "qemu-system-x86_64");
        for flag in ["-nographic", "-no-reboot", "-nodefaults"] {
            assert!(argv.iter().any(|a| a == flag), "{flag}");
        }
        assert_eq!(window(&argv, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(window(&argv, "-initrd"), ["/img/initramfs.img"]);
        assert_eq!(window(&argv, "-m"), ["512"]);
        assert_eq!(window(&argv, "-smp"), ["1"]);
        assert_eq!(window(&argv, "-serial"), ["file:/out/serial.log"]);
        assert_eq!(window(&argv, "-accel"), ["tcg"]);
        assert_eq!(window(&argv, "-cpu"), ["max"]);
        assert_eq!(
            window(&argv, "-append"),
            ["console=ttyS0 panic=-1 powernode.on_failure=poweroff powernode.identity_source=fw_cfg"]
        );
    }

    #[test]
    fn a_vm_that_resets_in_place_has_no_no_reboot() {
        let mut s = spec();
        s.reset_in_place = true;
        let argv = s.argv();
        assert!(!argv.iter().any(|a| a == "-no-reboot"), "{argv:?}");
        assert_eq!(argv[1..4], ["-nodefaults", "-no-user-config", "-nographic"]);
        // The rest of the machine is the same.
        let mut plain = spec().argv();
        plain.retain(|a| a != "-no-reboot");
        assert_eq!(argv, plain);
    }

    #[test]
    fn devices_add_qemu_and_kernel_args() {
        let mut s = spec();
        s.devices.push(Device::PersistDisk {
            path: "/out/persist.img".into(),
        });
        s.accel = Accel::Kvm;
        let argv = s.argv();
        assert_eq!(
            window(&argv, "-fw_cfg"),
            ["name=opt/org.powernode/identity,file=/out/identity,,1.json"]
        );
        assert_eq!(window(&argv, "-netdev"), ["user,id=n0"]);
        assert_eq!(
            window(&argv, "-device"),
            [
                "virtio-net-pci,netdev=n0",
                "virtio-rng-pci",
                "virtio-blk-pci,drive=persist,serial=persist"
            ]
        );
        assert_eq!(
            window(&argv, "-drive"),
            ["file=/out/persist.img,format=raw,if=none,id=persist,cache=unsafe"]
        );
        assert_eq!(window(&argv, "-accel"), ["kvm"]);
        assert_eq!(window(&argv, "-cpu"), ["host"]);
        assert!(s
            .kernel_cmdline()
            .ends_with("powernode.persist=LABEL=pn-persist"));
    }

    #[test]
    fn a_data_disk_is_read_only_virtio_and_never_named_persist() {
        let mut s = spec();
        s.devices.push(Device::DataDisk {
            path: "/out/config-drive.img".into(),
            id: "config2".into(),
        });
        let argv = s.argv();
        assert_eq!(
            window(&argv, "-drive"),
            ["file=/out/config-drive.img,format=raw,if=none,id=config2,readonly=on"]
        );
        assert!(window(&argv, "-device").contains(&"virtio-blk-pci,drive=config2,serial=config2"));
        assert!(!s.kernel_cmdline().contains("powernode.persist"));
    }

    #[test]
    fn caller_overrides_base_kernel_args_and_duplicates_collapse() {
        let mut s = spec();
        s.kernel_args = vec![
            "console=ttyS0".into(),
            "panic=5".into(),
            "console=ttyS0".into(),
        ];
        assert_eq!(
            s.kernel_cmdline(),
            "console=ttyS0 panic=5 powernode.identity_source=fw_cfg"
        );
    }

    #[test]
    fn disk_boot_has_firmware_and_no_direct_kernel() {
        let fw = Firmware {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/out/vars,1.fd".into(),
        };
        let mut s = VmSpec::disk(fw, "/img/disk.raw", "/out/serial.log");
        s.devices[0] = Device::metadata_net("n0", 41234);
        s.devices.push(Device::PersistDisk {
            path: "/out/persist.img".into(),
        });
        assert!(s.boots_disk());
        let argv = s.argv();
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!argv.iter().any(|a| a == flag), "{flag} in {argv:?}");
        }
        assert_eq!(
            window(&argv, "-drive"),
            [
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "if=pflash,format=raw,unit=1,file=/out/vars,,1.fd",
                "file=/img/disk.raw,format=raw,if=none,id=boot,snapshot=on",
                "file=/out/persist.img,format=raw,if=none,id=persist,cache=unsafe",
            ]
        );
        assert_eq!(
            window(&argv, "-netdev"),
            ["user,id=n0,net=169.254.0.0/16,guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:41234"]
        );
        assert_eq!(
            window(&argv, "-device"),
            [
                "virtio-net-pci,netdev=n0",
                "virtio-rng-pci",
                "ide-hd,drive=boot,bus=ide.0,bootindex=0",
                "virtio-blk-pci,drive=persist,serial=persist"
            ]
        );
        // The direct-kernel spec is unchanged by the new devices' existence.
        assert!(!spec().boots_disk());
        let plain = VmSpec::new("/k", "/i", "/s").argv();
        assert_eq!(window(&plain, "-netdev"), ["user,id=n0"]);
    }

    #[test]
    fn smbios_system_fields_are_escaped() {
        let d = Device::SmbiosSystem {
            fields: vec![
                ("manufacturer".into(), "Amazon EC2".into()),
                ("product".into(), "t3.micro,x".into()),
            ],
        };
        assert_eq!(
            d.qemu_args(),
            [
                "-smbios",
                "type=1,manufacturer=Amazon EC2,product=t3.micro,,x"
            ]
        );
    }

    #[test]
    fn user_net_with_defaults_is_plain_user_net() {
        let d = Device::UserNetWith {
            id: "a,b".into(),
            net: None,
            guestfwd: vec![],
        };
        assert_eq!(
            d.qemu_args(),
            [
                "-netdev",
                "user,id=a,,b",
                "-device",
                "virtio-net-pci,netdev=a,,b"
            ]
        );
        assert!(d.kernel_args().is_empty());
    }

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        let argv: Vec<String> = ["echo", "a b", "it's", "x=1,y", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s|' {}", shell_quote(&argv[1..])))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "a b|it's|x=1,y||");
    }
}
