//! Boot reports: a failure before the node has credentials, sent with the bootstrap
//! token to `proto::paths::BOOT_REPORT` so the operator sees it in `get-instance`
//! rather than only on the node's console. The report does not spend the token.
//!
//! Best effort and quick: one try with short timeouts ([`TIMEOUTS`]), so an
//! unreachable control plane delays the failure policy by a few seconds at most; a
//! report that cannot be sent is logged by the caller, never retried here.

use std::time::{Duration, Instant};

use powernode_proto::boot_report::{BootReportRequest, BootReportResponse, ReportTarget};
use powernode_proto::node::Phase;
use powernode_proto::{paths, ErrorCode};

use crate::client::{ApiClient, ClientError, Timeouts};
use crate::enroll::EnrollError;

/// One try, bounded: a few seconds at most when the server is unreachable.
pub const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    request: Duration::from_secs(5),
};

/// A report for `target`'s instance, within the size rule.
pub fn request(
    target: &ReportTarget,
    phase: Phase,
    code: ErrorCode,
    message: String,
    attempt: u32,
    console: Vec<String>,
) -> BootReportRequest {
    BootReportRequest {
        bootstrap_token: target.bootstrap_token.clone(),
        instance_id: target.instance_id.clone(),
        phase,
        code,
        message,
        attempt,
        console,
        agent_version: crate::AGENT_VERSION.to_string(),
    }
    .bounded()
    .0
}

/// Sends one report over TLS pinning the target's CA.
pub async fn send(
    target: &ReportTarget,
    report: &BootReportRequest,
    timeouts: Timeouts,
) -> Result<BootReportResponse, ClientError> {
    let client = ApiClient::new(&target.control_plane_url, &target.ca_pem, None, timeouts)?;
    client.post(paths::BOOT_REPORT, report).await
}

/// The code an enrollment failure is reported under.
pub fn enroll_code(e: &EnrollError) -> ErrorCode {
    match e {
        EnrollError::Client(c) => c.report_code(),
        EnrollError::Key(_) | EnrollError::BadCertificate(_) | EnrollError::State(_) => {
            ErrorCode::EnrollmentFailed
        }
    }
}

/// When a node that keeps retrying reports: its first failure, a failure with a new
/// code, a refusal for good, and otherwise at most once per [`Throttle::every`]
/// (the server limits reports per token too).
#[derive(Debug, Clone)]
pub struct Throttle {
    pub every: Duration,
    last: Option<(ErrorCode, Instant)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether to report a failure with `code` now; records it when so.
    pub fn due(&mut self, code: ErrorCode, terminal: bool) -> bool {
        let now = Instant::now();
        let due = terminal
            || match self.last {
                None => true,
                Some((last, at)) => last != code || now.duration_since(at) >= self.every,
            };
        if due {
            self.last = Some((code, now));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control plane that accepts the connection and never answers must not hold
    /// the failure policy up: the report gives up within its timeouts.
    #[tokio::test]
    async fn a_report_to_a_server_that_never_answers_gives_up_within_seconds() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let identity = powernode_proto::IdentityDocument {
            version: 1,
            control_plane_url: format!("https://127.0.0.1:{port}"),
            ca_pem: ca.pem(),
            bootstrap_token: "tok".into(),
            node_id: "node-1".into(),
            instance_id: "inst-1".into(),
            hostname: "h".into(),
            network: Default::default(),
            heartbeat_interval_seconds: 30,
            ssh_authorized_keys: Vec::new(),
            module_trust_keys: Vec::new(),
        };
        let target = ReportTarget::from(&identity);
        let report = request(
            &target,
            Phase::Enrolled,
            ErrorCode::Network,
            "m".into(),
            1,
            vec!["line".into()],
        );
        let started = Instant::now();
        let sent = send(&target, &report, TIMEOUTS).await;
        let took = started.elapsed();
        assert!(sent.is_err(), "{sent:?}");
        // The TLS handshake counts against the connect timeout (3 s here).
        assert!(took < Duration::from_secs(6), "gave up after {took:?}");
        println!("boot report to a silent server gave up after {took:?}");
        hold.abort();
    }

    #[test]
    fn a_retrying_node_reports_the_first_failure_a_new_code_and_a_refusal() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert!(t.due(ErrorCode::Network, false));
        assert!(!t.due(ErrorCode::Network, false));
        assert!(t.due(ErrorCode::CsrInvalid, false));
        assert!(t.due(ErrorCode::CsrInvalid, true));
        let mut t = Throttle::new(Duration::ZERO);
        assert!(t.due(ErrorCode::Network, false));
        assert!(t.due(ErrorCode::Network, false));
    }
}
