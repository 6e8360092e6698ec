//! [`PhaseError`]: why a phase of the boot failed, with the wire code reported
//! upstream and whether a retry may help.

use powernode_proto::ErrorCode;

use super::persist::PersistError;
use crate::agent::BootstrapError;
use crate::identity::IdentityProbeError;
use crate::modules::ModuleError;
use crate::mounts::MountError;
use crate::net::NetError;
use crate::root_init::RootInitError;
use crate::switch_root::SwitchRootError;
use crate::sys::Errno;

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] Errno),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Identity(#[from] IdentityProbeError),
    #[error("no identity: not on the command line (powernode.identity=), not in fw_cfg, not from cloud metadata")]
    IdentityMissing,
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    SwitchRoot(#[from] SwitchRootError),
    #[error("preparing the test root")]
    TestRoot(#[source] Errno),
    /// Leaving what agent mode needs before switch_root.
    #[error("hand-off to the composed root: {step} {path}")]
    HandOff {
        step: &'static str,
        path: String,
        #[source]
        errno: Errno,
    },
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("the agent failed: {message}")]
    Agent { code: ErrorCode, message: String },
    /// A file of the composed root could not be read in full before switch_root.
    /// `EIO` under `verity=require` is the kernel refusing a block whose content
    /// does not match the object's fs-verity digest.
    #[error("reading {path} in the composed root{}{}",
        if *verity { " (fs-verity required)" } else { "" },
        repaired_note(moved))]
    RootRead {
        path: String,
        verity: bool,
        /// Corrupt objects moved out of the store (fetched again next boot).
        moved: Vec<String>,
        #[source]
        errno: Errno,
    },
    #[error(transparent)]
    RootInit(#[from] RootInitError),
}

impl PhaseError {
    /// The stable reason code reported upstream.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Identity(_) => ErrorCode::IdentityInvalid,
            Self::IdentityMissing => ErrorCode::IdentityMissing,
            Self::Network(_) => ErrorCode::Network,
            Self::Bootstrap(e) => e.code(),
            Self::Agent { code, .. } => *code,
            Self::RootInit(e) => e.code(),
            Self::Persist(e) => e.code(),
            Self::RootRead {
                verity: true,
                errno: Errno::IO,
                ..
            } => ErrorCode::VerityMismatch,
            Self::RootRead { .. }
            | Self::Mount(_)
            | Self::Cmdline(_)
            | Self::Modules(_)
            | Self::SwitchRoot(_)
            | Self::TestRoot(_)
            | Self::HandOff { .. } => ErrorCode::Internal,
        }
    }

    /// Where the failure can be reported when the boot has no valid identity: a
    /// cloud document broken in one field that still names the control plane and
    /// the bootstrap token.
    pub fn report_target(&self) -> Option<&powernode_proto::boot_report::ReportTarget> {
        match self {
            Self::Identity(IdentityProbeError::Cloud {
                report_to: Some(t), ..
            }) => Some(t),
            _ => None,
        }
    }

    /// What the operator can do about it, where the init knows.
    pub fn recovery(&self) -> Option<String> {
        match self {
            Self::RootInit(e) => e.recovery(),
            _ => None,
        }
    }

    /// The control plane refused this node for good: no later attempt, under any
    /// policy, can succeed with this boot's identity.
    pub fn refused_for_good(&self) -> bool {
        matches!(self, Self::Bootstrap(e) if e.refused_for_good())
    }

    /// Whether a later attempt may succeed on its own (the network comes up, the
    /// control plane comes back). Others (a bad identity, a missing module) apply
    /// the failure policy at once, except `retry` which retries all but a refusal
    /// for good.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Network(_) | Self::Agent { .. } => true,
            Self::Persist(e) => e.retryable(),
            Self::Bootstrap(e) => e.retryable(),
            _ => false,
        }
    }

    /// The message with its whole cause chain, for the console and upstream.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

fn repaired_note(moved: &[String]) -> String {
    match moved {
        [] => String::new(),
        [one] => format!("; corrupt object {one} moved out of the store, fetched again next boot"),
        more => format!(
            "; {} corrupt objects moved out of the store, fetched again next boot",
            more.len()
        ),
    }
}
