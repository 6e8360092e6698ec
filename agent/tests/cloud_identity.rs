//! Cloud identity providers against a mock metadata server on 127.0.0.1:0 that
//! answers in each provider's documented format (fixtures written from the public
//! documentation), with the error cases users meet: 404 (absent), 5xx (retried),
//! 5xx forever (bounded give-up), malformed documents (the field is named), refused
//! tokens and missing headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use powernode_agent::identity::cloud::{
    self,
    aws::Aws,
    azure::Azure,
    digitalocean::DigitalOcean,
    gcp::Gcp,
    hetzner::Hetzner,
    openstack::{ConfigDrive, OpenStack},
    oracle::Oracle,
    scaleway::Scaleway,
    url::UrlSource,
    vultr::Vultr,
    CloudOptions, CloudProvider, RetryPolicy,
};
use powernode_agent::identity::SourceErrorKind;
use powernode_proto::IdentityDocument;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- mock server

#[derive(Debug, Clone)]
struct Req {
    /// The client's source port (Scaleway's privileged-port rule).
    peer_port: u16,
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: HashMap<String, String>,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn query(&self) -> &str {
        self.target.split_once('?').map(|(_, q)| q).unwrap_or("")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

fn ok(body: impl Into<Vec<u8>>) -> Resp {
    Resp {
        status: 200,
        body: body.into(),
        content_type: "text/plain",
        headers: Vec::new(),
    }
}
fn json(v: &serde_json::Value) -> Resp {
    Resp {
        status: 200,
        body: v.to_string().into_bytes(),
        content_type: "application/json",
        headers: Vec::new(),
    }
}
fn status(code: u16) -> Resp {
    Resp {
        status: code,
        body: format!("status {code}").into_bytes(),
        content_type: "text/plain",
        headers: Vec::new(),
    }
}
fn redirect(to: &str) -> Resp {
    Resp {
        headers: vec![("Location", to.to_string())],
        ..status(302)
    }
}

type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

/// A tiny HTTP/1.1 server: one request per connection (`Connection: close`), every
/// request logged.
struct Mock {
    base: String,
    log: Arc<Mutex<Vec<Req>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mock {
    async fn start(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Self {
        Self::start_with(None, handler).await
    }

    /// With `tls`, the mock speaks HTTPS.
    async fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: impl Fn(&Req) -> Resp + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task = {
            let log = log.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else {
                        return;
                    };
                    let (log, handler, tls) = (log.clone(), handler.clone(), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            None => {
                                let _ = serve(stream, peer.port(), log, handler).await;
                            }
                            Some(acceptor) => {
                                if let Ok(s) = acceptor.accept(stream).await {
                                    let _ = serve(s, peer.port(), log, handler).await;
                                }
                            }
                        }
                    });
                }
            })
        };
        Self { base, log, task }
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path() == path).count()
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    peer_port: u16,
    log: Arc<Mutex<Vec<Req>>>,
    handler: Handler,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        assert!(buf.len() < 64 * 1024, "request head too large");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let req = Req {
        peer_port,
        method,
        target,
        headers,
    };
    log.lock().unwrap().push(req.clone());
    let resp = handler(&req);
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&resp.body).await?;
    stream.shutdown().await
}

// ---------------------------------------------------------------- fixtures

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn doc_json(instance: &str) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "control_plane_url": "https://10.0.2.2:8443",
        "ca_pem": CA,
        "bootstrap_token": "tok-123",
        "node_id": "node-1",
        "instance_id": instance,
        "hostname": "edge-1",
    })
}

fn doc(instance: &str) -> IdentityDocument {
    IdentityDocument::parse(doc_json(instance).to_string().as_bytes()).unwrap()
}

/// Fast retries: tests must not sleep for real backoff.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(20),
        max_attempts: 4,
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
    }
}

/// Options with no DMI evidence and an empty command line.
fn opts(pinned: Option<&str>) -> (CloudOptions, tempfile::TempDir) {
    let dmi = tempfile::tempdir().unwrap();
    (
        CloudOptions {
            pinned: pinned.map(str::to_string),
            deadline: Duration::from_secs(10),
            retry: fast_retry(),
            cmdline: Some(String::new()),
            dmi_root: dmi.path().to_path_buf(),
            config_drive: ConfigDrive::Off,
        },
        dmi,
    )
}

async fn run(
    provider: impl CloudProvider + 'static,
    opts: &CloudOptions,
) -> Result<Option<cloud::CloudIdentity>, powernode_agent::identity::SourceError> {
    let providers: Vec<Box<dyn CloudProvider>> = vec![Box::new(provider)];
    cloud::probe_with(&providers, opts).await
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    powernode_agent::error_chain(e)
}

/// A port nothing listens on.
async fn dead_base() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

// ---------------------------------------------------------------- AWS IMDSv2

const AWS_TOKEN: &str = "AQAEAFTW-token==";

/// IMDSv2 as documented: PUT /latest/api/token with a TTL header returns a token;
/// every GET without the right `X-aws-ec2-metadata-token` is 401.
fn imds(routes: HashMap<&'static str, Resp>) -> impl Fn(&Req) -> Resp + Send + Sync {
    move |req: &Req| {
        if req.path() == "/latest/api/token" {
            if req.method != "PUT" {
                return status(405);
            }
            return match req.header("x-aws-ec2-metadata-token-ttl-seconds") {
                Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
                    ok(AWS_TOKEN)
                }
                _ => status(400),
            };
        }
        if req.header("x-aws-ec2-metadata-token") != Some(AWS_TOKEN) {
            return status(401);
        }
        routes
            .get(req.path())
            .cloned()
            .unwrap_or_else(|| status(404))
    }
}

fn aws_routes(user_data: &serde_json::Value) -> HashMap<&'static str, Resp> {
    HashMap::from([
        ("/latest/user-data", ok(user_data.to_string())),
        ("/latest/meta-data/instance-id", ok("i-0123456789abcdef0")),
        ("/latest/meta-data/placement/region", ok("eu-west-3")),
        (
            "/latest/meta-data/placement/availability-zone",
            ok("eu-west-3a"),
        ),
        ("/latest/meta-data/local-ipv4", ok("172.31.5.10")),
        ("/latest/meta-data/public-ipv4", ok("15.236.1.2")),
    ])
}

