//! Module supply chain, node side: unpack verified OCI layer streams into a
//! content-addressed object store (objects named by fs-verity digest), build the
//! module's composefs EROFS image from the resulting tree, check it against the signed
//! digest, and mount it (EROFS + overlayfs with the store as a data-only lower layer),
//! composing root modules into a union root with a tmpfs upper.
//!
//! The pull (registry client, cosign signature check) is not here: a puller hands
//! [`unpack::Unpacker::apply_layer`] each layer as a `Read` that fails on a digest
//! mismatch at EOF, then calls [`store::ObjectStore::commit_image`] and compares the
//! digest with the signed one ([`check_image_digest`]).
//!
//! It must never use an object, image or path it has not verified: objects are
//! re-hashed against their names (or kernel-verified with fs-verity), archive paths
//! that escape are refused, and nothing from an archive is ever followed.

pub mod composefs;
pub mod mount;
pub mod store;
pub mod tree;
pub mod unpack;

use powernode_proto::ErrorCode;

use crate::verity::VerityDigest;

/// Every error of this module tree maps to a stable wire code the agent reports.
pub trait ModuleErrorCode {
    fn code(&self) -> ErrorCode;
}

#[derive(Debug, thiserror::Error)]
#[error("composefs image digest {actual} does not match the signed {expected}")]
pub struct ImageDigestMismatch {
    pub expected: VerityDigest,
    pub actual: VerityDigest,
}

impl ModuleErrorCode for ImageDigestMismatch {
    fn code(&self) -> ErrorCode {
        ErrorCode::VerityMismatch
    }
}

/// The image we rebuilt must be the one the publisher signed.
pub fn check_image_digest(
    expected: &VerityDigest,
    actual: &VerityDigest,
) -> Result<(), ImageDigestMismatch> {
    if expected == actual {
        Ok(())
    } else {
        Err(ImageDigestMismatch {
            expected: *expected,
            actual: *actual,
        })
    }
}

#[cfg(test)]
mod tests;
