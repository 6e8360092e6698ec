//! VM tier, end to end: the real kernel + our initramfs (init linked with the agent
//! library) against a real `powernode-stub` on the host loopback (the guest reaches
//! it at 10.0.2.2 through QEMU user networking). Everything asserted about the node
//! comes from the server's API (get-instance, get-task), not from console text.
//! Ignored unless built with `POWERNODE_VM_TESTS=1`; each test keeps `serial.log`,
//! `qemu-command.sh`, `server.log` and the server's data under
//! `target/vm-tests/<test>/`.

use std::time::{Duration, Instant};

use base64::Engine;
use powernode_qemu::Vm;
use powernode_tests::direct::stub::{assert_powered_off, Stub};
use powernode_tests::direct::*;
use serde_json::Value;

const TO_RUNNING: Duration = Duration::from_secs(120);
const TO_EXIT: Duration = Duration::from_secs(60);

/// The whole runbook against one VM: boot to `running`, drain, terminate, QEMU
/// exits on its own. Returns the instance as seen when it was running.
fn boot_to_running_drain_terminate(test: &str, by_cmdline: bool) -> Value {
    let dir = test_dir(test);
    let stub = Stub::start(&dir);
    let (instance_id, doc) = stub.provision(&format!("{test}-1").replace('_', "-"));
    let mut spec = netboot_spec(&dir, &["powernode.attempts=5"]);
    let expected_source = if by_cmdline {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doc.to_string());
        spec.kernel_args.push(format!("powernode.identity={b64}"));
        spec.kernel_args
            .push("powernode.identity_source=cmdline".into());
        "cmdline"
    } else {
        with_identity(&mut spec, &dir, &doc.to_string());
        "fw_cfg"
    };
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let context = vm_context(&vm, Some(stub.log()));

    let started = Instant::now();
    let running = wait_until("status running", TO_RUNNING, &mut vm, &context, || {
        let inst = stub.instance(&instance_id);
        (inst["status"] == "running").then_some(inst)
    });
    let to_running = started.elapsed();

    // The node's own account, as the server recorded it.
    assert_eq!(running["identity_source"], expected_source, "{running}");
    let timeline = boot_timeline(&running);
    let names: Vec<&str> = timeline.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "kernel_start",
            "init_start",
            "modules_loaded",
            "identity_found",
            "network_up",
            "enrolled",
            "agent_started",
            "ready"
        ],
        "{running}"
    );
    assert!(
        timeline.windows(2).all(|w| w[0].1 <= w[1].1),
        "timeline out of order: {timeline:?}"
    );
    // `/` is the initramfs until modules are composed into a root.
    let root = &running["root"];
    assert!(
        matches!(root["fstype"].as_str(), Some("rootfs" | "ramfs" | "tmpfs")),
        "root facts: {running}"
    );

    // Drain: the agent (PID 1 in the VM) leases the task and completes it.
    let drain = stub.cli(&["drain-instance", &instance_id, "--timeout-seconds", "10"]);
    let task_id = drain["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task_id in {drain}"))
        .to_string();
    let task = wait_until(
        "drain task succeeded",
        Duration::from_secs(60),
        &mut vm,
        &context,
        || {
            let t = stub.cli(&["get-task", &task_id]);
            let t = t.get("task").cloned().unwrap_or(t);
            assert!(
                !matches!(t["status"].as_str(), Some("failed" | "cancelled")),
                "drain task ended badly: {t}"
            );
            (t["status"] == "succeeded").then_some(t)
        },
    );
    assert_eq!(task["kind"], "drain", "{task}");
    let drained = wait_until(
        "phase drained",
        Duration::from_secs(30),
        &mut vm,
        &context,
        || {
            let i = stub.instance(&instance_id);
            (i["phase"] == "drained" && i["cordoned"] == true).then_some(i)
        },
    );
    assert_eq!(drained["status"], "draining", "{drained}");

    // Terminate: the agent is refused and powers the VM off; QEMU exits by itself.
    let exit = stub.terminate(&instance_id, false, &mut vm, TO_EXIT, &context);
    assert_powered_off(exit, &context);
    let serial = vm.serial();
    let events = events(&serial, "POWERNODE-INIT ");
    let stopped = event(&events, "event", "agent_stopped")
        .unwrap_or_else(|| panic!("no agent_stopped event\n{}", context()));
    assert_eq!(stopped["reason"], "refused", "{stopped}");
    assert!(serial.contains("reboot: Power down"), "{}", context());
    assert!(!serial.contains("Kernel panic"), "{}", context());
    assert_eq!(stub.instance(&instance_id)["status"], "terminated");

    let at = |p: &str| timeline.iter().find(|(n, _)| n == p).map(|(_, t)| *t);
    eprintln!(
        "{test}: running after {to_running:?} (wall, {} under QEMU); ready at {} ms, network_up at {} ms, enrolled at {} ms since kernel start; whole runbook {:?}",
        if spec.accel == powernode_qemu::Accel::Tcg { "TCG" } else { "KVM" },
        at("ready").unwrap_or(0),
        at("network_up").unwrap_or(0),
        at("enrolled").unwrap_or(0),
        started.elapsed()
    );
    running
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn fw_cfg_node_runs_drains_and_powers_off_when_terminated() {
    boot_to_running_drain_terminate("agent_fw_cfg", false);
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn cmdline_identity_node_runs_drains_and_powers_off_when_terminated() {
    boot_to_running_drain_terminate("agent_cmdline", true);
}

/// A bad identity cannot reach the server (no credentials, maybe no URL): the
/// reason naming the field reaches the operator on the console, in the init's
/// structured failure line, and the policy powers off.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn bad_cmdline_identity_names_the_field_and_powers_off() {
    let dir = test_dir("agent_bad_identity");
    let image = netboot(&dir);
    let mut doc: Value = serde_json::from_str(&identity_json("inst-bad")).unwrap();
    doc.as_object_mut().unwrap().remove("instance_id");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doc.to_string());
    let spec = poweroff_spec(&dir, &image, &[&format!("powernode.identity={b64}")]);
    let boot = boot(&spec, Duration::from_secs(60));
    let events = events(&boot.serial, "POWERNODE-INIT ");
    let failed = event(&events, "event", "phase_failed")
        .unwrap_or_else(|| panic!("no phase_failed event; command: {}", boot.command));
    assert_eq!(failed["phase"], "identity");
    assert_eq!(failed["code"], "identity_invalid");
    assert_eq!(failed["retrying"], false);
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("cmdline") && error.contains("instance_id"),
        "{error}"
    );
    // The human-readable log line carries it too.
    assert!(
        boot.serial
            .lines()
            .any(|l| l.contains("phase identity failed") && l.contains("instance_id")),
        "{}",
        spec.serial_log.display()
    );
    assert!(boot.serial.contains("reboot: Power down"));
}

