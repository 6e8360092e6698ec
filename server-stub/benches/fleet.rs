//! Fleet simulator: N agents, each with its own Ed25519 key, certificate and TLS
//! connection, heartbeating against one `powernode-stub` (release build, its own
//! process). Prints heartbeats/s, latency percentiles, errors and the server's RSS
//! and CPU. It never fails on time: figures only.
//!
//! `cargo bench -p powernode-stub --bench fleet -- --agents 10000 --interval 3 --duration 60`

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use powernode_proto::{paths, IdentityDocument};
use powernode_stub::cli::AdminClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use serde_json::json;

struct Opts {
    agents: usize,
    interval: f64,
    duration: f64,
    setup_concurrency: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        agents: 1000,
        interval: 3.0,
        duration: 30.0,
        setup_concurrency: 16,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--agents" => o.agents = val.parse().unwrap_or(o.agents),
            "--interval" => o.interval = val.parse().unwrap_or(o.interval),
            "--duration" => o.duration = val.parse().unwrap_or(o.duration),
            "--setup-concurrency" => o.setup_concurrency = val.parse().unwrap_or(16),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// The server child, killed by pid on drop.
struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm field.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (rss_kb, ticks as f64 / 100.0)
}

struct Agent {
    instance_id: String,
    tls: Arc<rustls::ClientConfig>,
}

