//! VM tier, the server's libvirt provider (`serve --provider libvirt`) on a daemon
//! the project's own script starts (`scripts/libvirtd`), through the runbook's
//! path: a persistent node boots as a transient libvirt domain (direct kernel
//! boot, fw_cfg identity, the `/persist` disk) with QEMU running as libvirt's
//! unprivileged user; `reboot-instance` resets it in place (libvirt's `reboot`
//! event) and it comes back on the same disk without enrolling again; the server is
//! SIGKILLed and started again on the same data directory: the instance stays
//! `running`, heartbeats keep flowing, the new server adopted the domain
//! (`vm.adopted`, no `vm.lost`); terminate presses the power button and the domain
//! is gone.
//!
//! Ignored unless built with `POWERNODE_VM_TESTS=1`; artefacts in
//! `target/vm-tests/<name>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use powernode_tests::vm::{
    build_image, count_events, events, last_heartbeat, qemu_alive, vm_rebooted, vm_test,
    wait_booted, Libvirtd, RealServer, LIBVIRT_URI,
};
use powernode_tests::{proto::paths, str_at, test_dir, wait_for};
use serde_json::{json, Value};

fn virsh(args: &[&str]) -> Result<std::process::Output> {
    Command::new("virsh")
        .args(["-q", "-c", LIBVIRT_URI])
        .args(args)
        .output()
        .context("running virsh")
}

/// A folder libvirt's QEMU user can read whatever the checkout's path (a home folder
/// is often closed to other users): the netboot image is built into it, and the
/// server keeps its instance folders there. Dropped: the VM's files (serial log,
/// domain XML, libvirt's QEMU log) are kept in `out`, then it is removed.
struct Staged {
    dir: PathBuf,
    out: PathBuf,
}

impl Staged {
    fn new(out: &Path) -> Result<Self> {
        let dir = PathBuf::from(format!(
            "/var/tmp/powernode-vm-libvirt-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir,
            out: out.to_path_buf(),
        })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.dir.join("build/instances")) {
            for inst in entries.flatten() {
                let id = inst.file_name().to_string_lossy().into_owned();
                for f in ["serial.log", "domain.xml"] {
                    let _ = std::fs::copy(inst.path().join(f), self.out.join(format!("{id}-{f}")));
                }
                let log = format!("/var/log/libvirt/qemu/powernode-{id}.log");
                let _ = std::fs::copy(log, self.out.join(format!("{id}-qemu.log")));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real uid QEMU runs as.
fn uid_of(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no Uid in /proc/PID/status")
}

fn run(name: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let _libvirtd = Libvirtd::ensure()?;
    let staged = Staged::new(out)?;
    let image = build_image(&staged.dir.join("build"))?;
    let data = test_dir(name)?.join("data");
    let mut rs = RealServer::start_provider("libvirt", &data, &image, &[], &[])?;
    let server = rs.server()?;
    let node = server.post(
        paths::ADMIN_NODES,
        &json!({"hostname": "vm-libvirt", "lifecycle_class": "persistent"}),
    )?;
    let node_id = str_at(&node, "/node/id")?;
    let t = Instant::now();
    let prov = server.post(&paths::admin_provision(&node_id), &json!({}))?;
    let inst = str_at(&prov, "/instance/id")?;
    let (pid, dir) = rs.vm_started(&inst, 0)?;
    *vm_dir = Some(dir.clone());
    let domain = format!("powernode-{inst}");
    let server = rs.server()?;
    let first = wait_booted(server, &inst, &Value::Null)?;
    println!("{name}: provision -> running in {:?}", t.elapsed());

    let info = virsh(&["dominfo", &domain])?;
    let info = String::from_utf8_lossy(&info.stdout);
    ensure!(info.contains("running"), "virsh dominfo {domain}: {info}");
    let uid = uid_of(pid)?;
    ensure!(uid != 0, "QEMU pid {pid} runs as root");
    println!("{name}: domain {domain}, QEMU pid {pid} as uid {uid}");
    ensure!(
        first["identity_source"] == "fw_cfg",
        "{}",
        first["identity_source"]
    );
    ensure!(std::fs::read_to_string(dir.join("domain.xml"))?.contains("persist.img"));

    // A reboot task: the domain resets in place and the node comes back on its disk.
    let t = Instant::now();
    let r = server.cli(&["reboot-instance", &inst, "--drain-timeout-seconds", "30"])?;
    let task = str_at(&r, "/task_id")?;
    let reset = vm_rebooted(server, &inst, 0)?;
    let again = wait_booted(server, &inst, &first["boot_timeline"])?;
    println!(
        "{name}: reboot-instance -> running again in {:?}",
        t.elapsed()
    );
    ensure!(server.task(&task)?["status"] == "succeeded");
    ensure!(reset["detail"]["reboot_task"] == true, "{reset}");
    ensure!(reset["detail"]["by_guest"].is_null(), "{reset}");
    ensure!(again["id"] == inst.as_str());
    ensure!(
        count_events(server, &inst, "instance.enrolled")? == 1,
        "enrolled again"
    );
    ensure!(qemu_alive(pid), "QEMU pid {pid} is gone after the reboot");

    // The server dies; the domain does not.
    let before = last_heartbeat(server, &inst)?;
    let t = Instant::now();
    rs.kill_and_restart()?;
    println!(
        "{name}: server SIGKILLed and started again in {:?}",
        t.elapsed()
    );
    let server = rs.server()?;
    let i = server.instance(&inst)?;
    ensure!(i["status"] == "running", "after the restart: {i}");
    let adopted: Vec<Value> = events(server, &inst)?
        .into_iter()
        .filter(|e| e["kind"] == "vm.adopted")
        .collect();
    ensure!(
        adopted.len() == 1 && adopted[0]["detail"]["provider"] == "libvirt",
        "{adopted:?}"
    );
    let t = Instant::now();
    wait_for(
        "a heartbeat to the new server",
        Duration::from_secs(60),
        || {
            let hb = last_heartbeat(server, &inst)?;
            Ok((hb > before).then_some(hb))
        },
    )?;
    println!(
        "{name}: first heartbeat to the new server after {:?}",
        t.elapsed()
    );
    for kind in ["vm.exited", "vm.lost"] {
        ensure!(count_events(server, &inst, kind)? == 0, "a {kind} event");
    }

    // Terminate: the power button (this initramfs-only node does not answer it: up
    // to 40 s), then the domain is gone. Through the CLI, which waits that long.
    let t = Instant::now();
    let term = server.cli(&["terminate-instance", &inst, "--force"])?;
    ensure!(term["status"] == "terminated", "{term}");
    println!("{name}: terminate-instance in {:?}", t.elapsed());
    let gone = virsh(&["dominfo", &domain])?;
    ensure!(!gone.status.success(), "domain {domain} survived terminate");
    ensure!(!qemu_alive(pid), "QEMU pid {pid} survived terminate");
    for kind in ["vm.exited", "vm.lost"] {
        ensure!(count_events(server, &inst, kind)? == 0, "a {kind} event");
    }
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_libvirt_domain_reboots_in_place_and_outlives_a_killed_server() {
    let name = "vm_libvirt";
    vm_test(name, |out, vm_dir| run(name, out, vm_dir));
}
