//! VM tier, runtime (issue 5): live module reconcile, module services, task lease,
//! drain and decommission on real VMs, asserted from the server's API only
//! (get-instance, get-task, drift-report): no console reading.
//!
//! Test modules are OCI image layouts built by `powernode_tests::direct::modules` (a tar layer with a
//! static busybox, an image config whose labels declare the mount point and the
//! services, see `agent/src/modules/config.rs`) and published with `powernode-stub
//! publish-module`. Ignored unless built with `POWERNODE_VM_TESTS=1`; each test keeps
//! `serial.log`, `qemu-command.sh`, `server.log` and the server's data under
//! `target/vm-tests/<test>/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use powernode_qemu::Vm;
use powernode_tests::direct::modules::{labels, publish_runtime, sh_service};
use powernode_tests::direct::stub::{assert_powered_off, Stub};
use powernode_tests::direct::*;
use serde_json::{json, Value};

const TO_RUNNING: Duration = Duration::from_secs(180);
const TO_CHANGE: Duration = Duration::from_secs(90);
const TO_EXIT: Duration = Duration::from_secs(60);

fn task(stub: &Stub, id: &str) -> Value {
    let t = stub.cli(&["get-task", id]);
    t.get("task").cloned().unwrap_or(t)
}

fn task_id(v: &Value) -> String {
    v["task_id"]
        .as_str()
        .or_else(|| v["task"]["id"].as_str())
        .unwrap_or_else(|| panic!("no task id in {v}"))
        .to_string()
}

fn module_digest<'a>(inst: &'a Value, name: &str) -> Option<&'a str> {
    inst["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["digest"]
        .as_str()
}

