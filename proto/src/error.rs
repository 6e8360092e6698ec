//! Stable error codes. The server answers every failure with
//! `{"error": {"code": "...", "message": "..."}}` and an HTTP status; clients match on
//! the code, never on the message.

use serde::{Deserialize, Serialize};

/// Machine-readable failure reason. Codes are part of the public interface: add new
/// ones, never rename. Unknown codes from a newer peer deserialize as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Generic request errors.
    BadRequest,
    MalformedJson,
    PayloadTooLarge,
    NotFound,
    Internal,
    /// The server could not record a change (its database write failed); nothing
    /// changed, the same request can be sent again.
    StorageUnavailable,
    /// Too many requests of one kind from one caller (boot reports per token).
    RateLimited,
    // Admin API.
    AdminTokenMissing,
    AdminTokenInvalid,
    InvalidTransition,
    LifecycleClassImmutable,
    NodeHasLiveInstance,
    NodeAlreadyHasInstance,
    UnknownTemplate,
    UnknownInstanceType,
    UnknownRegion,
    ProviderDisabled,
    ProviderFailed,
    MissingNetbootImageError,
    /// The operator cancelled the task that drove the instance (e.g. its provision).
    TaskCancelled,
    /// The server keeps no online module-signing key (`serve --online-signing off`):
    /// publishers sign offline (`publish-module --key`).
    OnlineSigningDisabled,
    // Enrollment.
    BootstrapTokenInvalid,
    BootstrapTokenExpired,
    BootstrapTokenUsed,
    CsrInvalid,
    CsrInstanceMismatch,
    // mTLS on the node API.
    ClientCertificateRequired,
    ClientCertificateInvalid,
    CertificateRevoked,
    CertificateInstanceMismatch,
    InstanceTerminated,
    /// The client certificate is ours and known but past `not_after` (by the
    /// server's clock): the node re-enrolls it at `certificate/reissue`.
    CertificateExpired,
    /// An expired certificate presented for reissue expired longer ago than the
    /// server's grace period: the node needs a new bootstrap token.
    CertificateGraceExceeded,
    /// A renewal for a certificate that has not reached its renewal point (and the
    /// server did not ask for it): keep the certificate, renew later.
    RenewalNotDue,
    /// Too many certificates for this instance lately: renew later.
    RenewalRateLimited,
    // Task lease.
    TaskNotLeased,
    LeaseExpired,
    // Module supply chain (reported upstream by the agent).
    SignatureMissing,
    SignatureMismatch,
    DigestMismatch,
    VerityMismatch,
    OciNotFound,
    RegistryUnreachable,
    /// The registry refused the pull's credentials (401/403): for the embedded one,
    /// the node's certificate was revoked, its instance ended, or none was presented;
    /// the message carries the registry's reason.
    RegistryUnauthorized,
    UnsupportedMediaType,
    UnsafePath,
    /// A layer unpacks to more than its bound (the store's free space, or a fixed
    /// cap), or one of its tar headers is larger than any real one: a decompression
    /// bomb, refused before it fills memory or the store.
    LayerTooLarge,
    /// A module version below one this node already attached (its version floor):
    /// an old, validly signed version must not roll the node back.
    VersionRollback,
    // Boot path (reported upstream by the init / agent).
    IdentityInvalid,
    IdentityMissing,
    Network,
    EnrollmentFailed,
    /// The composed root's `/sbin/init` cannot run (dangling link, not executable).
    RootInitInvalid,
    /// A systemd root without the running kernel's modules.
    KernelModulesMissing,
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::MalformedJson => "malformed_json",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NotFound => "not_found",
            Self::Internal => "internal",
            Self::StorageUnavailable => "storage_unavailable",
            Self::RateLimited => "rate_limited",
            Self::AdminTokenMissing => "admin_token_missing",
            Self::AdminTokenInvalid => "admin_token_invalid",
            Self::InvalidTransition => "invalid_transition",
            Self::LifecycleClassImmutable => "lifecycle_class_immutable",
            Self::NodeHasLiveInstance => "node_has_live_instance",
            Self::NodeAlreadyHasInstance => "node_already_has_instance",
            Self::UnknownTemplate => "unknown_template",
            Self::UnknownInstanceType => "unknown_instance_type",
            Self::UnknownRegion => "unknown_region",
            Self::ProviderDisabled => "provider_disabled",
            Self::ProviderFailed => "provider_failed",
            Self::MissingNetbootImageError => "missing_netboot_image_error",
            Self::TaskCancelled => "task_cancelled",
            Self::OnlineSigningDisabled => "online_signing_disabled",
            Self::BootstrapTokenInvalid => "bootstrap_token_invalid",
            Self::BootstrapTokenExpired => "bootstrap_token_expired",
            Self::BootstrapTokenUsed => "bootstrap_token_used",
            Self::CsrInvalid => "csr_invalid",
            Self::CsrInstanceMismatch => "csr_instance_mismatch",
            Self::ClientCertificateRequired => "client_certificate_required",
            Self::ClientCertificateInvalid => "client_certificate_invalid",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CertificateInstanceMismatch => "certificate_instance_mismatch",
            Self::InstanceTerminated => "instance_terminated",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateGraceExceeded => "certificate_grace_exceeded",
            Self::RenewalNotDue => "renewal_not_due",
            Self::RenewalRateLimited => "renewal_rate_limited",
            Self::TaskNotLeased => "task_not_leased",
            Self::LeaseExpired => "lease_expired",
            Self::SignatureMissing => "signature_missing",
            Self::SignatureMismatch => "signature_mismatch",
            Self::DigestMismatch => "digest_mismatch",
            Self::VerityMismatch => "verity_mismatch",
            Self::OciNotFound => "oci_not_found",
            Self::RegistryUnreachable => "registry_unreachable",
            Self::RegistryUnauthorized => "registry_unauthorized",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UnsafePath => "unsafe_path",
            Self::LayerTooLarge => "layer_too_large",
            Self::VersionRollback => "version_rollback",
            Self::IdentityInvalid => "identity_invalid",
            Self::IdentityMissing => "identity_missing",
            Self::Network => "network",
            Self::EnrollmentFailed => "enrollment_failed",
            Self::RootInitInvalid => "root_init_invalid",
            Self::KernelModulesMissing => "kernel_modules_missing",
            Self::Unknown => "unknown",
        }
    }

    /// Whether a node receiving this code must stop for good (its credentials are
    /// gone) rather than retry. A certificate this control plane never issued or
    /// does not know (`client_certificate_invalid`) is final too; an expired one
    /// (`certificate_expired`) is not: the node re-enrolls it.
    pub fn is_terminal_for_node(self) -> bool {
        matches!(
            self,
            Self::CertificateRevoked
                | Self::InstanceTerminated
                | Self::BootstrapTokenExpired
                | Self::BootstrapTokenUsed
                | Self::BootstrapTokenInvalid
                | Self::CertificateInstanceMismatch
                | Self::ClientCertificateInvalid
                | Self::CertificateGraceExceeded
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error object inside an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// `{"error": {...}}`, the body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ApiError {
                code,
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_json() {
        for code in [
            ErrorCode::BootstrapTokenExpired,
            ErrorCode::MissingNetbootImageError,
            ErrorCode::SignatureMismatch,
            ErrorCode::InvalidTransition,
            ErrorCode::CertificateExpired,
            ErrorCode::CertificateGraceExceeded,
            ErrorCode::RenewalNotDue,
            ErrorCode::RenewalRateLimited,
            ErrorCode::RegistryUnauthorized,
            ErrorCode::OnlineSigningDisabled,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    #[test]
    fn an_expired_certificate_is_retried_and_an_unknown_one_is_final() {
        assert!(!ErrorCode::CertificateExpired.is_terminal_for_node());
        assert!(!ErrorCode::RenewalNotDue.is_terminal_for_node());
        assert!(!ErrorCode::RenewalRateLimited.is_terminal_for_node());
        assert!(ErrorCode::ClientCertificateInvalid.is_terminal_for_node());
        assert!(ErrorCode::CertificateGraceExceeded.is_terminal_for_node());
        assert!(ErrorCode::CertificateRevoked.is_terminal_for_node());
        // The existing code keeps its wire name.
        assert_eq!(
            ErrorCode::ClientCertificateInvalid.as_str(),
            "client_certificate_invalid"
        );
    }

    #[test]
    fn unknown_code_from_newer_peer_is_unknown() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"brand_new_code","message":"x"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unknown);
    }
}