/// A persistent node keeps its key and certificate on the `/persist` disk (ext4 on
/// vda): after a hard power loss the second boot reuses them (the bootstrap token is
/// single use, so a fresh enrollment would be refused) and reports `ready` again.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn persistent_node_reuses_its_credentials_from_persist_after_power_loss() {
    let dir = test_dir("agent_persist");
    let stub = Stub::start(&dir);
    let (instance_id, doc) = stub.provision_class("agent-persist-1", "persistent");
    let image = netboot(&dir);
    let disk = dir.join("persist.img");
    powernode_qemu::make_persist_disk(&disk, 64).unwrap();
    let boot_once = |name: &str| {
        let spec = node_spec(&dir.join(name), &image, &doc, Some(&disk), &[]);
        let vm = Vm::spawn(&spec).expect("spawn QEMU");
        (spec, vm)
    };

    // Boot 1: enrolls, state on /persist.
    let (_spec1, mut vm1) = boot_once("boot1");
    let ctx1 = vm_context(&vm1, Some(stub.log()));
    let first = wait_until("first running", TO_RUNNING, &mut vm1, &ctx1, || {
        let i = stub.instance(&instance_id);
        (i["status"] == "running").then_some(i)
    });
    let enrolled1 = event(
        &events(&vm1.serial(), "POWERNODE-INIT "),
        "phase",
        "enrolled",
    )
    .cloned()
    .unwrap_or_else(|| panic!("no enrolled event\n{}", ctx1()));
    assert_eq!(enrolled1["state_dir"], "/persist/powernode");
    assert_eq!(enrolled1["reused_credentials"], false);
    // The credentials must be on the disk image before the power goes (ext4
    // commits its journal every 5 s of guest time): waited for, not slept.
    wait_credentials_persisted(&disk, &mut vm1, &ctx1);
    vm1.kill();
    drop(vm1);

    // Boot 2, same disk: stored credentials, no enrollment, ready again.
    let (_spec2, mut vm2) = boot_once("boot2");
    let ctx2 = vm_context(&vm2, Some(stub.log()));
    let first_ready = first["boot_timeline"].clone();
    let second = wait_until(
        "second ready handshake",
        TO_RUNNING,
        &mut vm2,
        &ctx2,
        || {
            let i = stub.instance(&instance_id);
            (i["phase"] == "ready" && i["boot_timeline"] != first_ready).then_some(i)
        },
    );
    assert_eq!(second["status"], "running", "{second}");
    let enrolled2 = event(
        &events(&vm2.serial(), "POWERNODE-INIT "),
        "phase",
        "enrolled",
    )
    .cloned()
    .unwrap_or_else(|| panic!("no enrolled event\n{}", ctx2()));
    assert_eq!(enrolled2["reused_credentials"], true, "{enrolled2}");
    // Not drained: a persistent node's terminate must be forced.
    let exit = stub.terminate(&instance_id, true, &mut vm2, TO_EXIT, &ctx2);
    assert_powered_off(exit, &ctx2);
}

