//! `serve`: data directory, TLS listener with an accept loop of our own (so the
//! peer certificate reaches the request), background sensors and heartbeat flusher,
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::api::{self, PeerAuth};
use crate::ca::{self, Ca};
use crate::clock::Clock;
use crate::config::Config;
use crate::service::AppState;
use crate::store::Store;

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
pub const SERVER_URL_FILE: &str = "server-url";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate authority")]
    Ca(#[from] ca::CaError),
    #[error("state store")]
    Store(#[from] crate::store::StoreError),
    #[error("provider")]
    Provider(#[from] crate::provider::ProviderError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("server task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("--public-url {0:?} must be an https:// URL with a host")]
    BadPublicUrl(String),
    #[error(
        "--online-signing off needs at least one --module-trust-key: with no key to trust, \
         no module could be published or verified"
    )]
    NoTrustKeys,
}

/// TLS-layer client-certificate policy: offer client auth, never require it, accept
/// any presented certificate, but check the handshake signature (proof that the
/// peer holds the key). Whether the certificate is ours, valid, unrevoked and bound
/// to the right instance is decided per request, so a foreign certificate gets a
/// JSON 401 instead of a TLS alert.
#[derive(Debug)]
pub struct OfferClientAuth {
    hints: Vec<DistinguishedName>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl OfferClientAuth {
    pub fn new(ca: &Ca) -> Self {
        let hints = x509_parser::parse_x509_certificate(ca.cert_der())
            .map(|(_, c)| vec![DistinguishedName::from(c.subject().as_raw().to_vec())])
            .unwrap_or_default();
        Self {
            hints,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for OfferClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A started server; [`RunningServer::shutdown`] stops it cleanly.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// URL clients on this machine should use (also in `DIR/server-url`).
    pub url: String,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// Stops accepting, lets open requests finish (up to 5 s), flushes heartbeats.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        // Long-polled leases answer now rather than holding the graceful shutdown.
        self.state.stopping.send_replace(true);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.await?;
        }
        // VMs outlive the server: they are let go of, and the next server adopts them.
        let st = self.state.clone();
        let left = tokio::task::spawn_blocking(move || st.shutdown_vms()).await?;
        if left > 0 {
            tracing::info!(
                vms = left,
                "VMs left running; the next server on this data directory takes them back"
            );
        }
        let n = self.state.flush_dirty().await?;
        tracing::info!(flushed = n, "server stopped");
        Ok(())
    }
}

/// Narrows the data directory to 0700 (its CA key, admin token, database and the
/// identity documents are the server's alone); `true` when it was looser.
fn make_dir_private(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    Ok(true)
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `DIR/admin-token`, creating it (0600) on first start; first writer wins, as
/// for the CA.
fn load_or_create_admin_token(dir: &Path) -> Result<String, ServeError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let read = |path: &Path| -> Result<Option<String>, ServeError> {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(dir_err(path)(e)),
        }
    };
    if let Some(t) = read(&path)? {
        return Ok(t);
    }
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    let token = hex::encode(b);
    let tmp = dir.join(format!(
        ".{ADMIN_TOKEN_FILE}.{:016x}",
        rand::random::<u64>()
    ));
    ca::write_private(&tmp, format!("{token}\n").as_bytes())?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(&path)?.ok_or_else(|| dir_err(&path)(e))
        }
        Err(e) => Err(dir_err(&path)(e)),
    }
}

