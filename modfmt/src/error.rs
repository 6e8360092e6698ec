//! The wire codes of this crate's errors, and the errors a puller wraps in a layer
//! stream (its digest check, its own failures). The store, the unpacker and the TOC
//! all report those, so they live here, below all three.

use std::io;

use powernode_proto::ErrorCode;

/// Every error of this module tree maps to a stable wire code the agent reports.
pub trait ModuleErrorCode {
    fn code(&self) -> ErrorCode;
}

/// What a puller wraps (as `io::Error::other`) in the layer stream's error when the blob
/// it streamed does not match its manifest digest. The unpacker reports it as
/// `digest_mismatch`.
#[derive(Debug, thiserror::Error)]
#[error("blob digest sha256:{actual} does not match the manifest's {expected}")]
pub struct BlobDigestMismatch {
    pub expected: String,
    pub actual: String,
}

/// Any other error a puller wants reported with its own code (e.g. `registry_unreachable`
/// when the connection drops mid-layer).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodedStreamError {
    pub code: ErrorCode,
    pub message: String,
}

/// The code for an error that came out of a layer stream.
pub fn stream_error_code(e: &io::Error) -> ErrorCode {
    let inner = e.get_ref();
    if inner.is_some_and(|i| i.is::<BlobDigestMismatch>()) {
        return ErrorCode::DigestMismatch;
    }
    if let Some(c) = inner.and_then(|i| i.downcast_ref::<CodedStreamError>()) {
        return c.code;
    }
    // The bytes were what the manifest promised but do not decode as its media type.
    ErrorCode::UnsupportedMediaType
}
