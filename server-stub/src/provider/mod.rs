//! Providers: what makes (and destroys) the machine behind an instance. One trait;
//! `recorder` (records exactly what it would boot, including the identity document
//! and the QEMU command line, boots nothing), `real` (boots a local QEMU VM through
//! `powernode-qemu`: direct kernel boot of a published netboot image, identity by
//! fw_cfg; in `real.rs`), `libvirt` (the same VM as a libvirt domain; in
//! `libvirt.rs`) and `disabled`.
//!
//! Provider calls may block (spawning QEMU, making a disk, killing and reaping):
//! the service calls them with no state lock held, on the blocking pool.

mod libvirt;
mod real;

pub use libvirt::{domain_name, Libvirt};
pub use real::Real;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use powernode_proto::admin::InstanceType;
use powernode_proto::{IdentityDocument, LifecycleClass};
use powernode_qemu::spec::shell_quote;
use powernode_qemu::{Accel, Device, VmSpec};
use serde_json::json;

use crate::config::ProviderMode;

/// Size of a persistent node's `/persist` disk (sparse raw file).
pub const PERSIST_DISK_MIB: u32 = 1024;
/// Subfolder of the image base with one folder per instance.
pub const INSTANCES_DIR: &str = "instances";

/// The netboot image a VM boots (a publication's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub publication_id: String,
    pub dir: PathBuf,
    /// Contents of the image's `cmdline` file, split on whitespace.
    pub cmdline: Vec<String>,
}

impl ImageRef {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }
}

/// Everything a provider needs to start one instance.
#[derive(Debug, Clone)]
pub struct ProvisionSpec {
    pub instance_id: String,
    pub node_id: String,
    pub hostname: String,
    pub lifecycle_class: LifecycleClass,
    pub instance_type: InstanceType,
    pub region: String,
    pub template_id: String,
    pub platform: String,
    pub arch: String,
    pub identity: IdentityDocument,
    /// The published image to boot (`real` needs one; `recorder` records it if known).
    pub image: Option<ImageRef>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("no provider is configured (POWERNODE_LIBVIRT_MODE=disabled)")]
    Disabled,
    #[error("provider failed: {0}")]
    Failed(String),
    #[error("no netboot image is published for this platform and architecture")]
    MissingImage,
    #[error("provider I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the /persist disk")]
    Disk(#[source] powernode_qemu::disk::DiskError),
    #[error("cannot start QEMU")]
    Vm(#[source] powernode_qemu::VmError),
    #[error("cannot take the VM back")]
    Adopt(#[source] powernode_qemu::AdoptError),
    #[error("{what}")]
    Libvirt {
        what: String,
        #[source]
        source: powernode_qemu::libvirt::VirshError,
    },
}

impl ProviderError {
    /// The message with its causes, for instance failures and API answers.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            out.push_str(": ");
            out.push_str(&s.to_string());
            src = s.source();
        }
        out
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProviderError + '_ {
    move |source| ProviderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A provider action's record: what was (or would have been) done, kept in
/// `provider_records` so an operator and the tests can read it back.
pub type ProviderRecord = serde_json::Value;

/// A VM that ended without being destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub instance_id: String,
    pub pid: u32,
    /// The exit status (`exit status: 0`), or why it is not known (a QEMU this
    /// server adopted is not its child: its status went to its parent).
    pub status: String,
    /// Why QEMU said it stopped (its last QMP `SHUTDOWN` reason: `guest-shutdown` is
    /// the guest powering off), if the watcher heard it.
    pub shutdown_reason: Option<String>,
    /// Last lines of the serial console (the guest's own account of why).
    pub serial_tail: String,
}

/// A VM that reset in place (QEMU's `RESET` events, coalesced per reboot: see
/// [`REBOOT_COALESCE`]): the guest rebooted (a reboot task, a kernel panic under
/// `panic=-1`, the init's failure policy) or the host reset it. Same process, same
/// disks, same identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmReset {
    pub instance_id: String,
    pub pid: u32,
    /// QEMU's reason (`guest-reset`, `host-qmp-system-reset`, ...).
    pub reason: String,
    /// Whether the guest asked for it (`None`: the provider cannot tell; libvirt's
    /// reboot event does not say).
    pub by_guest: Option<bool>,
    /// Reboots of this VM within [`RESET_WINDOW`], this one included.
    pub recent: usize,
}

