//! `fleet-sim`: N simulated agents, each with its own Ed25519 key, its own certificate
//! from a real enrollment and its own mTLS connection, heartbeating against one
//! `powernode-stub`. Prints heartbeats/s, p50 / p99 latency, errors and the server's RSS.
//!
//! The named peer, measured in the same run with the same agents, certificates and
//! connection pattern, is a floor server: bare hyper + rustls (ring) answering every
//! request with a fixed body, in its own process. The ratio stub / floor says what the
//! control plane adds on top of the transport. This binary never fails on a time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use powernode_proto::{admin, node, paths, IdentityDocument};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(about = "Simulated fleet heartbeating against powernode-stub")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Heartbeat interval of every agent.
    #[arg(long, default_value_t = 3)]
    interval_secs: u64,
    /// How long each measured phase runs once all agents are connected.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// The powernode-stub binary (default: next to this binary).
    #[arg(long)]
    stub: Option<PathBuf>,
    /// Concurrent workers creating, provisioning and enrolling agents.
    #[arg(long, default_value_t = 16)]
    setup_workers: usize,
    /// Skip the floor peer.
    #[arg(long)]
    no_peer: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: the floor peer (bare hyper + rustls mTLS answering a fixed body).
    FloorServer {
        #[arg(long)]
        client_ca: PathBuf,
        #[arg(long)]
        cert_out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match &cli.cmd {
        Some(Cmd::FloorServer {
            client_ca,
            cert_out,
        }) => rt.block_on(floor_server(client_ca, cert_out)),
        None => rt.block_on(run(&cli)),
    }
}

/// 10,000 agents need 10,000 sockets on each side.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
}

/// Kills the child by its own pid when dropped, also on error paths.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields 14 and 15 (utime, stime), counted after the parenthesised command name.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let hz = rustix::param::clock_ticks_per_second() as f64;
    ticks as f64 / hz
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots_from_pem(pem: &[u8]) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &*pem) {
        roots.add(cert?)?;
    }
    Ok(Arc::new(roots))
}

fn client_config(
    roots: Arc<rustls::RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(Arc::new(match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    }))
}

/// One HTTP/1.1 keep-alive connection over TLS.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    bearer: Option<String>,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        bearer: Option<String>,
    ) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Self { send, addr, bearer })
    }

    async fn call(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(hyper::StatusCode, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        if let Some(token) = &self.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.call(method, path, body).await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{path}: unexpected body"))
    }
}

struct Enrolled {
    instance_id: String,
    config: Arc<rustls::ClientConfig>,
}

