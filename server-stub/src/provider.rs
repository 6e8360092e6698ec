//! Providers: what makes (and destroys) the machine behind an instance. One trait;
//! `recorder` (records exactly what it would boot, including the identity document
//! and the QEMU command line, boots nothing), `real` (boots a local QEMU VM through
//! `powernode-qemu`: direct kernel boot of a published netboot image, identity by
//! fw_cfg) and `disabled`.
//!
//! Provider calls may block (spawning QEMU, making a disk, killing and reaping):
//! the service calls them with no state lock held, on the blocking pool.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use powernode_proto::admin::InstanceType;
use powernode_proto::{IdentityDocument, LifecycleClass};
use powernode_qemu::spec::shell_quote;
use powernode_qemu::{Accel, Device, Vm, VmSpec};
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
    pub status: String,
    /// QEMU exited 0: the guest powered off or, under `-no-reboot`, rebooted.
    pub clean: bool,
    /// Last lines of the serial console (the guest's own account of why).
    pub serial_tail: String,
}

pub trait Provider: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Whether provisioning can work at all (checked before any row is created).
    fn enabled(&self) -> bool;
    /// Whether provisioning needs a published netboot image.
    fn needs_image(&self) -> bool {
        false
    }
    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError>;
    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError>;
    /// VMs that ended on their own since the last call (reaped, forgotten).
    fn poll_exited(&self) -> Vec<VmExit> {
        Vec::new()
    }
    /// Starts the VM of an instance whose VM ended (the guest rebooted) again, as
    /// it was provisioned: same identity, same disks.
    fn restart(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        Err(ProviderError::Failed(format!(
            "the {} provider cannot start {instance_id}'s VM again",
            self.name()
        )))
    }
    /// Kills every VM and refuses new ones (server shutdown). Returns how many were
    /// running.
    fn shutdown(&self) -> usize {
        0
    }
}

/// Builds the provider. `image_base` is the netboot image folder (also the parent of
/// the per-instance folders of `real`).
pub fn from_mode(mode: ProviderMode, image_base: Option<PathBuf>) -> Box<dyn Provider> {
    match mode {
        ProviderMode::Recorder => Box::new(Recorder { image_base }),
        ProviderMode::Disabled => Box::new(Disabled),
        ProviderMode::Real => Box::new(Real::new(
            image_base.unwrap_or_else(|| PathBuf::from("build")),
        )),
    }
}

/// Folder of one instance's VM files (identity, serial log, command, persist disk).
pub fn instance_dir(base: &Path, instance_id: &str) -> PathBuf {
    base.join(INSTANCES_DIR).join(instance_id)
}

/// How long a persistent instance's VM gets to shut down after its ACPI power button
/// before it is killed: long enough for systemd (or the agent, refused at its next
/// heartbeat) to leave `/persist` clean under TCG.
pub const POWERDOWN_GRACE: Duration = Duration::from_secs(40);

