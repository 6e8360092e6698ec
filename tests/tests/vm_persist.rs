//! VM tier: a persistent node. Its `/persist` disk (ext4 with the verity feature)
//! holds the agent's state, the object store (fs-verity enabled on every object,
//! the root overlay mounted with `verity=require`) and the root's upper layer.
//!
//! One test, three boots on one disk:
//! 1. the node pulls its root module into the store on `/persist` and runs;
//! 2. with the module set unchanged it adds no object (only the signed manifest is
//!    fetched again, to re-check its signature) and runs again;
//! 3. after one byte of the busybox object is flipped in the disk image from the
//!    host, the kernel refuses the read (fs-verity `EIO`) and the failure reaches the
//!    server as `verity_mismatch` in phase `root_mounted`, naming the file; the init
//!    moves the corrupt object out of the store;
//! 4. the next boot fetches exactly that object again and runs; it is terminated.
//!
//! Boots 3 and 4 end in a normal power-off: boot 3 from the initramfs (the failure
//! policy), boot 4 from agent mode in the composed root (terminate). After each, the
//! ext4 image must be clean as read from the host (`dumpe2fs -h`, read-only: state
//! `clean`, no `needs_recovery`): PID 1 made `/persist` read-only or unmounted it
//! before `reboot(2)`, so the next boot replays no journal.
//!
//! A second test leaves a writer on `/persist` that escaped its service (`setsid`):
//! PID 1 ends it before the power-off and the disk is still clean.
//!
//! Everything about the node is asserted from get-instance and recent-signals, never
//! from the console (the shutdown checks read the disk image, and the init's
//! `shutdown_mounts` event for its own account). Ignored unless built with `POWERNODE_VM_TESTS=1`; artefacts in
//! `target/vm-tests/persist_verity/`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use powernode_qemu::{Vm, VmSpec};
use powernode_tests::direct::modules::{labels, publish_runtime};
use powernode_tests::direct::stub::{assert_powered_off, Stub};
use powernode_tests::direct::*;
use serde_json::Value;

const TO_RUNNING: Duration = Duration::from_secs(180);
const TO_EXIT: Duration = Duration::from_secs(180);

/// The object's path inside the `/persist` file system: the store lives at
/// `/persist/powernode/store`, objects named by their fs-verity digest (computed
/// here by fsverity-utils, a tool we did not write).
fn object_path_on_disk(content: &Path) -> String {
    let out = run_ok(Command::new("fsverity").arg("digest").arg(content));
    // `sha256:HEX PATH`
    let hex = out
        .split_whitespace()
        .next()
        .and_then(|d| d.strip_prefix("sha256:"))
        .unwrap_or_else(|| panic!("fsverity digest said {out:?}"))
        .to_string();
    format!("/powernode/store/objects/{}/{}", &hex[..2], &hex[2..])
}

/// Replays the journal (the guest was powered off hard), then flips one byte of
/// the first data block of `path` in the ext4 image. Returns the inode flags
/// debugfs reported for the file (fs-verity is `0x100000`).
fn corrupt_object(disk: &Path, path: &str) -> u64 {
    let fsck = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(disk)
        .output()
        .expect("run e2fsck");
    // 0: clean, 1: errors corrected (a replayed journal counts).
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    let stat = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(disk),
    );
    let flags = stat
        .split_whitespace()
        .skip_while(|w| *w != "Flags:")
        .nth(1)
        .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no Flags in debugfs stat {path}:\n{stat}"));
    let blocks = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("blocks {path}"))
            .arg(disk),
    );
    let first: u64 = blocks
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no blocks for {path}: {blocks:?}"));
    let offset = first * 4096 + 777;
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
    eprintln!("flipped the byte at {offset} (block {first}) of {path}");
    flags
}

/// What `dumpe2fs -h` (read-only, the image is never mounted or fixed) says of the
/// image: `Ok(())` when the state is `clean` and the features hold no
/// `needs_recovery`, else the two lines that say otherwise.
fn fs_clean(disk: &Path) -> Result<(), String> {
    let out = run_ok(Command::new("dumpe2fs").arg("-h").arg(disk));
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in dumpe2fs -h:\n{out}"))
    };
    let state = field("Filesystem state:");
    let features = field("Filesystem features:");
    if state == "clean" && !features.split_whitespace().any(|f| f == "needs_recovery") {
        Ok(())
    } else {
        Err(format!("state {state:?}; features {features:?}"))
    }
}

