//! The node agent library: everything a Powernode node does, from learning its
//! identity to heartbeating, reconciling modules and running leased tasks. Used by
//! `powernode-init` during boot and by the `powernode-agent` binary afterwards.
//!
//! It must never panic on input from the network, the kernel command line or
//! firmware: it runs inside PID 1.
//!
//! The path through it: [`identity`] (where the node learns who it is) ->
//! [`enroll`] (key, CSR, certificate, kept by [`state`]) -> [`node_loop`] (handshake
//! with the [`timeline`], heartbeat, task lease, drain, certificate renewal), which
//! drives services through [`supervisor`] and modules through [`module_reconcile`]
//! (the seam; [`modules::module_runtime`] is the module runtime behind it).

pub mod backoff;
pub mod boot_report;
pub mod client;
pub mod credentials;
pub mod drain;
pub mod enroll;
pub mod entropy;
pub mod facts;
pub mod identity;
pub mod kmod;
pub mod logring;
pub mod module_reconcile;
pub mod modules;
pub mod node_loop;
pub mod reissue;
pub mod server_time;
pub mod state;
pub mod supervisor;
pub mod systemd;
pub mod timeline;
/// fs-verity lives in the shared module format crate (the publisher needs it too).
pub use powernode_modfmt::verity;

/// This agent's version, as reported to the control plane.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit codes of `powernode-agent`.
pub mod exit_code {
    /// Stopped on request (SIGTERM / SIGINT).
    pub const STOPPED: i32 = 0;
    /// An error the agent could not get past (state directory, bad options...).
    pub const FAILURE: i32 = 1;
    /// Command-line usage error (clap's own code).
    pub const USAGE: i32 = 2;
    /// The control plane refused this node for good: certificate revoked, instance
    /// terminated, bootstrap token spent or expired. Restarting will not help; a
    /// supervisor must not restart the agent on this code.
    pub const TERMINAL: i32 = 3;
    /// No identity source answered, or the one that did is broken.
    pub const IDENTITY: i32 = 4;
}

/// An error and all its causes on one line (`outer: inner: root`), for logs and
/// upstream reports.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        // Some errors repeat their cause in their own message; skip duplicates.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