fn service<'a>(inst: &'a Value, name: &str) -> Option<&'a Value> {
    inst["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// A VM booted against `stub` for a provisioned instance.
struct Node {
    instance_id: String,
    vm: Vm,
    server_log: PathBuf,
}

impl Node {
    fn context(&self) -> impl Fn() -> String {
        vm_context(&self.vm, Some(&self.server_log))
    }

    /// Waits until get-instance satisfies `f`.
    fn wait(
        &mut self,
        stub: &Stub,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let ctx = self.context();
        let id = self.instance_id.clone();
        wait_until(what, timeout, &mut self.vm, &ctx, || {
            let i = stub.instance(&id);
            assert_ne!(i["status"], "failed", "instance failed: {i}\n{}", ctx());
            f(&i).then_some(i)
        })
    }

    /// Waits until the task reaches a final state.
    fn wait_task(&mut self, stub: &Stub, id: &str, timeout: Duration) -> Value {
        let ctx = self.context();
        wait_until(
            &format!("task {id} done"),
            timeout,
            &mut self.vm,
            &ctx,
            || {
                let t = task(stub, id);
                matches!(
                    t["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
                .then_some(t)
            },
        )
    }
}

/// Provisions an instance and boots a VM for it (identity by fw_cfg).
fn boot(stub: &Stub, dir: &Path, hostname: &str, sub: &str) -> Node {
    boot_with(stub, dir, hostname, sub, &[])
}

/// [`boot`] with extra kernel arguments.
fn boot_with(stub: &Stub, dir: &Path, hostname: &str, sub: &str, extra: &[&str]) -> Node {
    let (instance_id, doc) = stub.provision(hostname);
    boot_instance_with(dir, instance_id, &doc, sub, extra)
}

fn boot_instance(dir: &Path, instance_id: String, doc: &Value, sub: &str) -> Node {
    boot_instance_with(dir, instance_id, doc, sub, &[])
}

fn boot_instance_with(
    dir: &Path,
    instance_id: String,
    doc: &Value,
    sub: &str,
    extra: &[&str],
) -> Node {
    let built = netboot(dir);
    let args: Vec<&str> = std::iter::once("powernode.attempts=3")
        .chain(extra.iter().copied())
        .collect();
    let spec = node_spec(&dir.join(sub), &built, doc, None, &args);
    let vm = Vm::spawn(&spec).expect("spawn QEMU");
    Node {
        instance_id,
        vm,
        server_log: dir.join("server.log"),
    }
}

/// Phases 1-6 on ONE VM, the initramfs as root (the init is PID 1 and runs the agent):
/// create + provision + bootstrap to running; a runtime module with a service is
/// attached live (exposed at its mount point), updated (new digest, new process, a
/// crashing service restarted with backoff), diagnostics collected, then detached;
/// drain stops the remaining service; terminate powers the VM off.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn runtime_phases_1_to_6_on_one_vm() {
    let test = "runtime_phases";
    let dir = test_dir(test);
    let stub = Stub::start(&dir);
    // Phases 1-3: nothing desired yet.
    let mut node = boot(&stub, &dir, "runtime-phases-1", "vm");
    let started = Instant::now();
    let running = node.wait(&stub, "status running", TO_RUNNING, |i| {
        i["status"] == "running"
    });
    assert!(
        running["modules"].as_array().is_none_or(Vec::is_empty),
        "{running}"
    );
    let to_running = started.elapsed();

    // Phase 4: attach `demo` (exposed at /opt/demo, service `web` run through the
    // mount point) and `aux` (service `keeper`) live.
    let web = json!({"name": "web",
        "command": ["/opt/demo/bin/busybox", "sh", "-c", "while :; do sleep 1; done"],
        "env": ["PATH=/opt/demo/bin"], "restart": "always", "stop_timeout_seconds": 3});
    let demo1 = publish_runtime(
        &stub,
        &dir,
        "demo",
        "1.0.0",
        labels(Some("/opt/demo"), std::slice::from_ref(&web)),
    );
    let aux1 = publish_runtime(
        &stub,
        &dir,
        "aux",
        "1.0.0",
        labels(
            None,
            &[
                sh_service("keeper", "while :; do sleep 1; done", "on-failure"),
                sh_service("logger", "while :; do sleep 1; done", "on-failure"),
            ],
        ),
    );
    let t = Instant::now();
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "demo",
        "--runtime",
        "aux",
    ]);
    let attached = node.wait(
        &stub,
        "demo and aux attached, services running",
        TO_CHANGE,
        |i| {
            module_digest(i, "demo") == Some(&demo1)
                && module_digest(i, "aux") == Some(&aux1)
                && service(i, "web").is_some_and(|s| s["state"] == "running")
                && service(i, "keeper").is_some_and(|s| s["state"] == "running")
                && service(i, "logger").is_some_and(|s| s["state"] == "running")
        },
    );
    let attach_time = t.elapsed();
    assert_eq!(attached["status"], "running", "{attached}");
    let web_pid = service(&attached, "web").unwrap()["pid"].clone();
    assert!(web_pid.is_u64(), "{attached}");
    let drift = stub.cli(&["drift-report", &node.instance_id]);
    assert_eq!(drift["drift"], false, "drift after attach: {drift}");

    // Update demo live: a new digest, `web` restarted as a new process, and a
    // `crasher` that the supervisor restarts with backoff.
    let demo2 = publish_runtime(
        &stub,
        &dir,
        "demo",
        "2.0.0",
        labels(
            Some("/opt/demo"),
            &[web, sh_service("crasher", "sleep 1; exit 7", "on-failure")],
        ),
    );
    assert_ne!(demo1, demo2);
    let t = Instant::now();
    let updated = node.wait(&stub, "demo updated", TO_CHANGE, |i| {
        module_digest(i, "demo") == Some(&demo2)
            && service(i, "web").is_some_and(|s| s["state"] == "running" && s["pid"] != web_pid)
    });
    let update_time = t.elapsed();
    assert_eq!(
        module_digest(&updated, "aux"),
        Some(aux1.as_str()),
        "{updated}"
    );
    let crashed = node.wait(&stub, "crasher restarted twice", TO_CHANGE, |i| {
        service(i, "crasher").is_some_and(|s| s["restarts"].as_u64().unwrap_or(0) >= 2)
    });
    let crasher = service(&crashed, "crasher").unwrap();
    assert_eq!(crasher["last_exit"], "exit 7", "{crashed}");
    assert_eq!(crasher["module"], "demo", "{crashed}");
    // The keeper of the untouched module kept its process.
    assert_eq!(
        service(&crashed, "keeper").unwrap()["pid"],
        service(&attached, "keeper").unwrap()["pid"],
        "{crashed}"
    );

    // Diagnostics: a bounded result readable from get-task.
    let d = stub.cli(&[
        "collect-diagnostics",
        &node.instance_id,
        "--log-lines",
        "40",
    ]);
    let diag = node.wait_task(&stub, &task_id(&d), TO_CHANGE);
    assert_eq!(diag["status"], "succeeded", "{diag}");
    let r = &diag["result"];
    assert!(
        r["kernel"].as_str().is_some_and(|k| k.starts_with("6.")),
        "{r}"
    );
    assert_eq!(r["agent_version"], running["agent_version"], "{r}");
    let mounts: Vec<&str> = r["mounts"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["target"].as_str()).collect())
        .unwrap_or_default();
    for m in [
        "/run/powernode/modules/demo",
        "/opt/demo",
        "/run/powernode/modules/aux",
    ] {
        assert!(mounts.contains(&m), "{m} not in {mounts:?}");
    }
    assert!(
        r["modules"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["digest"] == demo2.as_str())),
        "{r}"
    );
    let log = r["log"].as_array().map(Vec::len).unwrap_or(0);
    assert!(log > 0 && log <= 40, "{log} log lines: {r}");
    assert!(serde_json::to_vec(r).unwrap().len() <= 64 * 1024);

    // Detach demo: its services stop, its mounts go; aux stays.
    let t = Instant::now();
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--runtime", "aux"]);
    let detached = node.wait(&stub, "demo detached", TO_CHANGE, |i| {
        module_digest(i, "demo").is_none()
            && service(i, "web").is_none()
            && service(i, "crasher").is_none()
            && module_digest(i, "aux").is_some()
    });
    let detach_time = t.elapsed();
    assert_eq!(
        service(&detached, "keeper").unwrap()["state"],
        "running",
        "{detached}"
    );
    let drift = stub.cli(&["drift-report", &node.instance_id]);
    assert_eq!(drift["drift"], false, "drift after detach: {drift}");

    // Phase 5: drain stops the remaining services, in reverse start order.
    let drain = stub.cli(&[
        "drain-instance",
        &node.instance_id,
        "--timeout-seconds",
        "20",
    ]);
    let drain_task = node.wait_task(&stub, &task_id(&drain), TO_CHANGE);
    assert_eq!(drain_task["status"], "succeeded", "{drain_task}");
    assert_eq!(
        drain_task["result"]["services_stopped"],
        json!(["logger", "keeper"]),
        "{drain_task}"
    );
    let drained = node.wait(&stub, "phase drained, services stopped", TO_CHANGE, |i| {
        i["phase"] == "drained"
            && ["keeper", "logger"]
                .iter()
                .all(|n| service(i, n).is_some_and(|s| s["state"] == "stopped"))
    });
    assert_eq!(drained["status"], "draining", "{drained}");
    assert_eq!(drained["cordoned"], true, "{drained}");

    // Phase 6: terminate; the agent is refused and the VM powers off.
    let ctx = node.context();
    let exit = stub.terminate(&node.instance_id, false, &mut node.vm, TO_EXIT, &ctx);
    assert_powered_off(exit, &ctx);
    assert_eq!(stub.instance(&node.instance_id)["status"], "terminated");
    eprintln!(
        "{test}: running after {to_running:?}; attach {attach_time:?}, update {update_time:?}, \
         detach {detach_time:?} (server view, 2 s heartbeats); whole runbook {:?}",
        started.elapsed()
    );
}

