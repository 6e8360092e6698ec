//! Enrollment: an Ed25519 key, a CSR bound to the instance, and one POST with the
//! bootstrap token over TLS that pins the identity document's CA. The answer is the
//! client certificate every later call presents.
//!
//! The key is made once per enrollment, not per attempt: the first attempt saves it
//! as the state directory's pending key before its request leaves, and every retry
//! (the agent's backoff, the init's failure policy, a restarted process) sends a CSR
//! for it again. A node whose answer was lost (reset, timeout, a failed save here)
//! thus gets the same certificate from the server rather than
//! `bootstrap_token_used`. The attempt ends by saving the credentials, the pending
//! key becoming their key.

use powernode_proto::node::{EnrollmentRequest, EnrollmentResponse};
use powernode_proto::{paths, IdentityDocument};

use crate::client::{ApiClient, ClientError, Timeouts};
use crate::credentials::{CredentialError, Credentials};
use crate::state::{KeyOrigin, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment could not prepare its key or request")]
    Key(#[from] CredentialError),
    #[error("enrollment request failed")]
    Client(#[from] ClientError),
    #[error("the control plane answered a certificate the node cannot use")]
    BadCertificate(#[source] CredentialError),
    #[error("enrollment could not keep its key or credentials")]
    State(#[from] StateError),
}

impl EnrollError {
    pub fn terminal_code(&self) -> Option<powernode_proto::ErrorCode> {
        match self {
            Self::Client(e) => e.terminal_code(),
            _ => None,
        }
    }
}

/// One enrollment attempt with `state`'s pending key; saves the credentials.
pub async fn enroll(
    state: &StateDir,
    identity: &IdentityDocument,
    source: &str,
    timeouts: Timeouts,
) -> Result<(Credentials, EnrollmentResponse), EnrollError> {
    enroll_with_provider(state, identity, source, None, timeouts).await
}

/// One enrollment attempt that also reports what the cloud's metadata said about
/// the machine (instance id, region, addresses; see `identity::cloud`).
pub async fn enroll_with_provider(
    state: &StateDir,
    identity: &IdentityDocument,
    source: &str,
    provider: Option<powernode_proto::node::ProviderFacts>,
    timeouts: Timeouts,
) -> Result<(Credentials, EnrollmentResponse), EnrollError> {
    let (key, origin) = state.pending_key()?;
    match &origin {
        KeyOrigin::Created => tracing::debug!("enrollment key made and saved as pending"),
        KeyOrigin::Reused => {
            tracing::info!("enrolling with the pending key of an earlier attempt")
        }
        KeyOrigin::Replaced(e) => tracing::warn!(error = %crate::error_chain(e),
            "pending enrollment key unusable; replaced by a new one"),
    }
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
    state.save_enrolled_credentials(&creds)?;
    tracing::info!(instance_id = %identity.instance_id, serial = %creds.info.serial,
        not_after = creds.info.not_after, "enrolled");
    Ok((creds, resp))
}
