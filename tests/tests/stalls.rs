//! Stalls through the real processes: the real `powernode-agent` against the real
//! `powernode-stub`, with a module published to a local `docker-registry` behind a
//! loopback proxy that can stop sending blob bodies.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use powernode_tests::{
    str_at, test_dir, wait_for, wait_running, Agent, ProcessGuard, Server, ServerOptions,
};
use serde_json::Value;

const RUNNING: Duration = Duration::from_secs(30);

/// Debian's `docker-registry` on a free loopback port (killed by its pid on drop).
struct DockerRegistry {
    _guard: ProcessGuard,
    port: u16,
}

fn docker_registry(dir: &Path) -> Result<DockerRegistry> {
    let bin = Path::new("/usr/bin/docker-registry");
    ensure!(
        bin.is_file(),
        "docker-registry not installed (scripts/tools installs it)"
    );
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: error\n",
            dir.join("registry-data").display()
        ),
    )?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let reg = DockerRegistry {
        _guard: ProcessGuard::new("docker-registry", child),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(reg);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("docker-registry did not listen on {port}")
}

/// A loopback proxy to `upstream`. While `stall` is set, a connection whose first
/// request GETs a blob gets the response head and a few bytes, then nothing more
/// (held open until the proxy is dropped).
struct StallProxy {
    port: u16,
    stall: Arc<AtomicBool>,
    released: Arc<AtomicBool>,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.released.store(true, Ordering::Relaxed);
    }
}

