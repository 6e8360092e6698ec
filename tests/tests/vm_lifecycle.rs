//! VM end-to-end: the runbook against `powernode-stub serve --provider real`. The
//! server boots a real QEMU VM (Debian cloud kernel, our initramfs, identity by
//! fw_cfg); the node enrolls over user networking and reaches `running`; then it is
//! drained and terminated, and the QEMU process must be gone.
//!
//! Ignored unless built with `POWERNODE_VM_TESTS=1` (it builds the musl init and the image,
//! and boots under TCG). The VM's serial log and QEMU command line are copied to
//! `target/vm-tests/<test>/`, and the command is printed when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use powernode_tests::vm::{build_image, events, qemu_alive, vm_test, RealServer};
use powernode_tests::{proto::paths, str_at, test_dir, wait_for};
use serde_json::{json, Value};

fn run(name: &str, lifecycle: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let t0 = Instant::now();
    let image = build_image(&out.join("build"))?;
    let data = test_dir(name)?.join("data");
    let mut rs = RealServer::start(&data, &image, &[])?;
    let server = rs.server.as_ref().context("server")?;
    let pubs = server.cli(&["list-disk-image-publications"])?;
    ensure!(
        pubs["publications"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "the image folder was not published: {pubs}"
    );

    let node = server.post(
        paths::ADMIN_NODES,
        &json!({"hostname": format!("vm-{lifecycle}"), "lifecycle_class": lifecycle}),
    )?;
    let node_id = str_at(&node, "/node/id")?;
    let t_prov = Instant::now();
    let prov = server.post(&paths::admin_provision(&node_id), &json!({}))?;
    let inst = str_at(&prov, "/instance/id")?;
    // A slow start (KVM canary, loaded host) answers `pending` and boots on.
    let started = wait_for("the VM to start", Duration::from_secs(60), || {
        let i = server.instance(&inst)?;
        if i["status"] == "failed" {
            bail!("provisioning failed: {}", i["failure"]);
        }
        Ok(events(server, &inst)?
            .into_iter()
            .find(|e| e["kind"] == "provider.provision"))
    })?;
    let pid = started["detail"]["pid"].as_u64().context("no VM pid")? as u32;
    rs.qemu_pid = Some(pid);
    let instance_dir = PathBuf::from(
        started["detail"]["instance_dir"]
            .as_str()
            .context("no instance_dir")?,
    );
    *vm_dir = Some(instance_dir.clone());
    ensure!(qemu_alive(pid), "QEMU pid {pid} is not running");
    if lifecycle == "persistent" {
        ensure!(
            instance_dir.join("persist.img").exists(),
            "no persist disk in {}",
            instance_dir.display()
        );
    }
    wait_for("the serial log", Duration::from_secs(30), || {
        Ok(std::fs::metadata(instance_dir.join("serial.log"))
            .ok()
            .filter(|m| m.len() > 0))
    })?;

    let running = wait_for("running", Duration::from_secs(120), || {
        let i = server.instance(&inst)?;
        match i["status"].as_str() {
            Some("running") => Ok(Some(i)),
            Some("failed") => bail!("instance failed: {}", i["failure"]),
            _ => Ok(None),
        }
    })?;
    let to_running = t_prov.elapsed();
    println!("{name}: provision -> running in {to_running:?}");
    println!("{name}: boot timeline (ms since kernel start):");
    let timeline = running["boot_timeline"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for p in &timeline {
        println!(
            "  {:<16} {:>6}",
            p["phase"].as_str().unwrap_or("?"),
            p["at_ms"]
        );
    }
    for phase in [
        "kernel_start",
        "init_start",
        "network_up",
        "enrolled",
        "ready",
    ] {
        ensure!(
            timeline.iter().any(|p| p["phase"] == phase),
            "phase {phase} missing from the timeline {timeline:?}"
        );
    }
    ensure!(
        running["identity_source"] == "fw_cfg",
        "identity source: {}",
        running["identity_source"]
    );

    // Drain, then terminate.
    let drain = server.post(
        &paths::admin_drain(&inst),
        &json!({"timeout_seconds": 60, "cordon_only": false}),
    )?;
    let drain_task = str_at(&drain, "/task_id")?;
    wait_for("the drain", Duration::from_secs(60), || {
        let t = server.task(&drain_task)?;
        match t["status"].as_str() {
            Some("succeeded") => Ok(Some(())),
            Some("failed" | "cancelled") => bail!("drain ended {t}"),
            _ => Ok(None),
        }
    })?;
    let term = server.post(&paths::admin_terminate(&inst), &json!({"force": false}))?;
    ensure!(term["status"] == "terminated", "{term}");
    ensure!(
        !qemu_alive(pid),
        "QEMU pid {pid} survived terminate-instance"
    );
    let done = server.instance(&inst)?;
    ensure!(done["status"] == "terminated", "{done}");
    let evs = events(server, &inst)?;
    let revoked: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "credentials.revoked")
        .collect();
    ensure!(
        revoked.iter().any(|e| e["detail"]["certificates"]
            .as_array()
            .is_some_and(|c| !c.is_empty())),
        "no certificate revoked: {evs:?}"
    );
    ensure!(
        !evs.iter().any(|e| e["kind"] == "vm.exited"),
        "the VM was destroyed, not exited on its own: {evs:?}"
    );
    println!("{name}: whole test {:?}", t0.elapsed());
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn ephemeral_vm_boots_to_running_drains_and_terminates() {
    let name = "vm_lifecycle_ephemeral";
    vm_test(name, |out, vm_dir| run(name, "ephemeral", out, vm_dir));
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn persistent_vm_boots_with_its_persist_disk_and_terminates() {
    let name = "vm_lifecycle_persistent";
    vm_test(name, |out, vm_dir| run(name, "persistent", out, vm_dir));
}

/// With `--provider real` the server owns the VM: a QEMU killed behind its back is
/// noticed by the exit watcher, and the instance fails with `provider_failed` and the
/// last console lines, as get-instance and the events say (no console reading).
fn run_killed(name: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let image = build_image(&out.join("build"))?;
    let data = test_dir(name)?.join("data");
    let mut rs = RealServer::start(&data, &image, &[])?;
    let server = rs.server.as_ref().context("server")?;
    let (_node, inst) = server.create_and_provision("vm-killed")?;
    let started = wait_for("the VM to start", Duration::from_secs(60), || {
        Ok(events(server, &inst)?
            .into_iter()
            .find(|e| e["kind"] == "provider.provision"))
    })?;
    let pid = started["detail"]["pid"].as_u64().context("no VM pid")? as u32;
    rs.qemu_pid = Some(pid);
    *vm_dir = started["detail"]["instance_dir"]
        .as_str()
        .map(PathBuf::from);
    wait_for("running", Duration::from_secs(120), || {
        let i = server.instance(&inst)?;
        match i["status"].as_str() {
            Some("running") => Ok(Some(i)),
            Some("failed") => bail!("instance failed: {}", i["failure"]),
            _ => Ok(None),
        }
    })?;
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -KILL {pid}");
    let t = Instant::now();
    let failed = wait_for("failed", Duration::from_secs(20), || {
        let i = server.instance(&inst)?;
        Ok((i["status"] == "failed").then_some(i))
    })?;
    println!(
        "{name}: the server failed the instance {:?} after the kill",
        t.elapsed()
    );
    ensure!(
        failed["failure"]["code"] == "provider_failed",
        "{}",
        failed["failure"]
    );
    let msg = failed["failure"]["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("exited on its own") && msg.contains(&pid.to_string()),
        "{msg}"
    );
    let evs = events(server, &inst)?;
    ensure!(
        evs.iter()
            .any(|e| e["kind"] == "vm.exited" && e["detail"]["pid"] == pid),
        "{evs:?}"
    );
    let a = server.cli(&["attribute-failure", &inst, "--lookback-hours", "1"])?;
    ensure!(
        a["failure"]["source"] == "failure_report" && a["failure"]["code"] == "provider_failed",
        "{a}"
    );
    // A failed instance is terminated without --force; its credentials go.
    let term = server.post(&paths::admin_terminate(&inst), &json!({"force": false}))?;
    ensure!(term["status"] == "terminated", "{term}");
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn real_vm_killed_behind_the_servers_back_fails_with_the_reason() {
    let name = "vm_lifecycle_killed";
    vm_test(name, |out, vm_dir| run_killed(name, out, vm_dir));
}
