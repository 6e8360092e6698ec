//! The metadata HTTP client every cloud provider shares. It turns the behaviour
//! users ask for into one place: 404 means absent, 5xx and connection errors are
//! retried with a bounded, jittered backoff, every other status is an error naming
//! the URL, bodies are bounded, and no request outlives the probe's deadline.
//!
//! A fetcher is either *patient* (the source is pinned or the firmware says we are
//! on that cloud: every failure is an error) or *probing* (guessing: until the
//! provider has answered one request with success, a failure means "not this
//! cloud", so a machine elsewhere does not wait out retries on every provider).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::identity::{SourceError, SourceErrorKind};

/// Largest provider metadata document read (JSON indexes, instance documents).
pub const MAX_METADATA_BYTES: usize = 1024 * 1024;

/// Retry pacing and per-request timeouts. Tests set `max_attempts` low and the
/// delays to milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First retry delay; doubles per attempt up to `cap` (then jittered).
    pub base: Duration,
    pub cap: Duration,
    /// Attempts per request, the first included. At least 1.
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(2),
            max_attempts: 8,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
        }
    }
}

/// One provider's HTTP access for one probe.
pub struct Fetcher {
    strategy: &'static str,
    http: reqwest::Client,
    policy: RetryPolicy,
    deadline: Instant,
    patient: bool,
    confirmed: AtomicBool,
    #[cfg(feature = "fuzzing")]
    replay: std::sync::Mutex<Option<std::collections::VecDeque<Replay>>>,
}

/// One canned answer of a [`Fetcher`] in replay mode (the `fuzzing` feature).
#[cfg(feature = "fuzzing")]
#[derive(Debug, Clone)]
pub enum Replay {
    /// A status and a body, judged like a real response (404 absent, 5xx retried,
    /// the size bound).
    Status(u16, Vec<u8>),
    /// The whole response as the raw HTTP/1.0 client reads it (status line,
    /// headers, body).
    Raw(Vec<u8>),
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("strategy", &self.strategy)
            .field("patient", &self.patient)
            .finish()
    }
}

/// A rustls config that trusts nothing: metadata services are plain HTTP on a
/// link-local address, and reqwest (built without a default provider) still wants
/// a TLS backend.
fn no_trust_tls() -> Result<rustls::ClientConfig, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

