//! Loads the kernel modules shipped in the initramfs, as the load-order file
//! [`layout::MODULE_LOAD_ORDER`] says (written by the builder, dependencies first).
//! The builder decompressed them, so each is a plain ELF handed to `finit_module`.
//!
//! Loading what a machine does not use costs boot time (a module's relocation and
//! init run under the same clock as everything else), so each entry says when:
//! `boot` (always), `device` (only when a present device's modalias matches one of
//! the module's aliases, as udev's coldplug would decide), or `demand` (only when
//! asked for by name: the composefs modules, loaded before the first EROFS mount).
//! Dependencies come along whenever the module that needs them is loaded.

use std::collections::BTreeSet;

use crate::layout;
use crate::sys::{Errno, ModuleSysError, Sys};

/// The load-order file is a few KiB; anything near this is not ours.
const MAX_LOAD_ORDER: usize = 64 * 1024;
/// A modalias is one short line.
const MAX_MODALIAS: usize = 4096;
/// Where a loaded module shows up (loadable modules only: a built-in one has no
/// `initstate`).
const SYS_MODULE: &str = "/sys/module";
const SYS_BUS: &str = "/sys/bus";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("cannot read the module load order {path}")]
    LoadOrder {
        path: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("load order names {0:?}, which is not a plain `NAME.ko` file name")]
    BadName(String),
    #[error("load order line {line}: {reason}: {text:?}")]
    BadEntry {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("module file {path} is missing from the initramfs")]
    Missing { path: String },
    #[error("cannot open module file {path}")]
    Open {
        path: String,
        #[source]
        errno: Errno,
    },
    #[error("the kernel refused module {name} (bad ELF, wrong kernel or a missing dependency)")]
    Rejected {
        name: String,
        #[source]
        errno: Errno,
    },
    #[error("the kernel refused module {name}: its signature is not trusted")]
    SignatureRejected {
        name: String,
        #[source]
        errno: Errno,
    },
    #[error("loading module {name} failed")]
    Load {
        name: String,
        #[source]
        errno: Errno,
    },
}

/// When an entry of the load order is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Boot,
    Device,
    Demand,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Device => "device",
            Self::Demand => "demand",
        }
    }
}

/// One line of the load order: `NAME.ko [when=boot|device|demand] [deps=A,B]
/// [match=PATTERN]...`. A bare `NAME.ko` is `when=boot`. Patterns are kernel module
/// aliases (`fnmatch` globs, no whitespace), matched against device modaliases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadEntry {
    /// Module name (the file is `NAME.ko`).
    pub name: String,
    pub when: When,
    /// Names of modules this one needs loaded first (those not in the load order are
    /// built into the kernel).
    pub deps: Vec<String>,
    /// Aliases of a `device` entry.
    pub matches: Vec<String>,
}

impl LoadEntry {
    pub fn file(&self) -> String {
        format!("{}.ko", self.name)
    }
}

impl std::fmt::Display for LoadEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.ko when={}", self.name, self.when.as_str())?;
        if !self.deps.is_empty() {
            write!(f, " deps={}", self.deps.join(","))?;
        }
        for m in &self.matches {
            write!(f, " match={m}")?;
        }
        Ok(())
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

/// What happened to each module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Already in the kernel (`EEXIST`): a retried phase, or built in after all.
    pub already: Vec<String>,
    /// Milliseconds each `finit_module` took (module init runs inside the call, so
    /// this includes probing its devices), in load order.
    pub ms: Vec<(String, u64)>,
    /// `device` entries left out because no present device matched them.
    pub no_device: Vec<String>,
    /// Modules whose init said there is nothing for them here (`ENODEV`): an
    /// accelerated driver on a CPU without its instructions (`sha256_ssse3` on a
    /// `qemu64` CPU). The generic code serves instead; whatever truly needs a
    /// missing driver fails later with its own error.
    pub unsupported: Vec<String>,
    /// Milliseconds spent reading the present devices' modaliases.
    pub scan_ms: u64,
    /// How many modaliases were read.
    pub scanned: usize,
}

