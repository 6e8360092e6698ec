//! The runbook on loopback: the real `powernode-agent` process against the real
//! `powernode-stub` process in recorder mode. Assertions are on the JSON the server
//! returns (and, for the agent's exit, on its exit code and stated reason).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use base64::Engine as _;
use powernode_tests::proxy::LossyProxy;
use powernode_tests::{
    proto, str_at, test_dir, timestamp, wait_for, wait_running, Agent, Server, ServerOptions,
};
use serde_json::{json, Value};

/// Generous deadlines: the machine has two cores and runs tests in parallel.
const RUNNING: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(20);

/// The agent's distinct exit code when the control plane refuses it for good
/// (`powernode_agent::exit_code::TERMINAL`).
const EXIT_TERMINAL: i32 = 3;

#[test]
fn runbook_create_provision_run_drain_terminate_reprovision() -> Result<()> {
    let dir = test_dir("runbook")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;

    // 1-2: create and provision through the CLI.
    let node = server.cli(&[
        "create-node",
        "--hostname",
        "edge-1",
        "--lifecycle-class",
        "persistent",
    ])?;
    let node_id = str_at(&node, "/node/id")?;
    assert_eq!(node["node"]["status"], "no_instance", "{node}");
    let prov = server.cli(&["provision-instance", &node_id])?;
    let instance_id = str_at(&prov, "/instance/id")?;
    str_at(&prov, "/task_id")?;
    let identity = server.cli(&["instance-identity", &instance_id])?;
    let identity = match identity.get("identity") {
        Some(doc) if doc.is_object() => doc.clone(),
        _ => identity,
    };
    assert_eq!(identity["instance_id"], instance_id.as_str());
    assert_eq!(identity["node_id"], node_id.as_str());

    // 3-4: the agent enrolls with the recorded identity, heartbeats, runs.
    let mut agent =
        Agent::with_identity(&dir, "agent1", &identity, &["--service", "web=sleep 300"])?;
    let inst = wait_running(&server, &instance_id, RUNNING).with_context(|| agent.log_text())?;
    assert_eq!(inst["identity_source"], "file", "{inst}");
    assert!(inst["enrolled_at"].is_string(), "{inst}");
    let phases: Vec<&str> = inst["boot_timeline"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["phase"].as_str()).collect())
        .unwrap_or_default();
    for p in ["identity_found", "enrolled", "ready"] {
        assert!(phases.contains(&p), "timeline lacks {p}: {inst}");
    }
    // The agent says what `/` is (same host, so the same root as ours).
    let our_root = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (left.split(' ').nth(4) == Some("/")).then(|| right.split(' ').next())?
        })
        .next_back()
        .map(str::to_string);
    assert_eq!(
        inst["root"]["fstype"].as_str().map(str::to_string),
        our_root,
        "{inst}"
    );
    // The key never left the node and is private to it.
    let key = agent.state_dir.join("node.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
    assert_eq!(mode & 0o777, 0o600);

    // 5: drain; the agent leases the drain task, stops its service, completes it.
    let drain = server.post(
        &proto::paths::admin_drain(&instance_id),
        &json!({"timeout_seconds": 10, "cordon_only": false}),
    )?;
    assert_eq!(drain["status"], "draining", "{drain}");
    let drain_task = str_at(&drain, "/task_id")?;
    let task = wait_for("drain task succeeded", RUNNING, || {
        let t = server.task(&drain_task)?;
        ensure!(
            !matches!(t["status"].as_str(), Some("failed" | "cancelled")),
            "drain task ended badly: {t}"
        );
        Ok((t["status"] == "succeeded").then_some(t))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(task["kind"], "drain");
    assert_eq!(task["result"]["drained"], true, "{task}");
    assert_eq!(task["result"]["services_stopped"], json!(["web"]), "{task}");
    let inst = wait_for("cordoned, drained heartbeat", RUNNING, || {
        let i = server.instance(&instance_id)?;
        Ok((i["cordoned"] == true && i["phase"] == "drained").then_some(i))
    })?;
    assert_eq!(inst["status"], "draining", "{inst}");

    // 6: terminate; the agent's next call is refused and it stops for good.
    let term = server.post(&proto::paths::admin_terminate(&instance_id), &json!({}))?;
    str_at(&term, "/task_id")?;
    let status = agent
        .guard
        .wait_timeout(EXIT)
        .with_context(|| agent.log_text())?;
    assert_eq!(status.code(), Some(EXIT_TERMINAL), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("stopping for good")
            && (log.contains("certificate_revoked") || log.contains("instance_terminated")),
        "exit reason missing from stderr:\n{log}"
    );
    let inst = wait_for("instance terminated", RUNNING, || {
        let i = server.instance(&instance_id)?;
        Ok((i["status"] == "terminated").then_some(i))
    })?;
    assert!(inst["terminated_at"].is_string(), "{inst}");

    // The Node stays, with its history, and can be provisioned again.
    let node = server.node(&node_id)?;
    assert_eq!(node["status"], "no_instance", "{node}");
    assert!(
        node["instance_history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|i| i == instance_id.as_str())),
        "{node}"
    );
    let prov2 = server.post(&proto::paths::admin_provision(&node_id), &json!({}))?;
    let instance2 = str_at(&prov2, "/instance/id")?;
    assert_ne!(instance2, instance_id);

    // The second agent learns its identity from a kernel command line this time.
    let identity2 = server.identity(&instance2)?;
    let encoded =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&identity2)?);
    let cmdline = dir.join("cmdline");
    std::fs::write(
        &cmdline,
        format!("console=ttyS0 powernode.identity={encoded} quiet\n"),
    )?;
    let fw_cfg = dir.join("no-fw-cfg");
    let mut agent2 = Agent::start(
        &dir.join("agent2-state"),
        &dir.join("agent2.log"),
        &[
            "--cmdline",
            &cmdline.to_string_lossy(),
            "--fw-cfg",
            &fw_cfg.to_string_lossy(),
        ],
    )?;
    let inst2 = wait_running(&server, &instance2, RUNNING).with_context(|| agent2.log_text())?;
    assert_eq!(inst2["identity_source"], "cmdline", "{inst2}");
    assert_eq!(server.node(&node_id)?["status"], "running");
    assert!(agent2.guard.is_running());
    Ok(())
}

#[test]
fn killed_agent_raises_instance_silent() -> Result<()> {
    let dir = test_dir("silent")?;
    let server = Server::start(
        &dir.join("data"),
        ServerOptions {
            // 5 heartbeats (1 s) fit in the window: a loaded machine that delays a
            // few must not look silent in the quiet phase below.
            silent_after_seconds: 5,
            sensor_interval_ms: 200,
            ..ServerOptions::default()
        },
    )?;
    let (_node, instance) = server.create_and_provision("edge-silent")?;
    let mut agent = Agent::with_identity(&dir, "agent", &server.identity(&instance)?, &[])?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;

    let silent = |server: &Server| -> Result<Option<Value>> {
        Ok(server.signals()?.into_iter().find(|s| {
            s["kind"] == "instance.silent"
                && s["instance_id"] == instance.as_str()
                && s["active"] == true
        }))
    };
    // While the agent heartbeats, the sensor stays quiet for longer than the window
    // (so it is the heartbeats that keep it quiet).
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(silent(&server)?, None, "silent raised while heartbeating");

    agent.guard.kill();
    let signal = wait_for("instance.silent", Duration::from_secs(15), || {
        silent(&server)
    })?;
    assert_eq!(signal["instance_id"], instance.as_str());
    Ok(())
}

#[test]
fn agent_carries_on_across_a_server_kill_and_restart() -> Result<()> {
    let dir = test_dir("server-restart")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (node_id, instance) = server.create_and_provision("edge-restart")?;
    let mut agent = Agent::with_identity(&dir, "agent", &server.identity(&instance)?, &[])?;
    let before = wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;

    let server = server.kill_and_restart()?;
    let restarted_at = time::OffsetDateTime::now_utc();
    let after = wait_for("a heartbeat after the restart", RUNNING, || {
        let i = server.instance(&instance)?;
        let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
        Ok(hb.filter(|t| *t > restarted_at).map(|_| i))
    })
    .with_context(|| agent.log_text())?;
    assert!(
        agent.guard.is_running(),
        "agent died:\n{}",
        agent.log_text()
    );
    // Nothing lost: same node and instance, still running, enrolled once.
    assert_eq!(after["status"], "running");
    assert_eq!(after["node_id"], node_id.as_str());
    assert_eq!(
        after["enrolled_at"], before["enrolled_at"],
        "agent enrolled again"
    );
    assert_eq!(
        server.node(&node_id)?["current_instance_id"],
        instance.as_str()
    );
    Ok(())
}

#[test]
fn restarted_agent_reuses_its_certificate() -> Result<()> {
    let dir = test_dir("agent-restart")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (_node, instance) = server.create_and_provision("edge-agent-restart")?;
    let identity = server.identity(&instance)?;
    let mut agent = Agent::with_identity(&dir, "agent", &identity, &[])?;
    let before = wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;
    let cert = std::fs::read_to_string(agent.state_dir.join("node.crt"))?;
    agent.guard.kill();

    // Same state dir, and no identity source but the agent's own copy (a service
    // restarted after the init's hand-off): no enrollment (the token is spent), it
    // carries on with its stored certificate.
    let restarted_at = time::OffsetDateTime::now_utc();
    let empty_cmdline = dir.join("cmdline");
    std::fs::write(&empty_cmdline, "console=ttyS0\n")?;
    let mut agent = Agent::start(
        &agent.state_dir,
        &dir.join("agent-restarted.log"),
        &[
            "--cmdline",
            &empty_cmdline.to_string_lossy(),
            "--fw-cfg",
            &dir.join("no-fw-cfg").to_string_lossy(),
        ],
    )?;
    let after = wait_for("a heartbeat from the restarted agent", RUNNING, || {
        let i = server.instance(&instance)?;
        let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
        Ok(hb.filter(|t| *t > restarted_at).map(|_| i))
    })
    .with_context(|| agent.log_text())?;
    assert!(agent.guard.is_running(), "{}", agent.log_text());
    assert_eq!(after["status"], "running");
    assert_eq!(after["enrolled_at"], before["enrolled_at"]);
    assert_eq!(
        std::fs::read_to_string(agent.state_dir.join("node.crt"))?,
        cert
    );

    // Without its state the node has only a spent token: refused for good.
    let mut stateless = Agent::with_identity(&dir, "stateless", &identity, &[])?;
    let status = stateless.guard.wait_timeout(EXIT)?;
    assert_eq!(
        status.code(),
        Some(EXIT_TERMINAL),
        "{}",
        stateless.log_text()
    );
    assert!(
        stateless.log_text().contains("bootstrap_token_used"),
        "{}",
        stateless.log_text()
    );
    // The running agent is not disturbed by that.
    assert_eq!(server.instance(&instance)?["status"], "running");
    assert!(agent.guard.is_running());
    Ok(())
}

/// A node refused at enrollment (its token spent by an earlier boot) tells the
/// server why with a boot report before it exits: get-instance shows the code, the
/// message, the agent's last log lines and the recovery, and recent-signals has it.
#[test]
fn an_agent_refused_at_enrollment_reports_why_and_get_instance_shows_it() -> Result<()> {
    let dir = test_dir("boot-report")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (node_id, instance) = server.create_and_provision("edge-report")?;
    let identity = server.identity(&instance)?;
    let mut first = Agent::with_identity(&dir, "first", &identity, &[])?;
    wait_running(&server, &instance, RUNNING).with_context(|| first.log_text())?;
    first.guard.kill();

    let mut again = Agent::with_identity(&dir, "again", &identity, &[])?;
    let status = again.guard.wait_timeout(EXIT)?;
    assert_eq!(status.code(), Some(EXIT_TERMINAL), "{}", again.log_text());
    let inst = server.cli(&["get-instance", &instance])?;
    let report = inst["instance"]["boot_reports"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .with_context(|| format!("no boot report: {inst}\n{}", again.log_text()))?;
    assert_eq!(report["code"], "bootstrap_token_used", "{report}");
    assert_eq!(report["phase"], "enrolled", "{report}");
    assert!(
        report["message"]
            .as_str()
            .is_some_and(|m| m.contains("already used")),
        "{report}"
    );
    let console = report["console"].as_array().cloned().unwrap_or_default();
    assert!(
        console
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("powernode"))),
        "the agent's last log lines: {report}"
    );
    let recovery = report["recovery"].as_str().unwrap_or_default();
    assert!(
        recovery.contains(&format!("provision-instance {node_id}")),
        "{recovery}"
    );
    let signals = server.cli(&["recent-signals", "--instance", &instance])?;
    let reported = signals["signals"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["kind"] == "bootstrap.reported"))
        .cloned()
        .with_context(|| format!("no bootstrap.reported signal: {signals}"))?;
    assert_eq!(reported["detail"]["code"], "bootstrap_token_used");
    // The report changed nothing else: the instance is still running.
    assert_eq!(inst["instance"]["status"], "running");
    Ok(())
}

