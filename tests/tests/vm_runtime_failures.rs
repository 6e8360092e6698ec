//! VM tier, failure paths of the runtime: a killed QEMU, a network partition, stuck
//! provisioning (a server the VM cannot reach) and its recovery, stuck bootstrapping,
//! a decommissioned persistent node booted again, and a node refused at enrollment
//! that says why with a boot report. Every injected
//! failure is asserted from the server's API alone (status, signals, stuck reason and
//! recovery step, refusal code): never from the console.
//!
//! The server is a real `powernode-stub serve` on the host loopback with short
//! sensor windows; the guest reaches it at 10.0.2.2 through QEMU user networking, in
//! the partition test through a TCP proxy on the host that the test can cut.
//! Ignored unless built with `POWERNODE_VM_TESTS=1`; files under
//! `target/vm-tests/<test>/` (serial log, server log, server data).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powernode_qemu::Vm;
use powernode_tests::direct::modules::{labels, publish_runtime};
use powernode_tests::direct::stub::{Stub, StubOptions};
use powernode_tests::direct::*;
use serde_json::{json, Value};

const TO_RUNNING: Duration = Duration::from_secs(120);
/// `--silent-after-seconds` of these tests.
const SILENT_AFTER: u64 = 5;

/// `powernode-stub serve` with the short sensor windows of these tests.
/// `public_port`: the port the guest dials at 10.0.2.2 (a proxy's, or the server's
/// own when `None`).
fn start_server(dir: &Path, public_port: Option<u16>, extra: &[&str]) -> Stub {
    let mut flags: Vec<String> = [
        "--silent-after-seconds",
        &SILENT_AFTER.to_string(),
        "--sensor-interval-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    Stub::start_with(
        dir,
        StubOptions {
            public_port,
            heartbeat_interval_seconds: 1,
            extra: flags,
            ..StubOptions::default()
        },
    )
}

/// A TCP proxy on the host loopback that the test can cut (every connection
/// dropped, new ones refused) and heal.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// When each connection dropped by a cut arrived: the guest's retry cadence,
    /// seen from the wire (no console).
    refused: Arc<Mutex<Vec<Instant>>>,
}

impl Proxy {
    fn start(listener: TcpListener, target: u16) -> Proxy {
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let refused: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (c, s, k, r) = (cut.clone(), stop.clone(), conns.clone(), refused.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(down) = down else { continue };
                if c.load(Ordering::SeqCst) {
                    r.lock().unwrap().push(Instant::now());
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut reg = k.lock().unwrap();
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                reg.push(down);
                reg.push(up);
            }
        });
        Proxy {
            port,
            cut,
            stop,
            conns,
            refused,
        }
    }

    /// Arrival times of the connections a cut dropped, oldest first.
    fn refused(&self) -> Vec<Instant> {
        self.refused.lock().unwrap().clone()
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Boots the netboot image with `doc` by fw_cfg (and a persist disk if given).
fn boot(dir: &Path, name: &str, doc: &Value, persist: Option<&Path>) -> (Vm, PathBuf) {
    boot_with_args(dir, name, doc, persist, &[])
}

/// [`boot`] with more kernel arguments after `powernode.on_failure=poweroff`.
fn boot_with_args(
    dir: &Path,
    name: &str,
    doc: &Value,
    persist: Option<&Path>,
    args: &[&str],
) -> (Vm, PathBuf) {
    let image = netboot(dir);
    let vm_dir = dir.join(name);
    let spec = node_spec(&vm_dir, &image, doc, persist, args);
    let vm = Vm::spawn(&spec).expect("spawn QEMU");
    std::fs::write(vm_dir.join("qemu-command.sh"), &vm.command).unwrap();
    (vm, spec.serial_log)
}

/// [`poll_until`] with a fixed context line.
fn wait<T>(what: &str, timeout: Duration, context: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_until(what, timeout, &|| context.to_string(), f)
}

fn running(server: &Stub, inst: &str, vm: &mut Vm, ctx: &str) -> Value {
    wait_until(
        "status running",
        TO_RUNNING,
        vm,
        &|| ctx.to_string(),
        || {
            let i = server.instance(inst);
            (i["status"] == "running" && i["last_heartbeat_at"].is_string()).then_some(i)
        },
    )
}

fn ctx(serial: &Path, server: &Stub) -> String {
    format!(
        "serial {}, server log {}",
        serial.display(),
        server.log().display()
    )
}

fn find<'a>(sigs: &'a [Value], kind: &str, active: bool) -> Option<&'a Value> {
    sigs.iter()
        .find(|s| s["kind"] == kind && s["active"] == active)
}

