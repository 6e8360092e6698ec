//! `libvirt`: the same VMs as `real` (same kernel, initrd, command line, fw_cfg
//! identity, `/persist` disk), started as transient libvirt domains named
//! `powernode-<instance id>` through `virsh` (see `powernode_qemu::libvirt`).
//!
//! libvirt owns the QEMU processes, so they outlive this server by construction: a
//! server that stops or dies leaves its domains running, and the next one on the
//! same data directory takes each back by name and UUID ([`Libvirt::adopt`]). Resets
//! in place (`on_reboot=restart`) and domains that stop come from libvirt's event
//! stream; a listing every [`LIST_EVERY`] catches what a restarted stream missed.
//! The daemon is started by the project's scripts (`scripts/libvirtd`), and QEMU
//! runs as libvirt's unprivileged user, which libvirt grants the instance's files
//! (identity, disk, kernel, initrd) for as long as the domain runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use powernode_qemu::libvirt::{domain_xml, EventKind, EventStream, Virsh, VirshError};
use powernode_qemu::{Accel, Device};
use serde_json::json;

use super::{
    env_extra_args, io, prepare_instance, tail_lines, vm_record, vm_spec, Provider, ProviderError,
    ProviderRecord, ProvisionSpec, Reboots, VmEvent, VmExit, VmReset, POWERDOWN_GRACE,
};

/// How often the running domains are listed, besides the event stream.
pub const LIST_EVERY: Duration = Duration::from_secs(5);
/// How soon a stream that ended is started again.
const STREAM_RETRY: Duration = Duration::from_secs(2);

/// The domain name of an instance.
pub fn domain_name(instance_id: &str) -> String {
    format!("powernode-{instance_id}")
}

/// libvirt domains (see the module doc).
#[derive(Debug)]
pub struct Libvirt {
    pub image_base: PathBuf,
    virsh: Virsh,
    extra_args: Vec<String>,
    /// Reboot stamps are seconds since this.
    epoch: Instant,
    /// `None` once the server shut down: no domain may start after that.
    watch: Mutex<Option<Watch>>,
}

#[derive(Debug, Default)]
struct Watch {
    domains: HashMap<String, Domain>,
    stream: Option<EventStream>,
    stream_tried: Option<Instant>,
    listed: Option<Instant>,
}

/// A domain under watch.
#[derive(Debug)]
struct Domain {
    name: String,
    uuid: String,
    pid: u32,
    dir: PathBuf,
    reboots: Reboots,
    /// libvirt's last `Shutdown` detail (`Finished after guest request`, ...).
    shutdown_reason: Option<String>,
}

impl Domain {
    fn exit(&self, instance_id: &str, status: String) -> VmEvent {
        let serial = std::fs::read(self.dir.join("serial.log")).unwrap_or_default();
        VmEvent::Exited(VmExit {
            instance_id: instance_id.to_string(),
            pid: self.pid,
            status,
            shutdown_reason: self.shutdown_reason.clone(),
            serial_tail: tail_lines(&String::from_utf8_lossy(&serial), 5),
        })
    }
}

fn virsh_err(what: &str) -> impl FnOnce(VirshError) -> ProviderError + '_ {
    move |e| ProviderError::Libvirt {
        what: what.to_string(),
        source: e,
    }
}