/// A service that ignores SIGTERM outlives the drain's --timeout-seconds: the drain
/// task fails with `drain_timeout` naming it, the instance stays `draining` with
/// the stuck signal and its recovery step, and `terminate-instance --force` ends it
/// (the agent kills what is left and the VM powers off).
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_drain_past_its_timeout_stays_draining_until_forced() {
    let dir = test_dir("runtime_drain_stuck");
    let stub = Stub::start(&dir);
    publish_runtime(
        &stub,
        &dir,
        "stubborn",
        "1.0.0",
        labels(
            None,
            &[sh_service(
                "stubborn",
                "trap '' TERM; while :; do sleep 1; done",
                "always",
            )],
        ),
    );
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "stubborn",
    ]);
    let mut node = boot(&stub, &dir, "drain-stuck-1", "vm");
    node.wait(
        &stub,
        "running with the stubborn service",
        TO_RUNNING,
        |i| {
            i["status"] == "running"
                && service(i, "stubborn").is_some_and(|s| s["state"] == "running")
        },
    );
    let drain = stub.cli(&[
        "drain-instance",
        &node.instance_id,
        "--timeout-seconds",
        "4",
    ]);
    let id = task_id(&drain);
    let t = node.wait_task(&stub, &id, TO_CHANGE);
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["result"]["error"], "drain_timeout", "{t}");
    assert_eq!(t["result"]["services_stuck"], json!(["stubborn"]), "{t}");
    // The stuck row follows the task's result; the service's `stopping` state comes
    // with a heartbeat, which may land after it: wait for both.
    let stuck = node.wait(
        &stub,
        "stuck drain_timeout with the service stopping",
        TO_CHANGE,
        |i| {
            i["stuck"]["reason"] == "drain_timeout"
                && service(i, "stubborn").is_some_and(|s| s["state"] == "stopping")
        },
    );
    assert_eq!(stuck["status"], "draining", "{stuck}");
    assert!(
        stuck["stuck"]["recovery"]
            .as_str()
            .is_some_and(|r| r.contains("--force")),
        "{stuck}"
    );
    assert_ne!(stuck["phase"], "drained", "{stuck}");
    // The same row as a signal, with the same recovery step.
    let ctx = node.context();
    let signal = wait_until(
        "the instance.stuck signal",
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            stub.signals(&node.instance_id)
                .into_iter()
                .find(|s| s["kind"] == "instance.stuck" && s["active"] == true)
        },
    );
    assert_eq!(signal["detail"]["reason"], "drain_timeout", "{signal}");
    assert_eq!(
        signal["detail"]["recovery"], stuck["stuck"]["recovery"],
        "{signal}"
    );

    let ctx = node.context();
    let exit = stub.terminate(&node.instance_id, true, &mut node.vm, TO_EXIT, &ctx);
    assert_powered_off(exit, &ctx);
    assert_eq!(stub.instance(&node.instance_id)["status"], "terminated");
}