fn stall_proxy(upstream: u16) -> Result<StallProxy> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let stall = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicBool::new(false));
    let (st, rel) = (stall.clone(), released.clone());
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(mut client) = client else { return };
            let (st, rel) = (st.clone(), rel.clone());
            std::thread::spawn(move || {
                // The first request's head decides.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .map(str::to_string);
                let stalls = st.load(Ordering::Relaxed)
                    && line.is_some_and(|l| l.starts_with("GET ") && l.contains("/blobs/sha256:"));
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                if server.write_all(&head).is_err() {
                    return;
                }
                let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                    return;
                };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c2.read(&mut buf) {
                        if n == 0 || s2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let mut buf = vec![0u8; 64 << 10];
                let mut sent = 0;
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let n = if stalls { n.min(600 - sent) } else { n };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                    if stalls && sent >= 600 {
                        while !rel.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        return;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    Ok(StallProxy {
        port,
        stall,
        released,
    })
}

/// The newest `task.created` event of `kind` on the instance: its task id.
fn created_task(server: &Server, instance: &str, kind: &str) -> Result<Option<String>> {
    let events = server.cli(&["recent-events", "--instance", instance, "--limit", "200"])?;
    Ok(events["events"].as_array().and_then(|evs| {
        evs.iter()
            .find(|e| e["kind"] == "task.created" && e["detail"]["kind"] == kind)
            .and_then(|e| e["detail"]["task_id"].as_str().map(str::to_string))
    }))
}

fn service_state(inst: &Value, name: &str) -> String {
    inst["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .and_then(|s| s["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// A module update stuck on a registry that stopped sending a layer does not hold a
/// drain behind it: the drain preempts it, completes in bounded time (well inside
/// the agent's 30 s stall timeout), the update ends `cancelled` (`preempted`), and
/// the drained service stays stopped.
#[test]
fn a_drain_preempts_a_module_update_stuck_on_a_stalled_registry() -> Result<()> {
    let dir = test_dir("stalls-drain-preempts-update")?;
    let registry = docker_registry(&dir)?;
    let proxy = stall_proxy(registry.port)?;
    let server = Server::start(&dir.join("data"), ServerOptions::default())?;
    let (_node, instance) = server.create_and_provision("edge-stalls")?;
    let modules_dir = dir.join("modules");
    let modules_arg = modules_dir.to_string_lossy().into_owned();
    let mut agent = Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &[
            "--service",
            "sleeper=sleep 600",
            "--lease-seconds",
            "3",
            "--insecure-http-loopback",
            "--modules-dir",
            &modules_arg,
        ],
    )?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;

    // A runtime module in the registry behind the proxy; then the proxy stalls
    // blob bodies and the template asks for the module: a module_update task.
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("usr/share/demo"))?;
    std::fs::write(src.join("usr/share/demo/data"), vec![7u8; 1 << 20])?;
    let registry_url = format!("http://127.0.0.1:{}", proxy.port);
    server.cli(&[
        "publish-module",
        src.to_str().context("utf-8 path")?,
        "--name",
        "demo",
        "--version",
        "1",
        "--kind",
        "runtime",
        "--registry",
        &registry_url,
    ])?;
    proxy.stall.store(true, Ordering::Relaxed);
    server.cli(&[
        "set-template-modules",
        "tmpl-edge-base",
        "--runtime",
        "demo",
    ])?;
    let update = wait_for("the module_update task", RUNNING, || {
        created_task(&server, &instance, "module_update")
    })?;
    wait_for("the update leased and pulling", RUNNING, || {
        let t = server.task(&update)?;
        Ok((t["status"] == "running" && t["progress"] == "reconciling modules").then_some(t))
    })
    .with_context(|| agent.log_text())?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        server.task(&update)?["status"] == "running",
        "the update should be stuck on the stalled registry:\n{}",
        agent.log_text()
    );

    let drain = server.cli(&["drain-instance", &instance, "--timeout-seconds", "30"])?;
    let drain_id = str_at(&drain, "/task_id")?;
    let t0 = Instant::now();
    let done = wait_for("the drain done", Duration::from_secs(15), || {
        let t = server.task(&drain_id)?;
        Ok(t["status"]
            .as_str()
            .is_some_and(|s| s != "pending" && s != "running")
            .then_some(t))
    })
    .with_context(|| agent.log_text())?;
    let took = t0.elapsed();
    eprintln!("drain done {took:?} after it was asked for, the registry still stalled");
    assert_eq!(done["status"], "succeeded", "{done}");
    let upd = server.task(&update)?;
    assert_eq!(upd["status"], "cancelled", "{upd}");
    assert_eq!(upd["result"]["error"], "preempted", "{upd}");
    ensure!(
        upd["result"]["preempted_by"]
            .as_str()
            .is_some_and(|b| b.contains(&drain_id)),
        "{upd}"
    );
    // Drained, and the service stays stopped (nothing the update did restarts it).
    let inst = wait_for("drained", RUNNING, || {
        let i = server.instance(&instance)?;
        Ok((i["status"] == "draining" || i["phase"] == "drained").then_some(i))
    })?;
    ensure!(service_state(&inst, "sleeper") != "running", "{inst}");
    std::thread::sleep(Duration::from_secs(3));
    let inst = server.instance(&instance)?;
    assert_eq!(inst["phase"], "drained", "{inst}");
    ensure!(
        service_state(&inst, "sleeper") != "running",
        "the service came back after the drain: {inst}\n{}",
        agent.log_text()
    );
    ensure!(
        inst["modules"].as_array().is_none_or(|m| m.is_empty()),
        "{inst}"
    );
    assert!(agent.guard.is_running(), "{}", agent.log_text());
    agent.guard.terminate(Duration::from_secs(10));
    Ok(())
}

/// The server grants at most 3 s (`--lease-max-seconds 3`) while the agent asks for
/// 30: the agent renews within the 3 s it was granted, so a drain that runs 8 s
/// (a service that ignores SIGTERM, `--timeout-seconds 8`) keeps its one lease to
/// the end: no `lease_expired` attempt, reported once, by its first attempt.
#[test]
fn the_agent_renews_within_the_lease_the_server_granted() -> Result<()> {
    let dir = test_dir("stalls-granted-lease")?;
    let server = Server::start(
        &dir.join("data"),
        ServerOptions {
            extra: vec!["--lease-max-seconds".into(), "3".into()],
            ..ServerOptions::default()
        },
    )?;
    let (_node, instance) = server.create_and_provision("edge-lease")?;
    let script = dir.join("stubborn.sh");
    std::fs::write(&script, "trap '' TERM\nwhile :; do sleep 0.2; done\n")?;
    let service = format!("stubborn=sh {}", script.display());
    let agent = Agent::with_identity(
        &dir,
        "agent",
        &server.identity(&instance)?,
        &["--service", &service, "--lease-seconds", "30"],
    )?;
    wait_running(&server, &instance, RUNNING).with_context(|| agent.log_text())?;
    let drain = server.cli(&["drain-instance", &instance, "--timeout-seconds", "8"])?;
    let task_id = str_at(&drain, "/task_id")?;
    let t = wait_for("the drain reported", RUNNING, || {
        let t = server.task(&task_id)?;
        Ok(t["status"]
            .as_str()
            .is_some_and(|s| s != "pending" && s != "running")
            .then_some(t))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["result"]["error"], "drain_timeout", "{t}");
    assert_eq!(t["attempts"], 1, "{t}\n{}", agent.log_text());
    ensure!(
        t["history"].as_array().is_none_or(|h| h.is_empty()),
        "the lease ran out under the agent: {t}\n{}",
        agent.log_text()
    );
    server.cli(&["terminate-instance", &instance, "--force"])?;
    Ok(())
}
