//! VM tier: the real Debian 6.12 cloud kernel boots our static init under QEMU
//! (TCG here, KVM where it works). Ignored unless `POWERNODE_VM_TESTS=1` is set at
//! build time (see `build.rs`); each test keeps `serial.log` and `qemu-command.sh`
//! under `target/vm-tests/<test>/`.

use std::time::Duration;

use powernode_tests::direct::*;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn real_kernel_boots_init_loads_modules_and_reads_fw_cfg_identity() {
    let dir = test_dir("fw_cfg_identity");
    let image = netboot(&dir);
    let mut spec = poweroff_spec(&dir, &image, &["powernode.test_poweroff=1"]);
    with_identity(&mut spec, &dir, &identity_json("inst-vm-fwcfg"));
    let disk = dir.join("persist.img");
    powernode_qemu::make_persist_disk(&disk, 64).unwrap();
    spec.devices
        .push(powernode_qemu::Device::PersistDisk { path: disk });
    let (boot, events, context) = boot_clean(&spec, DEADLINE);
    let found = event(&events, "phase", "identity_found")
        .unwrap_or_else(|| panic!("no identity_found event\n{}", context));
    assert_eq!(found["source"], "fw_cfg");
    assert_eq!(found["instance_id"], "inst-vm-fwcfg");
    assert_eq!(found["node_id"], "node-vm-test");

    // DHCP against QEMU's user-mode network: the guest reaches the host at 10.0.2.2.
    let net = event(&events, "phase", "network_up")
        .unwrap_or_else(|| panic!("no network_up event\n{}", context));
    assert_eq!(net["network"]["source"], "dhcp");
    assert_eq!(net["network"]["address"], "10.0.2.15");
    assert_eq!(net["network"]["gateway"], "10.0.2.2");
    assert_eq!(net["network"]["dns"][0], "10.0.2.3");

    let done = event(&events, "event", "init_done")
        .unwrap_or_else(|| panic!("no init_done event\n{}", context));
    let loaded: Vec<&str> = done["modules_loaded"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    // This VM has every device the drivers serve (fw_cfg, NIC, disk, RNG): each
    // driver and its dependencies are loaded; the composefs filesystems wait for a
    // mount (no module is mounted in this boot).
    let entries = image
        .manifest
        .load_order
        .iter()
        .map(|l| {
            powernode_init::modules::parse_load_order(l)
                .unwrap()
                .remove(0)
        })
        .collect::<Vec<_>>();
    for module in [
        "qemu_fw_cfg",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_blk",
        "virtio_rng",
    ] {
        assert!(loaded.contains(&module), "{module} not loaded: {loaded:?}");
    }
    for module in ["erofs", "overlay", "loop", "libcrc32c"] {
        assert!(
            entries
                .iter()
                .any(|e| e.name == module && e.when == powernode_init::modules::When::Demand),
            "{module} is not on demand: {entries:?}"
        );
        assert!(
            !loaded.contains(&module),
            "{module} loaded at boot: {loaded:?}"
        );
    }
    // The timeline is in boot order and the kernel agrees the modules are in.
    let at: Vec<u64> = done["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    assert!(boot.serial.contains("reboot: Power down"), "{}", context);
    // virtio_blk (loaded by the init) found the /persist disk.
    assert!(
        boot.serial.contains("[vda] 131072 512-byte logical blocks"),
        "{}",
        context
    );
    assert!(!boot.serial.contains("Kernel panic"), "{}", context);
    eprintln!(
        "booted in {:?} ({}); timeline {}",
        boot.elapsed,
        if spec.accel == powernode_qemu::Accel::Tcg {
            "TCG"
        } else {
            "KVM"
        },
        done["timeline"]
    );
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn bad_fw_cfg_identity_fails_naming_the_field_and_powers_off() {
    let dir = test_dir("bad_identity");
    let mut spec = netboot_spec(&dir, &[]);
    let bad = identity_json("inst-bad").replace("\"bootstrap_token\"", "\"bootstrap_tokn\"");
    with_identity(&mut spec, &dir, &bad);
    let boot = boot(&spec, DEADLINE);
    let events = events(&boot.serial, "POWERNODE-INIT ");
    let failed = event(&events, "event", "phase_failed")
        .unwrap_or_else(|| panic!("no phase_failed event; command: {}", boot.command));
    assert_eq!(failed["phase"], "identity");
    assert_eq!(failed["code"], "identity_invalid");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("fw_cfg") && error.contains("bootstrap_token"),
        "{error}"
    );
    assert!(event(&events, "event", "init_done").is_none());
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_panic_in_pid1_is_logged_and_the_policy_powers_off() {
    let dir = test_dir("panic_hook");
    let spec = netboot_spec(&dir, &["powernode.test_panic=1"]);
    let boot = boot(&spec, DEADLINE);
    let events = events(&boot.serial, "POWERNODE-INIT ");
    let panic = event(&events, "event", "panic")
        .unwrap_or_else(|| panic!("no panic event; command: {}", boot.command));
    assert_eq!(panic["on_failure"], "poweroff");
    assert!(panic["message"].as_str().unwrap().contains("test_panic"));
    // The hook powered off cleanly: no "attempted to kill init" kernel panic.
    assert!(
        boot.serial.contains("reboot: Power down"),
        "{}",
        boot.command
    );
    assert!(
        !boot.serial.contains("Attempted to kill init"),
        "{}",
        boot.command
    );
}

/// switch_root on the real kernel: the init moves into a tmpfs root holding a copy
/// of itself, frees the initramfs, and the copy reports from inside the new root.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn switch_root_leaves_the_initramfs() {
    let dir = test_dir("switch_root");
    let mut spec = netboot_spec(&dir, &["powernode.test_switch_root=1"]);
    with_identity(&mut spec, &dir, &identity_json("inst-switch"));
    let (boot, events, context) = boot_clean(&spec, DEADLINE);
    let after = event(&events, "event", "switched_root")
        .unwrap_or_else(|| panic!("no switched_root event\n{}", context));
    assert_eq!(after["pid"], 1, "the new root's init is PID 1");
    let root = after["root_mount"].as_str().unwrap();
    assert!(root.starts_with("tmpfs / tmpfs"), "root mount: {root}");
    assert_eq!(after["initramfs_init_present"], false);
    assert_eq!(after["initramfs_load_order_present"], false);
    assert_eq!(after["proc_mounted"], true, "/proc moved along");
    assert!(boot.serial.contains("switch_root: freed"), "{}", context);
    assert!(boot.serial.contains("reboot: Power down"), "{}", context);
}