/// An ephemeral node whose template has a published busybox base as its root
/// module: the init pulls and verifies it, mounts the union (composefs images under
/// an overlay with a tmpfs upper), switch_roots into it and runs the agent there as
/// PID 1. Asserted from get-instance: `root.fstype` is `overlay` and `root.modules`
/// holds the published manifest digest (the agent reports manifest digests).
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn composed_root_from_a_published_base_module() {
    let test = "agent_composed_root";
    let dir = test_dir(test);
    let stub = Stub::start(&dir);
    let base = rootfs::busybox_root(&dir, "1");
    let digest = stub.publish_module(&base, "base", "1.0.0", "root");
    eprintln!("published: {digest}");
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    let (instance_id, doc) = stub.provision("composed-root-1");
    let mut spec = netboot_spec(&dir, &["powernode.attempts=2"]);
    with_identity(&mut spec, &dir, &doc.to_string());
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let context = vm_context(&vm, Some(stub.log()));
    let started = Instant::now();
    let running = wait_until("status running", TO_RUNNING, &mut vm, &context, || {
        let inst = stub.instance(&instance_id);
        assert!(
            inst["status"] != "failed",
            "instance failed: {inst}\n{}",
            context()
        );
        (inst["status"] == "running").then_some(inst)
    });
    let to_running = started.elapsed();
    let root = &running["root"];
    assert_eq!(
        root["fstype"],
        "overlay",
        "root facts: {running}\n{}",
        context()
    );
    // The agent reports the root modules' manifest digests (as pinned in the
    // desired set), not their composefs digests.
    let modules: Vec<&str> = root["modules"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(modules, [digest.as_str()], "root facts: {running}");
    let drift = stub.cli(&["drift-report", &instance_id]);
    assert_eq!(drift["drift"], false, "drift report: {drift}");

    let drain = stub.cli(&["drain-instance", &instance_id, "--timeout-seconds", "10"]);
    let task_id = drain["task_id"].as_str().unwrap().to_string();
    wait_until(
        "drain task succeeded",
        Duration::from_secs(60),
        &mut vm,
        &context,
        || {
            let t = stub.cli(&["get-task", &task_id]);
            let t = t.get("task").cloned().unwrap_or(t);
            (t["status"] == "succeeded").then_some(t)
        },
    );
    let exit = stub.terminate(&instance_id, false, &mut vm, TO_EXIT, &context);
    assert_powered_off(exit, &context);
    let serial = vm.serial();
    assert!(!serial.contains("Kernel panic"), "{}", context());
    eprintln!(
        "{test}: running after {to_running:?} (wall); whole runbook {:?}",
        started.elapsed()
    );
}

/// A P-256 public key nobody here holds the private half of.
const STRANGER_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0Xol1i8xcxDF7T7mHjUwqH82Gukc
zFuyjAD91T99K0TRe3qnBJcO1Lsn2PZRFcYna43n+v9y2nJ+o++kbgcszg==
-----END PUBLIC KEY-----
";

/// Trust anchored on the node: the initramfs pins a key the server does not sign
/// with. The server signs the base module with its own key, hands that key out with
/// the desired modules (and writes it into the identity), and the node still refuses
/// the module with `signature_mismatch` before switch_root.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_key_the_initramfs_does_not_pin_is_refused_whatever_the_server_sends() {
    let dir = test_dir("agent_builtin_pin");
    let base = rootfs::busybox_root(&dir, "1");
    let stub = Stub::start(&dir);
    stub.publish_module(&base, "base", "1.0.0", "root");
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    let pinned = dir.join("pinned.pub");
    std::fs::write(&pinned, STRANGER_KEY).unwrap();
    let image = netboot_pinning(&dir, &[pinned]);
    let (instance_id, doc) = stub.provision("builtin-pin-1");
    let spec = node_spec(
        &dir.join("vm"),
        &image,
        &doc,
        None,
        &["powernode.attempts=1"],
    );
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let exit = vm.wait_timeout(TO_RUNNING).expect("wait for QEMU");
    let serial = vm.serial();
    assert!(
        matches!(exit, Some(s) if s.success()),
        "QEMU did not power off: {exit:?}\n{serial}"
    );
    assert!(
        serial.contains("module keys pinned by the initramfs: 1"),
        "{serial}"
    );
    let inst = stub.instance(&instance_id);
    assert_eq!(inst["failure"]["code"], "signature_mismatch", "{inst}");
    assert!(
        inst["failure"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signature made by no trust key"),
        "{inst}"
    );
    assert!(!serial.contains("switch_root: freed"), "{serial}");
}

/// The base module's signature no longer verifies (the server's signing key was
/// replaced after publishing, so the trust key it hands out is not the signer's):
/// the init reports `signature_mismatch` upstream, never switches root, and the
/// policy powers the VM off.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_root_module_signed_by_an_unknown_key_is_refused_before_switch_root() {
    let dir = test_dir("agent_composed_root_bad_signature");
    let base = rootfs::busybox_root(&dir, "1");
    {
        let stub = Stub::start(&dir);
        stub.publish_module(&base, "base", "1.0.0", "root");
        stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    }
    // A new signing key on restart: the published signature is now a stranger's.
    for f in ["module-signing.key", "module-signing.pub"] {
        std::fs::remove_file(dir.join("server-data").join(f)).unwrap();
    }
    let stub = Stub::start(&dir);
    let (instance_id, doc) = stub.provision("bad-signature-1");
    let mut spec = netboot_spec(&dir, &["powernode.attempts=1"]);
    with_identity(&mut spec, &dir, &doc.to_string());
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let exit = vm.wait_timeout(TO_RUNNING).expect("wait for QEMU");
    let serial = vm.serial();
    assert!(
        matches!(exit, Some(s) if s.success()),
        "QEMU did not power off: {exit:?}\n{serial}"
    );
    let inst = stub.instance(&instance_id);
    assert_eq!(inst["failure"]["code"], "signature_mismatch", "{inst}");
    assert_ne!(inst["status"], "running", "{inst}");
    assert!(!serial.contains("switch_root: freed"), "{serial}");
    assert!(
        !serial.contains("agent mode in the composed root"),
        "{serial}"
    );
}