/// The QMP socket of an instance's VM. Under the temp dir, not the instance folder:
/// a unix socket path has a 108-byte limit that deep checkouts exceed.
pub fn qmp_socket(instance_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("powernode-qmp-{instance_id}.sock"))
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
    vm.devices
        .push(Device::identity(inst_dir.join("identity.json")));
    vm.devices.push(Device::Qmp {
        path: qmp_socket(&spec.instance_id),
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

/// Local QEMU VMs, children of the server process (killed with it on shutdown).
#[derive(Debug)]
pub struct Real {
    pub image_base: PathBuf,
    extra_args: Vec<String>,
    /// `None` once the server shut down: no VM may start after that.
    vms: Mutex<Option<HashMap<String, Vm>>>,
    /// How each live instance was provisioned, to start its VM again after a reboot.
    specs: Mutex<HashMap<String, ProvisionSpec>>,
}

impl Real {
    pub fn new(image_base: PathBuf) -> Self {
        Self {
            // Absolute, so the recorded folder (and the orphan check on QEMU's command
            // line after a restart) does not depend on the server's working directory.
            image_base: std::path::absolute(&image_base).unwrap_or(image_base),
            extra_args: env_extra_args(),
            vms: Mutex::new(Some(HashMap::new())),
            specs: Mutex::new(HashMap::new()),
        }
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProvisionSpec>> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, Option<HashMap<String, Vm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
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

impl Provider for Real {
    fn name(&self) -> &'static str {
        "real"
    }

    fn enabled(&self) -> bool {
        true
    }

    fn needs_image(&self) -> bool {
        true
    }

    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        let image = spec.image.as_ref().ok_or(ProviderError::MissingImage)?;
        let dir = instance_dir(&self.image_base, &spec.instance_id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let identity = serde_json::to_vec_pretty(&spec.identity)
            .map_err(|e| ProviderError::Failed(format!("encoding the identity: {e}")))?;
        write_private(&dir.join("identity.json"), &identity)?;
        let qemu = PathBuf::from("qemu-system-x86_64");
        let accel = Accel::detect_for_kernel(&qemu, &image.kernel());
        let vm_spec = vm_spec(spec, image, &dir, accel, &self.extra_args);
        if spec.lifecycle_class == LifecycleClass::Persistent {
            let disk = dir.join("persist.img");
            // A new instance gets a new disk; one left by an earlier try is reused.
            if !disk.exists() {
                powernode_qemu::make_persist_disk(&disk, PERSIST_DISK_MIB)
                    .map_err(ProviderError::Disk)?;
            }
        }
        let vm = Vm::spawn(&vm_spec).map_err(ProviderError::Vm)?;
        let record = json!({
            "provider": "real",
            "action": "provision",
            "instance_id": spec.instance_id,
            "node_id": spec.node_id,
            "publication_id": image.publication_id,
            "pid": vm.pid(),
            "accel": format!("{accel:?}").to_lowercase(),
            "instance_dir": dir,
            "command_file": vm.command_file,
            "vm": vm_record(spec, &vm_spec),
            "identity": spec.identity,
        });
        tracing::info!(instance = %spec.instance_id, pid = vm.pid(), ?accel, "VM started");
        match self.vms().as_mut() {
            Some(vms) => {
                vms.insert(spec.instance_id.clone(), vm);
                self.specs().insert(spec.instance_id.clone(), spec.clone());
                Ok(record)
            }
            // Shut down while this VM was starting: it dies here (Vm's drop kills it).
            None => Err(ProviderError::Failed(
                "the server is shutting down; the VM was killed".into(),
            )),
        }
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        self.specs().remove(instance_id);
        // Taken out of the map first, so the exit watcher never reports a VM we kill.
        let vm = self.vms().as_mut().and_then(|v| v.remove(instance_id));
        let Some(mut vm) = vm else {
            return Ok(json!({
                "provider": "real", "action": "destroy", "instance_id": instance_id,
                "vm": null, "note": "no VM running for this instance",
            }));
        };
        let pid = vm.pid();
        let before = vm.try_wait().map_err(ProviderError::Vm)?;
        // A persistent VM first gets its power button, as a cloud's stop does, so
        // its /persist disk is left clean; an ephemeral one has nothing to keep.
        let qmp = qmp_socket(instance_id);
        let mut powerdown = serde_json::Value::Null;
        let persistent = instance_dir(&self.image_base, instance_id)
            .join("persist.img")
            .exists();
        if before.is_none() && persistent {
            let t = std::time::Instant::now();
            let pressed = Vm::power_button(&qmp, Duration::from_secs(5));
            let exited = match &pressed {
                Ok(()) => vm
                    .wait_timeout(POWERDOWN_GRACE)
                    .map_err(ProviderError::Vm)?,
                Err(_) => None,
            };
            powerdown = json!({
                "pressed": pressed.as_ref().map(|_| true).unwrap_or(false),
                "error": pressed.err().map(|e| e.to_string()),
                "exited": exited.map(|s| s.to_string()),
                "ms": t.elapsed().as_millis() as u64,
            });
            tracing::info!(instance = %instance_id, %powerdown, "power button");
        }
        let _ = std::fs::remove_file(&qmp);
        vm.kill();
        let status = vm
            .wait_timeout(Duration::from_secs(10))
            .map_err(ProviderError::Vm)?;
        let gone = !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
        if status.is_none() && !gone {
            return Err(ProviderError::Failed(format!(
                "QEMU pid {pid} did not die after SIGKILL"
            )));
        }
        Ok(json!({
            "provider": "real", "action": "destroy", "instance_id": instance_id,
            "pid": pid,
            "already_exited": before.map(|s| s.to_string()),
            "powerdown": powerdown,
            "status": status.map(|s| s.to_string()),
            "vm": {"name": format!("powernode-{instance_id}")},
        }))
    }

    fn poll_exited(&self) -> Vec<VmExit> {
        let mut guard = self.vms();
        let Some(vms) = guard.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let ids: Vec<String> = vms.keys().cloned().collect();
        for id in ids {
            let Some(vm) = vms.get_mut(&id) else { continue };
            let (status, clean) = match vm.try_wait() {
                Ok(Some(s)) => (s.to_string(), s.success()),
                Ok(None) => continue,
                Err(e) => (format!("unknown ({e})"), false),
            };
            if let Some(vm) = vms.remove(&id) {
                out.push(VmExit {
                    instance_id: id,
                    pid: vm.pid(),
                    status,
                    clean,
                    serial_tail: tail_lines(&vm.serial(), 5),
                });
            }
        }
        out
    }

    fn restart(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        let spec = self.specs().get(instance_id).cloned().ok_or_else(|| {
            ProviderError::Failed(format!(
                "no VM was provisioned for {instance_id} by this server run"
            ))
        })?;
        // QEMU truncates its serial file: the boot that just ended keeps its log.
        let dir = instance_dir(&self.image_base, instance_id);
        let serial = dir.join("serial.log");
        if serial.exists() {
            let kept = dir.join("serial.previous.log");
            std::fs::rename(&serial, &kept).map_err(io(&kept))?;
        }
        let mut record = self.provision(&spec)?;
        record["action"] = json!("restart");
        Ok(record)
    }

    fn shutdown(&self) -> usize {
        let taken = self.vms().take().unwrap_or_default();
        let mut vms: Vec<Vm> = taken.into_values().collect();
        for vm in &mut vms {
            vm.kill();
        }
        vms.len()
    }
}

/// Whether `pid` is a live QEMU started for the instance folder `dir` (a VM left
/// behind by a server that was SIGKILLed: its QEMU was re-parented, not killed).
pub fn orphan_vm_alive(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("qemu-system") && cmdline.contains(&*dir.to_string_lossy())
}

/// SIGKILLs an orphaned QEMU found by [`orphan_vm_alive`].
pub fn kill_orphan(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .map(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_proto::identity::IDENTITY_VERSION;
    use powernode_proto::NetworkConfig;

    fn spec(class: LifecycleClass, type_id: &str, vcpus: u32, memory_mb: u32) -> ProvisionSpec {
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
                "-no-reboot",
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
                Device::PersistDisk {
                    path: "/b/instances/inst-1/persist.img".into(),
                },
            ],
            serial_log: "/b/instances/inst-1/serial.log".into(),
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

    #[test]
    fn real_provider_refuses_without_an_image() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Real::new(tmp.path().to_path_buf());
        let mut s = spec(LifecycleClass::Ephemeral, "type-qemu-1cpu-512mb", 1, 512);
        s.image = None;
        assert!(matches!(p.provision(&s), Err(ProviderError::MissingImage)));
        assert!(p.poll_exited().is_empty());
        assert_eq!(p.destroy("inst-x").unwrap()["vm"], serde_json::Value::Null);
    }
}