/// create-node -> provision -> identity -> CSR -> enrollment, as a real node would.
async fn enroll_one(
    admin: &mut Conn,
    roots: &Arc<rustls::RootCertStore>,
    i: usize,
) -> Result<Enrolled> {
    let created: admin::NodeResponse = admin
        .json(
            hyper::Method::POST,
            paths::ADMIN_NODES,
            Some(&admin::CreateNodeRequest {
                hostname: format!("sim-{i}"),
                template_id: admin::default_template(),
                lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
                labels: Default::default(),
            }),
        )
        .await?;
    let prov: admin::ProvisionResponse = admin
        .json(
            hyper::Method::POST,
            &paths::admin_provision(&created.node.id),
            Some(&admin::ProvisionRequest::default()),
        )
        .await?;
    let ident: IdentityDocument = admin
        .json(
            hyper::Method::GET,
            &paths::admin_instance_identity(&prov.instance.id),
            None::<&()>,
        )
        .await?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ident.instance_id.clone());
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        format!("{}{}", node::INSTANCE_URI_PREFIX, ident.instance_id),
    )?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let enrolled: node::EnrollmentResponse = admin
        .json(
            hyper::Method::POST,
            paths::ENROLLMENT,
            Some(&node::EnrollmentRequest {
                bootstrap_token: ident.bootstrap_token.clone(),
                node_id: ident.node_id.clone(),
                instance_id: ident.instance_id.clone(),
                csr_pem: csr,
                identity_source: "fleet-sim".into(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                provider: None,
            }),
        )
        .await?;
    let chain = rustls_pemfile::certs(&mut enrolled.certificate_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok(Enrolled {
        instance_id: ident.instance_id,
        config: client_config(roots.clone(), Some((chain, key)))?,
    })
}

fn handshake_body(instance_id: &str) -> Vec<u8> {
    serde_json::to_vec(&node::HandshakeRequest {
        instance_id: instance_id.to_string(),
        phase: node::Phase::Ready,
        timeline: vec![],
        failure: None,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        root: None,
    })
    .unwrap_or_default()
}

fn heartbeat_body(instance_id: &str, started: Instant) -> Vec<u8> {
    serde_json::to_vec(&node::HeartbeatRequest {
        instance_id: instance_id.to_string(),
        phase: node::Phase::Ready,
        uptime_seconds: started.elapsed().as_secs(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        modules: vec![],
        services: vec![],
        last_reconcile: None,
        cordoned: false,
        systemd: None,
    })
    .unwrap_or_default()
}

#[derive(Default)]
struct PhaseStats {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    connect_errors: u64,
    reconnects: u64,
}

struct PhaseResult {
    name: String,
    stats: PhaseStats,
    hist: hdrhistogram::Histogram<u64>,
    wall: Duration,
    connect_time: Duration,
}

/// Opens one connection per agent, then has every agent heartbeat at its interval,
/// starting at a random offset so the load is spread as in a real fleet.
async fn heartbeat_phase(
    name: &str,
    addr: SocketAddr,
    agents: &[(String, Arc<rustls::ClientConfig>)],
    interval: Duration,
    duration: Duration,
) -> Result<PhaseResult> {
    let hist = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let stats = Arc::new(Mutex::new(PhaseStats::default()));
    let connect_start = Instant::now();
    let mut conns = Vec::with_capacity(agents.len());
    // Connect in bounded waves: 10,000 simultaneous handshakes would only measure the
    // accept backlog.
    for chunk in agents.chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for (idx, (id, cfg)) in chunk.iter().enumerate() {
            let (id, cfg) = (id.clone(), cfg.clone());
            set.spawn(async move {
                let conn = async {
                    let mut c = Conn::open(addr, cfg, None).await?;
                    // The boot handshake (phase ready) is what moves an instance to
                    // running: done once per agent, outside the measured heartbeats.
                    let (status, body) = c
                        .call(
                            hyper::Method::POST,
                            paths::HANDSHAKE,
                            Some(handshake_body(&id)),
                        )
                        .await?;
                    if !status.is_success() {
                        bail!(
                            "handshake: HTTP {status}: {}",
                            String::from_utf8_lossy(&body)
                        );
                    }
                    anyhow::Ok(c)
                }
                .await;
                (idx, id.clone(), conn)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (idx, id, conn) = joined?;
            match conn {
                Ok(c) => conns.push((id, chunk[idx].1.clone(), c)),
                Err(e) => {
                    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                    s.connect_errors += 1;
                    s.first_error
                        .get_or_insert_with(|| format!("connect: {e:#}"));
                }
            }
        }
    }
    let connect_time = connect_start.elapsed();
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = tokio::task::JoinSet::new();
    let reconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for (n, (id, cfg, mut conn)) in conns.into_iter().enumerate() {
        let (hist, stats, reconnects) = (hist.clone(), stats.clone(), reconnects.clone());
        let offset = interval.mul_f64(((n as u64).wrapping_mul(2654435761) % 1000) as f64 / 1000.0);
        set.spawn(async move {
            let mut next = started + offset;
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                let t0 = Instant::now();
                if conn.send.is_closed() {
                    // The server closed an idle connection: reconnect, as a pooled
                    // client does, and count it.
                    reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(c) = Conn::open(addr, cfg.clone(), None).await {
                        conn = c;
                    }
                }
                let res = conn
                    .call(
                        hyper::Method::POST,
                        paths::HEARTBEAT,
                        Some(heartbeat_body(&id, started)),
                    )
                    .await;
                let micros = t0.elapsed().as_micros() as u64;
                match res {
                    Ok((status, _)) if status.is_success() => {
                        stats.lock().unwrap_or_else(|p| p.into_inner()).ok += 1;
                        let _ = hist
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(micros.max(1));
                    }
                    other => {
                        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                        s.errors += 1;
                        let msg = match other {
                            Ok((status, body)) => {
                                format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
                            }
                            Err(e) => format!("{e:#}"),
                        };
                        s.first_error.get_or_insert(msg);
                    }
                }
                next += interval;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let wall = started.elapsed();
    let hist = std::mem::replace(
        &mut *hist.lock().unwrap_or_else(|p| p.into_inner()),
        hdrhistogram::Histogram::new(1)?,
    );
    let mut stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner()));
    stats.reconnects = reconnects.load(std::sync::atomic::Ordering::Relaxed);
    Ok(PhaseResult {
        name: name.to_string(),
        stats,
        hist,
        wall,
        connect_time,
    })
}

fn spawn_reading_listen(mut cmd: Command) -> Result<(ChildGuard, SocketAddr)> {
    use std::io::BufRead;
    let mut child = ChildGuard(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning server")?,
    );
    let stdout = child.0.stdout.take().context("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().context("server exited before it listened")??;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if let Some(a) = v.get("listening").and_then(|a| a.as_str()) {
                break a.parse()?;
            }
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((child, addr))
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        bail!(
            "{} not found; build it first (cargo build --release -p powernode-stub)",
            path.display()
        )
    }
}

async fn run(cli: &Cli) -> Result<()> {
    let stub = match &cli.stub {
        Some(p) => p.clone(),
        None => sibling_binary("powernode-stub")?,
    };
    let data = std::env::temp_dir().join(format!("fleet-sim-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let _cleanup = DirGuard(data.clone());
    let mut cmd = Command::new(&stub);
    cmd.args(["serve", "--data"]).arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--silent-after-seconds",
        "3600",
    ]);
    let (stub_child, addr) = spawn_reading_listen(cmd)?;
    let stub_pid = stub_child.0.id();
    let ca = std::fs::read(data.join("ca.pem"))?;
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    let roots = roots_from_pem(&ca)?;
    let admin_cfg = client_config(roots.clone(), None)?;

    println!(
        "fleet-sim: {} agents, heartbeat every {} s, {} s per phase, stub at {addr}",
        cli.agents, cli.interval_secs, cli.duration_secs
    );
    let setup_start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let enrolled = Arc::new(Mutex::new(Vec::with_capacity(cli.agents)));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..cli.setup_workers.max(1) {
        let (next, enrolled, roots, admin_cfg, token) = (
            next.clone(),
            enrolled.clone(),
            roots.clone(),
            admin_cfg.clone(),
            token.clone(),
        );
        let total = cli.agents;
        set.spawn(async move {
            let mut admin = Conn::open(addr, admin_cfg, Some(token)).await?;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let e = enroll_one(&mut admin, &roots, i)
                    .await
                    .with_context(|| format!("agent {i}"))?;
                enrolled.lock().unwrap_or_else(|p| p.into_inner()).push(e);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let enrolled = std::mem::take(&mut *enrolled.lock().unwrap_or_else(|p| p.into_inner()));
    println!(
        "setup: {} nodes created, provisioned and enrolled in {:.1} s ({:.0} enrollments/s)",
        enrolled.len(),
        setup_start.elapsed().as_secs_f64(),
        enrolled.len() as f64 / setup_start.elapsed().as_secs_f64()
    );
    let agents: Vec<(String, Arc<rustls::ClientConfig>)> = enrolled
        .iter()
        .map(|e| (e.instance_id.clone(), e.config.clone()))
        .collect();
    let (rss_before, _) = rss_kib(stub_pid);
    let cpu_before = cpu_seconds(stub_pid);
    let interval = Duration::from_secs(cli.interval_secs);
    let duration = Duration::from_secs(cli.duration_secs);
    let stub_result = heartbeat_phase("powernode-stub", addr, &agents, interval, duration).await?;
    let (rss, hwm) = rss_kib(stub_pid);
    let stub_cpu = cpu_seconds(stub_pid) - cpu_before;
    report(&stub_result, cli.agents);
    println!(
        "  server RSS: {:.1} MiB before the phase, {:.1} MiB after, peak {:.1} MiB; server CPU {:.0}% of one core (connect + heartbeats)",
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        stub_cpu / (stub_result.wall + stub_result.connect_time).as_secs_f64() * 100.0
    );
    drop(stub_child);

    if !cli.no_peer {
        let cert_out = data.join("floor-cert.pem");
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["floor-server", "--client-ca"])
            .arg(data.join("ca.pem"))
            .arg("--cert-out")
            .arg(&cert_out);
        let (floor_child, floor_addr) = spawn_reading_listen(cmd)?;
        let floor_roots = roots_from_pem(&std::fs::read(&cert_out)?)?;
        // Same identities, trusting the floor's own certificate.
        let floor_agents = agents
            .iter()
            .zip(enrolled.iter())
            .map(|((id, _), e)| {
                let cfg = rebase_roots(&e.config, floor_roots.clone());
                (id.clone(), cfg)
            })
            .collect::<Vec<_>>();
        let floor_result = heartbeat_phase(
            "floor (hyper+rustls)",
            floor_addr,
            &floor_agents,
            interval,
            duration,
        )
        .await?;
        let (frss, fhwm) = rss_kib(floor_child.0.id());
        let floor_cpu = cpu_seconds(floor_child.0.id());
        report(&floor_result, cli.agents);
        println!(
            "  floor RSS: {:.1} MiB, peak {:.1} MiB; floor CPU {:.0}% of one core (connect + heartbeats)",
            frss as f64 / 1024.0,
            fhwm as f64 / 1024.0,
            floor_cpu / (floor_result.wall + floor_result.connect_time).as_secs_f64() * 100.0
        );
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        println!(
            "ratio stub/floor: p50 {:.2}x, p99 {:.2}x, throughput {:.2}x",
            ratio(
                stub_result.hist.value_at_quantile(0.5),
                floor_result.hist.value_at_quantile(0.5)
            ),
            ratio(
                stub_result.hist.value_at_quantile(0.99),
                floor_result.hist.value_at_quantile(0.99)
            ),
            (stub_result.stats.ok as f64 / stub_result.wall.as_secs_f64())
                / (floor_result.stats.ok as f64 / floor_result.wall.as_secs_f64()).max(1e-9)
        );
        drop(floor_child);
    }
    Ok(())
}

/// A client config with the same client identity but other trusted roots.
fn rebase_roots(
    cfg: &Arc<rustls::ClientConfig>,
    roots: Arc<rustls::RootCertStore>,
) -> Arc<rustls::ClientConfig> {
    let mut c = (**cfg).clone();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider()).build();
    if let Ok(v) = verifier {
        c.dangerous().set_certificate_verifier(v);
    }
    Arc::new(c)
}

fn report(r: &PhaseResult, agents: usize) {
    let h = &r.hist;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}: {agents} agents connected in {:.1} s; {} heartbeats ok, {} errors, {} connect errors, {} reconnects in {:.1} s = {:.0} heartbeats/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        r.name,
        r.connect_time.as_secs_f64(),
        r.stats.ok,
        r.stats.errors,
        r.stats.connect_errors,
        r.stats.reconnects,
        r.wall.as_secs_f64(),
        r.stats.ok as f64 / r.wall.as_secs_f64(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
    );
    if let Some(e) = &r.stats.first_error {
        println!("  first error: {e}");
    }
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The floor peer: TLS 1.3 with client certificates checked against the stub's CA
/// (the same work the stub's transport does), HTTP/1.1 keep-alive, a fixed answer.
async fn floor_server(client_ca: &Path, cert_out: &Path) -> Result<()> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).map(|mut p| {
        p.subject_alt_names.push(rcgen::SanType::IpAddress(
            "127.0.0.1"
                .parse()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ));
        p
    })?;
    let cert = params.self_signed(&key)?;
    std::fs::write(cert_out, cert.pem())?;
    let roots = roots_from_pem(&std::fs::read(client_ca)?)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{}",
        serde_json::json!({"listening": listener.local_addr()?.to_string()})
    );
    let body =
        Bytes::from_static(br#"{"instance_status":"running","heartbeat_interval_seconds":3}"#);
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        hyper::Response::builder()
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(body))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
