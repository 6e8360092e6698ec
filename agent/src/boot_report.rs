//! Boot reports: a failure before the node has credentials, sent with the bootstrap
//! token to `proto::paths::BOOT_REPORT` so the operator sees it in `get-instance`
//! rather than only on the node's console. The report does not spend the token.
//!
//! Best effort and quick: one try with short timeouts ([`TIMEOUTS`]), so an
//! unreachable control plane delays the failure policy by a few seconds at most; a
//! report that cannot be sent is logged by the caller, never retried here.

use std::time::{Duration, Instant};

use powernode_proto::boot_report::{BootReportRequest, BootReportResponse};
use powernode_proto::node::Phase;
use powernode_proto::{paths, ErrorCode, IdentityDocument};

use crate::client::{ApiClient, ClientError, Timeouts};
use crate::enroll::EnrollError;

/// One try, bounded: a few seconds at most when the server is unreachable.
pub const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    request: Duration::from_secs(5),
};

/// A report for `identity`'s instance, within the size rule.
pub fn request(
    identity: &IdentityDocument,
    phase: Phase,
    code: ErrorCode,
    message: String,
    attempt: u32,
    console: Vec<String>,
) -> BootReportRequest {
    BootReportRequest {
        bootstrap_token: identity.bootstrap_token.clone(),
        instance_id: identity.instance_id.clone(),
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

/// Sends one report over TLS pinning the identity document's CA.
pub async fn send(
    identity: &IdentityDocument,
    report: &BootReportRequest,
    timeouts: Timeouts,
) -> Result<BootReportResponse, ClientError> {
    let client = ApiClient::new(
        &identity.control_plane_url,
        &identity.ca_pem,
        None,
        timeouts,
    )?;
    client.post(paths::BOOT_REPORT, report).await
}

/// The code an enrollment failure is reported under.
pub fn enroll_code(e: &EnrollError) -> ErrorCode {
    match e {
        EnrollError::Client(c) => c.report_code(),
        EnrollError::Key(_) | EnrollError::BadCertificate(_) => ErrorCode::EnrollmentFailed,
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