/// Parses the load-order file; blank lines and `#` comments are ignored.
pub fn parse_load_order(text: &str) -> Result<Vec<LoadEntry>, ModuleError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &'static str| ModuleError::BadEntry {
            line: i + 1,
            reason,
            text: line.to_string(),
        };
        let mut fields = line.split_whitespace();
        let file = fields.next().unwrap_or_default();
        let name = file
            .strip_suffix(".ko")
            .filter(|n| plain_name(n))
            .ok_or_else(|| ModuleError::BadName(file.to_string()))?;
        let mut entry = LoadEntry {
            name: name.to_string(),
            when: When::Boot,
            deps: Vec::new(),
            matches: Vec::new(),
        };
        for field in fields {
            match field.split_once('=') {
                Some(("when", "boot")) => entry.when = When::Boot,
                Some(("when", "device")) => entry.when = When::Device,
                Some(("when", "demand")) => entry.when = When::Demand,
                Some(("when", _)) => return Err(bad("`when` is boot, device or demand")),
                Some(("deps", list)) => {
                    for dep in list.split(',').filter(|d| !d.is_empty()) {
                        if !plain_name(dep) {
                            return Err(bad("a dependency is not a plain module name"));
                        }
                        entry.deps.push(dep.to_string());
                    }
                }
                Some(("match", pattern)) if !pattern.is_empty() => {
                    glob::Pattern::new(pattern)
                        .map_err(|_| bad("a match pattern is not a glob"))?;
                    entry.matches.push(pattern.to_string());
                }
                _ => return Err(bad("unknown field")),
            }
        }
        if entry.when == When::Device && entry.matches.is_empty() {
            return Err(bad("a `device` entry needs at least one `match=`"));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Buses in scan order (few devices first), with the alias prefixes their devices'
/// modaliases start with.
const BUSES: &[(&str, &str)] = &[
    ("virtio:", "virtio"),
    ("vmbus:", "vmbus"),
    ("xen:", "xen"),
    ("pci:", "pci"),
    ("usb:", "usb"),
    ("acpi", "acpi"),
    ("of:", "platform"),
    ("platform:", "platform"),
];

/// The `/sys/bus` folder whose devices can carry a modalias of this shape; `None`
/// for aliases that name no device (`fs-erofs`, `char-major-10-237`, `devname:`).
pub fn device_bus(pattern: &str) -> Option<&'static str> {
    BUSES
        .iter()
        .find(|(prefix, _)| pattern.starts_with(prefix))
        .map(|(_, bus)| *bus)
}

/// Decides the `device` entries: those a present device matches, and those none
/// does. Reads modaliases bus by bus (only buses some undecided entry names) and
/// stops as soon as every entry is decided. A bus the kernel does not have (no
/// folder) has no devices; an unreadable modalias is skipped (a device without one
/// has no driver to load). Returns (matched, unmatched, modaliases read).
pub fn coldplug<'e>(
    sys: &mut dyn Sys,
    devices: Vec<&'e LoadEntry>,
) -> (Vec<&'e LoadEntry>, Vec<&'e LoadEntry>, usize) {
    let patterns = |e: &LoadEntry| -> Vec<glob::Pattern> {
        // Patterns were checked when the file was parsed.
        e.matches
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect()
    };
    let mut pending: Vec<(&LoadEntry, Vec<glob::Pattern>)> =
        devices.into_iter().map(|e| (e, patterns(e))).collect();
    let mut matched = Vec::new();
    let mut read = 0;
    let mut buses: Vec<&str> = BUSES.iter().map(|(_, bus)| *bus).collect();
    buses.dedup();
    for bus in buses {
        let on_bus = |p: &(&LoadEntry, Vec<glob::Pattern>)| {
            p.0.matches.iter().any(|m| device_bus(m) == Some(bus))
        };
        if !pending.iter().any(on_bus) {
            continue;
        }
        let dir = format!("{SYS_BUS}/{bus}/devices");
        let Ok(mut names) = sys.list_dir(&dir) else {
            continue;
        };
        // Reading a modalias costs (the kernel builds it), and ACPI alone may list
        // dozens of devices: names that carry an ID a pending pattern names (ACPI
        // devices are `HID:instance`) are read first, so the scan can stop early.
        // Only the order changes: a device that does not look likely is still read.
        let likely = |name: &str| {
            let id = name.split(':').next().unwrap_or(name);
            id.len() >= 4
                && pending
                    .iter()
                    .filter(|p| on_bus(p))
                    .any(|(e, _)| e.matches.iter().any(|m| m.contains(id)))
        };
        names.sort_by_key(|n| !likely(n));
        for device in names {
            let Ok(alias) = sys.read_file(&format!("{dir}/{device}/modalias"), MAX_MODALIAS) else {
                continue;
            };
            read += 1;
            let alias = String::from_utf8_lossy(&alias);
            let alias = alias.trim();
            let (hit, rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|(_, pats)| pats.iter().any(|p| p.matches(alias)));
            matched.extend(hit.into_iter().map(|(e, _)| e));
            pending = rest;
            if !pending.iter().any(on_bus) {
                break;
            }
        }
    }
    (matched, pending.into_iter().map(|(e, _)| e).collect(), read)
}

