//! `VmSpec -> libvirt domain XML`: pure, so the whole domain is unit-tested without
//! libvirt. The domain boots exactly what [`VmSpec::argv`] boots (direct kernel,
//! q35, the same kernel command line, fw_cfg identity, `/persist` on virtio with the
//! same serial, user networking, virtio-rng, the serial console to a file), so a
//! node cannot tell which of the two started it.
//!
//! Written by hand rather than with an XML writer: a domain is a few fixed elements,
//! and every value goes through [`xml_escape`].

use std::path::Path;

use crate::spec::{Device, VmSpec};
use crate::Accel;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("a libvirt domain boots the netboot image directly; {0} is not supported")]
    Unsupported(&'static str),
    #[error("libvirt needs an absolute path: {0}")]
    RelativePath(String),
}

/// Escapes text for an XML element or a single-quoted attribute.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn abs(path: &Path) -> Result<String, DomainError> {
    let s = path.to_string_lossy();
    if !path.is_absolute() {
        return Err(DomainError::RelativePath(s.into_owned()));
    }
    Ok(xml_escape(&s))
}

/// The domain `name` for `spec`. QMP devices are left out (libvirt owns QEMU's
/// monitor; the power button is `virsh shutdown --mode acpi`).
pub fn domain_xml(name: &str, spec: &VmSpec) -> Result<String, DomainError> {
    if spec.boots_disk() {
        return Err(DomainError::Unsupported("booting a disk through firmware"));
    }
    let (kind, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host-passthrough"),
        Accel::Tcg => ("qemu", "maximum"),
    };
    let mut x = String::new();
    let mut line = |s: String| {
        x.push_str(&s);
        x.push('\n');
    };
    line(format!("<domain type='{kind}'>"));
    line(format!("  <name>{}</name>", xml_escape(name)));
    line(format!("  <memory unit='MiB'>{}</memory>", spec.memory_mib));
    line(format!("  <vcpu>{}</vcpu>", spec.cpus));
    line("  <os>".into());
    line("    <type arch='x86_64' machine='q35'>hvm</type>".into());
    line(format!("    <kernel>{}</kernel>", abs(&spec.kernel)?));
    line(format!("    <initrd>{}</initrd>", abs(&spec.initrd)?));
    line(format!(
        "    <cmdline>{}</cmdline>",
        xml_escape(&spec.kernel_cmdline())
    ));
    line("  </os>".into());
    let fw_cfg: Vec<(&String, &Path)> = spec
        .devices
        .iter()
        .filter_map(|d| match d {
            Device::FwCfgFile { name, path } => Some((name, path.as_path())),
            _ => None,
        })
        .collect();
    if !fw_cfg.is_empty() {
        line("  <sysinfo type='fwcfg'>".into());
        for (entry, path) in fw_cfg {
            line(format!(
                "    <entry name='{}' file='{}'/>",
                xml_escape(entry),
                abs(path)?
            ));
        }
        line("  </sysinfo>".into());
    }
    // The guest's fw_cfg driver finds the device through ACPI; without it the node
    // sees no identity, and a power-off becomes a halt.
    line("  <features><acpi/></features>".into());
    line(format!("  <cpu mode='{cpu}'/>"));
    line("  <clock offset='utc'/>".into());
    let reboot = if spec.reset_in_place {
        "restart"
    } else {
        "destroy"
    };
    line("  <on_poweroff>destroy</on_poweroff>".into());
    line(format!("  <on_reboot>{reboot}</on_reboot>"));
    line(format!("  <on_crash>{reboot}</on_crash>"));
    line("  <devices>".into());
    if spec.qemu.is_absolute() {
        line(format!("    <emulator>{}</emulator>", abs(&spec.qemu)?));
    }
    for device in &spec.devices {
        match device {
            Device::FwCfgFile { .. } | Device::Qmp { .. } => {}
            Device::UserNet { .. } => {
                line("    <interface type='user'><model type='virtio'/></interface>".into())
            }
            Device::UserNetWith { net, guestfwd, .. } => {
                if !guestfwd.is_empty() {
                    return Err(DomainError::Unsupported("a guest forward (guestfwd)"));
                }
                line("    <interface type='user'>".into());
                if let Some(net) = net {
                    let (addr, prefix) = net
                        .split_once('/')
                        .ok_or(DomainError::Unsupported("a user network without a prefix"))?;
                    line(format!(
                        "      <ip family='ipv4' address='{}' prefix='{}'/>",
                        xml_escape(addr),
                        xml_escape(prefix)
                    ));
                }
                line("      <model type='virtio'/>".into());
                line("    </interface>".into());
            }
            Device::Rng => line(
                "    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
                    .into(),
            ),
            Device::PersistDisk { path } => {
                line("    <disk type='file' device='disk'>".into());
                line("      <driver name='qemu' type='raw' cache='unsafe'/>".into());
                line(format!("      <source file='{}'/>", abs(path)?));
                line("      <target dev='vda' bus='virtio'/>".into());
                line("      <serial>persist</serial>".into());
                line("    </disk>".into());
            }
            Device::DataDisk { .. } => return Err(DomainError::Unsupported("a data disk")),
            Device::SmbiosSystem { .. } => {
                return Err(DomainError::Unsupported("SMBIOS system information"))
            }
            Device::Firmware(_) | Device::BootDisk { .. } => {
                return Err(DomainError::Unsupported("booting a disk through firmware"))
            }
        }
    }
    line("    <serial type='file'>".into());
    line(format!(
        "      <source path='{}' append='on'/>",
        abs(&spec.serial_log)?
    ));
    line("      <target port='0'/>".into());
    line("    </serial>".into());
    line("    <controller type='usb' model='none'/>".into());
    line("    <memballoon model='none'/>".into());
    line("  </devices>".into());
    line("</domain>".into());
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("/img/vmlinuz", "/img/initramfs.img", "/i/serial.log");
        s.kernel_args = vec!["console=ttyS0".into(), "powernode.x=a&b".into()];
        s.memory_mib = 768;
        s.cpus = 2;
        s.reset_in_place = true;
        s.devices.push(Device::identity("/i/identity.json"));
        s.devices.push(Device::Qmp {
            path: "/tmp/q.sock".into(),
        });
        s.devices.push(Device::PersistDisk {
            path: "/i/persist.img".into(),
        });
        s
    }

    #[test]
    fn the_domain_boots_what_the_argv_boots() {
        let s = spec();
        let xml = domain_xml("powernode-inst-1", &s).unwrap();
        for want in [
            "<domain type='qemu'>",
            "<name>powernode-inst-1</name>",
            "<memory unit='MiB'>768</memory>",
            "<vcpu>2</vcpu>",
            "machine='q35'",
            "<kernel>/img/vmlinuz</kernel>",
            "<initrd>/img/initramfs.img</initrd>",
            "<entry name='opt/org.powernode/identity' file='/i/identity.json'/>",
            "<features><acpi/></features>",
            "<cpu mode='maximum'/>",
            "<on_reboot>restart</on_reboot>",
            "<source file='/i/persist.img'/>",
            "<serial>persist</serial>",
            "<interface type='user'><model type='virtio'/></interface>",
            "<rng model='virtio'>",
            "<source path='/i/serial.log' append='on'/>",
        ] {
            assert!(xml.contains(want), "missing {want} in\n{xml}");
        }
        // The same kernel command line as the direct QEMU boot, escaped.
        let cmdline = s.kernel_cmdline();
        assert!(cmdline.contains("powernode.identity_source=fw_cfg"));
        assert!(cmdline.contains("powernode.persist=LABEL="));
        assert!(xml.contains(&format!("<cmdline>{}</cmdline>", xml_escape(&cmdline))));
        assert!(xml.contains("powernode.x=a&amp;b"));
        // libvirt owns the monitor: no QMP socket of ours.
        assert!(!xml.contains("q.sock"));
    }

    #[test]
    fn kvm_and_no_reset_in_place_change_type_cpu_and_reboot() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.reset_in_place = false;
        s.qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
        let xml = domain_xml("d", &s).unwrap();
        assert!(xml.starts_with("<domain type='kvm'>"));
        assert!(xml.contains("<cpu mode='host-passthrough'/>"));
        assert!(xml.contains("<on_reboot>destroy</on_reboot>"));
        assert!(xml.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
    }

    #[test]
    fn values_are_escaped_and_paths_must_be_absolute() {
        let mut s = spec();
        s.serial_log = PathBuf::from("/i/it's <here>.log");
        let xml = domain_xml("a'b", &s).unwrap();
        assert!(xml.contains("<name>a&apos;b</name>"));
        assert!(xml.contains("/i/it&apos;s &lt;here&gt;.log"));
        s.kernel = PathBuf::from("build/vmlinuz");
        assert_eq!(
            domain_xml("d", &s),
            Err(DomainError::RelativePath("build/vmlinuz".into()))
        );
    }

    #[test]
    fn what_libvirt_cannot_boot_here_is_refused_by_name() {
        let mut s = spec();
        s.devices.push(Device::metadata_net("m", 8080));
        assert_eq!(
            domain_xml("d", &s),
            Err(DomainError::Unsupported("a guest forward (guestfwd)"))
        );
        let fw = crate::Firmware {
            code: "/c".into(),
            vars: "/v".into(),
        };
        let s = VmSpec::disk(fw, "/d.raw", "/s.log");
        assert!(matches!(
            domain_xml("d", &s),
            Err(DomainError::Unsupported(_))
        ));
        let mut s = spec();
        s.devices.push(Device::UserNetWith {
            id: "n".into(),
            net: Some("169.254.0.0/16".into()),
            guestfwd: vec![],
        });
        let xml = domain_xml("d", &s).unwrap();
        assert!(xml.contains("<ip family='ipv4' address='169.254.0.0' prefix='16'/>"));
    }
}