/// What the watcher saw happen to a VM, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    Reset(VmReset),
    Exited(VmExit),
}

/// A VM that reboots more than [`RESET_LIMIT`] times within [`RESET_WINDOW`] is in a
/// reboot loop (a boot that fails and reboots by policy, a panic at every boot): the
/// service destroys it and fails the instance, as it would a VM that died.
pub const RESET_LIMIT: usize = 5;
pub const RESET_WINDOW: Duration = Duration::from_secs(600);
/// QEMU reports one guest reboot as several `RESET`s (measured: three for one
/// `reboot(2)` of the netboot init, within half a second: the kernel's reset, then
/// the firmware's own hard reset as it starts again). Resets QEMU stamped within
/// this long of the first one of a reboot are that reboot; anchored at the first, so
/// a loop faster than this still counts, at worst half as fast.
pub const REBOOT_COALESCE: Duration = Duration::from_secs(2);

/// A VM's reboots, counted from its resets: several resets within
/// [`REBOOT_COALESCE`] of a reboot's first are that reboot.
#[derive(Debug, Default)]
struct Reboots {
    /// When each reboot within [`RESET_WINDOW`] began (this process's clock).
    recent: std::collections::VecDeque<std::time::Instant>,
    /// The stamp of the first reset of the latest reboot.
    started: Option<f64>,
}

impl Reboots {
    /// A reset stamped `stamp` (seconds on a clock that moves forward): `Some(n)`,
    /// the reboots within the window with this one, when it begins a reboot; `None`
    /// when it belongs to the latest.
    fn reset(&mut self, stamp: f64) -> Option<usize> {
        if self
            .started
            .is_some_and(|t| stamp >= t && stamp - t < REBOOT_COALESCE.as_secs_f64())
        {
            return None;
        }
        self.started = Some(stamp);
        let now = std::time::Instant::now();
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESET_WINDOW)
        {
            self.recent.pop_front();
        }
        Some(self.recent.len())
    }
}

/// Writes the identity document readable by the owner only (it holds a bootstrap token).
fn write_private(path: &Path, data: &[u8]) -> Result<(), ProviderError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Makes an instance's folder for a VM provider: the identity document (0600: it
/// holds the bootstrap token) and, for a persistent node, its `/persist` disk (one
/// left by an earlier try is reused). Returns the folder.
fn prepare_instance(base: &Path, spec: &ProvisionSpec) -> Result<PathBuf, ProviderError> {
    let dir = instance_dir(base, &spec.instance_id);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let identity = serde_json::to_vec_pretty(&spec.identity)
        .map_err(|e| ProviderError::Failed(format!("encoding the identity: {e}")))?;
    write_private(&dir.join("identity.json"), &identity)?;
    if spec.lifecycle_class == LifecycleClass::Persistent {
        let disk = dir.join("persist.img");
        if !disk.exists() {
            powernode_qemu::make_persist_disk(&disk, PERSIST_DISK_MIB)
                .map_err(ProviderError::Disk)?;
        }
    }
    Ok(dir)
}

pub trait Provider: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Whether provisioning can work at all (checked before any row is created).
    fn enabled(&self) -> bool;
    /// Whether the provider can work at all (its daemon answers): checked when the
    /// server starts, before it takes back any VM, so a daemon that is down stops
    /// the server rather than failing every instance.
    fn check(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Whether provisioning needs a published netboot image.
    fn needs_image(&self) -> bool {
        false
    }
    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError>;
    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError>;
    /// What happened to the VMs since the last call: resets in place, and VMs that
    /// ended on their own (reaped and forgotten).
    fn poll(&self) -> Vec<VmEvent> {
        Vec::new()
    }
    /// Takes back the VM an earlier server started for `instance_id` (its provision
    /// `record`: pid, instance folder, QMP sockets) and watches it as if it had
    /// started it. An error when it is gone or is not that VM.
    fn adopt(
        &self,
        instance_id: &str,
        record: &ProviderRecord,
    ) -> Result<ProviderRecord, ProviderError> {
        let _ = record;
        Err(ProviderError::Failed(format!(
            "the {} provider cannot take back {instance_id}'s VM",
            self.name()
        )))
    }
    /// Server shutdown: refuses new VMs and lets go of the running ones, which keep
    /// running for the next server on the same data directory to adopt. Returns how
    /// many were left running.
    fn shutdown(&self) -> usize {
        0
    }
}

