//! `real`: local QEMU VMs started by the server, which outlive it.
//!
//! Each VM is QEMU in a process group of its own (a Ctrl-C to the server does not
//! reach it), in the server's session, with no parent-death signal: a server that
//! stops (SIGTERM: [`Provider::shutdown`] lets go of its VMs) or dies (SIGKILL)
//! leaves its VMs running, and the next server on the same data directory takes each
//! back by the pid and folder of its provision record ([`Real::adopt`]). A VM this
//! server started is watched as its child (`waitpid`); an adopted one through a
//! pidfd; both through the QMP event socket, which tells of resets in place (QEMU
//! runs without `-no-reboot`: see [`super::vm_spec`]) and why QEMU stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use powernode_qemu::qmp::QmpEvents;
use powernode_qemu::{Accel, Adopted, Vm};
use serde_json::json;

use super::{
    env_extra_args, prepare_instance, qmp_events_socket, qmp_socket, tail_lines, vm_record,
    vm_spec, Provider, ProviderError, ProviderRecord, ProvisionSpec, Reboots, VmEvent, VmExit,
    VmReset, POWERDOWN_GRACE,
};

/// How long the watcher waits for a VM's QMP greeting (it holds the VM table
/// meanwhile; a QEMU still starting is simply asked again at the next pass).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Local QEMU VMs (see the module doc).
#[derive(Debug)]
pub struct Real {
    pub image_base: PathBuf,
    extra_args: Vec<String>,
    /// `None` once the server shut down: no VM may start after that.
    vms: Mutex<Option<HashMap<String, Running>>>,
}

