//! Module supply chain, node side: unpack verified OCI layer streams into a
//! content-addressed object store (objects named by fs-verity digest), build the
//! module's composefs EROFS image from the resulting tree, check it against the signed
//! digest, and mount it (EROFS + overlayfs with the store as a data-only lower layer),
//! composing root modules into a union root with a tmpfs upper.
//!
//! The pull: [`pull::pull_module`] (registry client in [`registry`], cosign signature
//! check in [`signature`], run alongside) installs the image with the signed composefs
//! digest, each layer opened as a stream whose read-ahead thread receives and hashes
//! it and fails on a digest mismatch at EOF ([`registry::BlobReader`]), and nothing
//! recorded before the signature verified; then [`mount::mount_module`] /
//! [`mount::mount_union`]; [`store::ObjectStore::gc`] between reconciles. Every error
//! has a stable wire code ([`ModuleErrorCode`]). [`module_runtime::ModuleRuntime`] is
//! the module runtime that does all this at each reconcile the node loop asks for.
//!
//! It must never use an object, image or path it has not verified: objects are
//! re-hashed against their names (or kernel-verified with fs-verity), archive paths
//! that escape are refused, and nothing from an archive is ever followed.

pub mod config;
pub mod module_runtime;
pub mod mount;
pub mod pull;
pub mod registry;
pub mod signature;
mod stream;
pub mod trust;

// The format (tree, unpacking, store, composefs image) is shared with the publisher
// and lives in `powernode-modfmt`; these re-exports keep the agent's paths.
pub use powernode_modfmt::error::{self, ModuleErrorCode};
pub use powernode_modfmt::{
    check_image_digest, composefs, install_image, store, tree, unpack, ImageDigestMismatch,
    InstallError, InstallReport,
};

#[cfg(test)]
mod interop_tests;
#[cfg(test)]
pub(crate) mod stall_tests;
#[cfg(test)]
mod tests;