impl Libvirt {
    pub fn new(image_base: PathBuf, virsh: Virsh) -> Self {
        Self {
            image_base: std::path::absolute(&image_base).unwrap_or(image_base),
            virsh,
            extra_args: env_extra_args(),
            epoch: Instant::now(),
            watch: Mutex::new(Some(Watch::default())),
        }
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Option<Watch>> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the event stream when there is none (at most every [`STREAM_RETRY`]).
    /// Started before a domain is created or taken back, so none of its events is
    /// missed.
    fn ensure_stream(&self, w: &mut Watch) {
        if w.stream.is_some() || w.stream_tried.is_some_and(|t| t.elapsed() < STREAM_RETRY) {
            return;
        }
        w.stream_tried = Some(Instant::now());
        match self.virsh.events() {
            Ok(s) => w.stream = Some(s),
            Err(e) => tracing::warn!(error = %e, "cannot follow libvirt's events"),
        }
        // Whatever happened while there was no stream shows in the next listing.
        w.listed = None;
    }

    fn keep_watching(&self, instance_id: &str, domain: Domain) -> Result<(), ProviderError> {
        let mut guard = self.watch();
        let Some(w) = guard.as_mut() else {
            return Err(ProviderError::Failed(
                "the server is shutting down; no VM is watched any more".into(),
            ));
        };
        w.domains.insert(instance_id.to_string(), domain);
        Ok(())
    }

    /// Waits up to `grace` for the domain to stop after its power button.
    fn wait_stopped(&self, name: &str, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.virsh.dominfo(name) {
                Err(VirshError::NoDomain(_)) => return true,
                Ok(info) if !info.active() => return true,
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        false
    }
}

impl Provider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn enabled(&self) -> bool {
        true
    }

    fn needs_image(&self) -> bool {
        true
    }

    fn check(&self) -> Result<(), ProviderError> {
        self.virsh
            .version()
            .map(drop)
            .map_err(|e| ProviderError::Libvirt {
                what: format!(
                    "libvirt at {} does not answer (start it with scripts/libvirtd)",
                    self.virsh.uri()
                ),
                source: e,
            })
    }

    fn provision(&self, spec: &ProvisionSpec) -> Result<ProviderRecord, ProviderError> {
        let image = spec.image.as_ref().ok_or(ProviderError::MissingImage)?;
        let name = domain_name(&spec.instance_id);
        let dir = prepare_instance(&self.image_base, spec)?;
        let accel = Accel::detect_for_kernel(Path::new("qemu-system-x86_64"), &image.kernel());
        let mut vm = vm_spec(spec, image, &dir, accel, &self.extra_args);
        vm.devices.retain(|d| !matches!(d, Device::Qmp { .. }));
        let xml = domain_xml(&name, &vm).map_err(|e| ProviderError::Failed(e.to_string()))?;
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, &xml).map_err(io(&xml_path))?;
        // A domain of this name is this instance's from an earlier try (a server
        // that died while provisioning it): it is replaced, not doubled.
        if self
            .virsh
            .destroy(&name)
            .map_err(virsh_err("replacing the old domain"))?
        {
            tracing::warn!(domain = %name, "an earlier try's domain was destroyed");
        }
        if let Some(w) = self.watch().as_mut() {
            self.ensure_stream(w);
        }
        self.virsh
            .create(&xml_path)
            .map_err(virsh_err("starting the domain"))?;
        let info = match self.virsh.dominfo(&name) {
            Ok(info) => info,
            Err(e) => {
                let _ = self.virsh.destroy(&name);
                return Err(virsh_err("reading the started domain")(e));
            }
        };
        let pid = self.virsh.qemu_pid(&name).unwrap_or(0);
        let mut vm_doc = vm_record(spec, &vm);
        if let Some(o) = vm_doc.as_object_mut() {
            for key in ["argv", "command", "qmp", "qmp_events"] {
                o.remove(key);
            }
            o.insert("domain_xml".into(), json!(xml_path));
        }
        let record = json!({
            "provider": "libvirt",
            "action": "provision",
            "instance_id": spec.instance_id,
            "node_id": spec.node_id,
            "publication_id": image.publication_id,
            "uri": self.virsh.uri(),
            "domain": name,
            "uuid": info.uuid,
            "pid": pid,
            "accel": format!("{accel:?}").to_lowercase(),
            "instance_dir": dir,
            "qemu_log": self.virsh.qemu_log(&name),
            "vm": vm_doc,
            "identity": spec.identity,
        });
        tracing::info!(instance = %spec.instance_id, domain = %name, pid, ?accel, "domain started");
        let domain = Domain {
            name: name.clone(),
            uuid: info.uuid,
            pid,
            dir,
            reboots: Reboots::default(),
            shutdown_reason: None,
        };
        if let Err(e) = self.keep_watching(&spec.instance_id, domain) {
            // Nobody would know of this domain: it ends here.
            let _ = self.virsh.destroy(&name);
            return Err(e);
        }
        Ok(record)
    }

