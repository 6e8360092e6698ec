//! VM tier, the server's real provider across the two events that used to end a
//! node: the guest's reboot and the server's death.
//!
//! 1. `reboot-instance` on a persistent node: QEMU resets the guest in place, the
//!    same instance comes back `running` on the same QEMU process, disk and
//!    identity: it never enrolls again (its credentials are on `/persist`), the
//!    reboot task succeeds, the server records `vm.rebooted`.
//!    A reset the guest did not ask for (QMP `system_reset`, a hardware reset or
//!    watchdog) brings it back too.
//! 2. SIGKILL the server with a running VM and start it again on the same data
//!    directory and port: the VM was never the server's to lose. The instance stays
//!    `running`, heartbeats keep arriving, the new server adopted the VM
//!    (`vm.adopted`, no `vm.lost`) and watches it: a reboot is seen through it, and
//!    terminate kills its QEMU.
//! 3. A guest that panics at every boot (`powernode.test_panic=1`, the init's
//!    `on_failure=reboot`) resets in place each time; the sixth reset within 10
//!    minutes is a reboot loop: the VM is destroyed and the instance fails.
//!
//! Ignored unless built with `POWERNODE_VM_TESTS=1`; artefacts in
//! `target/vm-tests/<name>/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use powernode_tests::vm::{
    build_image, count_events, events, last_heartbeat, qemu_alive, vm_rebooted, vm_test,
    wait_booted, RealServer,
};
use powernode_tests::{proto::paths, str_at, test_dir, wait_for};
use serde_json::{json, Value};

/// Starts a real-provider server, creates a `class` node and provisions it; returns
/// the instance once `running`, its QEMU pid and folder.
fn boot(
    rs: &mut RealServer,
    name: &str,
    class: &str,
    vm_dir: &mut Option<PathBuf>,
) -> Result<(String, u32, Value)> {
    let server = rs.server()?;
    let node = server.post(
        paths::ADMIN_NODES,
        &json!({"hostname": name.replace('_', "-"), "lifecycle_class": class}),
    )?;
    let node_id = str_at(&node, "/node/id")?;
    let prov = server.post(&paths::admin_provision(&node_id), &json!({}))?;
    let inst = str_at(&prov, "/instance/id")?;
    let (pid, dir) = rs.vm_started(&inst, 0)?;
    *vm_dir = Some(dir);
    let t = Instant::now();
    let running = wait_booted(rs.server()?, &inst, &Value::Null)?;
    println!("{name}: provision -> running in {:?}", t.elapsed());
    Ok((inst, pid, running))
}

