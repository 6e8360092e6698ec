//! Re-enrollment of an expired certificate. A node whose certificate ran out (a
//! control-plane outage longer than its life, a long power-off) still holds its
//! key: it sends the expired certificate and a CSR signed by that key, and the
//! server, if it still accepts the node, signs a new certificate for the same key.
//! No bootstrap token is spent. The server may refuse for good (revoked,
//! terminated, expired longer ago than its grace period): the caller stops then.

use powernode_proto::node::{EnrollmentResponse, ReissueRequest};
use powernode_proto::{paths, ErrorCode};

use crate::client::{ApiClient, ClientError};
use crate::credentials::{CredentialError, Credentials};

#[derive(Debug, thiserror::Error)]
pub enum ReissueError {
    #[error("reissue request failed")]
    Client(#[from] ClientError),
    #[error("reissue key or certificate")]
    Credentials(#[from] CredentialError),
}

impl ReissueError {
    /// `Some(code)` when the node must stop for good.
    pub fn terminal_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Client(e) => e.terminal_code(),
            Self::Credentials(_) => None,
        }
    }
}

/// Asks for a new certificate for `creds`' key. `Ok(None)`: the server says the
/// certificate has not expired (the node's clock misled it): keep using it.
pub async fn reissue(
    client: &ApiClient,
    creds: &Credentials,
    instance_id: &str,
) -> Result<Option<Credentials>, ReissueError> {
    let req = ReissueRequest {
        instance_id: instance_id.to_string(),
        certificate_pem: creds.cert_pem.clone(),
        csr_pem: creds.key.csr_pem(instance_id)?,
    };
    let resp: EnrollmentResponse = match client.post(paths::CERTIFICATE_REISSUE, &req).await {
        Ok(r) => r,
        Err(e) if e.code() == Some(ErrorCode::RenewalNotDue) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let ca_pem = if resp.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        resp.ca_pem
    } else {
        creds.ca_pem.clone()
    };
    let mut new = Credentials::new(creds.key.clone(), resp.certificate_pem, ca_pem, instance_id)?;
    new.info.received_at = client.server_clock().now();
    tracing::info!(old_serial = %creds.info.serial, serial = %new.info.serial,
        not_after = new.info.not_after, "expired certificate reissued for the same key");
    Ok(Some(new))
}