    fn destroy(&self, instance_id: &str) -> Result<ProviderRecord, ProviderError> {
        // Out of the table first, so the watcher never reports a domain we end.
        let watched = self
            .watch()
            .as_mut()
            .and_then(|w| w.domains.remove(instance_id));
        let name = watched
            .as_ref()
            .map(|d| d.name.clone())
            .unwrap_or_else(|| domain_name(instance_id));
        let dir = super::instance_dir(&self.image_base, instance_id);
        // A persistent node gets its power button first, as a cloud's stop does.
        let mut powerdown = serde_json::Value::Null;
        let running = matches!(self.virsh.dominfo(&name), Ok(ref i) if i.active());
        if running && dir.join("persist.img").exists() {
            let t = Instant::now();
            let pressed = self.virsh.shutdown_acpi(&name);
            let stopped = pressed.is_ok() && self.wait_stopped(&name, POWERDOWN_GRACE);
            powerdown = json!({
                "pressed": pressed.is_ok(),
                "error": pressed.err().map(|e| e.to_string()),
                "stopped": stopped,
                "ms": t.elapsed().as_millis() as u64,
            });
            tracing::info!(instance = %instance_id, %powerdown, "power button");
        }
        let destroyed = self
            .virsh
            .destroy(&name)
            .map_err(virsh_err("destroying the domain"))?;
        if !running && !destroyed && watched.is_none() {
            return Ok(json!({
                "provider": "libvirt", "action": "destroy", "instance_id": instance_id,
                "domain": name, "vm": null, "note": "no domain running for this instance",
            }));
        }
        Ok(json!({
            "provider": "libvirt", "action": "destroy", "instance_id": instance_id,
            "domain": name,
            "uuid": watched.as_ref().map(|d| d.uuid.clone()),
            "pid": watched.as_ref().map(|d| d.pid),
            "powerdown": powerdown,
            "destroyed": destroyed,
            "vm": {"name": name},
        }))
    }

