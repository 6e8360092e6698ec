//! The init's options from the kernel command line (`/proc/cmdline`). Identity keys
//! (`powernode.identity=` and friends) are the identity code's business, not parsed
//! here.

use std::fmt;

use powernode_sysfmt::cmdline::{flag, split_params};

/// What happens after a phase fails (or the init panics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Power the machine off: tests, so that QEMU exits.
    Poweroff,
    /// Reboot at once.
    Reboot,
    /// Retry the failed phase with backoff, forever (production default).
    #[default]
    Retry,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poweroff => "poweroff",
            Self::Reboot => "reboot",
            Self::Retry => "retry",
        }
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attempts of a retryable phase before the failure policy applies.
pub const DEFAULT_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub on_failure: FailurePolicy,
    /// `powernode.test_poweroff=1`: power off cleanly once the init has done its work
    /// (the VM smoke test and the boot benchmark).
    pub test_poweroff: bool,
    /// `powernode.test_panic=1`: panic on purpose after reading the command line, so
    /// a VM test can prove the panic hook applies the failure policy.
    pub test_panic: bool,
    /// `powernode.test_switch_root=1`: switch into a tmpfs root holding a copy of
    /// the init (which reports and powers off), to prove the switch on a real kernel
    /// before the agent's composed root exists.
    pub test_switch_root: bool,
    /// `powernode.attempts=N`: how many times a phase that may heal by itself
    /// (network, enrollment, the agent) is tried before `poweroff`/`reboot` applies
    /// (`retry` retries forever). Default [`DEFAULT_ATTEMPTS`].
    pub attempts: u32,
    /// `quiet`: the kernel console shows warnings only, so the logger writes
    /// info lines to the console itself.
    pub quiet: bool,
    /// `powernode.persist=/dev/NAME` or `LABEL=NAME` (the one disk whose ext4
    /// label it is): the ext4 disk mounted at `/persist` for the
    /// agent's state and module store (checked when used). Absent: an ephemeral
    /// node, whatever disks the machine has (a cloud's root volume is never taken
    /// for it).
    pub persist: Option<String>,
    /// `powernode.lease_s=N` (3..=3600): how long the agent asks to hold a task's
    /// lease (renewed every third of it). Default: the agent's (30 s).
    pub lease_seconds: Option<u64>,
    /// Values the init did not understand, reported once in the log (a typo in
    /// `powernode.on_failure` must not silently mean "retry").
    pub unknown: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            on_failure: FailurePolicy::default(),
            test_poweroff: false,
            test_panic: false,
            test_switch_root: false,
            attempts: DEFAULT_ATTEMPTS,
            quiet: false,
            persist: None,
            lease_seconds: None,
            unknown: Vec::new(),
        }
    }
}

/// The init's options; the words are split as the kernel splits them
/// ([`powernode_sysfmt::cmdline`]), and a repeated key keeps its last value.
pub fn parse(cmdline: &str) -> Options {
    let mut opts = Options::default();
    for (key, value) in split_params(cmdline) {
        let Some(v) = value.as_deref() else {
            if key == "quiet" {
                opts.quiet = true;
            }
            continue;
        };
        let unknown = || format!("{key}={v}");
        let switch = |slot: &mut bool, unknown_words: &mut Vec<String>| match flag(v) {
            Some(b) => *slot = b,
            None => unknown_words.push(unknown()),
        };
        match key.as_str() {
            "powernode.on_failure" => match v {
                "poweroff" => opts.on_failure = FailurePolicy::Poweroff,
                "reboot" => opts.on_failure = FailurePolicy::Reboot,
                "retry" => opts.on_failure = FailurePolicy::Retry,
                _ => opts.unknown.push(unknown()),
            },
            "powernode.test_poweroff" => switch(&mut opts.test_poweroff, &mut opts.unknown),
            "powernode.test_panic" => switch(&mut opts.test_panic, &mut opts.unknown),
            "powernode.test_switch_root" => switch(&mut opts.test_switch_root, &mut opts.unknown),
            "powernode.persist" => opts.persist = Some(v.to_string()),
            "powernode.lease_s" => match v.parse::<u64>() {
                Ok(n) if (3..=3600).contains(&n) => opts.lease_seconds = Some(n),
                _ => opts.unknown.push(unknown()),
            },
            "powernode.attempts" => match v.parse::<u32>() {
                Ok(n) if n >= 1 => opts.attempts = n,
                _ => opts.unknown.push(unknown()),
            },
            _ => {}
        }
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_repeats_follow_the_kernel() {
        let o =
            parse("\"powernode.persist=LABEL=my disk\" powernode.attempts=2 powernode.attempts=7");
        assert_eq!(o.persist.as_deref(), Some("LABEL=my disk"));
        assert_eq!(o.attempts, 7, "the last value wins");
        // `quiet=1` is not the bare word the kernel means.
        assert!(!parse("quiet=1").quiet);
        assert!(parse("a quiet b=c").quiet);
    }

    #[test]
    fn options_parse_and_unknown_values_are_kept() {
        let o =
            parse("console=ttyS0 powernode.on_failure=poweroff powernode.test_poweroff=1 quiet");
        assert_eq!(o.on_failure, FailurePolicy::Poweroff);
        assert!(o.test_poweroff && o.quiet);
        assert!(o.unknown.is_empty());
        assert!(!o.test_panic);
        assert!(parse("powernode.test_panic=1").test_panic);
        assert_eq!(parse("powernode.test_panic=maybe").unknown.len(), 1);
        let o = parse("powernode.on_failure=explode");
        assert_eq!(o.on_failure, FailurePolicy::Retry);
        assert_eq!(o.unknown, ["powernode.on_failure=explode"]);
        assert_eq!(parse("").on_failure, FailurePolicy::Retry);
        assert_eq!(parse("").attempts, DEFAULT_ATTEMPTS);
        assert_eq!(parse("powernode.attempts=5").attempts, 5);
        assert_eq!(parse("powernode.attempts=0").unknown.len(), 1);
        assert_eq!(parse("").persist, None);
        assert_eq!(parse("powernode.lease_s=90").lease_seconds, Some(90));
        assert_eq!(parse("").lease_seconds, None);
        for bad in [
            "powernode.lease_s=2",
            "powernode.lease_s=7200",
            "powernode.lease_s=x",
        ] {
            let o = parse(bad);
            assert_eq!((o.lease_seconds, o.unknown.len()), (None, 1), "{bad}");
        }
        assert_eq!(
            parse("powernode.persist=/dev/vdb").persist.as_deref(),
            Some("/dev/vdb")
        );
    }
}
