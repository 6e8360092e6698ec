//! VM tier: a composed root whose init cannot be handed to is refused before the
//! switch, and the control plane hears why with a recovery, never a kernel panic or
//! a silent hang. Busybox roots stand in for broken distribution roots (a Debian
//! root takes minutes to compose under TCG; `tests/tests/vm_debian.rs` boots one):
//! 1. `/sbin/init` a link to a missing `/lib/systemd/systemd`: `root_init_invalid`;
//! 2. `/sbin/init` systemd, but no `/lib/modules/<release>` for the running kernel
//!    (the kernel-modules root module was left out of the template):
//!    `kernel_modules_missing`, naming the release and the `kernel-modules` step.
//!
//! Both are asserted from get-instance and recent-signals. Ignored unless built with
//! `POWERNODE_VM_TESTS=1`; artefacts in `target/vm-tests/<test>/`.

use std::time::Duration;

use powernode_qemu::Vm;
use powernode_tests::direct::stub::Stub;
use powernode_tests::direct::*;
use serde_json::Value;

const TO_EXIT: Duration = Duration::from_secs(180);

/// Publishes `root` as the template's only root module, boots a node on it with
/// `on_failure=poweroff`, waits for QEMU to exit, and returns the instance.
fn boot_refused(test: &str, root: &std::path::Path) -> Value {
    let dir = test_dir(test);
    let stub = Stub::start(&dir);
    stub.publish_module(root, "base", "1.0.0", "root");
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    let (instance_id, doc) = stub.provision(&test.replace('_', "-"));
    let mut spec = netboot_spec(&dir, &["powernode.attempts=1"]);
    with_identity(&mut spec, &dir, &doc.to_string());
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let exit = vm.wait_timeout(TO_EXIT).expect("wait for QEMU");
    assert!(
        matches!(exit, Some(s) if s.success()),
        "QEMU did not power off: {exit:?}\n{}",
        vm_context(&vm, Some(stub.log()))()
    );
    let inst = stub.instance(&instance_id);
    let failed = stub
        .signals(&instance_id)
        .into_iter()
        .find(|s| s["kind"] == "bootstrap.failed")
        .unwrap_or_else(|| panic!("no bootstrap.failed signal for {inst}"));
    assert_eq!(
        failed["detail"]["code"], inst["failure"]["code"],
        "{failed}"
    );
    inst
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_root_whose_init_links_to_nothing_is_refused_with_a_recovery() {
    let dir = test_dir("root_init_dangling_src");
    let root = rootfs::busybox_root(&dir, "1");
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::os::unix::fs::symlink("/lib/systemd/systemd", root.join("sbin/init")).unwrap();
    let inst = boot_refused("root_init_dangling", &root);
    let failure = &inst["failure"];
    assert_eq!(failure["code"], "root_init_invalid", "{inst}");
    assert_eq!(failure["phase"], "root_mounted", "{inst}");
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(message.contains("/sbin/init"), "{message}");
    let recovery = failure["recovery"].as_str().unwrap_or_default();
    assert!(recovery.contains("set-template-modules"), "{inst}");
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_systemd_root_without_the_kernels_modules_is_refused_naming_the_release() {
    let dir = test_dir("root_init_no_kmods_src");
    let root = rootfs::busybox_root(&dir, "1");
    // systemd in name: what the init looks for; never run (refused first).
    std::fs::create_dir_all(root.join("lib/systemd")).unwrap();
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::copy(rootfs::busybox(), root.join("lib/systemd/systemd")).unwrap();
    std::os::unix::fs::symlink("/lib/systemd/systemd", root.join("sbin/init")).unwrap();
    let inst = boot_refused("root_init_no_kmods", &root);
    let failure = &inst["failure"];
    assert_eq!(failure["code"], "kernel_modules_missing", "{inst}");
    assert_eq!(failure["phase"], "root_mounted", "{inst}");
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(message.contains("+deb13-cloud-amd64"), "{message}");
    let recovery = failure["recovery"].as_str().unwrap_or_default();
    assert!(recovery.contains("kernel-modules"), "{inst}");
}