/// Killing QEMU (no drain, no goodbye): `instance.silent` fires within the configured
/// window, then the `running` stuck row with its recovery step.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn killed_qemu_raises_instance_silent_within_the_window() {
    let dir = test_dir("failures_killed_qemu");
    let server = start_server(&dir, None, &["--stuck-thresholds", "running=8"]);
    let (inst, doc) = server.provision_class("killed-1", "ephemeral");
    let (mut vm, serial) = boot(&dir, "vm", &doc, None);
    let c = ctx(&serial, &server);
    running(&server, &inst, &mut vm, &c);
    // A couple of heartbeats, then the machine vanishes.
    std::thread::sleep(Duration::from_secs(2));
    assert!(find(&server.signals(&inst), "instance.silent", true).is_none());
    vm.kill();
    let killed = Instant::now();
    let silent = wait("instance.silent", Duration::from_secs(30), &c, || {
        find(&server.signals(&inst), "instance.silent", true).cloned()
    });
    let took = killed.elapsed();
    println!("killed_qemu: instance.silent {took:?} after the kill (window {SILENT_AFTER} s)");
    // The window is judged by the server's own figures, not by this test's clock.
    assert_eq!(silent["detail"]["threshold_seconds"], SILENT_AFTER);
    assert!(silent["detail"]["silent_for_seconds"].as_u64().unwrap() >= SILENT_AFTER);
    // The stuck row follows, with what to do about it.
    let i = wait("stuck running", Duration::from_secs(30), &c, || {
        let i = server.instance(&inst);
        (i["stuck"]["reason"] == "running_without_heartbeat").then_some(i)
    });
    assert_eq!(i["status"], "running");
    assert!(i["stuck"]["recovery"]
        .as_str()
        .unwrap()
        .contains("terminate-instance --force"));
    let stuck = wait("the stuck signal", Duration::from_secs(10), &c, || {
        find(&server.signals(&inst), "instance.stuck", true).cloned()
    });
    assert_eq!(stuck["detail"]["reason"], "running_without_heartbeat");
    // The recovery ends it.
    server.cli(&["terminate-instance", &inst, "--force"]);
    assert_eq!(server.instance(&inst)["status"], "terminated");
}