#[tokio::test]
async fn aws_happy_path_reports_facts() {
    let mock = Mock::start(imds(aws_routes(&doc_json("inst-aws")))).await;
    let (o, _d) = opts(Some("aws"));
    let found = run(Aws::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.source, "aws");
    assert_eq!(found.document, doc("inst-aws"));
    assert_eq!(found.facts.provider, "aws");
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("i-0123456789abcdef0")
    );
    assert_eq!(found.facts.region.as_deref(), Some("eu-west-3"));
    assert_eq!(found.facts.addresses, vec!["172.31.5.10", "15.236.1.2"]);
    let reqs = mock.requests();
    assert_eq!(reqs[0].method, "PUT", "token first: {reqs:?}");
    assert_eq!(reqs[0].path(), "/latest/api/token");
    assert!(reqs[1..]
        .iter()
        .all(|r| r.header("x-aws-ec2-metadata-token") == Some(AWS_TOKEN)));
}

#[tokio::test]
async fn aws_region_falls_back_to_the_zone() {
    let mut routes = aws_routes(&doc_json("inst-aws"));
    routes.remove("/latest/meta-data/placement/region");
    routes.remove("/latest/meta-data/public-ipv4");
    let mock = Mock::start(imds(routes)).await;
    let (o, _d) = opts(Some("aws"));
    let found = run(Aws::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.facts.region.as_deref(), Some("eu-west-3"));
    assert_eq!(found.facts.addresses, vec!["172.31.5.10"]);
}

#[tokio::test]
async fn aws_without_user_data_is_absent() {
    let mut routes = aws_routes(&doc_json("x"));
    routes.remove("/latest/user-data");
    let mock = Mock::start(imds(routes)).await;
    let (o, _d) = opts(Some("aws"));
    assert_eq!(run(Aws::new(&mock.base), &o).await.unwrap(), None);
    // Absence stops before the facts are read.
    assert_eq!(mock.count("/latest/meta-data/instance-id"), 0);
}

#[tokio::test]
async fn aws_500_then_success_is_retried() {
    let routes = aws_routes(&doc_json("inst-aws"));
    let failures = Arc::new(Mutex::new(2));
    let inner = imds(routes);
    let f = failures.clone();
    let mock = Mock::start(move |req: &Req| {
        if req.path() == "/latest/user-data" {
            let mut left = f.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return status(503);
            }
        }
        inner(req)
    })
    .await;
    let (o, _d) = opts(Some("aws"));
    let found = run(Aws::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document.instance_id, "inst-aws");
    assert_eq!(mock.count("/latest/user-data"), 3);
}

