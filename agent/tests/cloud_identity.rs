//! Cloud identity providers against a mock metadata server on 127.0.0.1:0 that
//! answers in each provider's documented format (fixtures written from the public
//! documentation), with the error cases users meet: 404 (absent), 5xx (retried),
//! 5xx forever (bounded give-up), malformed documents (the field is named), refused
//! tokens and missing headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powernode_agent::identity::cloud::{
    self, aws::Aws, url::UrlSource, CloudOptions, CloudProvider, RetryPolicy,
};
use powernode_agent::identity::SourceErrorKind;
use powernode_proto::IdentityDocument;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- mock server

#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: HashMap<String, String>,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task = {
            let log = log.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (log, handler) = (log.clone(), handler.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, log, handler).await;
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

async fn serve(
    mut stream: tokio::net::TcpStream,
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
    let started = Instant::now();
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
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
    let started = Instant::now();
    let err = run(Aws::new(&mock.base), &o).await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1000), "{waited:?}");
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
    let started = Instant::now();
    assert_eq!(run(Aws::new(&base), &o).await.unwrap(), None);
    assert!(started.elapsed() < Duration::from_secs(1));
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
    // No evidence: a guess that never succeeded is skipped.
    let (o, dmi) = opts(None);
    assert_eq!(run(Aws::new(&mock.base), &o).await.unwrap(), None);
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