impl Fetcher {
    /// `tls`: the trust for HTTPS URLs (only the generic URL source has one).
    /// `follow_redirects`: metadata services never redirect; a user's URL may.
    pub fn new(
        strategy: &'static str,
        policy: RetryPolicy,
        deadline: Instant,
        patient: bool,
        tls: Option<rustls::ClientConfig>,
        follow_redirects: bool,
    ) -> Result<Self, SourceError> {
        let config = |reason: String| {
            SourceError::new(
                strategy,
                SourceErrorKind::Config {
                    what: "HTTP client".into(),
                    reason,
                },
            )
        };
        let tls = match tls {
            Some(t) => t,
            None => no_trust_tls().map_err(config)?,
        };
        let redirect = if follow_redirects {
            reqwest::redirect::Policy::limited(5)
        } else {
            reqwest::redirect::Policy::none()
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(policy.connect_timeout)
            .timeout(policy.request_timeout)
            .redirect(redirect)
            // Proxies from the environment must never see a link-local metadata
            // request (or the token it carries).
            .no_proxy()
            .user_agent(concat!("powernode-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| config(crate::error_chain(&e)))?;
        Ok(Self {
            strategy,
            http,
            policy,
            deadline,
            patient,
            confirmed: AtomicBool::new(false),
            #[cfg(feature = "fuzzing")]
            replay: std::sync::Mutex::new(None),
        })
    }

    /// Replay mode (the `fuzzing` feature): from now on every request takes the
    /// next of `answers` instead of going to the network, and a request past the
    /// last one is answered 404. The providers' walks run as they do for real.
    #[cfg(feature = "fuzzing")]
    pub fn replay(&self, answers: impl IntoIterator<Item = Replay>) {
        let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        *replay = Some(answers.into_iter().collect());
    }

    #[cfg(feature = "fuzzing")]
    fn replayed(&self, method: Method, url: &str, max: usize) -> Option<Attempt> {
        let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        let answer = replay
            .as_mut()?
            .pop_front()
            .unwrap_or(Replay::Status(404, Vec::new()));
        Some(match answer {
            Replay::Status(_, body) if body.len() > max => {
                Attempt::Fatal(SourceErrorKind::TooLarge {
                    size: body.len() as u64,
                    max,
                })
            }
            Replay::Status(status, body) => classify(method, url, status, body),
            Replay::Raw(raw) => raw_response(url, max, &raw),
        })
    }

    #[cfg(not(feature = "fuzzing"))]
    fn replayed(&self, _method: Method, _url: &str, _max: usize) -> Option<Attempt> {
        None
    }

    pub fn strategy(&self) -> &'static str {
        self.strategy
    }

    /// Pinned or detected: failures are errors, 5xx and connection errors are retried.
    pub fn is_patient(&self) -> bool {
        self.patient
    }

    /// Whether any request has succeeded: the provider is known to be here.
    pub fn confirmed(&self) -> bool {
        self.confirmed.load(Ordering::SeqCst)
    }

    pub fn error(&self, kind: SourceErrorKind) -> SourceError {
        SourceError::new(self.strategy, kind)
    }

    /// A malformed-metadata error naming `field`.
    pub fn field_error(&self, field: impl Into<String>, reason: impl Into<String>) -> SourceError {
        self.error(SourceErrorKind::Metadata {
            field: field.into(),
            reason: reason.into(),
        })
    }

    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        self.send(Method::Get, url, headers, max).await
    }

    /// GET that must succeed: a 404 is an error naming `field`.
    pub async fn get_required(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
        field: &str,
    ) -> Result<Vec<u8>, SourceError> {
        self.get(url, headers, max)
            .await?
            .ok_or_else(|| self.field_error(field, format!("is missing ({url} answered 404)")))
    }

    /// GET of a short text value (instance id, region, address): `None` on 404.
    /// Trimmed; must be one printable line.
    pub async fn get_text(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        field: &str,
    ) -> Result<Option<String>, SourceError> {
        match self.get(url, headers, 4096).await? {
            None => Ok(None),
            Some(bytes) => text_value(&bytes)
                .map(Some)
                .map_err(|reason| self.field_error(field, reason)),
        }
    }

    /// One request with the retry policy. `Ok(None)` on 404.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        self.send_with(method, url, headers, max, None).await
    }

    /// A GET sent from a local port in `ports` (Scaleway serves user data only to
    /// privileged source ports, which reqwest cannot bind), with the same retry
    /// policy and status rules as [`Self::send`]. Plain HTTP/1.0, IP-literal hosts.
    pub async fn get_from_ports(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
        ports: std::ops::RangeInclusive<u16>,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        self.send_with(Method::Get, url, headers, max, Some(ports))
            .await
    }