    fn poll(&self) -> Vec<VmEvent> {
        let mut guard = self.watch();
        let Some(w) = guard.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if w.domains.is_empty() {
            return out;
        }
        self.ensure_stream(w);
        let by_name: HashMap<String, String> = w
            .domains
            .iter()
            .map(|(id, d)| (d.name.clone(), id.clone()))
            .collect();
        let events = w
            .stream
            .as_mut()
            .map(EventStream::drain)
            .unwrap_or_default();
        if let Some(why) = w.stream.as_ref().and_then(|s| s.ended()) {
            tracing::warn!(%why, "libvirt's event stream ended; starting it again");
            w.stream = None;
        }
        for ev in events {
            let Some(id) = by_name.get(&ev.domain) else {
                continue;
            };
            let Some(d) = w.domains.get_mut(id) else {
                continue;
            };
            match ev.kind {
                EventKind::Reboot => {
                    let stamp = ev.at.duration_since(self.epoch).as_secs_f64();
                    if let Some(recent) = d.reboots.reset(stamp) {
                        out.push(VmEvent::Reset(VmReset {
                            instance_id: id.clone(),
                            pid: d.pid,
                            reason: "reboot".into(),
                            // libvirt's reboot event does not say who asked.
                            by_guest: None,
                            recent,
                        }));
                    }
                }
                EventKind::Lifecycle { state, detail } => match state.as_str() {
                    "Shutdown" => d.shutdown_reason = Some(detail),
                    "Stopped" => {
                        if let Some(d) = w.domains.remove(id) {
                            out.push(d.exit(id, format!("stopped ({detail})")));
                        }
                    }
                    _ => {}
                },
            }
        }
        if w.listed.is_none_or(|t| t.elapsed() >= LIST_EVERY) && !w.domains.is_empty() {
            w.listed = Some(Instant::now());
            match self.virsh.running_domains() {
                Ok(running) => {
                    let gone: Vec<String> = w
                        .domains
                        .iter()
                        .filter(|(_, d)| !running.contains(&d.name))
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in gone {
                        if let Some(d) = w.domains.remove(&id) {
                            out.push(d.exit(&id, "no longer running (seen by a listing)".into()));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list libvirt's domains"),
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
        let name = record["domain"].as_str().ok_or_else(|| missing("domain"))?;
        let uuid = record["uuid"].as_str().ok_or_else(|| missing("uuid"))?;
        let dir = record["instance_dir"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| missing("instance_dir"))?;
        if let Some(w) = self.watch().as_mut() {
            self.ensure_stream(w);
        }
        let info = self
            .virsh
            .dominfo(name)
            .map_err(virsh_err("finding the domain"))?;
        if info.uuid != uuid {
            return Err(ProviderError::Failed(format!(
                "domain {name} is another VM (UUID {}, this instance's was {uuid})",
                info.uuid
            )));
        }
        if !info.active() {
            return Err(ProviderError::Failed(format!(
                "domain {name} is {}",
                info.state
            )));
        }
        let pid = self.virsh.qemu_pid(name).unwrap_or(0);
        let doc = json!({
            "provider": "libvirt", "action": "adopt", "instance_id": instance_id,
            "domain": name, "uuid": uuid, "pid": pid, "instance_dir": dir,
        });
        tracing::info!(instance = %instance_id, domain = %name, "domain taken back from an earlier server");
        self.keep_watching(
            instance_id,
            Domain {
                name: name.to_string(),
                uuid: uuid.to_string(),
                pid,
                dir,
                reboots: Reboots::default(),
                shutdown_reason: None,
            },
        )?;
        Ok(doc)
    }

    fn shutdown(&self) -> usize {
        let taken = self.watch().take().unwrap_or_default();
        for (id, d) in &taken.domains {
            tracing::info!(instance = %id, domain = %d.name, "domain left running");
        }
        taken.domains.len()
    }
}

/// Destroys the domain of a `libvirt` provision record whose instance the server
/// cannot take back (it now runs another provider): the domain of that record's
/// UUID only. Returns whether one was destroyed.
pub fn end_orphan(record: &ProviderRecord, virsh_program: &Path) -> bool {
    let (Some(name), Some(uuid)) = (record["domain"].as_str(), record["uuid"].as_str()) else {
        return false;
    };
    let uri = record["uri"]
        .as_str()
        .unwrap_or(powernode_qemu::libvirt::DEFAULT_URI);
    let virsh = Virsh::new(virsh_program, uri);
    match virsh.dominfo(name) {
        Ok(info) if info.uuid == uuid && info.active() => virsh.destroy(name).unwrap_or(false),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;
    use powernode_proto::LifecycleClass;
    use std::os::unix::fs::PermissionsExt as _;

    /// A stand-in for `virsh` that keeps domains as files in `state/`: `dom-NAME`
    /// holds the state, `uuid-NAME` the UUID; `events` is what `event` streams;
    /// `calls` logs every call.
    struct FakeVirsh {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        virsh: Virsh,
    }

    const FAKE: &str = r#"#!/bin/sh
S="$(dirname "$0")/state"
echo "$*" >> "$S/calls"
shift 3
cmd=$1; shift
for last; do :; done
case $cmd in
  version) [ -f "$S/down" ] && { echo "error: failed to connect to the hypervisor" >&2; exit 1; }
           echo "Compiled against library: libvirt 9.0.0" ;;
  create) name=$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$1")
          echo running > "$S/dom-$name"; echo "uuid-$name-$(date +%s%N)" > "$S/uuid-$name" ;;
  dominfo) [ -f "$S/dom-$1" ] || { echo "error: failed to get domain '$1'" >&2; exit 1; }
           printf 'Name: %s\nUUID: %s\nState: %s\nPersistent: no\n' "$1" "$(cat "$S/uuid-$1")" "$(cat "$S/dom-$1")" ;;
  destroy) [ -f "$S/dom-$1" ] || { echo "error: failed to get domain '$1'" >&2; exit 1; }
           rm "$S/dom-$1"; echo "event 'lifecycle' for domain '$1': Stopped Destroyed" >> "$S/events" ;;
  shutdown) [ -f "$S/ignore-acpi" ] || rm -f "$S/dom-$last" ;;
  list) for f in "$S"/dom-*; do [ -f "$f" ] && echo "${f#$S/dom-}"; done; true ;;
  event) exec tail -n 0 -F "$S/events" 2>/dev/null ;;
  *) echo "error: unknown command $cmd" >&2; exit 1 ;;