/// The agent dies mid-task (QEMU killed while a drain waits on a stubborn service):
/// the lease runs out and the server puts the task back to `pending`, as get-task
/// shows, with the first attempt kept.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn a_task_whose_agent_died_is_requeued_when_its_lease_expires() {
    let dir = test_dir("runtime_lease_requeue");
    let stub = Stub::start(&dir);
    publish_runtime(
        &stub,
        &dir,
        "stubborn",
        "1.0.0",
        labels(
            None,
            &[sh_service(
                "stubborn",
                "trap '' TERM; while :; do sleep 1; done",
                "always",
            )],
        ),
    );
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "stubborn",
    ]);
    // A short lease from the kernel command line: renewed every 2 s, requeued soon
    // after the agent dies.
    let mut node = boot_with(
        &stub,
        &dir,
        "lease-requeue-1",
        "vm",
        &[&format!("powernode.lease_s={LEASE_S}")],
    );
    node.wait(
        &stub,
        "running with the stubborn service",
        TO_RUNNING,
        |i| {
            i["status"] == "running"
                && service(i, "stubborn").is_some_and(|s| s["state"] == "running")
        },
    );
    let drain = stub.cli(&[
        "drain-instance",
        &node.instance_id,
        "--timeout-seconds",
        "600",
    ]);
    let id = task_id(&drain);
    let ctx = node.context();
    let leased = wait_until("drain leased", TO_CHANGE, &mut node.vm, &ctx, || {
        let t = task(&stub, &id);
        (t["status"] == "running" && t["lease_expires_at"].is_string()).then_some(t)
    });
    // The agent renews while it waits on the service.
    let renewed = wait_until("lease renewed", TO_CHANGE, &mut node.vm, &ctx, || {
        let t = task(&stub, &id);
        (t["lease_expires_at"] != leased["lease_expires_at"]).then_some(t)
    });
    assert_eq!(renewed["status"], "running", "{renewed}");
    node.vm.kill();
    let killed_at = Instant::now();
    let requeued = poll_until(
        "the task requeued after the agent died",
        Duration::from_secs(120),
        &|| format!("task: {}", task(&stub, &id)),
        || {
            let t = task(&stub, &id);
            (t["status"] == "pending").then_some(t)
        },
    );
    eprintln!(
        "lease_requeue: requeued {:?} after the VM was killed: {requeued}",
        killed_at.elapsed()
    );
    // Requeued because the lease ran out, not cancelled or failed: the dead attempt
    // is kept as history.
    assert_eq!(requeued["attempts"], 1, "{requeued}");
    assert_eq!(
        requeued["history"][0]["outcome"], "lease_expired",
        "{requeued}"
    );
    // The server granted the lease the agent asked for (the command line's), by its
    // own timestamps: first lease at `leased_at`, expiring at the first
    // `lease_expires_at` seen (second resolution).
    let at = |v: &Value| {
        let text = v.as_str().unwrap_or_else(|| panic!("no timestamp: {v}"));
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    };
    let granted = (at(&leased["lease_expires_at"]) - at(&requeued["history"][0]["leased_at"]))
        .whole_seconds();
    assert!(
        (LEASE_S as i64 - 1..=LEASE_S as i64 + 1).contains(&granted),
        "granted {granted} s for powernode.lease_s={LEASE_S}: {leased} / {requeued}"
    );
    stub.cli(&["terminate-instance", &node.instance_id, "--force"]);
}