/// Builds the provider. `image_base` is the netboot image folder (also the parent of
/// the per-instance folders of `real`).
pub fn from_mode(
    mode: ProviderMode,
    image_base: Option<PathBuf>,
    libvirt_uri: &str,
) -> Box<dyn Provider> {
    let base = || image_base.clone().unwrap_or_else(|| PathBuf::from("build"));
    match mode {
        ProviderMode::Recorder => Box::new(Recorder {
            image_base: image_base.clone(),
        }),
        ProviderMode::Disabled => Box::new(Disabled),
        ProviderMode::Real => Box::new(Real::new(base())),
        ProviderMode::Libvirt => Box::new(Libvirt::new(
            base(),
            powernode_qemu::libvirt::Virsh::new(virsh_program(), libvirt_uri),
        )),
    }
}

/// The `virsh` the `libvirt` provider runs: `POWERNODE_VIRSH`, else `virsh` on the
/// `PATH`.
pub fn virsh_program() -> PathBuf {
    std::env::var_os("POWERNODE_VIRSH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("virsh"))
}

/// Folder of one instance's VM files (identity, serial log, command, persist disk).
pub fn instance_dir(base: &Path, instance_id: &str) -> PathBuf {
    base.join(INSTANCES_DIR).join(instance_id)
}

/// How long a persistent instance's VM gets to shut down after its ACPI power button
/// before it is killed: long enough for systemd (or the agent, refused at its next
/// heartbeat) to leave `/persist` clean under TCG.
pub const POWERDOWN_GRACE: Duration = Duration::from_secs(40);

/// The QMP socket of an instance's VM, for commands (the power button). Under the
/// temp dir, not the instance folder: a unix socket path has a 108-byte limit that
/// deep checkouts exceed. The provision record keeps the path, so a server started
/// with another temp dir still finds it.
pub fn qmp_socket(instance_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("powernode-qmp-{instance_id}.sock"))
}

/// The second QMP socket, the one the exit watcher keeps open for its events (a
/// QMP socket serves one client at a time).
pub fn qmp_events_socket(instance_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("powernode-qmp-{instance_id}.events.sock"))
}

/// The VM of an instance, as `real` boots it (pure: unit-tested without QEMU).
/// `extra_args` go after the image's own command line (e.g. test switches).
pub fn vm_spec(
    spec: &ProvisionSpec,
    image: &ImageRef,
    inst_dir: &Path,
    accel: Accel,
    extra_args: &[String],
) -> VmSpec {
    let mut vm = VmSpec::new(image.kernel(), image.initrd(), inst_dir.join("serial.log"));
    vm.memory_mib = spec.instance_type.memory_mb;
    vm.cpus = spec.instance_type.vcpus;
    vm.accel = accel;
    vm.kernel_args = image.cmdline.clone();
    vm.kernel_args.extend(extra_args.iter().cloned());
    // A guest reboot resets the machine in place rather than ending QEMU: the VM
    // comes back from a reboot task, a panic (`panic=-1`) or the init's failure
    // policy with the same kernel, initrd, fw_cfg identity and disks, whether or
    // not a server is watching at that moment (one restarting, or down). The
    // watcher learns of each reset from QMP's `RESET` event and bounds a loop.
    vm.reset_in_place = true;
    vm.devices
        .push(Device::identity(inst_dir.join("identity.json")));
    vm.devices.push(Device::Qmp {
        path: qmp_socket(&spec.instance_id),
    });
    vm.devices.push(Device::Qmp {
        path: qmp_events_socket(&spec.instance_id),
    });
    if spec.lifecycle_class == LifecycleClass::Persistent {
        vm.devices.push(Device::PersistDisk {
            path: inst_dir.join("persist.img"),
        });
    }
    vm
}