/// A partition between guest and server (a proxy the test cuts), then healed:
/// `instance.silent` fires during the cut, heartbeats resume after it and the
/// signal is cleared.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn partition_raises_silent_and_healing_clears_it() {
    let dir = test_dir("failures_partition");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let public = listener.local_addr().unwrap().port();
    let server = start_server(&dir, Some(public), &[]);
    let proxy = Proxy::start(listener, server.port());
    let (inst, doc) = server.provision_class("partition-1", "ephemeral");
    assert!(doc["control_plane_url"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{public}")));
    let (mut vm, serial) = boot(&dir, "vm", &doc, None);
    let c = ctx(&serial, &server);
    running(&server, &inst, &mut vm, &c);
    std::thread::sleep(Duration::from_secs(2));

    proxy.cut();
    let cut = Instant::now();
    let silent = wait("instance.silent", Duration::from_secs(30), &c, || {
        find(&server.signals(&inst), "instance.silent", true).cloned()
    });
    println!(
        "partition: instance.silent {:?} after the cut",
        cut.elapsed()
    );
    let before = server.instance(&inst)["last_heartbeat_at"].clone();
    assert_eq!(silent["detail"]["last_heartbeat_at"], before);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.instance(&inst)["last_heartbeat_at"],
        before,
        "a heartbeat crossed the cut"
    );

    proxy.heal();
    let healed = Instant::now();
    let cleared = wait(
        "instance.silent_cleared",
        Duration::from_secs(90),
        &c,
        || find(&server.signals(&inst), "instance.silent_cleared", false).cloned(),
    );
    println!(
        "partition: heartbeats resumed, silent cleared {:?} after healing",
        healed.elapsed()
    );
    assert_eq!(cleared["detail"]["silent_signal_id"], silent["id"]);
    let sig = server.signals(&inst);
    assert!(find(&sig, "instance.silent", true).is_none(), "{sig:?}");
    let i = server.instance(&inst);
    assert_eq!(i["status"], "running");
    assert_ne!(i["last_heartbeat_at"], before);
    assert!(i.get("stuck").is_none(), "{i}");
    server.cli(&["terminate-instance", &inst, "--force"]);
    drop(proxy);
}

/// `--stuck-thresholds provisioning=N` of the provisioning test: crossed while the
/// init is still retrying its enrollment (see `ENROLL_ATTEMPTS`).
const PROVISIONING_STUCK: u64 = 6;
/// `powernode.attempts` of the provisioning test. The init retries a failed phase with
/// 1, 2, 4, 8, 16 s backoff before it gives up (and powers off): 6 attempts keep it
/// trying for 31 s after its first, long enough to cross the threshold, cancel and
/// heal. The default (3) gives up 3 s after the first attempt.
const ENROLL_ATTEMPTS: u32 = 6;

