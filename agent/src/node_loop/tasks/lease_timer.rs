//! When to renew a task's lease and when it is gone, by the agent's monotonic clock
//! (pure: the caller passes the time, so tests need no clock).
//!
//! The length is the one the server granted (its answer's `lease_seconds`; the asked
//! length only when an older server does not say), counted from when the request was
//! sent, so the agent's idea of the end is never later than the server's. A renewal
//! is due after a third of it; a failed renewal is retried sooner (a sixth, or half
//! the time left), and once the end has passed without a renewal the lease is gone:
//! the server requeues the task and the agent must stop working on it.

use std::time::{Duration, Instant};

/// The least wait between two renewal attempts.
const MIN_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub(crate) struct LeaseTimer {
    granted: Duration,
    /// When the request that granted (or renewed) the lease was sent.
    since: Instant,
    /// The last renewal attempt that failed without an answer, if any since.
    failed_at: Option<Instant>,
}

impl LeaseTimer {
    /// A lease granted `granted` seconds (or, from a server that does not say,
    /// `asked`) by a request sent at `sent`.
    pub(crate) fn new(granted: Option<u64>, asked: u64, sent: Instant) -> Self {
        Self {
            granted: Self::length(granted, asked),
            since: sent,
            failed_at: None,
        }
    }

    fn length(granted: Option<u64>, asked: u64) -> Duration {
        Duration::from_secs(granted.unwrap_or(asked).max(1))
    }

    pub(crate) fn granted(&self) -> Duration {
        self.granted
    }

    /// A renewal sent at `sent` was answered with `granted`.
    pub(crate) fn renewed(&mut self, granted: Option<u64>, asked: u64, sent: Instant) {
        self.granted = Self::length(granted, asked);
        self.since = sent;
        self.failed_at = None;
    }

    /// A renewal attempt at `at` got no answer (network, 5xx).
    pub(crate) fn failed(&mut self, at: Instant) {
        self.failed_at = Some(at);
    }

    /// When the lease ends unless renewed.
    pub(crate) fn expires(&self) -> Instant {
        self.since + self.granted
    }

    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.expires()
    }

    /// When to try the next renewal.
    pub(crate) fn next_renewal(&self) -> Instant {
        match self.failed_at {
            None => self.since + self.granted / 3,
            Some(at) => {
                let left = self.expires().saturating_duration_since(at);
                at + (self.granted / 6).min(left / 2).max(MIN_RETRY)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_granted_length_decides_not_the_asked_one() {
        let t0 = Instant::now();
        // Asked 30 s, the server capped it at 6 s: renew after 2 s, gone after 6 s.
        let t = LeaseTimer::new(Some(6), 30, t0);
        assert_eq!(t.granted(), 6 * S);
        assert_eq!(t.next_renewal(), t0 + 2 * S);
        assert!(!t.expired(t0 + 5 * S) && t.expired(t0 + 6 * S));
        // An older server that does not say: the asked length.
        let t = LeaseTimer::new(None, 30, t0);
        assert_eq!(t.next_renewal(), t0 + 10 * S);
        // Never zero.
        assert_eq!(LeaseTimer::new(Some(0), 30, t0).granted(), S);
    }

    #[test]
    fn a_failed_renewal_is_retried_sooner_and_the_lease_ends_without_one() {
        let t0 = Instant::now();
        let mut t = LeaseTimer::new(Some(30), 30, t0);
        assert_eq!(t.next_renewal(), t0 + 10 * S);
        // The renewal at 10 s got no answer: again after 5 s (a sixth), not 10.
        t.failed(t0 + 10 * S);
        assert_eq!(t.next_renewal(), t0 + 15 * S);
        t.failed(t0 + 15 * S);
        assert_eq!(t.next_renewal(), t0 + 20 * S);
        // Close to the end: half the time left, so attempts still land before it.
        t.failed(t0 + 28 * S);
        assert_eq!(t.next_renewal(), t0 + 29 * S);
        assert!(t.next_renewal() < t.expires());
        assert!(t.expired(t0 + 30 * S));
        // An answer (the server granted less this time) starts over from its send.
        t.renewed(Some(9), 30, t0 + 29 * S);
        assert_eq!(t.next_renewal(), t0 + 32 * S);
        assert_eq!(t.expires(), t0 + 38 * S);
        assert!(!t.expired(t0 + 31 * S));
    }
}