/// The QEMU process of a VM: started by this server, or taken back from an earlier one.
#[derive(Debug)]
enum Proc {
    Child(Vm),
    Adopted(Adopted),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(vm) => vm.pid(),
            Proc::Adopted(a) => a.pid(),
        }
    }

    /// `Some(how)` once QEMU has ended (never blocks).
    fn exited(&mut self) -> Option<String> {
        match self {
            Proc::Child(vm) => match vm.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
            Proc::Adopted(a) => a.has_exited().then(|| {
                "ended (adopted from an earlier server: the exit status went to its parent)"
                    .to_string()
            }),
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(how) = self.exited() {
                return Some(how);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a child is reaped too).
    fn kill(&mut self) {
        match self {
            Proc::Child(vm) => vm.kill(),
            Proc::Adopted(a) => a.kill(),
        }
    }

    /// Leaves QEMU running, watched by nobody until a server adopts it.
    fn detach(self) {
        match self {
            Proc::Child(vm) => {
                vm.detach();
            }
            Proc::Adopted(_) => {}
        }
    }
}

/// A VM under watch.
#[derive(Debug)]
struct Running {
    proc: Proc,
    /// The instance folder (serial log, persist disk).
    dir: PathBuf,
    /// QMP for commands (the power button).
    qmp: PathBuf,
    /// QMP the watcher keeps open; `events` is the connection, once made.
    qmp_events: PathBuf,
    events: Option<QmpEvents>,
    reboots: Reboots,
    /// QEMU's last `SHUTDOWN` reason.
    shutdown_reason: Option<String>,
}

impl Running {
    fn new(proc: Proc, dir: PathBuf, qmp: PathBuf, qmp_events: PathBuf) -> Self {
        Self {
            proc,
            dir,
            qmp,
            qmp_events,
            events: None,
            reboots: Reboots::default(),
            shutdown_reason: None,
        }
    }

    /// Reads the QMP events that arrived (connecting first if need be): a reset
    /// becomes a [`VmReset`], a shutdown's reason is kept for the exit.
    fn watch(&mut self, instance_id: &str, out: &mut Vec<VmEvent>) {
        if self.events.is_none() {
            self.events = QmpEvents::connect(&self.qmp_events, QMP_CONNECT_TIMEOUT).ok();
        }
        let Some(conn) = self.events.as_mut() else {
            return;
        };
        for ev in conn.drain() {
            match ev.event.as_str() {
                "RESET" => {
                    // QEMU's own clock when it said (arrival is batched by the
                    // watcher's pass); without one, this server's.
                    let stamp = ev.timestamp.unwrap_or_else(|| {
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or_default()
                    });
                    let Some(recent) = self.reboots.reset(stamp) else {
                        continue;
                    };
                    out.push(VmEvent::Reset(VmReset {
                        instance_id: instance_id.to_string(),
                        pid: self.proc.pid(),
                        reason: ev.reason().to_string(),
                        by_guest: Some(ev.by_guest()),
                        recent,
                    }));
                }
                "SHUTDOWN" => self.shutdown_reason = Some(ev.reason().to_string()),
                _ => {}
            }
        }
        if conn.closed() {
            self.events = None;
        }
    }

    fn serial_tail(&self) -> String {
        let serial = std::fs::read(self.dir.join("serial.log")).unwrap_or_default();
        tail_lines(&String::from_utf8_lossy(&serial), 5)
    }
}

impl Real {
    pub fn new(image_base: PathBuf) -> Self {
        Self {
            // Absolute, so the recorded folder (and the adoption check on QEMU's
            // command line after a restart) does not depend on the working directory.
            image_base: std::path::absolute(&image_base).unwrap_or(image_base),
            extra_args: env_extra_args(),
            vms: Mutex::new(Some(HashMap::new())),
        }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, Option<HashMap<String, Running>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a VM under watch, unless the server is shutting down (then it is let go
    /// of, or killed when `kill_if_closed`: a VM nobody recorded yet).
    fn keep_watching(
        &self,
        instance_id: &str,
        running: Running,
        kill_if_closed: bool,
    ) -> Result<(), ProviderError> {
        match self.vms().as_mut() {
            Some(vms) => {
                vms.insert(instance_id.to_string(), running);
                Ok(())
            }
            None => {
                let mut proc = running.proc;
                if kill_if_closed {
                    proc.kill();
                } else {
                    proc.detach();
                }
                Err(ProviderError::Failed(
                    "the server is shutting down; no VM is watched any more".into(),
                ))
            }
        }
    }
}

fn record_path(record: &ProviderRecord, key: &str) -> Option<PathBuf> {
    record[key].as_str().map(PathBuf::from)
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
        let dir = prepare_instance(&self.image_base, spec)?;
        let qemu = PathBuf::from("qemu-system-x86_64");
        let accel = Accel::detect_for_kernel(&qemu, &image.kernel());
        let vm_spec = vm_spec(spec, image, &dir, accel, &self.extra_args);
        let (qmp, qmp_events) = (
            qmp_socket(&spec.instance_id),
            qmp_events_socket(&spec.instance_id),
        );
        let vm = Vm::spawn_own_group(&vm_spec).map_err(ProviderError::Vm)?;
        let record = json!({
            "provider": "real",
            "action": "provision",
            "instance_id": spec.instance_id,
            "node_id": spec.node_id,
            "publication_id": image.publication_id,
            "pid": vm.pid(),
            "accel": format!("{accel:?}").to_lowercase(),
            "instance_dir": dir,
            "qmp": qmp,
            "qmp_events": qmp_events,
            "command_file": vm.command_file,
            "vm": vm_record(spec, &vm_spec),
            "identity": spec.identity,
        });
        tracing::info!(instance = %spec.instance_id, pid = vm.pid(), ?accel, "VM started");
        let running = Running::new(Proc::Child(vm), dir, qmp, qmp_events);
        // Shut down while this VM was starting: nobody would know of it; it dies here.
        self.keep_watching(&spec.instance_id, running, true)?;
        Ok(record)
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        // Taken out of the table first, so the watcher never reports a VM we kill.
        let vm = self.vms().as_mut().and_then(|v| v.remove(instance_id));
        let Some(mut vm) = vm else {
            return Ok(json!({
                "provider": "real", "action": "destroy", "instance_id": instance_id,
                "vm": null, "note": "no VM running for this instance",
            }));
        };
        let pid = vm.proc.pid();
        let before = vm.proc.exited();
        // A persistent VM first gets its power button, as a cloud's stop does, so
        // its /persist disk is left clean; an ephemeral one has nothing to keep.
        let mut powerdown = serde_json::Value::Null;
        if before.is_none() && vm.dir.join("persist.img").exists() {
            let t = Instant::now();
            let pressed = Vm::power_button(&vm.qmp, Duration::from_secs(5));
            let exited = match &pressed {
                Ok(()) => vm.proc.wait_timeout(POWERDOWN_GRACE),
                Err(_) => None,
            };
            powerdown = json!({
                "pressed": pressed.is_ok(),
                "error": pressed.err().map(|e| e.to_string()),
                "exited": exited,
                "ms": t.elapsed().as_millis() as u64,
            });
            tracing::info!(instance = %instance_id, %powerdown, "power button");
        }
        for sock in [&vm.qmp, &vm.qmp_events] {
            let _ = std::fs::remove_file(sock);
        }
        vm.proc.kill();
        let status = vm.proc.wait_timeout(Duration::from_secs(10));
        if status.is_none() {
            return Err(ProviderError::Failed(format!(
                "QEMU pid {pid} did not die after SIGKILL"
            )));
        }
        Ok(json!({
            "provider": "real", "action": "destroy", "instance_id": instance_id,
            "pid": pid,
            "adopted": matches!(vm.proc, Proc::Adopted(_)),
            "already_exited": before,
            "powerdown": powerdown,
            "status": status,
            "vm": {"name": format!("powernode-{instance_id}")},
        }))
    }

    fn poll(&self) -> Vec<VmEvent> {
        let mut guard = self.vms();
        let Some(vms) = guard.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut ended = Vec::new();
        for (id, vm) in vms.iter_mut() {
            vm.watch(id, &mut out);
            if let Some(status) = vm.proc.exited() {
                // What QEMU said last (its SHUTDOWN reason) is read before it goes.
                vm.watch(id, &mut out);
                ended.push((id.clone(), status));
            }
        }
        for (id, status) in ended {
            if let Some(vm) = vms.remove(&id) {
                out.push(VmEvent::Exited(VmExit {
                    instance_id: id,
                    pid: vm.proc.pid(),
                    status,
                    shutdown_reason: vm.shutdown_reason.clone(),
                    serial_tail: vm.serial_tail(),
                }));
            }
        }
        out
    }

    fn adopt(
        &self,
        instance_id: &str,
        record: &ProviderRecord,
    ) -> Result<ProviderRecord, ProviderError> {
        let missing =
            |what: &str| ProviderError::Failed(format!("the VM's provision record has no {what}"));
        let pid = record["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| missing("pid"))?;
        let dir = record_path(record, "instance_dir").ok_or_else(|| missing("instance_dir"))?;
        // Records from before the QMP paths were kept: the paths this server would use.
        let qmp = record_path(record, "qmp").unwrap_or_else(|| qmp_socket(instance_id));
        let qmp_events =
            record_path(record, "qmp_events").unwrap_or_else(|| qmp_events_socket(instance_id));
        let adopted = Adopted::adopt(pid, &dir).map_err(ProviderError::Adopt)?;
        let doc = json!({
            "provider": "real", "action": "adopt", "instance_id": instance_id,
            "pid": pid, "instance_dir": dir, "qmp": qmp, "qmp_events": qmp_events,
        });
        tracing::info!(instance = %instance_id, pid, "VM taken back from an earlier server");
        let running = Running::new(Proc::Adopted(adopted), dir, qmp, qmp_events);
        self.keep_watching(instance_id, running, false)?;
        Ok(doc)
    }

    fn shutdown(&self) -> usize {
        let taken = self.vms().take().unwrap_or_default();
        let n = taken.len();
        for (id, vm) in taken {
            tracing::info!(instance = %id, pid = vm.proc.pid(), "VM left running");
            vm.proc.detach();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;
    use powernode_proto::LifecycleClass;

    #[test]
    fn real_provider_refuses_without_an_image() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Real::new(tmp.path().to_path_buf());
        let mut s = spec(LifecycleClass::Ephemeral, "type-qemu-1cpu-512mb", 1, 512);
        s.image = None;
        assert!(matches!(p.provision(&s), Err(ProviderError::MissingImage)));
        assert!(p.poll().is_empty());
        assert_eq!(p.destroy("inst-x").unwrap()["vm"], serde_json::Value::Null);
    }

    #[test]
    fn a_record_without_a_live_qemu_is_not_adopted() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Real::new(tmp.path().to_path_buf());
        let err = p
            .adopt("inst-1", &json!({"instance_dir": "/x"}))
            .unwrap_err();
        assert!(err.chain().contains("no pid"), "{}", err.chain());
        // This test process is alive, and no QEMU of that folder.
        let rec = json!({"pid": std::process::id(), "instance_dir": "/x/instances/inst-1"});
        let err = p.adopt("inst-1", &rec).unwrap_err();
        assert!(matches!(err, ProviderError::Adopt(_)), "{}", err.chain());
        assert!(p.poll().is_empty());
        assert_eq!(p.shutdown(), 0);
    }
}