esac
"#;

    impl FakeVirsh {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let state = tmp.path().join("state");
            std::fs::create_dir(&state).unwrap();
            std::fs::write(state.join("events"), "").unwrap();
            let prog = tmp.path().join("virsh");
            std::fs::write(&prog, FAKE).unwrap();
            std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
            let virsh = Virsh::new(prog, "test:///fake");
            Self {
                _tmp: tmp,
                state,
                virsh,
            }
        }

        fn provider(&self, base: &Path) -> Libvirt {
            Libvirt::new(base.to_path_buf(), self.virsh.clone())
        }

        fn event(&self, line: &str) {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(self.state.join("events"))
                .unwrap();
            writeln!(f, "{line}").unwrap();
        }

        fn calls(&self) -> String {
            std::fs::read_to_string(self.state.join("calls")).unwrap_or_default()
        }

        fn running(&self, name: &str) -> bool {
            self.state.join(format!("dom-{name}")).exists()
        }
    }

    /// Polls until `n` events came (the stream is another process).
    fn poll_for(p: &Libvirt, n: usize) -> Vec<VmEvent> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < n && Instant::now() < deadline {
            got.extend(p.poll());
            std::thread::sleep(Duration::from_millis(20));
        }
        got
    }

    #[test]
    fn a_domain_is_started_watched_through_its_events_and_destroyed() {
        let fake = FakeVirsh::new();
        let base = tempfile::tempdir().unwrap();
        let p = fake.provider(base.path());
        p.check().unwrap();
        let rec = p
            .provision(&spec(LifecycleClass::Ephemeral, "t", 1, 512))
            .unwrap();
        assert_eq!(rec["provider"], "libvirt");
        assert_eq!(rec["domain"], "powernode-inst-1");
        assert!(rec["uuid"]
            .as_str()
            .unwrap()
            .starts_with("uuid-powernode-inst-1"));
        assert!(rec["vm"].get("argv").is_none(), "{rec}");
        let dir = base.path().join("instances/inst-1");
        let xml = std::fs::read_to_string(dir.join("domain.xml")).unwrap();
        assert!(xml.contains(&format!("file='{}'", dir.join("identity.json").display())));
        assert!(xml.contains("<on_reboot>restart</on_reboot>"));
        assert!(
            !xml.contains("persist.img"),
            "an ephemeral node has no disk"
        );
        let mode = std::fs::metadata(dir.join("identity.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The first pass lists the domains; nothing happened yet.
        assert!(p.poll().is_empty());

        // Two reboot events close together are one reboot.
        fake.event("event 'reboot' for domain 'powernode-inst-1'");
        fake.event("event 'reboot' for domain 'powernode-inst-1'");
        fake.event("event 'reboot' for domain 'powernode-other'");
        let got = poll_for(&p, 1);
        std::thread::sleep(Duration::from_millis(200));
        let more = p.poll();
        assert!(more.is_empty(), "{more:?}");
        let [VmEvent::Reset(r)] = got.as_slice() else {
            panic!("{got:?}");
        };
        assert_eq!(
            (r.instance_id.as_str(), r.recent, r.by_guest),
            ("inst-1", 1, None)
        );

        // The guest powers off: libvirt says why, then that it stopped.
        std::fs::write(dir.join("serial.log"), "booting\nreboot: Power down\n").unwrap();
        fake.event("event 'lifecycle' for domain 'powernode-inst-1': Shutdown Finished after guest request");
        std::fs::remove_file(fake.state.join("dom-powernode-inst-1")).unwrap();
        fake.event("event 'lifecycle' for domain 'powernode-inst-1': Stopped Shutdown");
        let got = poll_for(&p, 1);
        let [VmEvent::Exited(ex)] = got.as_slice() else {
            panic!("{got:?}");
        };
        assert_eq!(ex.status, "stopped (Shutdown)");
        assert_eq!(
            ex.shutdown_reason.as_deref(),
            Some("Finished after guest request")
        );
        assert!(ex.serial_tail.contains("Power down"));
        // Forgotten: destroying it finds nothing.
        let d = p.destroy("inst-1").unwrap();
        assert_eq!(d["vm"], serde_json::Value::Null, "{d}");
    }

    #[test]
    fn a_domain_gone_without_an_event_is_found_by_the_listing() {
        let fake = FakeVirsh::new();
        let base = tempfile::tempdir().unwrap();
        let p = fake.provider(base.path());
        p.provision(&spec(LifecycleClass::Ephemeral, "t", 1, 512))
            .unwrap();
        std::fs::remove_file(fake.state.join("dom-powernode-inst-1")).unwrap();
        let got = p.poll();
        let [VmEvent::Exited(ex)] = got.as_slice() else {
            panic!("{got:?}");
        };
        assert!(ex.status.contains("listing"), "{}", ex.status);
    }

    #[test]
    fn a_persistent_domain_gets_its_power_button_before_it_is_destroyed() {
        let fake = FakeVirsh::new();
        let base = tempfile::tempdir().unwrap();
        let p = fake.provider(base.path());
        let rec = p
            .provision(&spec(LifecycleClass::Persistent, "t", 1, 512))
            .unwrap();
        assert_eq!(rec["vm"]["persist_disk"], true);
        let d = p.destroy("inst-1").unwrap();
        assert_eq!(d["powerdown"]["pressed"], true, "{d}");
        assert_eq!(d["powerdown"]["stopped"], true, "{d}");
        assert!(fake
            .calls()
            .contains("shutdown --mode acpi powernode-inst-1"));
        assert!(!fake.running("powernode-inst-1"));
        // Nothing more is reported of a domain destroyed on purpose.
        std::thread::sleep(Duration::from_millis(200));
        assert!(p.poll().is_empty());
    }

    #[test]
    fn a_restarted_server_takes_back_its_domain_by_name_and_uuid_only() {
        let fake = FakeVirsh::new();
        let base = tempfile::tempdir().unwrap();
        let first = fake.provider(base.path());
        let rec = first
            .provision(&spec(LifecycleClass::Ephemeral, "t", 1, 512))
            .unwrap();
        let before = fake.calls().len();
        assert_eq!(first.shutdown(), 1);
        assert!(fake.running("powernode-inst-1"), "left running");
        assert!(!fake.calls()[before..].contains("destroy"));
        // Shut down: no new domain.
        let mut other = spec(LifecycleClass::Ephemeral, "t", 1, 512);
        other.instance_id = "inst-2".into();
        assert!(first.provision(&other).is_err());
        assert!(!fake.running("powernode-inst-2"));

        let second = fake.provider(base.path());
        let mut wrong = rec.clone();
        wrong["uuid"] = json!("another");
        let err = second.adopt("inst-1", &wrong).unwrap_err();
        assert!(err.chain().contains("is another VM"), "{}", err.chain());
        let doc = second.adopt("inst-1", &rec).unwrap();
        assert_eq!(doc["domain"], "powernode-inst-1");
        assert!(second.poll().is_empty());
        std::fs::remove_file(fake.state.join("dom-powernode-inst-1")).unwrap();
        fake.event("event 'lifecycle' for domain 'powernode-inst-1': Stopped Crashed");
        let got = poll_for(&second, 1);
        assert!(
            matches!(got.as_slice(), [VmEvent::Exited(e)] if e.status == "stopped (Crashed)"),
            "{got:?}"
        );

        // A domain that is gone is not taken back; one that lacks fields neither.
        let err = second.adopt("inst-1", &rec).unwrap_err();
        assert!(
            err.chain().contains("no domain powernode-inst-1"),
            "{}",
            err.chain()
        );
        let err = second.adopt("inst-1", &json!({"domain": "x"})).unwrap_err();
        assert!(err.chain().contains("no uuid"), "{}", err.chain());
    }

    #[test]
    fn a_daemon_that_does_not_answer_is_named_with_the_fix() {
        let fake = FakeVirsh::new();
        std::fs::write(fake.state.join("down"), "").unwrap();
        let base = tempfile::tempdir().unwrap();
        let err = fake.provider(base.path()).check().unwrap_err();
        let chain = err.chain();
        assert!(
            chain.contains("test:///fake does not answer")
                && chain.contains("scripts/libvirtd")
                && chain.contains("failed to connect"),
            "{chain}"
        );
    }

    #[test]
    fn an_orphan_domain_is_ended_only_with_its_uuid() {
        let fake = FakeVirsh::new();
        let base = tempfile::tempdir().unwrap();
        let p = fake.provider(base.path());
        let mut rec = p
            .provision(&spec(LifecycleClass::Ephemeral, "t", 1, 512))
            .unwrap();
        p.shutdown();
        rec["uri"] = json!("test:///fake");
        let mut other = rec.clone();
        other["uuid"] = json!("someone-else");
        assert!(!end_orphan(&other, fake.virsh.program()));
        assert!(fake.running("powernode-inst-1"));
        assert!(end_orphan(&rec, fake.virsh.program()));
        assert!(!fake.running("powernode-inst-1"));
    }
}
