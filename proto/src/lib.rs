//! Wire types shared by the node (`powernode-agent`, `powernode-init`) and the control
//! plane (`powernode-stub`): the identity document, node-API and admin-API requests and
//! responses, the stable error codes, the lifecycle state enums and the URL paths.
//!
//! This crate must never do I/O: it is linked into PID 1 and into the server, and both
//! sides must agree on these shapes byte for byte. Parsing and validation that need no
//! I/O (the identity document) live here so that every strategy reports the same errors.

pub mod admin;
pub mod boot_report;
pub mod error;
pub mod identity;
pub mod node;
pub mod paths;
pub mod state;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use identity::{IdentityDocument, IdentityError, NetworkConfig};
pub use state::{InstanceStatus, LifecycleClass, TaskKind, TaskStatus};

/// Timestamps on the wire are RFC 3339 strings in UTC (`2026-11-25T00:40:23Z`).
pub type Timestamp = String;