/// A VM that boots but never reaches the server (the proxy is cut before it boots):
/// the instance stays `provisioning` past its threshold, and get-instance and
/// recent-signals show the `provisioning_too_long` row naming `cancel-task` of the
/// provision task. Following it fails the instance (`task_cancelled`) and clears the
/// signal; healed, the late VM's enrollment is refused (`instance.refused`,
/// `bootstrap_token_expired`) and the VM powers off; the Node provisioned again
/// reaches `running`.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn unreachable_server_leaves_provisioning_stuck_and_cancel_recovers() {
    let dir = test_dir("failures_stuck_provisioning");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let public = listener.local_addr().unwrap().port();
    let threshold = format!("provisioning={PROVISIONING_STUCK}");
    let server = start_server(&dir, Some(public), &["--stuck-thresholds", &threshold]);
    let proxy = Proxy::start(listener, server.port());
    // Cut before anything boots: the guest never gets through until healed.
    proxy.cut();
    // The image first: the threshold counts from provision-instance, and a build must
    // not use it up (the row must show while the VM is up and retrying).
    netboot(&dir);
    let (inst, doc) = server.provision_class("prov-stuck-1", "ephemeral");
    let provisioned = Instant::now();
    assert!(doc["control_plane_url"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{public}")));
    let i = server.instance(&inst);
    assert_eq!(i["status"], "provisioning", "{i}");
    assert!(i.get("stuck").is_none(), "stuck before the threshold: {i}");
    let task = i["task_id"]
        .as_str()
        .expect("the provision task")
        .to_string();
    let node = i["node_id"].as_str().expect("node id").to_string();
    let t = server.cli(&["get-task", &task]);
    assert_eq!(
        (&t["task"]["kind"], &t["task"]["instance_id"]),
        (&json!("provision"), &json!(inst)),
        "{t}"
    );

    let args = format!("powernode.attempts={ENROLL_ATTEMPTS}");
    let (mut vm, serial) = boot_with_args(&dir, "vm", &doc, None, &[&args]);
    let booted = Instant::now();
    let logs = ctx(&serial, &server);
    // Every failed wait names the server's view of the instance and what the cut saw.
    let state = || {
        format!(
            "instance {}\nconnections dropped by the cut: {}\n{logs}",
            server.instance(&inst),
            proxy.refused().len()
        )
    };

    // The guest really tries (its enrollment reaches the cut), and is still trying
    // (QEMU alive) when the server calls the instance stuck.
    wait_until(
        "an enrollment attempt at the cut",
        TO_RUNNING,
        &mut vm,
        &state,
        || (!proxy.refused().is_empty()).then_some(()),
    );
    let first_attempt = booted.elapsed();
    let i = wait_until(
        "the provisioning stuck row",
        Duration::from_secs(PROVISIONING_STUCK + 20),
        &mut vm,
        &state,
        || {
            let i = server.instance(&inst);
            (i["stuck"]["reason"] == "provisioning_too_long").then_some(i)
        },
    );
    let (to_stuck, since_provision) = (booted.elapsed(), provisioned.elapsed());
    assert_eq!(i["status"], "provisioning", "{i}");
    assert_eq!(i["stuck"]["threshold_seconds"], PROVISIONING_STUCK, "{i}");
    assert!(
        i["stuck"]["for_seconds"].as_u64().unwrap() > PROVISIONING_STUCK,
        "{i}"
    );
    let recovery = i["stuck"]["recovery"].as_str().unwrap().to_string();
    assert!(
        recovery.contains(&format!("cancel-task {task}")),
        "the recovery does not name the provision task {task}: {recovery}"
    );
    // Never enrolled: nothing from the node reached the server.
    assert!(i.get("last_heartbeat_at").is_none(), "{i}");
    assert_eq!(i["boot_timeline"], json!([]), "{i}");
    let stuck = wait_until(
        "the stuck signal",
        Duration::from_secs(10),
        &mut vm,
        &state,
        || find(&server.signals(&inst), "instance.stuck", true).cloned(),
    );
    assert_eq!(stuck["detail"]["reason"], "provisioning_too_long");
    assert_eq!(stuck["detail"]["recovery"], recovery.as_str());
    // Still retrying after the row: one more attempt reaches the cut.
    let at_row = proxy.refused().len();
    wait_until(
        "another enrollment attempt after the stuck row",
        Duration::from_secs(40),
        &mut vm,
        &state,
        || (proxy.refused().len() > at_row).then_some(()),
    );
    let tries = proxy.refused();
    let cadence: Vec<String> = tries
        .iter()
        .map(|t| format!("{:.1}", t.duration_since(tries[0]).as_secs_f64()))
        .collect();
    println!(
        "provisioning: first enrollment attempt {first_attempt:?} after QEMU start; stuck \
         row {to_stuck:?} after QEMU start, {since_provision:?} after provision-instance \
         (threshold {PROVISIONING_STUCK} s), {at_row} attempts dropped by then; attempts \
         at the cut at +[{}] s from the first",
        cadence.join(", ")
    );

    // The recovery, as the server worded it.
    let cancel = Instant::now();
    let t = server.cli(&["cancel-task", &task]);
    assert_eq!(t["task"]["status"], "cancelled", "{t}");
    let i = server.instance(&inst);
    let cancel_to_failed = cancel.elapsed();
    assert_eq!(i["status"], "failed", "{i}");
    assert_eq!(i["failure"]["code"], "task_cancelled", "{i}");
    assert!(
        i.get("stuck").is_none(),
        "a failed instance is not stuck: {i}"
    );
    // The ended instance keeps no active stuck signal (the next sensor pass ends it).
    poll_until(
        "the stuck signal to end",
        Duration::from_secs(10),
        &state,
        || {
            let sigs = server.signals(&inst);
            let ended = sigs
                .iter()
                .any(|s| s["id"] == stuck["id"] && s["active"] == false);
            (ended && find(&sigs, "instance.stuck", true).is_none()).then_some(())
        },
    );
    let cancel_to_cleared = cancel.elapsed();
    // Its bootstrap token went with it, as data.
    let events = server.cli(&["recent-events", "--instance", &inst, "--limit", "200"]);
    let revoked = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "credentials.revoked")
        .unwrap_or_else(|| panic!("no credentials.revoked event: {events}"));
    assert!(
        revoked["detail"]["tokens"].as_u64().unwrap() >= 1,
        "{revoked}"
    );

    // Healed: the late VM reaches the server with a dead token and is refused for good.
    let refused_before = proxy.refused().len();
    proxy.heal();
    let healed = Instant::now();
    let refusal = poll_until("instance.refused", Duration::from_secs(60), &state, || {
        find(&server.signals(&inst), "instance.refused", false).cloned()
    });
    let heal_to_refused = healed.elapsed();
    assert_eq!(
        refusal["detail"]["code"], "bootstrap_token_expired",
        "{refusal}"
    );
    assert_eq!(
        refusal["detail"]["path"], "/api/v1/system/node_api/enrollment",
        "{refusal}"
    );
    let exit = vm.wait_timeout(Duration::from_secs(60)).expect("wait QEMU");
    let heal_to_exit = healed.elapsed();
    assert!(
        exit.is_some(),
        "the refused VM kept running 60 s after healing; {}",
        state()
    );
    let i = server.instance(&inst);
    assert_eq!(
        (&i["status"], &i["failure"]["code"]),
        (&json!("failed"), &json!("task_cancelled")),
        "the late enrollment changed the failed instance: {i}"
    );
    println!(
        "provisioning: cancel -> failed {cancel_to_failed:?}, stuck signal ended \
         {cancel_to_cleared:?} after cancel; {refused_before} attempts dropped by the cut; \
         heal -> refused {heal_to_refused:?}, heal -> QEMU exit {heal_to_exit:?}"
    );

    // The Node is usable after the recovery: provisioned again, it runs.
    let prov = server.cli(&["provision-instance", &node]);
    let inst2 = prov["instance"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no instance id in {prov}"))
        .to_string();
    assert_ne!(inst2, inst);
    let ident = server.cli(&["instance-identity", &inst2]);
    let doc2 = match ident.get("identity") {
        Some(d) if d.is_object() => d.clone(),
        _ => ident,
    };
    let again = Instant::now();
    let (mut vm2, serial2) = boot(&dir, "vm2", &doc2, None);
    let c2 = ctx(&serial2, &server);
    let i2 = running(&server, &inst2, &mut vm2, &c2);
    println!(
        "provisioning: provisioned again, running {:?} after QEMU start",
        again.elapsed()
    );
    assert_eq!(i2["node_id"], node.as_str());
    assert!(i2.get("stuck").is_none(), "{i2}");
    let n = server.cli(&["get-node", &node]);
    assert_eq!(n["node"]["status"], "running", "{n}");
    assert_eq!(server.instance(&inst)["status"], "failed");
    server.cli(&["terminate-instance", &inst2, "--force"]);
    drop(proxy);
}

/// A root module whose registry cannot be reached: the node enrolls but never gets
/// ready. The server shows the `bootstrapping` stuck row with its recovery, the
/// failure the node reported, and attribute-failure names the publication.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn unreachable_root_module_leaves_bootstrapping_stuck_and_attributed() {
    let dir = test_dir("failures_stuck_bootstrapping");
    let server = start_server(&dir, None, &["--stuck-thresholds", "bootstrapping=10"]);
    // A publication on an external registry nobody listens on (port 9, discard).
    let sha = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let token = std::fs::read_to_string(server.data().join("admin-token")).unwrap();
    let ca = server.data().join("ca.pem");
    let record = json!({"name": "ghost", "version": "1.0.0", "kind": "root",
        "registry": "10.0.2.2:9", "repository": "modules/ghost", "digest": sha('a'),
        "composefs_digest": sha('b'), "signature_digest": sha('c')});
    let curl = |method: &str, path: &str, body: &Value| {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca)
            .args(["-X", method, "-H"])
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .args([
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
            ])
            .arg(format!("{}{path}", server.url()))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "{method} {path}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    curl("POST", "/api/v1/system/module_publications", &record);
    server.cli(&["set-template-modules", "tmpl-edge-base", "--root", "ghost"]);
    let (inst, doc) = server.provision_class("stuck-boot-1", "ephemeral");
    let (_vm, serial) = boot(&dir, "vm", &doc, None);
    let c = ctx(&serial, &server);
    let i = wait("stuck bootstrapping", TO_RUNNING, &c, || {
        let i = server.instance(&inst);
        (i["stuck"]["reason"] == "bootstrapping_too_long").then_some(i)
    });
    assert_eq!(i["status"], "bootstrapping");
    assert!(i["stuck"]["recovery"]
        .as_str()
        .unwrap()
        .contains("terminate-instance --force"));
    let failure = wait("a failure report", Duration::from_secs(60), &c, || {
        let i = server.instance(&inst);
        i["failure"].is_object().then(|| i["failure"].clone())
    });
    println!("stuck bootstrapping: node reported {failure}");
    // get-instance computes `stuck` when asked; the signal comes with the next
    // sensor pass.
    let sig = wait("the stuck signal", Duration::from_secs(10), &c, || {
        let sig = server.signals(&inst);
        find(&sig, "instance.stuck", true).is_some().then_some(sig)
    });
    assert!(find(&sig, "bootstrap.failed", true).is_some(), "{sig:?}");
    assert_eq!(
        find(&sig, "instance.stuck", true).unwrap()["detail"]["reason"],
        "bootstrapping_too_long"
    );
    let a = server.cli(&["attribute-failure", &inst, "--lookback-hours", "1"]);
    assert_eq!(a["failure"]["source"], "failure_report");
    let top = &a["candidates"][0];
    assert_eq!(
        (&top["change"], &top["module"], &top["kind"]),
        (&json!("module_published"), &json!("ghost"), &json!("root")),
        "{a}"
    );
    println!("attribution: {}", top["reasoning"]);
    server.cli(&["terminate-instance", &inst, "--force"]);
}

