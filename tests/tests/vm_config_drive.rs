//! VM tier: an OpenStack config drive for real. The netbooted node has no identity on
//! its command line or in fw_cfg; a read-only virtio disk carries a VFAT filesystem
//! labelled `config-2` with `openstack/latest/{meta_data.json,user_data,
//! network_data.json}` (what Nova writes with `config_drive_format=vfat`). The init
//! finds it after DHCP, loads the filesystem modules it ships on demand (the kernel
//! has no `modprobe` in the initramfs), mounts it read-only, enrolls with the identity
//! from `user_data`, and reports the drive's instance uuid and zone. Asserted from the
//! server's API only. The disk is not `/persist` (no `powernode.persist=`): the node
//! stays ephemeral and never mounts it read-write.

use std::time::Duration;

use powernode_qemu::{Device, Vm};
use powernode_tests::direct::stub::Stub;
use powernode_tests::direct::*;

const TO_RUNNING: Duration = Duration::from_secs(120);
const TO_EXIT: Duration = Duration::from_secs(60);
const UUID: &str = "6e1c9b57-0d2a-4c6e-9a3e-5c1f2b7d8e90";
const ZONE: &str = "nova-az1";

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn openstack_config_drive_on_vfat_gives_the_identity() {
    let dir = test_dir("config_drive");
    let stub = Stub::start(&dir);
    let (instance_id, doc) = stub.provision("config-drive-1");
    let meta = serde_json::json!({
        "uuid": UUID,
        "availability_zone": ZONE,
        "hostname": "config-drive-1",
        "name": "config-drive-1",
    })
    .to_string();
    let network = serde_json::json!({"links": [], "networks": [], "services": []}).to_string();
    let user_data = doc.to_string();
    let drive = powernode_initramfs::disk::fat_volume(
        16 << 20,
        0x2c0f_1e2d,
        *b"CONFIG-2   ",
        &[
            ("openstack/latest/meta_data.json", meta.as_bytes()),
            ("openstack/latest/user_data", user_data.as_bytes()),
            ("openstack/latest/network_data.json", network.as_bytes()),
        ],
    )
    .expect("building the config drive");
    let drive_path = dir.join("config-drive.img");
    std::fs::write(&drive_path, drive).unwrap();

    let mut spec = netboot_spec(&dir, &["powernode.attempts=3"]);
    spec.devices.push(Device::DataDisk {
        path: drive_path,
        id: "config2".into(),
    });
    let mut vm = Vm::spawn(&spec).expect("spawn QEMU");
    let context = vm_context(&vm, Some(stub.log()));
    let explain = || format!("instance: {}\n{}", stub.instance(&instance_id), context());
    let running = wait_until("status running", TO_RUNNING, &mut vm, &explain, || {
        let inst = stub.instance(&instance_id);
        assert_ne!(inst["status"], "failed", "{}", explain());
        (inst["status"] == "running").then_some(inst)
    });
    assert_eq!(running["identity_source"], "openstack", "{running}");
    let facts = &running["provider_facts"];
    assert_eq!(facts["provider"], "openstack", "{running}");
    assert_eq!(facts["instance_id"], UUID, "{running}");
    assert_eq!(facts["region"], ZONE, "{running}");
    // Reaching `running` also shows the drive (vda) was not taken for /persist: the
    // init used to mount whatever vda was as ext4, which a VFAT drive refuses.
    assert_identity_found_after_network(&running);

    stub.terminate(&instance_id, true, &mut vm, TO_EXIT, &context);
}