/// The init's `shutdown_mounts` event (how long making `/persist` read-only took).
fn shutdown_event(serial: &str) -> Option<Value> {
    event(
        &events(serial, "POWERNODE-INIT "),
        "event",
        "shutdown_mounts",
    )
    .cloned()
}

fn compose(inst: &Value) -> &Value {
    &inst["root"]["compose"]
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn persistent_root_keeps_its_store_on_persist_and_refuses_a_corrupt_object() {
    let dir = test_dir("persist_verity");
    let stub = Stub::start(&dir);
    let base = rootfs::busybox_root(&dir, "1");
    let busybox_size = std::fs::metadata(base.join("bin/busybox")).unwrap().len();
    let digest = stub.publish_module(&base, "base", "1.0.0", "root");
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    let (instance_id, doc) = stub.provision_class("persist-verity-1", "persistent");
    let image = netboot(&dir);
    let disk = dir.join("persist.img");
    powernode_qemu::make_persist_disk(&disk, 128).unwrap();
    let boot_spec = |name: &str| -> VmSpec {
        node_spec(
            &dir.join(name),
            &image,
            &doc,
            Some(&disk),
            &["powernode.attempts=1"],
        )
    };

    // Boot 1: pull into the store on /persist, fs-verity on every new object.
    let spec1 = boot_spec("boot1");
    let started = Instant::now();
    let mut vm1 = Vm::spawn(&spec1).expect("spawn QEMU");
    let ctx1 = vm_context(&vm1, Some(stub.log()));
    let first = wait_until("first running", TO_RUNNING, &mut vm1, &ctx1, || {
        let i = stub.instance(&instance_id);
        assert_ne!(i["status"], "failed", "{i}");
        (i["status"] == "running" && i["root"]["fstype"] == "overlay").then_some(i)
    });
    let wall1 = started.elapsed();
    let root = &first["root"];
    assert_eq!(root["modules"], serde_json::json!([digest]), "{first}");
    assert_eq!(root["verity"], "require", "{first}");
    assert_eq!(root["store"], "/persist/powernode/store", "{first}");
    assert_eq!(root["upper"], "/persist/powernode/root", "{first}");
    // The kernel's own account of `/` (mountinfo) agrees.
    let options = root["options"].as_str().unwrap_or_default();
    assert!(options.contains("verity=require"), "{options}");
    assert!(
        options.contains("upperdir=/persist/powernode/root/upper"),
        "{options}"
    );
    let c1 = compose(&first).clone();
    assert!(u(&c1["objects_added"]) >= 2, "{c1}");
    assert_eq!(c1["verity_enabled"], c1["objects_added"], "{c1}");
    assert!(u(&c1["bytes_fetched"]) > busybox_size / 4, "{c1}");
    assert_eq!(c1["checked"], serde_json::json!(["/bin/sh"]), "{c1}");
    // The store was synced by the node itself; the credentials reach the image with
    // a journal commit (every 5 s of guest time): waited for, not slept.
    wait_credentials_persisted(&disk, &mut vm1, &ctx1);
    vm1.kill();
    drop(vm1);

    // Boot 2, same disk, same modules: nothing added, only the manifest re-checked.
    let spec2 = boot_spec("boot2");
    let started = Instant::now();
    let mut vm2 = Vm::spawn(&spec2).expect("spawn QEMU");
    let ctx2 = vm_context(&vm2, Some(stub.log()));
    let first_timeline = first["boot_timeline"].clone();
    let second = wait_until("second ready", TO_RUNNING, &mut vm2, &ctx2, || {
        let i = stub.instance(&instance_id);
        (i["phase"] == "ready"
            && i["boot_timeline"] != first_timeline
            && i["root"]["fstype"] == "overlay")
            .then_some(i)
    });
    let wall2 = started.elapsed();
    assert_eq!(second["status"], "running", "{second}");
    let c2 = compose(&second).clone();
    assert_eq!(c2["objects_added"], 0, "{c2}");
    assert_eq!(c2["bytes_added"], 0, "{c2}");
    assert_eq!(c2["verity_enabled"], 0, "{c2}");
    // Manifest + signature only: far below one layer.
    assert!(u(&c2["bytes_fetched"]) < 64 * 1024, "{c2}");
    assert!(
        u(&c2["bytes_fetched"]) * 20 < u(&c1["bytes_fetched"]),
        "{c1} {c2}"
    );
    assert_eq!(second["root"]["verity"], "require", "{second}");
    wait_credentials_persisted(&disk, &mut vm2, &ctx2);
    vm2.kill();
    drop(vm2);
    // A power cut is told apart from a clean power-off: the journal needs replaying.
    let cut = fs_clean(&disk);
    assert!(
        cut.as_ref().is_err_and(|e| e.contains("needs_recovery")),
        "after a hard power loss: {cut:?}"
    );

    // Host: flip one byte of the busybox object in the disk image.
    let object = object_path_on_disk(&base.join("bin/busybox"));
    let flags = corrupt_object(&disk, &object);
    assert_ne!(
        flags & 0x0010_0000,
        0,
        "no fs-verity flag on {object}: {flags:#x}"
    );

    // Boot 3: the kernel refuses the read; the server hears why.
    let spec3 = boot_spec("boot3");
    let mut vm3 = Vm::spawn(&spec3).expect("spawn QEMU");
    let exit = vm3.wait_timeout(TO_EXIT).expect("wait for QEMU");
    assert!(
        matches!(exit, Some(s) if s.success()),
        "QEMU did not power off: {exit:?}; serial: {}",
        spec3.serial_log.display()
    );
    // Read before anything (boot 4, an e2fsck) could clean it. Asserted at the end,
    // beside the agent-mode check, so that one run tells both modes apart.
    let clean3 = fs_clean(&disk);
    let inst = stub.instance(&instance_id);
    let failure = &inst["failure"];
    assert_eq!(failure["code"], "verity_mismatch", "{inst}");
    assert_eq!(failure["phase"], "root_mounted", "{inst}");
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(message.contains("/bin/sh"), "{message}");
    let signals = stub.cli(&["recent-signals", "--instance", &instance_id]);
    let failed = signals["signals"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["kind"] == "bootstrap.failed"))
        .unwrap_or_else(|| panic!("no bootstrap.failed signal: {signals}"));
    assert_eq!(failed["detail"]["code"], "verity_mismatch", "{failed}");
    // The init found the corrupt object and moved it out of the store.
    assert!(message.contains("moved out of the store"), "{message}");

    // Boot 4: the store heals: exactly the corrupt object is fetched and added again.
    let spec4 = boot_spec("boot4");
    let mut vm4 = Vm::spawn(&spec4).expect("spawn QEMU");
    let ctx4 = vm_context(&vm4, Some(stub.log()));
    let second_timeline = second["boot_timeline"].clone();
    let healed = wait_until("healed ready", TO_RUNNING, &mut vm4, &ctx4, || {
        let i = stub.instance(&instance_id);
        (i["phase"] == "ready"
            && i["boot_timeline"] != second_timeline
            && i["root"]["fstype"] == "overlay"
            && compose(&i).is_object())
        .then_some(i)
    });
    let c4 = compose(&healed).clone();
    assert_eq!(c4["objects_added"], 1, "{c4}");
    assert_eq!(u(&c4["bytes_added"]), busybox_size, "{c4}");
    assert_eq!(c4["verity_enabled"], 1, "{c4}");
    assert_eq!(c4["checked"], serde_json::json!(["/bin/sh"]), "{c4}");
    assert_eq!(healed["root"]["verity"], "require", "{healed}");
    // Terminate: agent mode in the composed root powers off by itself.
    let exit = stub.terminate(&instance_id, true, &mut vm4, TO_EXIT, &ctx4);
    assert_powered_off(exit, &ctx4);
    let clean4 = fs_clean(&disk);
    let serial3 = std::fs::read_to_string(&spec3.serial_log).unwrap_or_default();
    let (down3, down4) = (shutdown_event(&serial3), shutdown_event(&vm4.serial()));
    assert!(
        clean3.is_ok() && clean4.is_ok(),
        "/persist not clean after a normal power-off: initramfs mode (boot 3): {clean3:?}; \
         composed root, agent mode (boot 4): {clean4:?}\nshutdown events: {down3:?} {down4:?}\n{}",
        ctx4()
    );
    // The init's own account agrees: nothing left writable, in both modes.
    for down in [&down3, &down4] {
        let down = down
            .as_ref()
            .unwrap_or_else(|| panic!("no shutdown_mounts event"));
        assert_eq!(down["failed"], serde_json::json!([]), "{down}");
    }
    drop(vm4);

    let timeline_at = |inst: &Value, phase: &str| {
        inst["boot_timeline"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["phase"] == phase))
            .map(|e| u(&e["at_ms"]))
    };
    eprintln!(
        "persist_verity figures:\n  boot 1: running after {wall1:?} wall; root_mounted at {:?} ms, \
         ready at {:?} ms; compose {} ms, {} bytes fetched, {} objects ({} bytes) added, \
         fs-verity enabled on {} objects in {} ms\n  boot 2: ready after {wall2:?} wall; \
         root_mounted at {:?} ms, ready at {:?} ms; compose {} ms, {} bytes fetched, {} objects added\n  \
         boot 4 (healed): compose {} ms, {} bytes fetched, {} objects ({} bytes) added\n  \
         shutdown (read-only / unmount before power-off): initramfs mode {}, agent mode {}",
        timeline_at(&first, "root_mounted"),
        timeline_at(&first, "ready"),
        c1["compose_ms"],
        c1["bytes_fetched"],
        c1["objects_added"],
        c1["bytes_added"],
        c1["verity_enabled"],
        c1["verity_enable_ms"],
        timeline_at(&second, "root_mounted"),
        timeline_at(&second, "ready"),
        c2["compose_ms"],
        c2["bytes_fetched"],
        c2["objects_added"],
        c4["compose_ms"],
        c4["bytes_fetched"],
        c4["objects_added"],
        c4["bytes_added"],
        down3.map(|e| e.to_string()).unwrap_or_default(),
        down4.map(|e| e.to_string()).unwrap_or_default(),
    );
}