fn vm_record(spec: &ProvisionSpec, vm: &VmSpec) -> serde_json::Value {
    json!({
        "name": format!("powernode-{}", spec.instance_id),
        "hostname": spec.hostname,
        "platform": spec.platform,
        "arch": spec.arch,
        "template_id": spec.template_id,
        "region": spec.region,
        "instance_type": spec.instance_type.id,
        "vcpus": vm.cpus,
        "memory_mb": vm.memory_mib,
        "kernel": vm.kernel,
        "initrd": vm.initrd,
        "persist_disk": spec.lifecycle_class == LifecycleClass::Persistent,
        "fw_cfg": {powernode_qemu::spec::IDENTITY_FW_CFG_NAME: "identity"},
        "kernel_cmdline": vm.kernel_cmdline(),
        "network": "user,host=10.0.2.2",
        "rng": "virtio-rng",
        "serial_log": vm.serial_log,
        "reset_in_place": vm.reset_in_place,
        "qmp": qmp_socket(&spec.instance_id),
        "qmp_events": qmp_events_socket(&spec.instance_id),
        "argv": vm.argv(),
        "command": shell_quote(&vm.argv()),
    })
}

/// Extra kernel arguments for every VM, from `POWERNODE_VM_APPEND` (space-separated,
/// e.g. `powernode.on_failure=poweroff`).
fn env_extra_args() -> Vec<String> {
    std::env::var("POWERNODE_VM_APPEND")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Records the VM it would boot, instantly.
#[derive(Debug)]
pub struct Recorder {
    pub image_base: Option<PathBuf>,
}

impl Provider for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn enabled(&self) -> bool {
        true
    }

    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        let base = self
            .image_base
            .clone()
            .unwrap_or_else(|| PathBuf::from("<POWERNODE_IMAGE_BASE>"));
        let image = spec.image.clone().unwrap_or(ImageRef {
            publication_id: String::new(),
            dir: base.clone(),
            cmdline: Vec::new(),
        });
        let dir = instance_dir(&base, &spec.instance_id);
        let vm = vm_spec(spec, &image, &dir, Accel::Tcg, &env_extra_args());
        Ok(json!({
            "provider": "recorder",
            "action": "provision",
            "instance_id": spec.instance_id,
            "node_id": spec.node_id,
            "publication_id": spec.image.as_ref().map(|i| i.publication_id.clone()),
            "vm": vm_record(spec, &vm),
            "identity": spec.identity,
        }))
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        Ok(json!({
            "provider": "recorder",
            "action": "destroy",
            "instance_id": instance_id,
            "vm": {"name": format!("powernode-{instance_id}")},
        }))
    }
}

/// No provider: provisioning is refused; destroying has nothing to do.
#[derive(Debug)]
pub struct Disabled;

impl Provider for Disabled {
    fn name(&self) -> &'static str {
        "disabled"
    }

    fn enabled(&self) -> bool {
        false
    }

    fn provision(&self, _spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        Err(ProviderError::Disabled)
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        Ok(
            json!({"provider": "disabled", "action": "destroy", "instance_id": instance_id, "vm": null}),
        )
    }
}

/// The providers whose instances have a VM that outlives the server.
pub const VM_PROVIDERS: &[&str] = &["real", "libvirt"];