#[tokio::test]
async fn aws_500_forever_gives_up_within_the_bound() {
    let mock = Mock::start(|req: &Req| {
        if req.path() == "/latest/api/token" {
            ok(AWS_TOKEN)
        } else {
            status(500)
        }
    })
    .await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert_eq!(err.strategy, "aws");
    match &err.kind {
        SourceErrorKind::GaveUp { attempts, url, .. } => {
            assert_eq!(*attempts, 4);
            assert!(url.ends_with("/latest/user-data"), "{url}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(mock.count("/latest/user-data"), 4);
    let text = chain(&err);
    assert!(text.contains("aws") && text.contains("HTTP 500"), "{text}");

    // The deadline bounds the total wait even when attempts would allow more.
    let (mut o, _d) = opts(Some("aws"));
    o.retry.max_attempts = 1000;
    o.deadline = Duration::from_millis(300);
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    // Counted, not timed: the deadline, not the 1000 attempts, ended it.
    let attempts = mock.count("/latest/user-data") - 4;
    assert!((1..1000).contains(&attempts), "{attempts} attempts");
    assert!(chain(&err).contains("deadline"), "{}", chain(&err));
}

#[tokio::test]
async fn aws_malformed_data_names_the_field() {
    // User data that is not JSON.
    let mut routes = aws_routes(&doc_json("x"));
    routes.insert("/latest/user-data", ok("#cloud-config\nusers: []\n"));
    let mock = Mock::start(imds(routes)).await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(matches!(err.kind, SourceErrorKind::Document(_)), "{err:?}");
    assert!(chain(&err).contains("aws"));

    // A document missing its token.
    let mut d = doc_json("x");
    d.as_object_mut().unwrap().remove("bootstrap_token");
    let mock = Mock::start(imds(aws_routes(&d))).await;
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains("aws") && text.contains("bootstrap_token"),
        "{text}"
    );

    // Provider metadata that is not what its documentation says.
    let mut routes = aws_routes(&doc_json("x"));
    routes.insert("/latest/meta-data/local-ipv4", ok("not-an-ip"));
    let mock = Mock::start(imds(routes)).await;
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    match &err.kind {
        SourceErrorKind::Metadata { field, .. } => assert_eq!(field, "meta-data/local-ipv4"),
        other => panic!("unexpected {other:?}"),
    }
    let mut routes = aws_routes(&doc_json("x"));
    routes.remove("/latest/meta-data/instance-id");
    let mock = Mock::start(imds(routes)).await;
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(
        chain(&err).contains("meta-data/instance-id"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn aws_token_refused_is_an_error_when_pinned_and_absence_when_guessing() {
    let mock = Mock::start(|req: &Req| {
        if req.path() == "/latest/api/token" {
            status(403)
        } else {
            ok("v1 data")
        }
    })
    .await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    match &err.kind {
        SourceErrorKind::HttpStatus { status, method, .. } => {
            assert_eq!((*status, *method), (403, "PUT"))
        }
        other => panic!("unexpected {other:?}"),
    }
    // IMDSv1 is never used as a fallback.
    assert_eq!(mock.count("/latest/user-data"), 0);
    // Guessing (no pin, no DMI evidence): a refused first request is "not AWS".
    let (o, _d) = opts(None);
    assert_eq!(run(Aws::new(&mock.base), &o).await.unwrap(), None);
}

#[tokio::test]
async fn aws_wrong_token_header_is_reported() {
    // A service that hands out a token but then refuses it (what IMDS does with a
    // wrong or expired `X-aws-ec2-metadata-token`: 401).
    let mock = Mock::start(|req: &Req| {
        if req.path() == "/latest/api/token" {
            ok(AWS_TOKEN)
        } else {
            status(401)
        }
    })
    .await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::HttpStatus { status: 401, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn aws_unreachable_pinned_is_an_error_guessing_is_absent() {
    let base = dead_base().await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::GaveUp { attempts: 4, .. }),
        "{err:?}"
    );
    let (o, _d) = opts(None);
    assert_eq!(run(Aws::new(&base), &o).await.unwrap(), None);
}

#[tokio::test]
async fn dmi_evidence_makes_a_broken_provider_an_error() {
    let mock = Mock::start(|req: &Req| {
        if req.path() == "/latest/api/token" {
            status(500)
        } else {
            status(404)
        }
    })
    .await;
    // No evidence: a guess that never succeeded is skipped, without retries.
    let (o, dmi) = opts(None);
    assert_eq!(run(Aws::new(&mock.base), &o).await.unwrap(), None);
    assert_eq!(mock.count("/latest/api/token"), 1);
    // The firmware says EC2: the same failure must surface.
    std::fs::write(dmi.path().join("sys_vendor"), "Amazon EC2\n").unwrap();
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::GaveUp { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_pin_to_another_source_asks_nothing() {
    let mock = Mock::start(imds(aws_routes(&doc_json("x")))).await;
    let (o, _d) = opts(Some("fw_cfg"));
    assert_eq!(run(Aws::new(&mock.base), &o).await.unwrap(), None);
    assert!(mock.requests().is_empty());
}

// ---------------------------------------------------------------- generic URL

#[tokio::test]
async fn url_source_fetches_the_document() {
    let body = doc_json("inst-url");
    let mock = Mock::start(move |req: &Req| match req.path() {
        "/ids/node-1.json" => json(&body),
        "/old" => redirect("/ids/node-1.json"),
        _ => status(404),
    })
    .await;
    let cmdline = format!("quiet powernode.identity_url={}/ids/node-1.json", mock.base);
    let source = UrlSource::from_cmdline(&cmdline).unwrap();
    let (o, _d) = opts(None);
    // Named on the command line: detected, so asked first and patiently.
    let found = run(source, &o).await.unwrap().unwrap();
    assert_eq!(found.source, "url");
    assert_eq!(found.document, doc("inst-url"));
    assert_eq!(found.facts.provider, "url");

    // A user's URL may redirect (metadata services never do).
    let found = run(UrlSource::new(format!("{}/old", mock.base), None), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document, doc("inst-url"));

    // The standard probe reads the URL off the command line too.
    let (mut o, _d) = opts(None);
    o.cmdline = Some(cmdline);
    let found = cloud::probe(&o).await.unwrap().unwrap();
    assert_eq!(found.source, "url");
}

#[tokio::test]
async fn url_source_errors() {
    let mock = Mock::start(|req: &Req| match req.path() {
        "/bad" => ok("{\"version\": 1, \"node_id\": 5}"),
        "/flaky" => status(502),
        _ => status(404),
    })
    .await;
    let (o, _d) = opts(None);
    // A named URL that 404s is broken, not absent.
    let err = run(UrlSource::new(format!("{}/missing", mock.base), None), &o)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    let err = run(UrlSource::new(format!("{}/bad", mock.base), None), &o)
        .await
        .unwrap_err();
    assert!(chain(&err).contains("url"), "{}", chain(&err));
    assert!(matches!(err.kind, SourceErrorKind::Document(_)));
    let err = run(UrlSource::new(format!("{}/flaky", mock.base), None), &o)
        .await
        .unwrap_err();
    assert!(matches!(
        err.kind,
        SourceErrorKind::GaveUp { attempts: 4, .. }
    ));
    assert_eq!(mock.count("/flaky"), 4);
    // No URL on the command line: the source is absent and asks nothing.
    let before = mock.requests().len();
    assert_eq!(run(UrlSource::default(), &o).await.unwrap(), None);
    assert_eq!(mock.requests().len(), before);
}

#[tokio::test]
async fn url_source_https_pins_the_given_ca() {
    let pki = pki();
    let body = doc_json("inst-tls");
    let mock = Mock::start_with(Some(pki.acceptor()), move |_: &Req| json(&body)).await;
    let url = format!("{}/id.json", mock.base);
    let (o, _d) = opts(None);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&pki.ca_pem);
    let cmdline = format!("powernode.identity_url={url} powernode.identity_url_ca_b64={b64}");
    let found = run(UrlSource::from_cmdline(&cmdline).unwrap(), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document, doc("inst-tls"));

    // The system bundle is the fallback when nothing is pinned.
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.crt");
    std::fs::write(&bundle, &pki.ca_pem).unwrap();
    let source = UrlSource::new(&url, None).with_system_bundle(Some(bundle));
    assert!(run(source, &o).await.unwrap().is_some());

    // Another CA pinned: the TLS handshake fails, reported (never skipped).
    let other = self::pki();
    let err = run(UrlSource::new(&url, Some(other.ca_pem)), &o)
        .await
        .unwrap_err();
    assert_eq!(err.strategy, "url");
    assert!(
        matches!(err.kind, SourceErrorKind::GaveUp { .. }),
        "{err:?}"
    );
    // No pin and no bundle: refused before any request.
    let before = mock.requests().len();
    let err = run(UrlSource::new(&url, None).with_system_bundle(None), &o)
        .await
        .unwrap_err();
    assert!(chain(&err).contains("no CA is pinned"), "{}", chain(&err));
    assert_eq!(mock.requests().len(), before);
}

struct Pki {
    ca_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Pki {
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it.
fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

// ---------------------------------------------------------------- GCP

/// The GCE metadata server: `Metadata-Flavor: Google` or 403.
fn gce(routes: HashMap<&'static str, Resp>) -> impl Fn(&Req) -> Resp + Send + Sync {
    move |req: &Req| {
        if req.header("metadata-flavor") != Some("Google") {
            return Resp {
                status: 403,
                body: b"Missing Metadata-Flavor:Google header.".to_vec(),
                content_type: "text/html",
                headers: Vec::new(),
            };
        }
        routes
            .get(req.path())
            .cloned()
            .unwrap_or_else(|| status(404))
    }
}

fn gce_routes() -> HashMap<&'static str, Resp> {
    HashMap::from([
        ("/computeMetadata/v1/instance/id", ok("4520031799277581759")),
        (
            "/computeMetadata/v1/instance/zone",
            ok("projects/123456789012/zones/europe-west4-b"),
        ),
        (
            "/computeMetadata/v1/instance/network-interfaces/",
            json(&serde_json::json!([{
                "ip": "10.164.0.2",
                "mac": "42:01:0a:a4:00:02",
                "network": "projects/123456789012/networks/default",
                "accessConfigs": [{"externalIp": "34.90.1.2", "type": "ONE_TO_ONE_NAT"}],
            }])),
        ),
    ])
}

#[tokio::test]
async fn gcp_attribute_then_user_data() {
    let mut routes = gce_routes();
    routes.insert(
        "/computeMetadata/v1/instance/attributes/powernode-identity",
        ok(doc_json("inst-gcp").to_string()),
    );
    routes.insert(
        "/computeMetadata/v1/instance/attributes/user-data",
        ok("#cloud-config\n"),
    );
    let mock = Mock::start(gce(routes)).await;
    let (o, _d) = opts(Some("gcp"));
    let found = run(Gcp::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.source, "gcp");
    assert_eq!(found.document, doc("inst-gcp"));
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("4520031799277581759")
    );
    assert_eq!(found.facts.region.as_deref(), Some("europe-west4"));
    assert_eq!(found.facts.addresses, vec!["10.164.0.2", "34.90.1.2"]);
    assert!(mock
        .requests()
        .iter()
        .any(|r| r.path().ends_with("network-interfaces/") && r.query() == "recursive=true"));

    // Without the attribute, `user-data` holds the document.
    let mut routes = gce_routes();
    routes.insert(
        "/computeMetadata/v1/instance/attributes/user-data",
        ok(doc_json("inst-ud").to_string()),
    );
    let mock = Mock::start(gce(routes)).await;
    let found = run(Gcp::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document.instance_id, "inst-ud");

    // Neither: absent.
    let mock = Mock::start(gce(gce_routes())).await;
    assert_eq!(run(Gcp::new(&mock.base), &o).await.unwrap(), None);
}

#[tokio::test]
async fn gcp_errors() {
    // A server that refuses our flavor header (what GCE does without it): 403.
    let mock = Mock::start(|_: &Req| status(403)).await;
    let (o, _d) = opts(Some("gcp"));
    let err = run(Gcp::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::HttpStatus { status: 403, .. }),
        "{err:?}"
    );
    assert!(mock
        .requests()
        .iter()
        .all(|r| r.header("metadata-flavor") == Some("Google")));

    let mut routes = gce_routes();
    routes.insert(
        "/computeMetadata/v1/instance/attributes/user-data",
        ok(doc_json("x").to_string()),
    );
    routes.insert(
        "/computeMetadata/v1/instance/network-interfaces/",
        json(&serde_json::json!([{"ip": "10.164.0.2", "accessConfigs": [{"externalIp": "nope"}]}])),
    );
    let mock = Mock::start(gce(routes)).await;
    let err = run(Gcp::new(&mock.base), &o).await.unwrap_err();
    match &err.kind {
        SourceErrorKind::Metadata { field, .. } => assert_eq!(
            field,
            "instance/network-interfaces[0].accessConfigs[0].externalIp"
        ),
        other => panic!("unexpected {other:?}"),
    }

    let mut routes = gce_routes();
    routes.insert(
        "/computeMetadata/v1/instance/attributes/user-data",
        ok(doc_json("x").to_string()),
    );
    routes.insert("/computeMetadata/v1/instance/zone", ok("nowhere"));
    let mock = Mock::start(gce(routes)).await;
    let err = run(Gcp::new(&mock.base), &o).await.unwrap_err();
    assert!(chain(&err).contains("instance/zone"), "{}", chain(&err));
}

// ---------------------------------------------------------------- Azure

/// Azure IMDS: `Metadata: true` and an `api-version`, or 400 with a JSON error.
fn azure_imds(routes: HashMap<&'static str, Resp>) -> impl Fn(&Req) -> Resp + Send + Sync {
    move |req: &Req| {
        if req.header("metadata") != Some("true") {
            return Resp {
                status: 400,
                ..json(
                    &serde_json::json!({"error": "Bad request. Required metadata header not specified"}),
                )
            };
        }
        if !req.query().contains("api-version=") {
            return Resp {
                status: 400,
                ..json(
                    &serde_json::json!({"error": "Bad request. api-version was not specified in the request."}),
                )
            };
        }
        routes
            .get(req.path())
            .cloned()
            .unwrap_or_else(|| status(404))
    }
}

fn azure_instance() -> serde_json::Value {
    serde_json::json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "location": "westeurope",
            "name": "edge-1",
            "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
            "zone": "1",
            "userData": "",
        },
        "network": {
            "interface": [{
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": "20.61.1.2"}],
                    "subnet": [{"address": "10.0.0.0", "prefix": "24"}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": "000D3AF806EC",
            }]
        }
    })
}

fn azure_routes(user_data_b64: &str) -> HashMap<&'static str, Resp> {
    HashMap::from([
        ("/metadata/instance", json(&azure_instance())),
        ("/metadata/instance/compute/userData", ok(user_data_b64)),
    ])
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn azure_user_data_and_facts() {
    let ud = b64(doc_json("inst-az").to_string().as_bytes());
    let mock = Mock::start(azure_imds(azure_routes(&ud))).await;
    let (o, _d) = opts(Some("azure"));
    let found = run(Azure::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document, doc("inst-az"));
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("02aab8a4-74ef-476e-8182-f6d2ba4166a6")
    );
    assert_eq!(found.facts.region.as_deref(), Some("westeurope"));
    assert_eq!(found.facts.addresses, vec!["10.0.0.4", "20.61.1.2"]);
    let ud_req = mock
        .requests()
        .into_iter()
        .find(|r| r.path() == "/metadata/instance/compute/userData")
        .unwrap();
    assert!(ud_req.query().contains("format=text"), "{}", ud_req.target);

    // Empty userData: absent, unless the provisioning ISO's customData holds it.
    let mock = Mock::start(azure_imds(azure_routes(""))).await;
    assert_eq!(run(Azure::new(&mock.base), &o).await.unwrap(), None);
    let dir = tempfile::tempdir().unwrap();
    let ovf = dir.path().join("ovf-env.xml");
    std::fs::write(
        &ovf,
        format!(
            "<?xml version=\"1.0\"?><ns0:Environment xmlns:ns0=\"http://schemas.dmtf.org/ovf/environment/1\" \
             xmlns:ns1=\"http://schemas.microsoft.com/windowsazure\"><ns1:ProvisioningSection>\
             <ns1:LinuxProvisioningConfigurationSet><ns1:HostName>edge-1</ns1:HostName>\
             <ns1:CustomData>{}</ns1:CustomData></ns1:LinuxProvisioningConfigurationSet>\
             </ns1:ProvisioningSection></ns0:Environment>",
            b64(doc_json("inst-custom").to_string().as_bytes())
        ),
    )
    .unwrap();
    let found = run(Azure::new(&mock.base).with_ovf_env(&ovf), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document.instance_id, "inst-custom");
}

#[tokio::test]
async fn azure_errors() {
    let (o, _d) = opts(Some("azure"));
    // userData that is not base64.
    let mock = Mock::start(azure_imds(azure_routes("%%% not base64"))).await;
    let err = run(Azure::new(&mock.base), &o).await.unwrap_err();
    match &err.kind {
        SourceErrorKind::Metadata { field, .. } => assert_eq!(field, "compute.userData"),
        other => panic!("unexpected {other:?}"),
    }
    // An instance document without vmId.
    let mut inst = azure_instance();
    inst["compute"].as_object_mut().unwrap().remove("vmId");
    let ud = b64(doc_json("x").to_string().as_bytes());
    let mut routes = azure_routes(&ud);
    routes.insert("/metadata/instance", json(&inst));
    let mock = Mock::start(azure_imds(routes)).await;
    let err = run(Azure::new(&mock.base), &o).await.unwrap_err();
    assert!(chain(&err).contains("compute.vmId"), "{}", chain(&err));
    // A truncated instance document.
    let mut routes = azure_routes(&ud);
    routes.insert("/metadata/instance", ok("{\"compute\": {"));
    let mock = Mock::start(azure_imds(routes)).await;
    let err = run(Azure::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(&err.kind, SourceErrorKind::Metadata { field, .. } if field == "instance"),
        "{err:?}"
    );
    // IMDS without the header answers 400: the mock proves we always send it.
    let mock = Mock::start(azure_imds(azure_routes(&ud))).await;
    run(Azure::new(&mock.base), &o).await.unwrap().unwrap();
    assert!(mock
        .requests()
        .iter()
        .all(|r| r.header("metadata") == Some("true")));
}

#[tokio::test]
async fn azure_410_while_provisioning_is_retried() {
    let ud = b64(doc_json("inst-az").to_string().as_bytes());
    let inner = azure_imds(azure_routes(&ud));
    let gone = Arc::new(Mutex::new(2));
    let g = gone.clone();
    let mock = Mock::start(move |req: &Req| {
        let mut left = g.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return status(410);
        }
        inner(req)
    })
    .await;
    let (o, _d) = opts(Some("azure"));
    assert!(run(Azure::new(&mock.base), &o).await.unwrap().is_some());
    assert_eq!(mock.count("/metadata/instance"), 3);
}

// ---------------------------------------------------------------- OpenStack

fn openstack_meta() -> serde_json::Value {
    serde_json::json!({
        "uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f38",
        "name": "edge-1",
        "hostname": "edge-1.novalocal",
        "availability_zone": "nova",
        "launch_index": 0,
        "project_id": "f7ac731cc11f40efbc03a9f9e1d1d21f",
        "meta": {},
        "public_keys": {},
    })
}

fn openstack_network() -> serde_json::Value {
    serde_json::json!({
        "links": [{"id": "tap1", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:01", "mtu": 1450}],
        "networks": [
            {"id": "network0", "type": "ipv4", "link": "tap1", "ip_address": "192.168.10.5",
             "netmask": "255.255.255.0", "network_id": "n1", "routes": []},
            {"id": "network1", "type": "ipv6_dhcp", "link": "tap1", "network_id": "n2"}
        ],
        "services": [{"type": "dns", "address": "8.8.8.8"}],
    })
}

fn write_drive(root: &std::path::Path, user_data: Option<&str>, meta: Option<&str>) {
    let latest = root.join("openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    if let Some(m) = meta {
        std::fs::write(latest.join("meta_data.json"), m).unwrap();
    }
    if let Some(u) = user_data {
        std::fs::write(latest.join("user_data"), u).unwrap();
    }
    std::fs::write(
        latest.join("network_data.json"),
        openstack_network().to_string(),
    )
    .unwrap();
}

#[tokio::test]
async fn openstack_config_drive_first() {
    // The metadata service would answer something else: it must not be asked.
    let mock = Mock::start(|_: &Req| status(500)).await;
    let dir = tempfile::tempdir().unwrap();
    write_drive(
        dir.path(),
        Some(&doc_json("inst-os").to_string()),
        Some(&openstack_meta().to_string()),
    );
    let (o, _d) = opts(None);
    let os = OpenStack::new(&mock.base, ConfigDrive::Dir(dir.path().to_path_buf()));
    // An attached drive is evidence enough: detected without DMI, asked patiently.
    let found = run(os, &o).await.unwrap().unwrap();
    assert_eq!(found.source, "openstack");
    assert_eq!(found.document, doc("inst-os"));
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("d8e02d56-2648-49a3-bf97-6be8f1204f38")
    );
    assert_eq!(found.facts.region.as_deref(), Some("nova"));
    assert_eq!(found.facts.addresses, vec!["192.168.10.5"]);
    assert!(mock.requests().is_empty());

    // A drive without meta_data.json is broken, and the service is still not asked.
    let dir = tempfile::tempdir().unwrap();
    write_drive(dir.path(), Some(&doc_json("x").to_string()), None);
    let os = OpenStack::new(&mock.base, ConfigDrive::Dir(dir.path().to_path_buf()));
    let err = run(os, &o).await.unwrap_err();
    assert!(chain(&err).contains("meta_data.json"), "{}", chain(&err));
    assert!(mock.requests().is_empty());

    // Malformed meta_data.json names the document.
    let dir = tempfile::tempdir().unwrap();
    write_drive(dir.path(), Some(&doc_json("x").to_string()), Some("{uuid"));
    let os = OpenStack::new(&mock.base, ConfigDrive::Dir(dir.path().to_path_buf()));
    let err = run(os, &o).await.unwrap_err();
    assert!(
        matches!(&err.kind, SourceErrorKind::Metadata { field, .. } if field == "meta_data.json"),
        "{err:?}"
    );

    // A drive without user_data: no identity here.
    let dir = tempfile::tempdir().unwrap();
    write_drive(dir.path(), None, Some(&openstack_meta().to_string()));
    let os = OpenStack::new(&mock.base, ConfigDrive::Dir(dir.path().to_path_buf()));
    assert_eq!(run(os, &o).await.unwrap(), None);
}

#[tokio::test]
async fn openstack_metadata_service_without_a_drive() {
    let user = Arc::new(Mutex::new(Some(doc_json("inst-md").to_string())));
    let u = user.clone();
    let mock = Mock::start(move |req: &Req| match req.path() {
        "/openstack/latest/meta_data.json" => json(&openstack_meta()),
        "/openstack/latest/network_data.json" => json(&openstack_network()),
        "/openstack/latest/user_data" => match u.lock().unwrap().clone() {
            Some(body) => ok(body),
            None => status(404),
        },
        _ => status(404),
    })
    .await;
    let (o, _d) = opts(Some("openstack"));
    let found = run(OpenStack::new(&mock.base, ConfigDrive::Off), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document.instance_id, "inst-md");
    assert_eq!(found.facts.addresses, vec!["192.168.10.5"]);
    // user_data 404: absent.
    *user.lock().unwrap() = None;
    assert_eq!(
        run(OpenStack::new(&mock.base, ConfigDrive::Off), &o)
            .await
            .unwrap(),
        None
    );
    // A drive folder that does not exist means no drive: the service answers.
    *user.lock().unwrap() = Some(doc_json("inst-md2").to_string());
    let os = OpenStack::new(&mock.base, ConfigDrive::Dir("/nonexistent/config-2".into()));
    assert_eq!(
        run(os, &o).await.unwrap().unwrap().document.instance_id,
        "inst-md2"
    );
}

// ---------------------------------------------------------------- Oracle

fn oci_instance(user_data: Option<&str>) -> serde_json::Value {
    let mut metadata = serde_json::json!({"ssh_authorized_keys": "ssh-ed25519 AAAA test"});
    if let Some(u) = user_data {
        metadata["user_data"] = u.into();
    }
    serde_json::json!({
        "availabilityDomain": "EMIr:PHX-AD-1",
        "faultDomain": "FAULT-DOMAIN-3",
        "compartmentId": "ocid1.tenancy.oc1..aaaaaaaa",
        "displayName": "edge-1",
        "hostname": "edge-1",
        "id": "ocid1.instance.oc1.phx.abyhqljrqyriphyccj75yut36ybxmlfgawtl7m77vqanhg6w4bdszaitd3da",
        "image": "ocid1.image.oc1.phx.aaaaaaaa",
        "metadata": metadata,
        "region": "phx",
        "canonicalRegionName": "us-phoenix-1",
        "ociAdName": "phx-ad-1",
        "shape": "VM.Standard.E4.Flex",
        "state": "Running",
        "timeCreated": 1600381928581u64,
    })
}

/// OCI IMDS v2: `Authorization: Bearer Oracle` or 401.
fn oci(instance: serde_json::Value) -> impl Fn(&Req) -> Resp + Send + Sync {
    move |req: &Req| {
        if req.header("authorization") != Some("Bearer Oracle") {
            return status(401);
        }
        match req.path() {
            "/opc/v2/instance/" => json(&instance),
            "/opc/v2/vnics/" => json(&serde_json::json!([{
                "vnicId": "ocid1.vnic.oc1.phx.abyhqljr",
                "privateIp": "10.0.3.6",
                "vlanTag": 11,
                "macAddr": "00:00:00:00:00:01",
                "virtualRouterIp": "10.0.3.1",
                "subnetCidrBlock": "10.0.3.0/24",
            }])),
            _ => status(404),
        }
    }
}

#[tokio::test]
async fn oracle_user_data_and_facts() {
    let ud = b64(doc_json("inst-oci").to_string().as_bytes());
    let mock = Mock::start(oci(oci_instance(Some(&ud)))).await;
    let (o, _d) = opts(Some("oracle"));
    let found = run(Oracle::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document, doc("inst-oci"));
    assert!(found
        .facts
        .instance_id
        .as_deref()
        .unwrap()
        .starts_with("ocid1.instance."));
    assert_eq!(found.facts.region.as_deref(), Some("us-phoenix-1"));
    assert_eq!(found.facts.addresses, vec!["10.0.3.6"]);
    assert!(mock
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer Oracle")));

    let mock = Mock::start(oci(oci_instance(None))).await;
    assert_eq!(run(Oracle::new(&mock.base), &o).await.unwrap(), None);

    let mock = Mock::start(oci(oci_instance(Some("***")))).await;
    let err = run(Oracle::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(&err.kind, SourceErrorKind::Metadata { field, .. } if field == "instance.metadata.user_data"),
        "{err:?}"
    );

    // v2 without the header is 401: a service that refuses ours is reported.
    let mock = Mock::start(|_: &Req| status(401)).await;
    let err = run(Oracle::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::HttpStatus { status: 401, .. }),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- DigitalOcean

fn do_metadata(user_data: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "droplet_id": 2756294,
        "hostname": "edge-1",
        "vendor_data": "#cloud-config\n",
        "public_keys": ["ssh-rsa AAAA test"],
        "auth_key": "",
        "region": "nyc3",
        "interfaces": {
            "public": [{
                "ipv4": {"ip_address": "104.131.20.105", "netmask": "255.255.192.0", "gateway": "104.131.0.1"},
                "ipv6": {"ip_address": "2604:A880:0800:0010:0000:0000:017D:2001", "cidr": 64, "gateway": "2604:A880:0800:0010:0000:0000:0000:0001"},
                "anchor_ipv4": {"ip_address": "10.17.0.5", "netmask": "255.255.0.0", "gateway": "10.17.0.1"},
                "mac": "04:01:2a:0f:2a:01",
                "type": "public"
            }],
            "private": [{
                "ipv4": {"ip_address": "10.132.255.113", "netmask": "255.255.0.0", "gateway": "0.0.0.0"},
                "mac": "04:01:2a:0f:2a:02",
                "type": "private"
            }]
        },
        "floating_ip": {"ipv4": {"active": false}},
        "dns": {"nameservers": ["2001:4860:4860::8844", "8.8.8.8"]},
        "features": {"dhcp_enabled": false},
    });
    if let Some(u) = user_data {
        v["user_data"] = u.into();
    }
    v
}

#[tokio::test]
async fn digitalocean_user_data_and_facts() {
    let meta = Arc::new(Mutex::new(do_metadata(Some(
        &doc_json("inst-do").to_string(),
    ))));
    let m = meta.clone();
    let mock = Mock::start(move |req: &Req| match req.path() {
        "/metadata/v1.json" => json(&m.lock().unwrap()),
        _ => status(404),
    })
    .await;
    let (o, _d) = opts(Some("digitalocean"));
    let found = run(DigitalOcean::new(&mock.base), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document, doc("inst-do"));
    assert_eq!(found.facts.instance_id.as_deref(), Some("2756294"));
    assert_eq!(found.facts.region.as_deref(), Some("nyc3"));
    assert_eq!(
        found.facts.addresses,
        vec![
            "104.131.20.105",
            "2604:a880:800:10::17d:2001",
            "10.132.255.113"
        ]
    );

    *meta.lock().unwrap() = do_metadata(None);
    assert_eq!(run(DigitalOcean::new(&mock.base), &o).await.unwrap(), None);

    let mut bad = do_metadata(Some(&doc_json("x").to_string()));
    bad["interfaces"]["public"][0]["ipv4"]["ip_address"] = serde_json::json!(["104.131.20.105"]);
    *meta.lock().unwrap() = bad;
    let err = run(DigitalOcean::new(&mock.base), &o).await.unwrap_err();
    assert!(
        chain(&err).contains("v1.json.interfaces.public[0].ipv4.ip_address"),
        "{}",
        chain(&err)
    );
}

// ---------------------------------------------------------------- Hetzner

#[tokio::test]
async fn hetzner_user_data_and_facts() {
    let flaky = Arc::new(Mutex::new(1));
    let f = flaky.clone();
    let user = Arc::new(Mutex::new(doc_json("inst-hz").to_string()));
    let u = user.clone();
    let mock = Mock::start(move |req: &Req| match req.path() {
        "/hetzner/v1/metadata/instance-id" => ok("12345678"),
        "/hetzner/v1/metadata/region" => ok("eu-central"),
        "/hetzner/v1/metadata/availability-zone" => ok("fsn1-dc14"),
        "/hetzner/v1/metadata/public-ipv4" => ok("116.203.1.2"),
        "/hetzner/v1/metadata/private-networks" => ok(
            "- ip: 10.0.0.2\n  alias_ips: []\n  interface_num: 1\n  mac_address: 86:00:00:2a:7d:e0\n  network_id: 1234\n  network_name: nw-test1\n  network: 10.0.0.0/8\n  subnet: 10.0.0.0/24\n  gateway: 10.0.0.1\n",
        ),
        "/hetzner/v1/userdata" => {
            let mut left = f.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return status(502);
            }
            ok(u.lock().unwrap().clone())
        }
        _ => status(404),
    })
    .await;
    let (o, _d) = opts(Some("hetzner"));
    let found = run(Hetzner::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document, doc("inst-hz"));
    assert_eq!(found.facts.instance_id.as_deref(), Some("12345678"));
    assert_eq!(found.facts.region.as_deref(), Some("eu-central"));
    assert_eq!(found.facts.addresses, vec!["116.203.1.2", "10.0.0.2"]);
    assert_eq!(mock.count("/hetzner/v1/userdata"), 2, "502 retried once");
    // Hetzner serves empty user data when none was given: absent.
    *user.lock().unwrap() = String::new();
    assert_eq!(run(Hetzner::new(&mock.base), &o).await.unwrap(), None);
    // A broken document is an error naming the field.
    *user.lock().unwrap() = doc_json("bad id!").to_string();
    let err = run(Hetzner::new(&mock.base), &o).await.unwrap_err();
    assert!(
        chain(&err).contains("hetzner") && chain(&err).contains("instance_id"),
        "{}",
        chain(&err)
    );
}

// ---------------------------------------------------------------- Vultr

fn vultr_v1() -> serde_json::Value {
    serde_json::json!({
        "bgp": {"ipv4": {"my-address": "", "my-asn": "", "peer-address": "", "peer-asn": ""}},
        "hostname": "edge-1",
        "instanceid": "a747bfz6385e",
        "instance-v2-id": "5b2a2d4c-7f2a-4b2e-9f62-0d7d2e1c3b6a",
        "interfaces": [
            {"ipv4": {"additional": [], "address": "45.76.1.2", "gateway": "45.76.0.1", "netmask": "255.255.254.0"},
             "ipv6": {"additional": [], "address": "2001:19f0:5:1234::1", "network": "2001:19f0:5:1234::", "prefix": "64"},
             "mac": "56:00:03:00:00:01", "network-type": "public"},
            {"ipv4": {"additional": [], "address": "10.1.96.3", "gateway": "", "netmask": "255.255.240.0"},
             "mac": "5a:00:03:00:00:01", "network-type": "private", "network-v2-id": "n2", "networkid": "net1"}
        ],
        "public-keys": ["ssh-ed25519 AAAA test"],
        "region": {"regioncode": "EWR"},
        "tags": [],
        "user-defined": [],
    })
}

#[tokio::test]
async fn vultr_user_data_and_facts() {
    let v1 = Arc::new(Mutex::new(vultr_v1()));
    let has_ud = Arc::new(Mutex::new(true));
    let (v, h) = (v1.clone(), has_ud.clone());
    let mock = Mock::start(move |req: &Req| match req.path() {
        "/v1.json" => json(&v.lock().unwrap()),
        "/user-data/user-data" if *h.lock().unwrap() => ok(doc_json("inst-vultr").to_string()),
        _ => status(404),
    })
    .await;
    let (o, _d) = opts(Some("vultr"));
    let found = run(Vultr::new(&mock.base), &o).await.unwrap().unwrap();
    assert_eq!(found.document, doc("inst-vultr"));
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("5b2a2d4c-7f2a-4b2e-9f62-0d7d2e1c3b6a")
    );
    assert_eq!(found.facts.region.as_deref(), Some("EWR"));
    assert_eq!(
        found.facts.addresses,
        vec!["45.76.1.2", "2001:19f0:5:1234::1", "10.1.96.3"]
    );
    *has_ud.lock().unwrap() = false;
    assert_eq!(run(Vultr::new(&mock.base), &o).await.unwrap(), None);
    *has_ud.lock().unwrap() = true;
    let mut bad = vultr_v1();
    bad["region"] = "EWR".into();
    *v1.lock().unwrap() = bad;
    let err = run(Vultr::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(&err.kind, SourceErrorKind::Metadata { field, .. } if field == "v1.json.region"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- Scaleway

/// Source ports the test treats as "privileged" (real ones need root).
const SCW_PORTS: std::ops::RangeInclusive<u16> = 40100..=40199;

fn scw_conf() -> serde_json::Value {
    serde_json::json!({
        "id": "b6e0c8a8-5d7e-4b5b-9a3f-4c2a1e0c9d11",
        "name": "edge-1",
        "hostname": "edge-1",
        "commercial_type": "DEV1-S",
        "organization": "000a115d-2852-4b0a-9ce8-47f1134ba95a",
        "private_ip": "10.68.34.21",
        "public_ip": {"address": "51.15.200.1", "id": "p1", "dynamic": false},
        "ipv6": null,
        "location": {"zone_id": "fr-par-1", "platform_id": "14", "cluster_id": "5", "hypervisor_id": "201", "node_id": "7"},
        "zone": "fr-par-1",
        "tags": [],
        "state_detail": "booted",
    })
}

/// The Scaleway service: `/user_data/*` only from a "privileged" source port.
fn scw(keys: HashMap<&'static str, String>) -> impl Fn(&Req) -> Resp + Send + Sync {
    move |req: &Req| {
        if req.path() == "/conf" && req.query() == "format=json" {
            return json(&scw_conf());
        }
        if let Some(key) = req.path().strip_prefix("/user_data/") {
            if !SCW_PORTS.contains(&req.peer_port) {
                return status(403);
            }
            return keys
                .get(key)
                .map(|v| ok(v.clone()))
                .unwrap_or_else(|| status(404));
        }
        status(404)
    }
}

#[tokio::test]
async fn scaleway_user_data_from_a_privileged_port() {
    let keys = HashMap::from([("cloud-init", doc_json("inst-scw").to_string())]);
    let mock = Mock::start(scw(keys)).await;
    let (o, _d) = opts(Some("scaleway"));
    let found = run(Scaleway::new(&mock.base).with_source_ports(SCW_PORTS), &o)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.document, doc("inst-scw"));
    assert_eq!(
        found.facts.instance_id.as_deref(),
        Some("b6e0c8a8-5d7e-4b5b-9a3f-4c2a1e0c9d11")
    );
    assert_eq!(found.facts.region.as_deref(), Some("fr-par"));
    assert_eq!(found.facts.addresses, vec!["10.68.34.21", "51.15.200.1"]);
    // `powernode-identity` asked first, then `cloud-init`, both from the range.
    let ud: Vec<Req> = mock
        .requests()
        .into_iter()
        .filter(|r| r.path().starts_with("/user_data/"))
        .collect();
    assert_eq!(ud.len(), 2);
    assert_eq!(ud[0].path(), "/user_data/powernode-identity");
    assert!(ud.iter().all(|r| SCW_PORTS.contains(&r.peer_port)));

    // Sent from an ordinary port, the service refuses: reported, not skipped.
    let err = run(
        Scaleway::new(&mock.base).with_source_ports(40300..=40310),
        &o,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::HttpStatus { status: 403, .. }),
        "{err:?}"
    );

    // No user data keys: absent.
    let mock = Mock::start(scw(HashMap::new())).await;
    assert_eq!(
        run(Scaleway::new(&mock.base).with_source_ports(SCW_PORTS), &o)
            .await
            .unwrap(),
        None
    );
}

// ---------------------------------------------------------------- probing

#[tokio::test]
async fn guessing_finds_the_cloud_that_answers() {
    // One mock that is GCE only: AWS's token PUT, Azure's and Oracle's documents
    // are 404 or refused there, so the guesses fall through to GCP.
    let mut routes = gce_routes();
    routes.insert(
        "/computeMetadata/v1/instance/attributes/user-data",
        ok(doc_json("inst-guess").to_string()),
    );
    let inner = gce(routes);
    let mock = Mock::start(move |req: &Req| {
        if req.path().starts_with("/computeMetadata/") {
            inner(req)
        } else {
            status(404)
        }
    })
    .await;
    let providers: Vec<Box<dyn CloudProvider>> = vec![
        Box::new(UrlSource::default()),
        Box::new(Aws::new(&mock.base)),
        Box::new(Azure::new(&mock.base)),
        Box::new(Oracle::new(&mock.base)),
        Box::new(Gcp::new(&mock.base)),
        Box::new(Hetzner::new(&mock.base)),
    ];
    let (o, dmi) = opts(None);
    let found = cloud::probe_with(&providers, &o).await.unwrap().unwrap();
    assert_eq!(found.source, "gcp");
    assert_eq!(mock.count("/hetzner/v1/metadata/instance-id"), 0);

    // With DMI evidence for Azure, only Azure is asked, and its absence is final.
    std::fs::write(
        dmi.path().join("chassis_asset_tag"),
        "7783-7084-3265-9085-8269-3286-77\n",
    )
    .unwrap();
    let before = mock.requests().len();
    assert_eq!(cloud::probe_with(&providers, &o).await.unwrap(), None);
    let asked: Vec<String> = mock.requests()[before..]
        .iter()
        .map(|r| r.path().to_string())
        .collect();
    assert_eq!(asked, vec!["/metadata/instance"]);
}

#[tokio::test]
async fn pinned_names_and_standard_list() {
    assert_eq!(
        cloud::NAMES,
        &[
            "url",
            "openstack",
            "aws",
            "gcp",
            "azure",
            "oracle",
            "digitalocean",
            "hetzner",
            "vultr",
            "scaleway"
        ]
    );
    // A pin to a cloud source that is not in the list given: nothing to ask.
    let (o, _d) = opts(Some("vultr"));
    let providers: Vec<Box<dyn CloudProvider>> = vec![Box::new(Aws::new(dead_base().await))];
    assert_eq!(cloud::probe_with(&providers, &o).await.unwrap(), None);
}

#[tokio::test]
async fn a_server_that_hangs_is_bounded_by_the_deadline() {
    // Accepts connections and never answers (a black-holed metadata address).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (mut o, _d) = opts(Some("aws"));
    o.deadline = Duration::from_millis(400);
    // The outer timeout only turns a hang into a failure (75x the deadline): the
    // check is that the probe gives up by itself, with GaveUp.
    let err = tokio::time::timeout(Duration::from_secs(30), run(Aws::new(&base), &o))
        .await
        .expect("the probe never gave up on a hanging server")
        .unwrap_err();
    hold.abort();
    assert!(
        matches!(err.kind, SourceErrorKind::GaveUp { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn oversize_user_data_is_refused() {
    let mut routes = aws_routes(&doc_json("x"));
    routes.insert(
        "/latest/user-data",
        ok(vec![
            b' ';
            powernode_proto::identity::MAX_IDENTITY_BYTES + 1
        ]),
    );
    let mock = Mock::start(imds(routes)).await;
    let (o, _d) = opts(Some("aws"));
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(
        matches!(err.kind, SourceErrorKind::TooLarge { .. }),
        "{err:?}"
    );
    // Refused at once, not retried.
    assert_eq!(mock.count("/latest/user-data"), 1);
}

#[tokio::test]
async fn the_agent_resolves_a_cloud_pin() {
    use powernode_agent::identity::{resolve_standard_with_cloud, SelectError, SourcePaths};
    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    let body = doc_json("inst-via-url");
    let url_mock = Mock::start(move |_: &Req| json(&body)).await;
    std::fs::write(
        &cmdline,
        format!(
            "quiet powernode.identity_source=url powernode.identity_url={}/id",
            url_mock.base
        ),
    )
    .unwrap();
    let paths = SourcePaths {
        cmdline: cmdline.clone(),
        fw_cfg_root: dir.path().join("no-fw-cfg"),
        file: None,
        state: None,
    };
    let (o, _d) = opts(None);
    let o = CloudOptions { cmdline: None, ..o };
    // The command line pins `url`, and its URL comes from the same command line.
    let r = resolve_standard_with_cloud(&paths, None, &o).await.unwrap();
    assert_eq!(
        (r.source, r.document.instance_id.as_str()),
        ("url", "inst-via-url")
    );
    // Pinned to `url` without a URL: not found, naming it (and no network).
    std::fs::write(&cmdline, "powernode.identity_source=url").unwrap();
    let err = resolve_standard_with_cloud(&paths, None, &o)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SelectError::NotFound { tried } if tried == &vec!["url"]),
        "{err:?}"
    );
    // A CLI override still wins over the command line.
    std::fs::write(&cmdline, "powernode.identity_source=url").unwrap();
    assert!(matches!(
        resolve_standard_with_cloud(&paths, Some("fw_cfg"), &o)
            .await
            .unwrap_err(),
        SelectError::NotFound { tried } if tried == vec!["fw_cfg"]
    ));
}