async fn setup_agent(admin: &AdminClient, i: usize, ca_pem: &str, base: &str) -> Result<Agent> {
    let (s, t) = admin
        .call(
            reqwest::Method::POST,
            paths::ADMIN_NODES,
            Some(json!({"hostname": format!("bench-{i}"), "lifecycle_class": "ephemeral"})),
        )
        .await?;
    anyhow::ensure!(s.is_success(), "create-node: {t}");
    let node: serde_json::Value = serde_json::from_str(&t)?;
    let node_id = node["node"]["id"].as_str().context("node id")?.to_string();
    let (s, t) = admin
        .call(
            reqwest::Method::POST,
            &paths::admin_provision(&node_id),
            Some(json!({})),
        )
        .await?;
    anyhow::ensure!(s.is_success(), "provision: {t}");
    let p: serde_json::Value = serde_json::from_str(&t)?;
    let inst = p["instance"]["id"]
        .as_str()
        .context("instance id")?
        .to_string();
    let (s, t) = admin
        .call(
            reqwest::Method::GET,
            &paths::admin_instance_identity(&inst),
            None,
        )
        .await?;
    anyhow::ensure!(s.is_success(), "identity: {t}");
    let doc = IdentityDocument::parse(t.as_bytes())?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, inst.as_str());
    let csr = params.serialize_request(&key)?.pem()?;
    let http = powernode_stub::cli::pinned_client(ca_pem, None)?;
    let r = http
        .post(format!("{base}{}", paths::ENROLLMENT))
        .json(&json!({
            "bootstrap_token": doc.bootstrap_token, "node_id": doc.node_id,
            "instance_id": inst, "csr_pem": csr, "identity_source": "file",
            "agent_version": "fleet-sim",
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "enroll: {}", r.text().await?);
    let e: serde_json::Value = r.json().await?;
    let cert_pem = e["certificate_pem"].as_str().context("certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in powernode_stub::ca::pem_certs(ca_pem) {
        roots.add(c)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        powernode_stub::ca::pem_certs(cert_pem),
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
    )?;
    Ok(Agent {
        instance_id: inst,
        tls: Arc::new(tls),
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let conn = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn beat(sender: &mut Sender, body: &Bytes) -> Result<bool> {
    sender.ready().await?;
    let req = hyper::Request::post(paths::HEARTBEAT)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}

fn main() -> Result<()> {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(o))
}

async fn run(o: Opts) -> Result<()> {
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let l = getrlimit(Resource::Nofile);
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        );
    }
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_powernode-stub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--silent-after-seconds",
            "600",
        ])
        .args([
            "--heartbeat-interval-seconds",
            &format!("{}", o.interval.ceil() as u64),
        ])
        .arg("--data")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let server = Server(child);
    let pid = server.0.id();
    let addr = serde_json::from_str::<serde_json::Value>(&line)?["listening"]
        .as_str()
        .context("listening")?
        .to_string();
    let base = format!("https://{addr}");
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    let admin = AdminClient::from_data_dir(dir.path(), None)?;

    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(o.setup_concurrency));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..o.agents {
        let (admin, ca, base, sem) = (admin.clone(), ca_pem.clone(), base.clone(), sem.clone());
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            setup_agent(&admin, i, &ca, &base).await
        });
    }
    let mut agents = Vec::with_capacity(o.agents);
    while let Some(r) = set.join_next().await {
        agents.push(r??);
    }
    let setup = t0.elapsed();
    let (rss_idle, _) = proc_stat(pid);
    println!(
        "setup: {} agents created, provisioned and enrolled in {:.1} s; server RSS {} MiB",
        agents.len(),
        setup.as_secs_f64(),
        rss_idle / 1024
    );

    // Connect everyone first (handshakes are not heartbeats), then go ready.
    let t1 = Instant::now();
    let mut senders = Vec::with_capacity(agents.len());
    for chunk in agents.chunks(256) {
        let mut js = tokio::task::JoinSet::new();
        for (k, a) in chunk.iter().enumerate() {
            let (addr, tls) = (addr.clone(), a.tls.clone());
            js.spawn(async move { (k, connect(&addr, tls).await) });
        }
        let mut got: Vec<(usize, Sender)> = Vec::new();
        while let Some(r) = js.join_next().await {
            let (k, s) = r?;
            got.push((k, s?));
        }
        got.sort_by_key(|(k, _)| *k);
        senders.extend(got.into_iter().map(|(_, s)| s));
    }
    for (a, s) in agents.iter().zip(senders.iter_mut()) {
        let body = Bytes::from(serde_json::to_vec(&json!({
            "instance_id": a.instance_id, "phase": "ready", "uptime_seconds": 1,
            "agent_version": "fleet-sim"}))?);
        anyhow::ensure!(beat(s, &body).await?, "first heartbeat refused");
    }
    let (rss_conn, _) = proc_stat(pid);
    println!(
        "connected and ready: {} TLS connections in {:.1} s; server RSS {} MiB",
        senders.len(),
        t1.elapsed().as_secs_f64(),
        rss_conn / 1024
    );

    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(o.interval);
    let duration = Duration::from_secs_f64(o.duration);
    let (_, cpu0) = proc_stat(pid);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (a, mut s)) in agents.iter().zip(senders).enumerate() {
        let errors = errors.clone();
        let body = Bytes::from(serde_json::to_vec(&json!({
            "instance_id": a.instance_id, "phase": "ready", "uptime_seconds": 10,
            "agent_version": "fleet-sim", "modules": [], "services": []}))?);
        // Spread the fleet evenly over the interval.
        let offset = interval.mul_f64(i as f64 / o.agents.max(1) as f64);
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut next = tokio::time::Instant::from_std(start) + offset;
            loop {
                tokio::time::sleep_until(next).await;
                if start.elapsed() >= duration {
                    break;
                }
                let t = Instant::now();
                match beat(&mut s, &body).await {
                    Ok(true) => lat.push(t.elapsed().as_micros() as u32),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += interval;
            }
            lat
        });
    }
    let mut lat: Vec<u32> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r?);
    }
    let (rss_end, cpu1) = proc_stat(pid);
    // Beats are sent during `duration`; the tail is agents waiting for their slot.
    let wall = o.duration;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|v| *v as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    println!(
        "fleet: {} agents, interval {:.1} s, {:.0} s measured",
        o.agents, o.interval, wall
    );
    println!(
        "heartbeats: {} ok, {:.0}/s; errors {}",
        lat.len(),
        lat.len() as f64 / wall,
        errors.load(Ordering::Relaxed)
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(f64::NAN)
    );
    println!(
        "server: RSS {} MiB, CPU {:.0}% of one core during the run (2 cores, simulator on the same machine)",
        rss_end / 1024,
        (cpu1 - cpu0) / wall * 100.0
    );
    drop(server);
    Ok(())
}