/// Many agents mean many sockets: lift the soft descriptor limit to the hard one.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.maximum != lim.current {
        let new = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => tracing::info!(limit = ?lim.maximum, "raised RLIMIT_NOFILE"),
            Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
        }
    }
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// Starts the server and returns once it is listening.
pub async fn start(cfg: Config, clock: Clock) -> Result<RunningServer, ServeError> {
    if let Some(u) = &cfg.public_url {
        if !u.starts_with("https://") || host_of(u).is_none() {
            return Err(ServeError::BadPublicUrl(u.clone()));
        }
    }
    if !cfg.online_signing && cfg.module_trust_keys.is_empty() {
        return Err(ServeError::NoTrustKeys);
    }
    let dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
    if make_dir_private(&dir).map_err(dir_err(&dir))? {
        tracing::warn!(dir = %dir.display(), "the data directory was readable by others; now 0700");
    }
    raise_nofile_limit();
    let ca = Ca::load_or_create(&dir)?;
    let admin_token = load_or_create_admin_token(&dir)?;
    let store = Store::open(&dir)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    // A wildcard listen address is not something a client can dial.
    let client_addr = if addr.ip().is_unspecified() {
        let ip: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    };
    let url = format!("https://{client_addr}");
    let public_url = cfg
        .public_url
        .clone()
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| {
            if cfg.provider.boots_vms() {
                // Under QEMU user networking the guest reaches the host's loopback here.
                format!("https://10.0.2.2:{}", addr.port())
            } else {
                url.clone()
            }
        });

    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1", "10.0.2.2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    names.extend(host_of(&public_url));
    names.extend(cfg.sans.iter().cloned());
    let (chain, key) = ca.server_cert(&names)?;
    let verifier = Arc::new(OfferClientAuth::new(&ca));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_client_cert_verifier(verifier)
    .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let sensor_ms = cfg.sensor_interval_ms.max(10);
    let flush_ms = cfg.flush_interval_ms.max(10);
    let provider =
        crate::provider::from_mode(cfg.provider, cfg.image_base.clone(), &cfg.libvirt_uri);
    // Before any VM is taken back: a daemon that is down must not read as VMs lost.
    provider.check()?;
    let state = AppState::with_provider(cfg, public_url, clock, ca, store, &admin_token, provider)?;

    if state.cfg.image_base.is_some() {
        match state.publish_image(None).await {
            Ok(p) => {
                tracing::info!(publication = %p.id, path = %p.path.display(), kernel = %p.kernel_version, "netboot image")
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "image folder not published; real provisioning will answer missing_netboot_image_error")
            }
        }
    }

    let url_path = dir.join(SERVER_URL_FILE);
    std::fs::write(&url_path, format!("{url}\n")).map_err(dir_err(&url_path))?;
    if state.cfg.announce {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        // Harnesses read the port from this line.
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({"listening": addr.to_string()})
        );
        let _ = out.flush();
    }
    tracing::info!(%addr, %url, public_url = %state.public_url, provider = state.provider.name(), "listening");

    let (tx, rx) = watch::channel(false);
    let router = api::app(state.clone());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(accept_loop(
        listener,
        acceptor,
        router,
        state.clone(),
        rx.clone(),
    )));
    tasks.push(tokio::spawn(periodic(
        rx.clone(),
        Duration::from_millis(sensor_ms),
        state.clone(),
        |s| async move {
            if let Err(e) = s.sense().await {
                tracing::error!(error = %e, "sensor pass failed");
            }
        },
    )));
    tasks.push(tokio::spawn(periodic(
        rx.clone(),
        Duration::from_millis(500),
        state.clone(),
        |s| async move {
            if let Err(e) = s.reap_vms().await {
                tracing::error!(error = %e.message, "VM exit watcher failed");
            }
        },
    )));
    tasks.push(tokio::spawn(periodic(
        rx.clone(),
        crate::service::retention::PRUNE_EVERY,
        state.clone(),
        |s| async move {
            if let Err(e) = s.prune().await {
                tracing::error!(error = %e, "pruning records past their retention failed");
            }
            s.sweep_identities();
        },
    )));
    tasks.push(tokio::spawn(periodic(
        rx,
        Duration::from_millis(flush_ms),
        state.clone(),
        |s| async move {
            if let Err(e) = s.flush_dirty().await {
                tracing::error!(error = %e, "heartbeat flush failed");
            }
        },
    )));
    Ok(RunningServer {
        addr,
        url,
        state,
        shutdown: tx,
        tasks,
    })
}

async fn periodic<F, Fut>(mut stop: watch::Receiver<bool>, every: Duration, state: AppState, f: F)
where
    F: Fn(AppState) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => f(state.clone()).await,
            _ = stop.changed() => break,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // hyper also applies this to idle keep-alive connections: it must outlast the
        // default heartbeat interval (30 s, +10 % jitter), or every heartbeat would
        // find its connection closed and pay a fresh TLS handshake.
        .header_read_timeout(Duration::from_secs(75));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let auth = match tls.get_ref().1.peer_certificates() {
                None | Some([]) => PeerAuth::Anonymous,
                Some(chain) => {
                    let chain: Vec<CertificateDer<'static>> =
                        chain.iter().map(|c| c.clone().into_owned()).collect();
                    match state.ca.verify_client(&chain, state.clock.now_ms()) {
                        Ok(id) => PeerAuth::Verified(Arc::new(id)),
                        Err(e) => PeerAuth::Invalid(e.to_string().into()),
                    }
                }
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(auth.clone());
                router.clone().oneshot(req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 5 s; closing them");
    }
}

/// `serve` as the binary runs it: start, wait for SIGTERM / SIGINT, stop cleanly.
pub async fn run_until_signal(cfg: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let server = start(cfg, Clock::default())
        .await
        .context("starting the server")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    server.shutdown().await.context("shutting down")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{host_of, make_dir_private};

    #[test]
    fn the_data_directory_is_narrowed_to_its_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(make_dir_private(dir.path()).unwrap());
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!make_dir_private(dir.path()).unwrap(), "already private");
    }

    #[test]
    fn host_of_urls() {
        assert_eq!(
            host_of("https://10.0.2.2:8443").as_deref(),
            Some("10.0.2.2")
        );
        assert_eq!(host_of("https://[::1]:8443/x").as_deref(), Some("::1"));
        assert_eq!(host_of("https://cp.example").as_deref(), Some("cp.example"));
    }
}