/// The lease the requeue test asks for on the kernel command line.
const LEASE_S: u64 = 6;

fn publish_root(stub: &Stub, dir: &Path, version: &str) -> String {
    stub.publish_module(&rootfs::busybox_root(dir, version), "base", version, "root")
}

fn root_modules(inst: &Value) -> Vec<String> {
    inst["root"]["modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent as PID 1 of a composed root (agent mode after switch_root): a runtime
/// module with a service is attached live on top of the busybox base; a new version
/// of the ROOT module is reported as needing a reboot (never swapped live) and
/// applied by a reboot task: the agent stops the services and reboots, the VM comes
/// back by netboot (QEMU runs with -no-reboot, so the test boots it again with the
/// same identity, as a provider would), re-enrolls in the server's window after the
/// reboot task, and runs on the new root with its runtime module re-attached.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn composed_root_runs_runtime_modules_and_a_reboot_applies_a_root_change() {
    let test = "runtime_composed_reboot";
    let dir = test_dir(test);
    let stub = Stub::start(&dir);
    let base1 = publish_root(&stub, &dir, "1.0.0");
    stub.cli(&["set-template-modules", "tmpl-edge-base", "--root", "base"]);
    let (instance_id, doc) = stub.provision("composed-reboot-1");
    let mut node = boot_instance(&dir, instance_id.clone(), &doc, "boot1");
    let running = node.wait(&stub, "running on the composed root", TO_RUNNING, |i| {
        i["status"] == "running"
    });
    assert_eq!(running["root"]["fstype"], "overlay", "{running}");
    assert_eq!(
        root_modules(&running),
        std::slice::from_ref(&base1),
        "{running}"
    );

    // A runtime module attached live in agent mode.
    let web = json!({"name": "web",
        "command": ["/opt/demo/bin/busybox", "sh", "-c", "while :; do sleep 1; done"],
        "restart": "always", "stop_timeout_seconds": 3});
    let demo = publish_runtime(
        &stub,
        &dir,
        "demo",
        "1.0.0",
        labels(Some("/opt/demo"), &[web]),
    );
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--root",
        "base",
        "--runtime",
        "demo",
    ]);
    node.wait(
        &stub,
        "demo attached in the composed root",
        TO_CHANGE,
        |i| {
            module_digest(i, "demo") == Some(&demo)
                && service(i, "web").is_some_and(|s| s["state"] == "running")
        },
    );

    // A root change: reported, not applied live.
    let base2 = publish_root(&stub, &dir, "2.0.0");
    let ctx = node.context();
    let drift = wait_until(
        "reboot_required drift",
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            let d = stub.cli(&["drift-report", &instance_id]);
            (d["reboot_required"] == true).then_some(d)
        },
    );
    eprintln!("{test}: drift after the root change: {drift}");
    std::thread::sleep(Duration::from_secs(5));
    let still = stub.instance(&instance_id);
    assert_eq!(
        root_modules(&still),
        std::slice::from_ref(&base1),
        "applied live? {still}"
    );

    let reboot = stub.cli(&[
        "reboot-instance",
        &instance_id,
        "--drain-timeout-seconds",
        "10",
    ]);
    let reboot_id = task_id(&reboot);
    // The guest reboots; with -no-reboot QEMU exits.
    let exit = node
        .vm
        .wait_timeout(Duration::from_secs(120))
        .expect("wait for QEMU");
    assert!(
        matches!(exit, Some(s) if s.success()),
        "{exit:?}\n{}",
        node.context()()
    );
    let t = task(&stub, &reboot_id);
    assert_ne!(t["status"], "failed", "{t}");
    if t["status"] == "succeeded" {
        assert!(
            t["result"]["rebooting"] == true || t["result"]["re_enrolled"] == true,
            "{t}"
        );
        if t["result"]["rebooting"] == true {
            assert_eq!(t["result"]["services_stopped"], json!(["web"]), "{t}");
        }
    }

    // Netboot again: same identity document.
    let mut node = boot_instance(&dir, instance_id.clone(), &doc, "boot2");
    let back = node.wait(&stub, "running on the new root", TO_RUNNING, |i| {
        i["status"] == "running" && root_modules(i) == [base2.clone()]
    });
    node.wait(&stub, "demo re-attached after the reboot", TO_CHANGE, |i| {
        module_digest(i, "demo") == Some(&demo)
            && service(i, "web").is_some_and(|s| s["state"] == "running")
    });
    let t = task(&stub, &reboot_id);
    assert_eq!(t["status"], "succeeded", "{t}");
    // Heartbeats carry the running modules: once boot 2's agent reported, no drift
    // is left. (One run in many still saw the old root digest here right after the
    // reboot task succeeded, a race not yet found; two reruns cleared at once. A
    // drift that never clears still fails here.)
    let cleared = Instant::now();
    let ctx = node.context();
    let drift = wait_until(
        "no drift after the reboot",
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            let d = stub.cli(&["drift-report", &instance_id]);
            (d["drift"] == false).then_some(d)
        },
    );
    eprintln!(
        "{test}: drift cleared {:?} after the reboot task succeeded: {drift}",
        cleared.elapsed()
    );
    eprintln!("{test}: back on {:?}", back["root"]);
    let ctx = node.context();
    let exit = stub.terminate(&instance_id, true, &mut node.vm, TO_EXIT, &ctx);
    assert_powered_off(exit, &ctx);
}

