//! The node agent library: everything a Powernode node does, from learning its
//! identity to heartbeating, reconciling modules and running leased tasks. Used by
//! `powernode-init` during boot and by the `powernode-agent` binary afterwards.
//!
//! It must never panic on input from the network, the kernel command line or
//! firmware: it runs inside PID 1.

pub mod modules;
pub mod verity;