    async fn send_with(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
        ports: Option<std::ops::RangeInclusive<u16>>,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.policy.base, self.policy.cap);
        let max_attempts = self.policy.max_attempts.max(1);
        let mut attempts = 0u32;
        let gave_up = |attempts: u32, last: String| {
            self.error(SourceErrorKind::GaveUp {
                method: method.as_str(),
                url: url.to_string(),
                attempts,
                waited_ms: started.elapsed().as_millis() as u64,
                last,
            })
        };
        loop {
            attempts += 1;
            let attempt = async {
                if let Some(replayed) = self.replayed(method, url, max) {
                    return replayed;
                }
                match &ports {
                    None => self.attempt(method, url, headers, max).await,
                    Some(p) => self.raw_attempt(url, headers, max, p.clone()).await,
                }
            };
            let last = match tokio::time::timeout_at(self.deadline, attempt).await {
                Err(_) => return Err(gave_up(attempts, "the probe's deadline passed".into())),
                Ok(Attempt::Done(body)) => {
                    // Only a success proves the provider is here: another cloud's
                    // metadata server answers 404 to paths it does not serve.
                    if body.is_some() {
                        self.confirmed.store(true, Ordering::SeqCst);
                    }
                    return Ok(body);
                }
                Ok(Attempt::Fatal(kind)) => return Err(self.error(kind)),
                Ok(Attempt::Retry(reason)) => {
                    // A guess that has not had one success yet is not this cloud
                    // (nothing listens, or another service answers 5xx): do not
                    // spend the shared deadline retrying it.
                    if !self.patient && !self.confirmed() {
                        return Err(gave_up(attempts, reason));
                    }
                    reason
                }
            };
            if attempts >= max_attempts {
                return Err(gave_up(attempts, last));
            }
            let delay = backoff.next_delay();
            let now = Instant::now();
            if now + delay >= self.deadline {
                return Err(gave_up(
                    attempts,
                    format!("{last}; no time left before the probe's deadline"),
                ));
            }
            tracing::debug!(strategy = self.strategy, url, attempt = attempts, delay_ms = delay.as_millis() as u64,
                reason = %last, "metadata request failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
    ) -> Attempt {
        let mut req = match method {
            Method::Get => self.http.get(url),
            // IMDSv2's token PUT has an empty body; say so for proxies and servers
            // that insist on a length.
            Method::Put => self
                .http
                .put(url)
                .header(reqwest::header::CONTENT_LENGTH, "0"),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(crate::error_chain(&e)),
        };
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(None) => break,
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max {
                        return Attempt::Fatal(SourceErrorKind::TooLarge {
                            size: (body.len() + chunk.len()) as u64,
                            max,
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Err(e) => {
                    return Attempt::Retry(format!("reading the body: {}", crate::error_chain(&e)))
                }
            }
        }
        classify(method, url, status, body)
    }

    async fn raw_attempt(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        max: usize,
        ports: std::ops::RangeInclusive<u16>,
    ) -> Attempt {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let bad_url = |reason: &str| {
            Attempt::Fatal(SourceErrorKind::Config {
                what: url.to_string(),
                reason: reason.to_string(),
            })
        };
        let Ok(parsed) = reqwest::Url::parse(url) else {
            return bad_url("is not a URL");
        };
        let Some(ip) = parsed
            .host_str()
            .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
        else {
            return bad_url("needs an IP address as host");
        };
        if parsed.scheme() != "http" {
            return bad_url("must be http://");
        }
        let peer = std::net::SocketAddr::new(ip, parsed.port().unwrap_or(80));
        let (lo, hi) = (*ports.start(), *ports.end());
        if lo == 0 || lo > hi {
            return bad_url("has an empty source port range");
        }
        // Start at a random port so two probes do not fight over the same one.
        let span = u32::from(hi - lo) + 1;
        let offset = (crate::entropy::unit_random() * f64::from(span)) as u32;
        let mut stream = None;
        let mut last = String::from("no source port free");
        for i in 0..span.min(64) {
            let port = lo + ((offset + i) % span) as u16;
            let socket = match if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            } {
                Ok(s) => s,
                Err(e) => return bad_url(&format!("socket: {e}")),
            };
            let local = std::net::SocketAddr::new(
                if ip.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                port,
            );
            match socket.bind(local) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = format!("source port {port}: {e}");
                    continue;
                }
                Err(e) => {
                    return Attempt::Fatal(SourceErrorKind::Config {
                        what: format!("binding source port {port} for {url}"),
                        reason: e.to_string(),
                    })
                }
            }
            match tokio::time::timeout(self.policy.connect_timeout, socket.connect(peer)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last = format!("source port {port}: {e}");
                }
                Ok(Err(e)) => return Attempt::Retry(format!("connecting to {peer}: {e}")),
                Err(_) => return Attempt::Retry(format!("connecting to {peer}: timed out")),
            }
        }
        let Some(mut stream) = stream else {
            return Attempt::Retry(last);
        };
        let mut target = parsed.path().to_string();
        if let Some(q) = parsed.query() {
            target.push('?');
            target.push_str(q);
        }
        let mut request = format!(
            "GET {target} HTTP/1.0\r\nHost: {}\r\nUser-Agent: powernode-agent/{}\r\n",
            parsed.host_str().unwrap_or_default(),
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            let mut raw = Vec::new();
            // Head plus body, bounded: one byte past the limit is enough to refuse.
            (&mut stream)
                .take((max + 64 * 1024 + 1) as u64)
                .read_to_end(&mut raw)
                .await?;
            Ok::<_, std::io::Error>(raw)
        };
        let raw = match tokio::time::timeout(self.policy.request_timeout, exchange).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return Attempt::Retry(format!("GET {url}: {e}")),
            Err(_) => return Attempt::Retry(format!("GET {url}: timed out")),
        };
        raw_response(url, max, &raw)
    }
}

