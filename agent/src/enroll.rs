//! Enrollment: a fresh Ed25519 key, a CSR bound to the instance, and one POST with
//! the bootstrap token over TLS that pins the identity document's CA. The answer is
//! the client certificate every later call presents.

use powernode_proto::node::{EnrollmentRequest, EnrollmentResponse};
use powernode_proto::{paths, IdentityDocument};

use crate::client::{ApiClient, ClientError, Timeouts};
use crate::credentials::{CredentialError, Credentials, NodeKey};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment could not prepare its key or request")]
    Key(#[from] CredentialError),
    #[error("enrollment request failed")]
    Client(#[from] ClientError),
    #[error("the control plane answered a certificate the node cannot use")]
    BadCertificate(#[source] CredentialError),
}

impl EnrollError {
    pub fn terminal_code(&self) -> Option<powernode_proto::ErrorCode> {
        match self {
            Self::Client(e) => e.terminal_code(),
            _ => None,
        }
    }
}

/// One enrollment attempt.
pub async fn enroll(
    identity: &IdentityDocument,
    source: &str,
    timeouts: Timeouts,
) -> Result<(Credentials, EnrollmentResponse), EnrollError> {
    enroll_with_provider(identity, source, None, timeouts).await
}

/// One enrollment attempt that also reports what the cloud's metadata said about
/// the machine (instance id, region, addresses; see `identity::cloud`).
pub async fn enroll_with_provider(
    identity: &IdentityDocument,
    source: &str,
    provider: Option<powernode_proto::node::ProviderFacts>,
    timeouts: Timeouts,
) -> Result<(Credentials, EnrollmentResponse), EnrollError> {
    let key = NodeKey::generate()?;
    let csr_pem = key.csr_pem(&identity.instance_id)?;
    let client = ApiClient::new(
        &identity.control_plane_url,
        &identity.ca_pem,
        None,
        timeouts,
    )?;
    let req = EnrollmentRequest {
        bootstrap_token: identity.bootstrap_token.clone(),
        node_id: identity.node_id.clone(),
        instance_id: identity.instance_id.clone(),
        csr_pem,
        identity_source: source.to_string(),
        agent_version: crate::AGENT_VERSION.to_string(),
        provider,
    };
    let resp: EnrollmentResponse = client.post(paths::ENROLLMENT, &req).await?;
    // Keep pinning what the (already pinned) server says is its CA chain; fall back
    // to the identity's CA if it sent none.
    let ca_pem = if resp.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        resp.ca_pem.clone()
    } else {
        identity.ca_pem.clone()
    };
    let creds = Credentials::new(
        key,
        resp.certificate_pem.clone(),
        ca_pem,
        &identity.instance_id,
    )
    .map_err(EnrollError::BadCertificate)?;
    tracing::info!(instance_id = %identity.instance_id, serial = %creds.info.serial,
        not_after = creds.info.not_after, "enrolled");
    Ok((creds, resp))
}