/// `names` and everything they depend on, as a set of names present in `entries`.
fn with_deps(entries: &[LoadEntry], names: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut wanted = BTreeSet::new();
    let mut todo: Vec<String> = names.into_iter().collect();
    while let Some(name) = todo.pop() {
        let Some(entry) = entries.iter().find(|e| e.name == name) else {
            continue;
        };
        if wanted.insert(name) {
            todo.extend(entry.deps.iter().cloned());
        }
    }
    wanted
}

pub fn load_one(sys: &mut dyn Sys, file: &str, report: &mut LoadReport) -> Result<(), ModuleError> {
    let path = format!("{}/{file}", layout::MODULE_DIR);
    let name = file.trim_end_matches(".ko").to_string();
    let start = sys.boot_ms();
    let result = sys.finit_module(&path);
    let took = sys.boot_ms().saturating_sub(start);
    report.ms.push((name.clone(), took));
    match result {
        Ok(()) => report.loaded.push(name),
        Err(ModuleSysError::Load(Errno::EXIST)) => report.already.push(name),
        Err(ModuleSysError::Load(Errno::NODEV)) => report.unsupported.push(name),
        Err(ModuleSysError::Open(Errno::NOENT)) => return Err(ModuleError::Missing { path }),
        Err(ModuleSysError::Open(errno)) => return Err(ModuleError::Open { path, errno }),
        Err(ModuleSysError::Load(errno @ (Errno::NOEXEC | Errno::NOENT | Errno::INVAL))) => {
            return Err(ModuleError::Rejected { name, errno })
        }
        Err(ModuleSysError::Load(errno @ (Errno::KEYREJECTED | Errno::PERM))) => {
            return Err(ModuleError::SignatureRejected { name, errno })
        }
        Err(ModuleSysError::Load(errno)) => return Err(ModuleError::Load { name, errno }),
    }
    Ok(())
}

fn read_load_order(sys: &mut dyn Sys) -> Result<Vec<LoadEntry>, ModuleError> {
    let text = sys
        .read_file(layout::MODULE_LOAD_ORDER, MAX_LOAD_ORDER)
        .map_err(|errno| ModuleError::LoadOrder {
            path: layout::MODULE_LOAD_ORDER,
            errno,
        })?;
    parse_load_order(&String::from_utf8_lossy(&text))
}

/// Loads `wanted` (names) in load order, skipping those already in the kernel.
fn load_set(
    sys: &mut dyn Sys,
    entries: &[LoadEntry],
    wanted: &BTreeSet<String>,
    report: &mut LoadReport,
) -> Result<(), ModuleError> {
    for entry in entries.iter().filter(|e| wanted.contains(&e.name)) {
        if sys
            .read_file(&format!("{SYS_MODULE}/{}/initstate", entry.name), 64)
            .is_ok()
        {
            report.already.push(entry.name.clone());
            continue;
        }
        load_one(sys, &entry.file(), report)?;
    }
    Ok(())
}

/// The boot-time load: every `boot` entry and every `device` entry a present device
/// matches, with their dependencies, in load order.
pub fn load_boot(sys: &mut dyn Sys) -> Result<LoadReport, ModuleError> {
    let entries = read_load_order(sys)?;
    let start = sys.boot_ms();
    let devices = entries.iter().filter(|e| e.when == When::Device).collect();
    let (present, absent, scanned) = coldplug(sys, devices);
    let mut report = LoadReport {
        scan_ms: sys.boot_ms().saturating_sub(start),
        scanned,
        no_device: absent.iter().map(|e| e.name.clone()).collect(),
        ..LoadReport::default()
    };
    let roots = entries
        .iter()
        .filter(|e| e.when == When::Boot)
        .chain(present)
        .map(|e| e.name.clone());
    let wanted = with_deps(&entries, roots);
    load_set(sys, &entries, &wanted, &mut report)?;
    Ok(report)
}