/// Decommission on a real VM: a persistent node is terminated (its certificate
/// revoked), then its /persist disk is booted again. The node comes back with its old
/// credentials and is refused with a stable code, visible in recent-signals.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn decommissioned_persistent_node_booted_again_is_refused() {
    let dir = test_dir("failures_decommission");
    let server = start_server(&dir, None, &[]);
    let (inst, doc) = server.provision_class("decom-1", "persistent");
    let disk = dir.join("persist.img");
    powernode_qemu::make_persist_disk(&disk, 64).unwrap();
    let (mut vm, serial) = boot(&dir, "boot1", &doc, Some(&disk));
    let c = ctx(&serial, &server);
    running(&server, &inst, &mut vm, &c);
    // The credentials must reach the image (ext4 commits its journal every 5 s of
    // guest time): waited for, not slept.
    wait_credentials_persisted(&disk, &mut vm, &|| c.clone());
    let t = server.cli(&["terminate-instance", &inst, "--force"]);
    assert_eq!(t["status"], "terminated");
    // Its certificate revoked and its bootstrap token expired, as the audit says.
    let events = server.cli(&["recent-events", "--instance", &inst, "--limit", "200"]);
    let revoked = events["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "credentials.revoked"))
        .unwrap_or_else(|| panic!("no credentials.revoked event: {events}"));
    assert_eq!(
        revoked["detail"]["certificates"].as_array().map(Vec::len),
        Some(1),
        "{revoked}"
    );
    assert_eq!(revoked["detail"]["tokens"], 1, "{revoked}");
    // The recorder provider does not own this VM: the node learns on its next call
    // (certificate_revoked) and powers off.
    let exit = vm.wait_timeout(Duration::from_secs(60)).expect("wait QEMU");
    assert!(exit.is_some(), "the terminated node kept running; {c}");
    let first: Vec<Value> = server
        .signals(&inst)
        .into_iter()
        .filter(|s| s["kind"] == "instance.refused")
        .collect();

    // The same disk again, a minute later (one refusal signal a minute).
    std::thread::sleep(Duration::from_secs(61));
    let (mut vm2, serial2) = boot(&dir, "boot2", &doc, Some(&disk));
    let c2 = ctx(&serial2, &server);
    let refused = wait("instance.refused", TO_RUNNING, &c2, || {
        server
            .signals(&inst)
            .into_iter()
            .find(|s| s["kind"] == "instance.refused" && !first.iter().any(|f| f["id"] == s["id"]))
    });
    println!("decommission: second boot refused: {}", refused["detail"]);
    assert_eq!(refused["detail"]["code"], "certificate_revoked");
    assert_eq!(refused["detail"]["instance_status"], "terminated");
    let exit = vm2
        .wait_timeout(Duration::from_secs(60))
        .expect("wait QEMU");
    assert!(exit.is_some(), "a refused node must stop; {c2}");
    let i = server.instance(&inst);
    assert_eq!(i["status"], "terminated");
    // The Node row is kept, with no live instance.
    let n = server.cli(&["get-node", i["node_id"].as_str().unwrap()]);
    assert_eq!(n["node"]["status"], "no_instance");
}