#[test]
fn certificate_is_renewed_before_it_expires() -> Result<()> {
    // Long enough that a loaded machine still renews in time (renewal at ~5.3 s).
    const TTL: u64 = 8;
    let dir = test_dir("renewal")?;
    let server = Server::start(
        &dir.join("data"),
        ServerOptions {
            cert_ttl_seconds: TTL,
            ..ServerOptions::default()
        },
    )?;
    let (_node, instance) = server.create_and_provision("edge-renew")?;
    let mut agent = Agent::with_identity(&dir, "agent", &server.identity(&instance)?, &[])?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;
    let first = std::fs::read_to_string(agent.state_dir.join("node.crt"))?;

    // Well past the first certificate's expiry the agent must still be heartbeating
    // (the server refuses an expired certificate) and hold a different certificate.
    std::thread::sleep(Duration::from_secs(TTL * 2));
    assert!(
        agent.guard.is_running(),
        "agent died:\n{}",
        agent.log_text()
    );
    let checked_at = time::OffsetDateTime::now_utc();
    wait_for(
        "a heartbeat on a renewed certificate",
        Duration::from_secs(10),
        || {
            let i = server.instance(&instance)?;
            let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
            Ok(hb.filter(|t| *t > checked_at).map(|_| i))
        },
    )
    .with_context(|| agent.log_text())?;
    let now = std::fs::read_to_string(agent.state_dir.join("node.crt"))?;
    assert_ne!(now, first, "certificate was never renewed");

    // Renewed at about two thirds of each lifetime: a few times in 2 x TTL, not at
    // every heartbeat and not never.
    let events = server.cli(&["recent-events", "--instance", &instance, "--limit", "200"])?;
    let renewals = events["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["kind"] == "certificate.renewed")
                .count()
        })
        .unwrap_or(0);
    assert!(
        (2..=5).contains(&renewals),
        "{renewals} renewals in {} s with a {TTL} s certificate:\n{events}",
        TTL * 2
    );
    Ok(())
}