impl LoadReport {
    /// `name=MSms` per module loaded or tried, in load order.
    pub fn timing(&self) -> String {
        self.ms
            .iter()
            .map(|(n, ms)| format!("{n}={ms}ms"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// [`load_demand`] on the real kernel for `what` (a filesystem, `composefs`): logs
/// what it loaded; the error is the whole cause chain, for a caller outside the
/// boot phases (the agent library's mounts).
pub fn load_on_demand(what: &str, names: &[&str]) -> Result<(), String> {
    let mut sys = crate::sys::RealSys::new();
    let report = load_demand(&mut sys, names).map_err(|e| powernode_agent::error_chain(&e))?;
    if !report.ms.is_empty() {
        log::info!(
            "kernel modules for {what}: {} (unsupported here: {})",
            report.timing(),
            report.unsupported.join(" ")
        );
    }
    Ok(())
}

/// Loads `names` (any `when`) and their dependencies now. Names not in the load
/// order are skipped: built into this kernel, or no initramfs any more (after
/// switch_root the boot loaded them already). No load-order file is the same.
pub fn load_demand(sys: &mut dyn Sys, names: &[&str]) -> Result<LoadReport, ModuleError> {
    let entries = match read_load_order(sys) {
        Ok(e) => e,
        Err(ModuleError::LoadOrder {
            errno: Errno::NOENT,
            ..
        }) => return Ok(LoadReport::default()),
        Err(e) => return Err(e),
    };
    let wanted = with_deps(&entries, names.iter().map(|n| n.to_string()));
    let mut report = LoadReport::default();
    load_set(sys, &entries, &wanted, &mut report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSys;

    const ORDER: &str = "\
# written by powernode-initramfs
qemu_fw_cfg.ko when=device match=acpi*:QEMU0002:* match=of:N*T*Cqemu,fw-cfg-mmio
failover.ko when=demand
net_failover.ko when=demand deps=failover
virtio_net.ko when=device deps=net_failover match=virtio:d00000001v*
virtio_blk.ko when=device match=virtio:d00000002v*
libcrc32c.ko when=demand
erofs.ko when=demand deps=libcrc32c
overlay.ko when=demand
loop.ko when=demand
always.ko
";

    fn machine() -> FakeSys {
        let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, ORDER);
        sys.dirs
            .insert("/sys/bus/virtio/devices".into(), vec!["virtio0".into()]);
        sys.dirs.insert(
            "/sys/bus/acpi/devices".into(),
            vec!["PNP0A08:00".into(), "QEMU0002:00".into()],
        );
        sys.with_file(
            "/sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000001v00001AF4\n",
        )
        .with_file(
            "/sys/bus/acpi/devices/QEMU0002:00/modalias",
            "acpi:QEMU0002:\n",
        )
        .with_file(
            "/sys/bus/acpi/devices/PNP0A08:00/modalias",
            "acpi:PNP0A08:PNP0A03:\n",
        )
    }

    #[test]
    fn entries_round_trip_and_bad_lines_are_typed() {
        let entries = parse_load_order(ORDER).unwrap();
        assert_eq!(entries.len(), 10);
        assert_eq!(entries[3].deps, ["net_failover"]);
        assert_eq!(entries[9].when, When::Boot);
        for e in &entries {
            assert_eq!(
                parse_load_order(&e.to_string()).unwrap(),
                std::slice::from_ref(e)
            );
        }
        // The old format (bare names) is `boot`.
        let old = parse_load_order("failover.ko\nvirtio_net.ko\n").unwrap();
        assert!(old
            .iter()
            .all(|e| e.when == When::Boot && e.deps.is_empty()));
        for bad in ["../evil.ko", "x.ko.xz", "a/b.ko", ".ko"] {
            assert!(
                matches!(parse_load_order(bad), Err(ModuleError::BadName(_))),
                "{bad}"
            );
        }
        for (bad, why) in [
            ("a.ko when=later", "`when`"),
            ("a.ko deps=../b", "dependency"),
            ("a.ko match=[", "glob"),
            ("a.ko when=device", "match"),
            ("a.ko colour=blue", "unknown"),
        ] {
            let e = parse_load_order(bad).unwrap_err();
            assert!(
                matches!(&e, ModuleError::BadEntry { line: 1, reason, .. } if reason.contains(why)),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn boot_loads_present_devices_with_their_deps_and_leaves_demand_for_later() {
        let mut sys = machine();
        let report = load_boot(&mut sys).unwrap();
        assert_eq!(
            sys.modules(),
            [
                "/lib/modules/qemu_fw_cfg.ko",
                "/lib/modules/failover.ko",
                "/lib/modules/net_failover.ko",
                "/lib/modules/virtio_net.ko",
                "/lib/modules/always.ko",
            ]
        );
        assert_eq!(report.no_device, ["virtio_blk"]);
        // Only the buses the patterns name were scanned, and each only until every
        // entry on it was decided: fw_cfg matched on acpi (its ID-named device read
        // first although listed last), so neither the rest of acpi nor the platform
        // bus was read.
        let touched = |needle: &str| {
            sys.calls.iter().any(|c| match c {
                crate::sys::fake::Call::ListDir(p) | crate::sys::fake::Call::Read(p) => {
                    p.contains(needle)
                }
                _ => false,
            })
        };
        assert!(touched("/sys/bus/virtio/devices/virtio0/modalias"));
        assert!(touched("/sys/bus/acpi/devices/QEMU0002:00/modalias"));
        assert!(!touched("PNP0A08"));
        assert!(!touched("/sys/bus/pci/"));
        assert!(!touched("/sys/bus/platform/"));
        assert_eq!(report.scanned, 2);

        // Later, composefs: erofs with its dependency, overlay, loop; asking again
        // loads nothing more.
        let report = load_demand(&mut sys, &["erofs", "overlay", "loop", "ext4"]).unwrap();
        assert_eq!(report.loaded, ["libcrc32c", "erofs", "overlay", "loop"]);
        for name in ["libcrc32c", "erofs", "overlay", "loop"] {
            sys.files
                .insert(format!("/sys/module/{name}/initstate"), b"live\n".to_vec());
        }
        let again = load_demand(&mut sys, &["erofs", "overlay", "loop"]).unwrap();
        assert!(again.loaded.is_empty());
        assert_eq!(again.already.len(), 4);
    }

    #[test]
    fn without_a_load_order_a_demand_is_nothing_to_do() {
        let mut sys = FakeSys::default();
        assert_eq!(load_demand(&mut sys, &["erofs"]), Ok(LoadReport::default()));
        assert!(matches!(
            load_boot(&mut sys),
            Err(ModuleError::LoadOrder {
                errno: Errno::NOENT,
                ..
            })
        ));
    }

    #[test]
    fn loads_in_order_and_already_loaded_is_fine() {
        let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, "a.ko\nb.ko\n");
        sys.module_errors.insert(
            "/lib/modules/a.ko".into(),
            ModuleSysError::Load(Errno::EXIST),
        );
        let report = load_boot(&mut sys).unwrap();
        assert_eq!(sys.modules(), ["/lib/modules/a.ko", "/lib/modules/b.ko"]);
        assert_eq!(report.already, ["a"]);
        assert_eq!(report.loaded, ["b"]);
        // The fake clock advances 5 ms per load.
        assert_eq!(report.ms, [("a".to_string(), 5), ("b".to_string(), 5)]);
    }

    #[test]
    fn a_module_with_nothing_to_drive_here_is_skipped_not_fatal() {
        let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, "a.ko\nb.ko\n");
        sys.module_errors.insert(
            "/lib/modules/a.ko".into(),
            ModuleSysError::Load(Errno::NODEV),
        );
        let report = load_boot(&mut sys).unwrap();
        assert_eq!(sys.modules(), ["/lib/modules/a.ko", "/lib/modules/b.ko"]);
        assert_eq!(report.unsupported, ["a"]);
        assert_eq!(report.loaded, ["b"]);
    }

    #[test]
    fn errors_are_typed_and_stop_the_load() {
        let cases = [
            (ModuleSysError::Open(Errno::NOENT), "Missing"),
            (ModuleSysError::Open(Errno::ACCESS), "Open"),
            (ModuleSysError::Load(Errno::NOEXEC), "Rejected"),
            (
                ModuleSysError::Load(Errno::KEYREJECTED),
                "SignatureRejected",
            ),
            (ModuleSysError::Load(Errno::NOMEM), "Load"),
        ];
        for (err, want) in cases {
            let mut sys = FakeSys::default().with_file(layout::MODULE_LOAD_ORDER, "a.ko\nb.ko\n");
            sys.module_errors.insert("/lib/modules/a.ko".into(), err);
            let got = load_boot(&mut sys).unwrap_err();
            assert!(format!("{got:?}").starts_with(want), "{got:?} for {err:?}");
            assert_eq!(
                sys.modules(),
                ["/lib/modules/a.ko"],
                "stops at the first failure"
            );
        }
    }
}