/// A process that left its service's process group (`setsid`) and keeps a file open
/// for writing on `/persist` outlives the agent's service stop. PID 1 ends it
/// (SIGTERM) before making `/persist` read-only, so the terminated node's disk is
/// still clean. Initramfs mode: `/persist` holds the state and the module store.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_leftover_writer_on_persist_is_ended_and_the_disk_left_clean() {
    let dir = test_dir("persist_leftover_writer");
    let stub = Stub::start(&dir);
    let writer = "exec 3>>/persist/leftover.log; while :; do echo x >&3; sleep 1; done";
    let service = serde_json::json!({"name": "spawner",
        "command": ["/opt/leftover/bin/busybox", "sh", "-c",
                    format!("busybox setsid sh -c '{writer}' & while :; do sleep 1; done")],
        "env": ["PATH=/opt/leftover/bin"], "restart": "always", "stop_timeout_seconds": 3});
    publish_runtime(
        &stub,
        &dir,
        "leftover",
        "1.0.0",
        labels(Some("/opt/leftover"), &[service]),
    );
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "leftover",
    ]);
    let (instance_id, doc) = stub.provision_class("persist-leftover-1", "persistent");
    let image = netboot(&dir);
    let disk = dir.join("persist.img");
    powernode_qemu::make_persist_disk(&disk, 128).unwrap();
    let spec = node_spec(&dir.join("vm"), &image, &doc, Some(&disk), &[]);
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let ctx = vm_context(&vm, Some(stub.log()));
    wait_until("the spawner running", TO_RUNNING, &mut vm, &ctx, || {
        let i = stub.instance(&instance_id);
        assert_ne!(i["status"], "failed", "{i}");
        let running = i["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "spawner" && s["state"] == "running")
        });
        running.then_some(i)
    });
    // Let the writer open its file and write.
    std::thread::sleep(Duration::from_secs(2));
    let exit = stub.terminate(&instance_id, true, &mut vm, TO_EXIT, &ctx);
    assert_powered_off(exit, &ctx);
    let clean = fs_clean(&disk);
    let down = shutdown_event(&vm.serial());
    assert!(
        clean.is_ok(),
        "/persist not clean with a leftover writer: {clean:?}; shutdown event {down:?}\n{}",
        ctx()
    );
    // The init's account: the writer was still there and SIGTERM ended it.
    let down = down.unwrap_or_else(|| panic!("no shutdown_mounts event\n{}", ctx()));
    assert!(
        u(&down["processes"]["terminated"]) >= 1,
        "no leftover process ended: {down}"
    );
    assert_eq!(down["processes"]["left"], false, "{down}");
    assert_eq!(down["failed"], serde_json::json!([]), "{down}");
    eprintln!("persist_leftover_writer: {down}");
}