/// A node whose bootstrap token was already spent (here by an agent on the host
/// that enrolled with the same identity) is refused at enrollment. Before the
/// failure policy powers it off, the init reports why with its bootstrap token:
/// get-instance shows the phase, code, message and the init's last console lines,
/// recent-signals the `bootstrap.reported` signal with its recovery.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_node_refused_at_enrollment_reports_why_before_it_powers_off() {
    let dir = test_dir("failures_boot_report");
    let server = start_server(&dir, None, &[]);
    let (inst, doc) = server.provision_class("boot-report-1", "ephemeral");
    // Spend the token from the host: the same identity, the server's host URL.
    let mut host_doc = doc.clone();
    host_doc["control_plane_url"] = json!(server.url());
    let mut spender = powernode_tests::Agent::with_identity(&dir, "spender", &host_doc, &[])
        .expect("start the host agent");
    wait(
        "the host agent enrolled",
        TO_RUNNING,
        &spender.log_text(),
        || {
            server.instance(&inst)["enrolled_at"]
                .is_string()
                .then_some(())
        },
    );
    spender.guard.kill();

    let (mut vm, serial) = boot(&dir, "vm", &doc, None);
    let c = ctx(&serial, &server);
    let started = Instant::now();
    let exit = vm
        .wait_timeout(TO_RUNNING)
        .expect("wait QEMU")
        .unwrap_or_else(|| panic!("a node refused for good must power off; {c}"));
    assert!(
        exit.success(),
        "QEMU did not power off cleanly: {exit}; {c}"
    );
    println!(
        "boot report: the refused node powered off {:?} after QEMU started",
        started.elapsed()
    );
    let i = server.instance(&inst);
    let report = i["boot_reports"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_else(|| panic!("no boot report on the instance: {i}; {c}"));
    println!("boot report: {report}");
    assert_eq!(report["phase"], "enrolled", "{report}");
    assert_eq!(report["code"], "bootstrap_token_used", "{report}");
    assert!(
        report["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("bootstrap: ") && m.contains("already used")),
        "{report}"
    );
    let console: Vec<&str> = report["console"]
        .as_array()
        .map(|l| l.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        console.iter().any(|l| l.contains("powernode-init")),
        "the init's last console lines: {console:?}"
    );
    assert!(
        report["recovery"]
            .as_str()
            .is_some_and(|r| r.contains("provision-instance")),
        "{report}"
    );
    let signals = server.signals(&inst);
    let reported = find(&signals, "bootstrap.reported", true)
        .unwrap_or_else(|| panic!("no active bootstrap.reported signal: {signals:?}"));
    assert_eq!(reported["detail"]["code"], "bootstrap_token_used");
    server.cli(&["terminate-instance", &inst, "--force"]);
}

/// The completion of a reboot task cannot reach the server (a partition cut while
/// the services stop for it): the agent does not reboot blind, which would leave
/// the task to be requeued and run again and an ephemeral node without its
/// re-enrollment window. It restarts its services; the lease runs out and the
/// server requeues the task (`lease_expired`); once healed, the agent leases it
/// again, completes it, and only then reboots.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_reboot_whose_completion_is_lost_waits_for_the_requeue() {
    let dir = test_dir("failures_reboot_partition");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let public = listener.local_addr().unwrap().port();
    let server = start_server(&dir, Some(public), &[]);
    let proxy = Proxy::start(listener, server.port());
    let slow = json!({"name": "slowstop",
        "command": ["bin/busybox", "sh", "-c",
                    "trap 'sleep 8; exit 0' TERM; while :; do sleep 1; done"],
        "restart": "always", "stop_timeout_seconds": 30});
    publish_runtime(&server, &dir, "slow", "1.0.0", labels(None, &[slow]));
    server.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "slow",
    ]);
    let (inst, doc) = server.provision_class("reboot-partition-1", "ephemeral");
    let (mut vm, serial) = boot_with_args(&dir, "vm", &doc, None, &["powernode.lease_s=6"]);
    let c = ctx(&serial, &server);
    let slowstop = |i: &Value, state: &str| {
        i["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "slowstop" && s["state"] == state)
        })
    };
    wait_until(
        "running with slowstop",
        TO_RUNNING,
        &mut vm,
        &|| c.clone(),
        || {
            let i = server.instance(&inst);
            (i["status"] == "running" && slowstop(&i, "running")).then_some(i)
        },
    );
    let reboot = server.cli(&["reboot-instance", &inst, "--drain-timeout-seconds", "60"]);
    let id = reboot["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task id: {reboot}"))
        .to_string();
    wait_until(
        "slowstop stopping for the reboot",
        TO_RUNNING,
        &mut vm,
        &|| c.clone(),
        || {
            let i = server.instance(&inst);
            slowstop(&i, "stopping").then_some(i)
        },
    );
    proxy.cut();
    // Long enough for the stop (8 s) and the agent's five completion attempts
    // (about 16 s of backoff); a reboot would end QEMU (it runs with -no-reboot).
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(40) {
        if let Ok(Some(status)) = vm.try_wait() {
            panic!(
                "the node rebooted {:?} into the cut although the server never recorded \
                 the reboot ({status}); task: {}\n{c}",
                cut.elapsed(),
                server.cli(&["get-task", &id])
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The agent did try (heartbeats, renewals, its completions) and was turned away.
    let tried = proxy.refused().len();
    assert!(tried >= 5, "only {tried} connections reached the cut\n{c}");
    let t = server.cli(&["get-task", &id]);
    assert_ne!(t["task"]["status"], "succeeded", "{t}");
    proxy.heal();
    let healed = Instant::now();
    let exit = vm
        .wait_timeout(Duration::from_secs(120))
        .expect("wait for QEMU");
    assert!(
        matches!(exit, Some(s) if s.success()),
        "the requeued reboot did not happen: {exit:?}; task {}\n{c}",
        server.cli(&["get-task", &id])
    );
    let t = server.cli(&["get-task", &id]);
    let t = &t["task"];
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["result"]["rebooting"], true, "{t}");
    assert_eq!(t["history"][0]["outcome"], "lease_expired", "{t}");
    println!(
        "reboot_partition: {tried} connections refused during the cut; rebooted {:?} after \
         the heal, task attempts {}",
        healed.elapsed(),
        t["attempts"]
    );
}