/// The ids of the tasks of `kind` created on the instance, newest first (tasks the
/// server schedules itself, such as a `module_update` after a publication).
fn created_tasks(stub: &Stub, instance_id: &str, kind: &str) -> Vec<String> {
    let events = stub.cli(&["recent-events", "--instance", instance_id, "--limit", "200"]);
    events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "task.created" && e["detail"]["kind"] == kind)
        .filter_map(|e| e["detail"]["task_id"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the agent has answered a task the operator cancelled (the server
/// keeps its account beside the cancellation).
fn wait_agent_answer(node: &mut Node, stub: &Stub, id: &str) -> Value {
    let ctx = node.context();
    wait_until(
        &format!("the agent's answer to cancelled task {id}"),
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            let t = task(stub, id);
            t["result"]["agent_status"].is_string().then_some(t)
        },
    )
}

/// `cancel-task` on the three node tasks that change the machine, each caught part
/// way (a service that takes 20 s to stop on SIGTERM keeps them there): a drain or
/// a reboot cancelled while the services stop restarts them, uncordons (and never
/// reboots); a
/// module update cancelled mid-swap lets the swap in flight finish (no module is
/// left half swapped) and the node ends on the desired version. Both cancellations
/// and the agent's own account are read back from get-task. Then a cordon-only
/// drain cordons and leaves the service running.
#[test]
#[cfg_attr(not(vm_tests), ignore = "VM tier: build with POWERNODE_VM_TESTS=1")]
fn cancel_mid_drain_reboot_and_module_update_leaves_the_node_whole() {
    let dir = test_dir("runtime_cancel_mid_task");
    let stub = Stub::start(&dir);
    let slow = json!({"name": "slowstop",
        "command": ["bin/busybox", "sh", "-c",
                    "trap 'sleep 20; exit 0' TERM; while :; do sleep 1; done"],
        "restart": "always", "stop_timeout_seconds": 60});
    let v1 = publish_runtime(
        &stub,
        &dir,
        "slow",
        "1.0.0",
        labels(None, std::slice::from_ref(&slow)),
    );
    stub.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "slow",
    ]);
    // A short lease: renewals, where a cancel is seen, every 2 s.
    let mut node = boot_with(
        &stub,
        &dir,
        "cancel-mid-task-1",
        "vm",
        &[&format!("powernode.lease_s={LEASE_S}")],
    );
    let id = node.instance_id.clone();
    let running = node.wait(&stub, "running with slowstop", TO_RUNNING, |i| {
        i["status"] == "running"
            && module_digest(i, "slow") == Some(&v1)
            && service(i, "slowstop").is_some_and(|s| s["state"] == "running")
    });
    let started_pid = service(&running, "slowstop").unwrap()["pid"].clone();

    // A drain, cancelled while slowstop is stopping: uncordoned, running again.
    let drain = stub.cli(&["drain-instance", &id, "--timeout-seconds", "120"]);
    let drain_id = task_id(&drain);
    node.wait(&stub, "slowstop stopping for the drain", TO_CHANGE, |i| {
        i["status"] == "draining"
            && service(i, "slowstop").is_some_and(|s| s["state"] == "stopping")
    });
    stub.cli(&["cancel-task", &drain_id]);
    let answered = wait_agent_answer(&mut node, &stub, &drain_id);
    assert_eq!(answered["status"], "cancelled", "{answered}");
    assert_eq!(
        answered["result"]["agent_result"]["services_restarted"],
        json!(["slowstop"]),
        "{answered}"
    );
    let after_drain = node.wait(&stub, "running again after the drain", TO_CHANGE, |i| {
        i["status"] == "running"
            && i["cordoned"] == false
            && service(i, "slowstop")
                .is_some_and(|s| s["state"] == "running" && s["pid"] != started_pid)
    });
    let first_pid = service(&after_drain, "slowstop").unwrap()["pid"].clone();

    // A reboot, cancelled while slowstop is stopping.
    let reboot = stub.cli(&["reboot-instance", &id, "--drain-timeout-seconds", "120"]);
    let reboot_id = task_id(&reboot);
    node.wait(&stub, "slowstop stopping for the reboot", TO_CHANGE, |i| {
        service(i, "slowstop").is_some_and(|s| s["state"] == "stopping")
    });
    let t = task(&stub, &reboot_id);
    assert_eq!(t["status"], "running", "{t}");
    assert_eq!(t["progress"], "stopping services for reboot", "{t}");
    let cancelled = stub.cli(&["cancel-task", &reboot_id]);
    assert_eq!(
        task(&stub, &reboot_id)["status"],
        "cancelled",
        "{cancelled}"
    );
    let answered = wait_agent_answer(&mut node, &stub, &reboot_id);
    assert_eq!(answered["status"], "cancelled", "{answered}");
    assert_eq!(
        answered["result"]["agent_status"], "cancelled",
        "{answered}"
    );
    assert_eq!(
        answered["result"]["agent_result"]["services_restarted"],
        json!(["slowstop"]),
        "{answered}"
    );
    // Up again, uncordoned, slowstop a new process; `wait` fails if QEMU exits (the
    // guest rebooting ends QEMU: it runs with -no-reboot).
    let after_reboot = node.wait(
        &stub,
        "slowstop running again, uncordoned",
        TO_CHANGE,
        |i| {
            i["status"] == "running"
                && i["cordoned"] == false
                && service(i, "slowstop")
                    .is_some_and(|s| s["state"] == "running" && s["pid"] != first_pid)
        },
    );
    assert_eq!(
        after_reboot["enrolled_at"], running["enrolled_at"],
        "the node enrolled again: {after_reboot}"
    );
    let second_pid = service(&after_reboot, "slowstop").unwrap()["pid"].clone();

    // A module update (scheduled by the server at the publication), cancelled
    // while the reconcile swaps v1 (slowstop stopping) for v2.
    let earlier = created_tasks(&stub, &id, "module_update");
    let v2 = publish_runtime(
        &stub,
        &dir,
        "slow",
        "2.0.0",
        labels(None, std::slice::from_ref(&slow)),
    );
    let ctx = node.context();
    let update_id = wait_until(
        "the module_update task the publication scheduled",
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            created_tasks(&stub, &id, "module_update")
                .into_iter()
                .find(|t| !earlier.contains(t))
        },
    );
    let leased = wait_until(
        "the module update reconciling",
        TO_CHANGE,
        &mut node.vm,
        &ctx,
        || {
            let t = task(&stub, &update_id);
            assert!(
                !matches!(t["status"].as_str(), Some("succeeded" | "failed")),
                "the update ended before it could be cancelled: {t}"
            );
            (t["progress"] == "reconciling modules").then_some(t)
        },
    );
    // Mid-swap, heartbeats still show v1 with its service stopping.
    node.wait(&stub, "v1 listed, slowstop stopping", TO_CHANGE, |i| {
        service(i, "slowstop").is_some_and(|s| s["state"] == "stopping")
    });
    let mid = stub.instance(&id);
    assert_eq!(
        module_digest(&mid, "slow"),
        Some(v1.as_str()),
        "swapped already? {mid}"
    );
    stub.cli(&["cancel-task", &update_id]);
    let answered = wait_agent_answer(&mut node, &stub, &update_id);
    assert_eq!(answered["status"], "cancelled", "{answered}");
    assert_eq!(
        answered["result"]["agent_status"], "cancelled",
        "{answered}"
    );
    assert!(
        answered["result"]["agent_result"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("reconcile in flight completes")),
        "{answered}"
    );
    // The swap in flight finished: v2 runs, its service a new process, no drift.
    let updated = node.wait(&stub, "v2 running after the cancel", TO_CHANGE, |i| {
        module_digest(i, "slow") == Some(&v2)
            && service(i, "slowstop")
                .is_some_and(|s| s["state"] == "running" && s["pid"] != second_pid)
    });
    assert_eq!(updated["status"], "running", "{updated}");
    assert_eq!(updated["last_reconcile"]["ok"], true, "{updated}");
    let drift = stub.cli(&["drift-report", &id]);
    assert_eq!(drift["drift"], false, "{drift}");
    eprintln!("cancel_mid_task: update leased as {leased}");

    // A cordon-only drain: cordoned, slowstop left running as the same process.
    let v2_pid = service(&updated, "slowstop").unwrap()["pid"].clone();
    let cordon = stub.cli(&["drain-instance", &id, "--cordon-only"]);
    let cordoned = node.wait_task(&stub, &task_id(&cordon), TO_CHANGE);
    assert_eq!(cordoned["status"], "succeeded", "{cordoned}");
    assert_eq!(cordoned["result"]["cordon_only"], true, "{cordoned}");
    let i = node.wait(&stub, "cordoned", TO_CHANGE, |i| i["cordoned"] == true);
    assert_ne!(i["phase"], "drained", "{i}");
    let s = service(&i, "slowstop").unwrap();
    assert_eq!(
        (&s["state"], &s["pid"]),
        (&json!("running"), &v2_pid),
        "{i}"
    );

    let ctx = node.context();
    let exit = stub.terminate(&id, true, &mut node.vm, TO_EXIT, &ctx);
    assert_powered_off(exit, &ctx);
}