fn run_reboot(name: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let image = build_image(&out.join("build"))?;
    let data = test_dir(name)?.join("data");
    let mut rs = RealServer::start(&data, &image, &[])?;
    let (inst, pid, first) = boot(&mut rs, name, "persistent", vm_dir)?;
    let server = rs.server()?;
    ensure!(count_events(server, &inst, "instance.enrolled")? == 1);

    let t = Instant::now();
    let r = server.cli(&["reboot-instance", &inst, "--drain-timeout-seconds", "30"])?;
    let task = str_at(&r, "/task_id")?;
    let reset = vm_rebooted(server, &inst, 0)?;
    let again = wait_booted(server, &inst, &first["boot_timeline"])?;
    println!(
        "{name}: reboot-instance -> running again in {:?}",
        t.elapsed()
    );
    let t = server.task(&task)?;
    ensure!(t["status"] == "succeeded", "the reboot task: {t}");
    // The same instance, on the same QEMU process: the machine was reset, not
    // replaced.
    ensure!(again["id"] == inst.as_str(), "{again}");
    ensure!(qemu_alive(pid), "QEMU pid {pid} is gone after the reboot");
    let d = &reset["detail"];
    ensure!(d["pid"] == pid, "{reset}");
    ensure!(
        d["reason"] == "guest-reset" && d["by_guest"] == true,
        "{reset}"
    );
    ensure!(d["reboot_task"] == true, "{reset}");
    // The same disk: the node came back with the credentials it kept on /persist,
    // so it never enrolled again; nothing ended.
    ensure!(count_events(server, &inst, "instance.enrolled")? == 1);
    ensure!(count_events(server, &inst, "instance.re_enrolled")? == 0);
    for kind in ["vm.exited", "vm.lost", "provider.provision"] {
        let n = count_events(server, &inst, kind)?;
        ensure!(
            n == usize::from(kind == "provider.provision"),
            "{n} {kind} events"
        );
    }
    ensure!(
        again["identity_source"] == "fw_cfg",
        "{}",
        again["identity_source"]
    );

    // A reset nobody inside asked for: the host's (QMP `system_reset`).
    let qmp = std::env::temp_dir().join(format!("powernode-qmp-{inst}.sock"));
    powernode_qemu::qmp::execute(&qmp, "system_reset", Duration::from_secs(5))
        .with_context(|| format!("system_reset on {}", qmp.display()))?;
    let t = Instant::now();
    let reset = vm_rebooted(server, &inst, 1)?;
    let d = &reset["detail"];
    ensure!(
        d["reason"] == "host-qmp-system-reset" && d["by_guest"] == false && d["pid"] == pid,
        "{reset}"
    );
    wait_booted(server, &inst, &again["boot_timeline"])?;
    println!("{name}: system_reset -> running again in {:?}", t.elapsed());
    ensure!(qemu_alive(pid));
    ensure!(count_events(server, &inst, "instance.enrolled")? == 1);
    for kind in ["vm.exited", "vm.lost"] {
        ensure!(count_events(server, &inst, kind)? == 0, "a {kind} event");
    }
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn reboot_instance_resets_the_real_providers_vm_in_place_and_the_node_comes_back() {
    let name = "vm_provider_reboot";
    vm_test(name, |out, vm_dir| run_reboot(name, out, vm_dir));
}

fn run_adopt(name: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let image = build_image(&out.join("build"))?;
    let data = test_dir(name)?.join("data");
    let mut rs = RealServer::start(&data, &image, &[])?;
    let (inst, pid, first) = boot(&mut rs, name, "ephemeral", vm_dir)?;
    let before = last_heartbeat(rs.server()?, &inst)?;

    let t = Instant::now();
    rs.kill_and_restart()?;
    println!(
        "{name}: server SIGKILLed and started again in {:?}",
        t.elapsed()
    );
    let server = rs.server()?;
    let i = server.instance(&inst)?;
    ensure!(i["status"] == "running", "after the restart: {i}");
    ensure!(qemu_alive(pid), "QEMU pid {pid} died with the server");
    let adopted: Vec<Value> = events(server, &inst)?
        .into_iter()
        .filter(|e| e["kind"] == "vm.adopted")
        .collect();
    ensure!(
        adopted.len() == 1 && adopted[0]["detail"]["pid"] == pid,
        "{adopted:?}"
    );
    let t = Instant::now();
    let after = wait_for(
        "a heartbeat to the new server",
        Duration::from_secs(60),
        || {
            let hb = last_heartbeat(server, &inst)?;
            Ok((hb > before).then_some(hb))
        },
    )?;
    println!(
        "{name}: first heartbeat to the new server {:?} after it started ({before} -> {after})",
        t.elapsed()
    );
    ensure!(count_events(server, &inst, "vm.lost")? == 0);
    ensure!(server.instance(&inst)?["status"] == "running");

    // The adopted VM is watched as before: its reboot is seen (QMP), the node
    // comes back (ephemeral: it enrolls again with its token), and terminate kills it.
    let r = server.cli(&["reboot-instance", &inst, "--drain-timeout-seconds", "30"])?;
    let task = str_at(&r, "/task_id")?;
    let reset = vm_rebooted(server, &inst, 0)?;
    ensure!(reset["detail"]["pid"] == pid, "{reset}");
    wait_booted(server, &inst, &first["boot_timeline"])?;
    let t = server.task(&task)?;
    ensure!(t["status"] == "succeeded", "the reboot task: {t}");
    ensure!(qemu_alive(pid));

    let term = server.post(&paths::admin_terminate(&inst), &json!({"force": true}))?;
    ensure!(term["status"] == "terminated", "{term}");
    ensure!(
        !qemu_alive(pid),
        "QEMU pid {pid} survived terminate-instance"
    );
    for kind in ["vm.exited", "vm.lost"] {
        ensure!(count_events(server, &inst, kind)? == 0, "a {kind} event");
    }
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_running_vm_outlives_a_killed_server_and_the_restarted_one_adopts_it() {
    let name = "vm_provider_adopt";
    vm_test(name, |out, vm_dir| run_adopt(name, out, vm_dir));
}

fn run_panic(name: &str, out: &Path, vm_dir: &mut Option<PathBuf>) -> Result<()> {
    let image = build_image(&out.join("build"))?;
    let data = test_dir(name)?.join("data");
    let append = [(
        "POWERNODE_VM_APPEND",
        "powernode.test_panic=1 powernode.on_failure=reboot",
    )];
    let mut rs = RealServer::start_env(&data, &image, &[], &append)?;
    let server = rs.server()?;
    let node = server.post(
        paths::ADMIN_NODES,
        &json!({"hostname": "vm-panic", "lifecycle_class": "ephemeral"}),
    )?;
    let node_id = str_at(&node, "/node/id")?;
    let prov = server.post(&paths::admin_provision(&node_id), &json!({}))?;
    let inst = str_at(&prov, "/instance/id")?;
    let (pid, dir) = rs.vm_started(&inst, 0)?;
    *vm_dir = Some(dir);
    let server = rs.server()?;
    let t = Instant::now();
    // Six boots under TCG: a loaded host has taken 95 s (one boot stalled ~40 s).
    let failed = wait_for("the reboot loop stopped", Duration::from_secs(400), || {
        let i = server.instance(&inst)?;
        Ok((i["status"] == "failed").then_some(i))
    })?;
    println!(
        "{name}: 6 panics and resets, failed after {:?}",
        t.elapsed()
    );
    let msg = failed["failure"]["message"].as_str().unwrap_or_default();
    ensure!(
        failed["failure"]["code"] == "provider_failed" && msg.contains("reboot loop"),
        "{}",
        failed["failure"]
    );
    let resets: Vec<Value> = events(server, &inst)?
        .into_iter()
        .filter(|e| e["kind"] == "vm.rebooted")
        .collect();
    ensure!(resets.len() == 6, "{} resets: {resets:?}", resets.len());
    ensure!(
        resets.iter().all(|e| e["detail"]["pid"] == pid
            && e["detail"]["by_guest"] == true
            && e["detail"]["reason"] == "guest-reset"),
        "{resets:?}"
    );
    ensure!(
        !qemu_alive(pid),
        "the looping VM (QEMU pid {pid}) is still running"
    );
    ensure!(count_events(server, &inst, "vm.exited")? == 0);
    Ok(())
}

#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_guest_that_panics_at_every_boot_resets_in_place_until_the_loop_is_stopped() {
    let name = "vm_provider_panic";
    vm_test(name, |out, vm_dir| run_panic(name, out, vm_dir));
}
