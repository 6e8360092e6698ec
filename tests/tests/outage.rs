//! Outages longer than a certificate, on loopback: the real `powernode-agent` with a
//! supervised service against the real `powernode-stub` process, the server stopped
//! by its pid for longer than the node's certificate lives. The node must keep its
//! workloads, retry, and come back on the same service process once the server
//! returns (re-enrolling its expired certificate with the same key).

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use powernode_tests::{test_dir, timestamp, wait_for, wait_running, Agent, Server, ServerOptions};

const RUNNING: Duration = Duration::from_secs(30);
/// The node certificate's life, as in the report.
const CERT_TTL: u64 = 60;
/// How long the control plane stays down: half a certificate life past expiry.
const OUTAGE: Duration = Duration::from_secs(90);
/// The agent's retry backoff is capped at 30 s (with jitter): it is back within
/// that after the server returns, plus a loaded machine's slack.
const RECOVERY: Duration = Duration::from_secs(75);

/// Whether `pid` is a live process (a zombie waiting for its reaper is not).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_node_outlives_a_control_plane_outage_longer_than_its_certificate() -> Result<()> {
    let dir = test_dir("outage")?;
    let opts = ServerOptions {
        cert_ttl_seconds: CERT_TTL,
        ..ServerOptions::default()
    };
    let server = Server::start(&dir.join("data"), opts)?;
    let (_node, instance) = server.create_and_provision("edge-outage")?;
    let mut agent = Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &["--service", "web=sleep 100000"],
    )?;
    let before = wait_for("the service running", RUNNING, || {
        let i = wait_running(&server, &instance, RUNNING)?;
        Ok(i["services"][0]["pid"].as_u64().map(|pid| (i.clone(), pid)))
    })
    .with_context(|| agent.log_text())?;
    let (before, service_pid) = before;
    let first_cert = std::fs::read_to_string(agent.state_dir.join("node.crt"))?;

    // The control plane goes away (stopped by its pid) for longer than the
    // certificate lives.
    let (data, opts) = server.stop()?;
    let stopped_at = std::time::Instant::now();
    while stopped_at.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_secs(5));
        ensure!(
            agent.guard.is_running(),
            "the agent exited {:?} into the outage:\n{}",
            stopped_at.elapsed(),
            agent.log_text()
        );
        ensure!(
            alive(service_pid),
            "service {service_pid} stopped {:?} into the outage:\n{}",
            stopped_at.elapsed(),
            agent.log_text()
        );
    }

    // Back on the same data directory and port.
    let server = Server::start_retrying(&data, opts)?;
    let back_at = time::OffsetDateTime::now_utc();
    let after = wait_for("a heartbeat after the outage", RECOVERY, || {
        let i = server.cli(&["get-instance", &instance])?;
        let i = i.get("instance").cloned().unwrap_or(i);
        let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
        Ok(hb.filter(|t| *t > back_at).map(|_| i))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["enrolled_at"], before["enrolled_at"], "{after}");
    assert_eq!(
        after["services"][0]["pid"].as_u64(),
        Some(service_pid),
        "the service was restarted: {after}"
    );
    assert!(alive(service_pid), "{}", agent.log_text());
    assert!(agent.guard.is_running(), "{}", agent.log_text());

    // It came back on a new certificate for the same key, and the server says how.
    let cert = std::fs::read_to_string(agent.state_dir.join("node.crt"))?;
    assert_ne!(
        cert, first_cert,
        "the node still holds its expired certificate"
    );
    let events = server.cli(&["recent-events", "--instance", &instance, "--limit", "200"])?;
    let reissued = events["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["kind"] == "certificate.reissued_after_expiry")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(reissued, 1, "{events}");

    // Heartbeats keep flowing on the new certificate.
    let later = time::OffsetDateTime::now_utc();
    wait_for("another heartbeat", RUNNING, || {
        let i = server.instance(&instance)?;
        let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
        Ok(hb.filter(|t| *t > later).map(|_| i))
    })
    .with_context(|| agent.log_text())?;
    Ok(())
}

/// The same from the other side: the node's agent was down (a node powered off,
/// an agent restarted) for longer than its certificate lives. At start it finds the
/// certificate expired and re-enrolls it with its key; the spent bootstrap token is
/// never tried.
#[test]
fn an_agent_restarted_after_its_certificate_expired_re_enrolls_it() -> Result<()> {
    const TTL: u64 = 10;
    let dir = test_dir("outage-agent")?;
    let server = Server::start(
        &dir.join("data"),
        ServerOptions {
            cert_ttl_seconds: TTL,
            ..ServerOptions::default()
        },
    )?;
    let (_node, instance) = server.create_and_provision("edge-agent-off")?;
    let identity = server.identity(&instance)?;
    let mut agent = Agent::with_identity(&dir, "agent", &identity, &[])?;
    let before = wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;
    agent.guard.kill();
    std::thread::sleep(Duration::from_secs(TTL + 3));

    let restarted_at = time::OffsetDateTime::now_utc();
    let mut agent = Agent::start(
        &agent.state_dir,
        &dir.join("agent-restarted.log"),
        &[
            "--identity",
            &dir.join("agent-identity.json").to_string_lossy(),
        ],
    )?;
    let after = wait_for("a heartbeat from the restarted agent", RUNNING, || {
        let i = server.instance(&instance)?;
        let hb = i["last_heartbeat_at"].as_str().map(timestamp).transpose()?;
        Ok(hb.filter(|t| *t > restarted_at).map(|_| i))
    })
    .with_context(|| agent.log_text())?;
    assert!(agent.guard.is_running(), "{}", agent.log_text());
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["enrolled_at"], before["enrolled_at"], "{after}");
    let events = server.cli(&["recent-events", "--instance", &instance, "--limit", "200"])?;
    ensure!(
        events["events"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["kind"] == "certificate.reissued_after_expiry")),
        "no reissue event: {events}"
    );
    Ok(())
}
