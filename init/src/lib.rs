//! powernode-init library (placeholder while writing)
pub mod layout;