/// Judges a whole HTTP/1.0 response read to EOF (status line, headers, body), as
/// the privileged-port client reads it.
fn raw_response(url: &str, max: usize, raw: &[u8]) -> Attempt {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Attempt::Retry(format!("GET {url}: no complete HTTP response"));
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Attempt::Retry(format!("GET {url}: bad status line"));
    };
    let body = raw[head_end + 4..].to_vec();
    if body.len() > max {
        return Attempt::Fatal(SourceErrorKind::TooLarge {
            size: body.len() as u64,
            max,
        });
    }
    classify(Method::Get, url, status, body)
}

/// The status rules every request follows.
fn classify(method: Method, url: &str, status: u16, body: Vec<u8>) -> Attempt {
    match status {
        200..=299 => Attempt::Done(Some(body)),
        404 => Attempt::Done(None),
        // 429: throttled (Azure IMDS); 410: Azure's "not ready yet, retry"
        // while the VM is still being provisioned.
        410 | 429 | 500..=599 => Attempt::Retry(format!("HTTP {status}")),
        _ => Attempt::Fatal(SourceErrorKind::HttpStatus {
            method: method.as_str(),
            url: url.to_string(),
            status,
            detail: snippet(&body),
        }),
    }
}

enum Attempt {
    Done(Option<Vec<u8>>),
    Retry(String),
    Fatal(SourceErrorKind),
}

/// The start of an error body, printable, for the message.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(120)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A short metadata value: UTF-8, trimmed, one line, printable, at most 255 bytes.
pub fn text_value(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
    let text = text.trim();
    if text.len() > 255 {
        return Err("is longer than 255 bytes".into());
    }
    if text.chars().any(|c| c.is_control()) {
        return Err("holds control characters or several lines".into());
    }
    Ok(text.to_string())
}

/// Checks that `value` is an IP address (v4 or v6), naming `field` otherwise.
pub fn ip_value(value: &str) -> Result<String, String> {
    value
        .parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| format!("holds {value:?}, not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_are_bounded_single_lines() {
        assert_eq!(text_value(b" i-0abc\n").unwrap(), "i-0abc");
        assert!(text_value(b"a\nb").is_err());
        assert!(text_value(&[0xff, 0xfe]).is_err());
        assert!(text_value(&[b'a'; 300]).is_err());
        assert_eq!(ip_value("10.0.0.5").unwrap(), "10.0.0.5");
        assert!(ip_value("10.0.0").is_err());
        assert_eq!(snippet(b"bad\r\ntoken"), "bad  token");
    }

    /// Replay (the `fuzzing` feature) answers in order and judges each answer by
    /// the rules a real response meets: 404 absent, 5xx given up, the size bound,
    /// raw HTTP/1.0 parsed; and it never touches the network (port 9 is discard).
    #[cfg(feature = "fuzzing")]
    #[tokio::test]
    async fn replayed_answers_follow_the_status_rules() {
        let policy = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let http = Fetcher::new("test", policy, deadline, true, None, false).unwrap();
        http.replay([
            Replay::Status(200, b"one".to_vec()),
            Replay::Status(404, Vec::new()),
            Replay::Status(503, Vec::new()),
            Replay::Status(200, vec![b'x'; 10]),
            Replay::Raw(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nraw".to_vec()),
            Replay::Raw(b"garbage".to_vec()),
        ]);
        let url = "http://127.0.0.1:9/x";
        assert_eq!(
            http.get(url, &[], 100).await.unwrap(),
            Some(b"one".to_vec())
        );
        assert_eq!(http.get(url, &[], 100).await.unwrap(), None);
        let err = http.get(url, &[], 100).await.unwrap_err();
        assert!(
            matches!(err.kind, SourceErrorKind::GaveUp { .. }),
            "{err:?}"
        );
        let err = http.get(url, &[], 4).await.unwrap_err();
        assert!(
            matches!(err.kind, SourceErrorKind::TooLarge { .. }),
            "{err:?}"
        );
        assert_eq!(
            http.get(url, &[], 100).await.unwrap(),
            Some(b"raw".to_vec())
        );
        let err = http.get(url, &[], 100).await.unwrap_err();
        assert!(
            matches!(err.kind, SourceErrorKind::GaveUp { .. }),
            "{err:?}"
        );
        // Past the last answer: 404.
        assert_eq!(http.get(url, &[], 100).await.unwrap(), None);
    }
}