/// Stops the VM of a provision `record` that no provider takes back (the server now
/// runs another provider, or cannot watch it): a `real` record's QEMU if its pid is
/// still the QEMU of that instance folder, a `libvirt` record's domain if it still
/// has that UUID. Says what it stopped.
pub fn end_orphan(record: &ProviderRecord) -> Option<String> {
    if record["provider"] == "libvirt" {
        let name = record["domain"].as_str()?;
        return libvirt::end_orphan(record, &virsh_program()).then(|| format!("domain {name}"));
    }
    let pid = u32::try_from(record["pid"].as_u64()?).ok()?;
    let dir = PathBuf::from(record["instance_dir"].as_str()?);
    if !powernode_qemu::adopt::is_qemu_of(pid, &dir) {
        return None;
    }
    let killed = rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok());
    killed.then(|| format!("QEMU pid {pid}"))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use powernode_proto::identity::IDENTITY_VERSION;
    use powernode_proto::NetworkConfig;

    pub(in crate::provider) fn spec(
        class: LifecycleClass,
        type_id: &str,
        vcpus: u32,
        memory_mb: u32,
    ) -> ProvisionSpec {
        ProvisionSpec {
            instance_id: "inst-1".into(),
            node_id: "node-1".into(),
            hostname: "edge-1".into(),
            lifecycle_class: class,
            instance_type: InstanceType {
                id: type_id.into(),
                vcpus,
                memory_mb,
            },
            region: "region-local-qemu".into(),
            template_id: "tmpl-edge-base".into(),
            platform: "powernode-netboot".into(),
            arch: "arch-amd64".into(),
            identity: IdentityDocument {
                version: IDENTITY_VERSION,
                control_plane_url: "https://10.0.2.2:8443".into(),
                ca_pem: "CA".into(),
                bootstrap_token: "tok".into(),
                node_id: "node-1".into(),
                instance_id: "inst-1".into(),
                hostname: "edge-1".into(),
                network: NetworkConfig::Dhcp,
                heartbeat_interval_seconds: 30,
                ssh_authorized_keys: Vec::new(),
                module_trust_keys: Vec::new(),
            },
            image: Some(image()),
        }
    }

    fn image() -> ImageRef {
        ImageRef {
            publication_id: "pub-1".into(),
            dir: "/img".into(),
            cmdline: vec!["quiet".into(), "powernode.log=info".into()],
        }
    }

    fn argv(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ephemeral_node_vm_spec_and_argv() {
        let qmp = format!("unix:{},server=on,wait=off", qmp_socket("inst-1").display());
        let events = format!(
            "unix:{},server=on,wait=off",
            qmp_events_socket("inst-1").display()
        );
        let s = spec(LifecycleClass::Ephemeral, "type-qemu-1cpu-512mb", 1, 512);
        let vm = vm_spec(
            &s,
            &image(),
            Path::new("/b/instances/inst-1"),
            Accel::Tcg,
            &[],
        );
        assert_eq!(
            vm.argv(),
            argv(&[
                "qemu-system-x86_64",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-machine",
                "q35",
                "-m",
                "512",
                "-smp",
                "1",
                "-display",
                "none",
                "-monitor",
                "none",
                "-parallel",
                "none",
                "-serial",
                "file:/b/instances/inst-1/serial.log",
                "-kernel",
                "/img/vmlinuz",
                "-initrd",
                "/img/initramfs.img",
                "-append",
                "console=ttyS0 panic=-1 quiet powernode.log=info powernode.identity_source=fw_cfg",
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-device",
                "virtio-rng-pci",
                "-fw_cfg",
                "name=opt/org.powernode/identity,file=/b/instances/inst-1/identity.json",
                "-qmp",
                &qmp,
                "-qmp",
                &events,
            ])
        );
    }

    #[test]
    fn persistent_node_gets_the_persist_disk_and_its_type() {
        let s = spec(LifecycleClass::Persistent, "type-qemu-2cpu-4gb", 2, 4096);
        let extra = vec!["powernode.on_failure=poweroff".to_string()];
        let vm = vm_spec(
            &s,
            &image(),
            Path::new("/b/instances/inst-1"),
            Accel::Kvm,
            &extra,
        );
        let expected = VmSpec {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initramfs.img".into(),
            kernel_args: argv(&[
                "quiet",
                "powernode.log=info",
                "powernode.on_failure=poweroff",
            ]),
            memory_mib: 4096,
            cpus: 2,
            accel: Accel::Kvm,
            devices: vec![
                Device::UserNet { id: "n0".into() },
                Device::Rng,
                Device::identity("/b/instances/inst-1/identity.json"),
                Device::Qmp {
                    path: qmp_socket("inst-1"),
                },
                Device::Qmp {
                    path: qmp_events_socket("inst-1"),
                },
                Device::PersistDisk {
                    path: "/b/instances/inst-1/persist.img".into(),
                },
            ],
            serial_log: "/b/instances/inst-1/serial.log".into(),
            reset_in_place: true,
        };
        assert_eq!(vm, expected);
        let argv = vm.argv();
        assert_eq!(
            argv[argv.len() - 4..],
            [
                "-drive",
                "file=/b/instances/inst-1/persist.img,format=raw,if=none,id=persist,cache=unsafe",
                "-device",
                "virtio-blk-pci,drive=persist,serial=persist",
            ]
        );
        assert!(vm
            .kernel_cmdline()
            .ends_with("powernode.on_failure=poweroff powernode.identity_source=fw_cfg powernode.persist=LABEL=pn-persist"));
        let w = |flag: &str| {
            argv.windows(2)
                .filter(|p| p[0] == flag)
                .map(|p| p[1].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(w("-m"), ["4096"]);
        assert_eq!(w("-smp"), ["2"]);
        assert_eq!(w("-accel"), ["kvm"]);
    }
}