#[test]
fn cordon_only_drain_keeps_services_running() -> Result<()> {
    let dir = test_dir("cordon-only")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (_node, instance) = server.create_and_provision("edge-cordon")?;
    let mut agent = Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &["--service", "web=sleep 300"],
    )?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;

    let drain = server.cli(&["drain-instance", &instance, "--cordon-only"])?;
    let task_id = str_at(&drain, "/task_id")?;
    let task = wait_for("cordon-only task done", RUNNING, || {
        let t = server.task(&task_id)?;
        Ok(t["status"]
            .as_str()
            .is_some_and(|s| s != "pending" && s != "running")
            .then_some(t))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["result"]["cordon_only"], true, "{task}");
    // Cordoned, but the services were left alone and the node is not drained.
    let inst = wait_for("cordoned heartbeat", RUNNING, || {
        let i = server.instance(&instance)?;
        Ok((i["cordoned"] == true).then_some(i))
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let inst = server.instance(&instance).unwrap_or(inst);
    assert_eq!(inst["services"][0]["state"], "running", "{inst}");
    assert_ne!(inst["phase"], "drained", "{inst}");
    assert!(agent.guard.is_running());

    // SIGTERM is a clean stop: exit 0, supervised services stopped with it.
    let pid = agent.guard.pid().context("agent pid")?;
    let service_pid = std::fs::read_to_string(&agent.log)?
        .lines()
        .find(|l| l.contains("service started"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
        .context("service pid in the agent log")?;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(term.success());
    let status = agent.guard.wait_timeout(EXIT)?;
    assert_eq!(status.code(), Some(0), "{}", agent.log_text());
    assert!(
        !std::path::Path::new(&format!("/proc/{service_pid}")).exists(),
        "service {service_pid} outlived the agent"
    );
    Ok(())
}

/// A server, a provisioned instance and a running agent (lease 3 s) whose one
/// service, `stubborn`, runs `sh stubborn.sh`: `prelude`, then a loop that ignores
/// SIGTERM, so a drain cannot stop it.
struct Stubborn {
    dir: PathBuf,
    server: Server,
    instance: String,
    /// The `--service` argument, for a second agent.
    service: String,
    agent: Agent,
}

fn stubborn(test: &str, hostname: &str, prelude: &str) -> Result<Stubborn> {
    let dir = test_dir(test)?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (_node, instance) = server.create_and_provision(hostname)?;
    let script = dir.join("stubborn.sh");
    std::fs::write(
        &script,
        format!("{prelude}trap '' TERM\nwhile :; do sleep 0.2; done\n"),
    )?;
    let service = format!("stubborn=sh {}", script.display());
    let agent = Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &["--service", &service, "--lease-seconds", "3"],
    )?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;
    Ok(Stubborn {
        dir,
        server,
        instance,
        service,
        agent,
    })
}

#[test]
fn cancelled_drain_uncordons_and_restarts_services() -> Result<()> {
    // A service that ignores SIGTERM keeps the drain busy until it is cancelled.
    let Stubborn {
        server,
        instance,
        mut agent,
        ..
    } = stubborn("cancel-drain", "edge-cancel", "")?;

    let drain = server.cli(&["drain-instance", &instance, "--timeout-seconds", "120"])?;
    let task_id = str_at(&drain, "/task_id")?;
    wait_for("the agent stopping its service", RUNNING, || {
        let i = server.instance(&instance)?;
        Ok((i["phase"] == "draining" && i["services"][0]["state"] == "stopping").then_some(i))
    })
    .with_context(|| agent.log_text())?;

    let cancelled = server.cli(&["cancel-task", &task_id])?;
    assert_eq!(cancelled["task"]["status"], "cancelled", "{cancelled}");
    // The agent hears of it at its next lease renewal, restarts the service and
    // takes work again.
    let inst = wait_for("uncordoned, ready, service running", RUNNING, || {
        let i = server.instance(&instance)?;
        Ok((i["status"] == "running"
            && i["phase"] == "ready"
            && i["cordoned"] == false
            && i["services"][0]["state"] == "running")
            .then_some(i))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(inst["services"].as_array().map(Vec::len), Some(1), "{inst}");
    assert_eq!(server.task(&task_id)?["status"], "cancelled");
    assert!(agent.guard.is_running(), "{}", agent.log_text());
    Ok(())
}

/// A service that ignores SIGTERM outlives `--timeout-seconds`: the instance stays
/// `draining` with the `drain_timeout` stuck row and its recovery step, and
/// `terminate-instance --force` ends it (the agent is refused and exits).
#[test]
fn drain_past_its_timeout_is_stuck_until_a_forced_terminate() -> Result<()> {
    let Stubborn {
        server,
        instance,
        mut agent,
        ..
    } = stubborn("drain-timeout", "edge-drain-timeout", "")?;
    let drain = server.cli(&["drain-instance", &instance, "--timeout-seconds", "3"])?;
    let task_id = str_at(&drain, "/task_id")?;
    let inst = wait_for("the drain_timeout stuck row", RUNNING, || {
        let i = server.instance(&instance)?;
        Ok((i["stuck"]["reason"] == "drain_timeout").then_some(i))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(inst["status"], "draining", "{inst}");
    let recovery = inst["stuck"]["recovery"].as_str().unwrap_or_default();
    ensure!(
        recovery.contains(&format!("terminate-instance {instance} --force")),
        "{recovery}"
    );
    let signal = wait_for("the stuck signal", RUNNING, || {
        Ok(server.signals()?.into_iter().find(|s| {
            s["kind"] == "instance.stuck"
                && s["instance_id"] == instance.as_str()
                && s["active"] == true
        }))
    })?;
    assert_eq!(signal["detail"]["reason"], "drain_timeout", "{signal}");
    // Refused without --force (not drained), then forced.
    ensure!(server.cli(&["terminate-instance", &instance]).is_err());
    let t = server.cli(&["terminate-instance", &instance, "--force"])?;
    assert_eq!(t["status"], "terminated", "{t}");
    let status = agent.guard.wait_timeout(EXIT)?;
    assert_eq!(status.code(), Some(EXIT_TERMINAL), "{}", agent.log_text());
    let task = server.task(&task_id)?;
    ensure!(
        task["status"] == "failed" || task["status"] == "cancelled",
        "{task}"
    );
    Ok(())
}

/// collect-diagnostics through the real agent: the result is read back from
/// get-task; an agent killed while it holds a task's lease leaves the task to be
/// requeued, its first attempt kept in the history.
#[test]
fn diagnostics_result_and_requeue_after_the_agent_dies() -> Result<()> {
    let Stubborn {
        dir,
        server,
        instance,
        service,
        mut agent,
    } = stubborn(
        "diagnostics",
        "edge-diag",
        "echo stubborn up\necho stubborn warns >&2\n",
    )?;
    let d = server.cli(&["collect-diagnostics", &instance, "--log-lines", "10"])?;
    let diag = str_at(&d, "/task_id")?;
    let task = wait_for("diagnostics done", RUNNING, || {
        let t = server.task(&diag)?;
        Ok(t["status"]
            .as_str()
            .is_some_and(|s| s != "pending" && s != "running")
            .then_some(t))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(task["status"], "succeeded", "{task}");
    ensure!(task["result"].is_object(), "{task}");
    ensure!(task["result"].to_string().len() <= 64 * 1024, "{task}");
    // What the service wrote, stdout and stderr, is in the result.
    let output: Vec<&str> = task["result"]["service_output"]["stubborn"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    ensure!(
        output.contains(&"stubborn up") && output.contains(&"stubborn warns"),
        "service output {output:?} in {task}"
    );

    // A drain the stubborn service keeps busy; the agent dies holding its lease.
    let drain = server.cli(&["drain-instance", &instance, "--timeout-seconds", "600"])?;
    let drain_id = str_at(&drain, "/task_id")?;
    wait_for("the drain leased", RUNNING, || {
        let t = server.task(&drain_id)?;
        Ok((t["status"] == "running").then_some(t))
    })
    .with_context(|| agent.log_text())?;
    agent.guard.kill();
    let t = wait_for("the lease to expire", RUNNING, || {
        let t = server.task(&drain_id)?;
        Ok((t["status"] == "pending").then_some(t))
    })?;
    assert_eq!(t["attempts"], 1, "{t}");
    assert_eq!(t["history"][0]["outcome"], "lease_expired", "{t}");
    // A fresh agent with the same state leases it again (attempt 2).
    let agent2 = Agent::start(
        &dir.join("agent-state"),
        &dir.join("agent2.log"),
        &[
            "--identity",
            &dir.join("agent-identity.json").to_string_lossy(),
            "--service",
            &service,
            "--lease-seconds",
            "3",
        ],
    )?;
    let t = wait_for("attempt 2", RUNNING, || {
        let t = server.task(&drain_id)?;
        Ok((t["attempts"] == 2).then_some(t))
    })
    .with_context(|| agent2.log_text())?;
    assert_eq!(t["history"].as_array().map(Vec::len), Some(1), "{t}");
    server.cli(&["terminate-instance", &instance, "--force"])?;
    Ok(())
}

/// The harness's promise for the agent's services: dropping the `Agent` guard ends
/// every process the agent started, also a service that ignores SIGTERM and lives in
/// its own process group, and that service's own children.
#[test]
fn dropped_agent_guard_leaves_no_service_behind() -> Result<()> {
    // The service starts a child of its own, in its process group, and names it.
    let Stubborn {
        dir,
        server,
        instance,
        agent,
        ..
    } = stubborn(
        "guard-services",
        "edge-guard",
        "sleep 300 &\necho $! > \"$(dirname \"$0\")/child.pid\"\n",
    )?;
    let inst = server.instance(&instance)?;
    let service_pid = inst["services"][0]["pid"]
        .as_u64()
        .with_context(|| format!("no service pid in {inst}"))?;
    let child_pid: u64 = wait_for("the service's child", RUNNING, || {
        Ok(std::fs::read_to_string(dir.join("child.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok()))
    })?;
    for pid in [service_pid, child_pid] {
        ensure!(alive(pid), "pid {pid} is not running before the drop");
    }
    drop(agent);
    for pid in [service_pid, child_pid] {
        ensure!(!alive(pid), "pid {pid} outlived the agent guard");
    }
    Ok(())
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is not).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn fake_identity(instance: &str) -> Value {
    json!({
        "version": 1,
        "control_plane_url": "https://127.0.0.1:9",
        "ca_pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "bootstrap_token": "secret-token",
        "node_id": "node-1",
        "instance_id": instance,
        "hostname": "edge-1",
    })
}

#[test]
fn identity_subcommand_reports_the_source_and_names_bad_fields() -> Result<()> {
    let dir = test_dir("identity-cli")?;
    let agent = powernode_tests::binary("powernode-agent")?;
    let cmdline = dir.join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0 quiet\n")?;
    let entry = dir.join("fw_cfg/by_name/opt/org.powernode/identity");
    std::fs::create_dir_all(&entry)?;
    let write_entry = |doc: &Value| -> Result<()> {
        let bytes = serde_json::to_vec(doc)?;
        std::fs::write(entry.join("size"), format!("{}\n", bytes.len()))?;
        std::fs::write(entry.join("raw"), bytes)?;
        Ok(())
    };
    let run = || {
        std::process::Command::new(&agent)
            .arg("identity")
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--fw-cfg")
            .arg(dir.join("fw_cfg"))
            .output()
    };

    write_entry(&fake_identity("inst-fw"))?;
    let out = run()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["source"], "fw_cfg");
    assert_eq!(v["identity"]["instance_id"], "inst-fw");
    assert_ne!(
        v["identity"]["bootstrap_token"], "secret-token",
        "token printed"
    );

    // The command line comes first when it carries an identity.
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&fake_identity("inst-cmd"))?);
    std::fs::write(&cmdline, format!("quiet powernode.identity={encoded}\n"))?;
    let v: Value = serde_json::from_slice(&run()?.stdout)?;
    assert_eq!(v["source"], "cmdline");
    assert_eq!(v["identity"]["instance_id"], "inst-cmd");

    // A pin skips the command line's identity; a broken fw_cfg entry is an error
    // naming the source and the field, never a fallback.
    std::fs::write(
        &cmdline,
        format!("powernode.identity={encoded} powernode.identity_source=fw_cfg\n"),
    )?;
    let mut broken = fake_identity("inst-fw");
    broken.as_object_mut().context("object")?.remove("node_id");
    write_entry(&broken)?;
    let out = run()?;
    assert_eq!(out.status.code(), Some(4), "identity errors exit 4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fw_cfg") && err.contains("node_id"), "{err}");
    Ok(())
}

/// The answer to the node's first enrollment is lost on the way: a loopback relay
/// between agent and server forwards the request, the server issues the
/// certificate, and the relay closes the agent's connection instead of passing the
/// answer on (a reset after the request). The agent asks again with the same key,
/// gets the same certificate, and the instance runs, with one enrollment on
/// record. (Before enrollment was idempotent the retry was `bootstrap_token_used`
/// and the agent stopped for good.)
#[test]
fn a_lost_enrollment_answer_is_asked_again_and_the_node_runs() -> Result<()> {
    let dir = test_dir("lost-enrollment-answer")?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (_, instance_id) = server.create_and_provision("edge-lossy")?;
    let proxy = LossyProxy::drop_first_answer(&server.addr)?;
    let mut identity = server.identity(&instance_id)?;
    identity["control_plane_url"] = json!(proxy.url());
    let mut agent = Agent::with_identity(&dir, "agent", &identity, &[])?;

    let inst = wait_for("the agent to run or exit", RUNNING, || {
        if let Some(status) = agent.guard.try_wait()? {
            return Ok(Some(Err(status)));
        }
        let v = server.cli(&["get-instance", &instance_id])?;
        let inst = v.get("instance").cloned().unwrap_or(v);
        Ok(
            (inst["status"] == "running" && inst["last_heartbeat_at"].is_string())
                .then_some(Ok(inst)),
        )
    })?;
    let inst = inst.map_err(|status| {
        anyhow::anyhow!(
            "the agent exited ({status}) instead of running:\n{}",
            agent.log_text()
        )
    })?;
    assert_eq!(
        proxy.answers_dropped(),
        1,
        "the relay lost no answer:\n{}",
        agent.log_text()
    );
    let log = agent.log_text();
    ensure!(
        log.contains("pending key of an earlier attempt"),
        "the retry did not reuse the key:\n{log}"
    );
    // One enrollment, whose certificate the node holds; no pending key left.
    let events = server.cli(&[
        "recent-events",
        "--instance",
        &instance_id,
        "--limit",
        "200",
    ])?;
    let enrolled: Vec<&Value> = events["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "instance.enrolled")
        .collect();
    assert_eq!(enrolled.len(), 1, "{events}");
    let serial = str_at(enrolled[0], "/detail/serial")?;
    // The agent logs serials as `7d:69:...`.
    ensure!(
        log.replace(':', "").contains(&format!("serial={serial}")),
        "the agent does not hold certificate {serial}:\n{log}"
    );
    ensure!(
        !agent.state_dir.join("pending.key").exists(),
        "pending key left"
    );
    ensure!(agent.state_dir.join("node.key").exists());
    assert!(inst["enrolled_at"].is_string(), "{inst}");
    agent.guard.terminate(EXIT);
    Ok(())
}

/// The README's walk, as written: `drain-instance --wait` follows the drain to its
/// end, so the `terminate-instance --wait` after it is accepted (without --wait it was
/// refused: the drain had not reached the node yet) and returns once the node is
/// gone. A task that cannot end in time fails the command, naming it.
#[test]
fn wait_follows_long_actions_to_their_end() -> Result<()> {
    let dir = test_dir("wait")?;
    // The runbook's heartbeat interval: tasks must not wait for the next heartbeat.
    let server = Server::start(
        &dir.join("data"),
        ServerOptions {
            heartbeat_interval_seconds: 30,
            ..ServerOptions::default()
        },
    )?;
    let node = server.cli(&[
        "create-node",
        "--hostname",
        "edge-w",
        "--lifecycle-class",
        "ephemeral",
    ])?;
    let node_id = str_at(&node, "/node/id")?;
    let prov = server.cli(&["provision-instance", &node_id])?;
    let instance = str_at(&prov, "/instance/id")?;
    let identity = server.identity(&instance)?;
    let mut agent =
        Agent::with_identity(&dir, "agent", &identity, &["--service", "web=sleep 300"])?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;

    let t0 = Instant::now();
    let drained = server.cli(&["drain-instance", &instance, "--wait", "--timeout", "120"])?;
    assert_eq!(drained["task"]["status"], "succeeded", "{drained}");
    assert_eq!(drained["task"]["kind"], "drain", "{drained}");
    assert_eq!(drained["task"]["result"]["drained"], true, "{drained}");
    let drain_took = t0.elapsed();
    eprintln!("drain-instance --wait returned after {drain_took:?} (heartbeat every 30 s)");
    // The long-polled lease took it at once, not at the next heartbeat.
    ensure!(
        drain_took < Duration::from_secs(15),
        "the drain waited for a heartbeat: {drain_took:?}"
    );
    let t1 = Instant::now();
    let ended = server.cli(&[
        "terminate-instance",
        &instance,
        "--wait",
        "--timeout",
        "120",
    ])?;
    assert_eq!(ended["task"]["status"], "succeeded", "{ended}");
    eprintln!(
        "terminate-instance --wait returned after {:?}",
        t1.elapsed()
    );
    assert_eq!(server.instance(&instance)?["status"], "terminated");
    let status = agent
        .guard
        .wait_timeout(EXIT)
        .with_context(|| agent.log_text())?;
    assert_eq!(status.code(), Some(EXIT_TERMINAL), "{}", agent.log_text());
    let stop_took = t1.elapsed();
    eprintln!("the agent stopped {stop_took:?} after terminate-instance");
    ensure!(
        stop_took < Duration::from_secs(15),
        "the agent learned of its end at a heartbeat: {stop_took:?}"
    );

    // Nobody boots the recorder's instance: the provision's wait gives up at its
    // timeout, non-zero, naming the task and how to follow it.
    let e = server
        .cli(&["provision-instance", &node_id, "--wait", "--timeout", "1"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("still ") && e.contains("after 1 s") && e.contains("get-task task-"),
        "{e}"
    );
    Ok(())
}
