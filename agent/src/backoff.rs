//! Retry pacing: exponential backoff with a cap and jitter, and the jittered
//! heartbeat interval. Jitter keeps a fleet that lost its control plane at the same
//! moment from coming back in lockstep.

use std::time::Duration;

/// Exponential backoff: `base * 2^attempt`, capped, then "equal jitter" (a uniform
/// draw from the upper half), so a delay is never below half its nominal value.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The un-jittered delay for `attempt` (0 = first retry).
    pub fn nominal(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, with `unit` a uniform draw in `[0, 1)`.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let nominal = self.nominal(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        nominal.mul_f64(0.5 + unit / 2.0)
    }

    /// The next delay with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(crate::entropy::unit_random())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The heartbeat interval spread by `±fraction`, with `unit` a draw in `[0, 1)`.
pub fn jittered(interval: Duration, fraction: f64, unit: f64) -> Duration {
    let fraction = fraction.clamp(0.0, 1.0);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    interval.mul_f64(1.0 - fraction + 2.0 * fraction * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let n: Vec<u128> = (0..10).map(|a| b.nominal(a).as_millis()).collect();
        assert_eq!(
            n,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]
        );
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_reset_restarts() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        assert_eq!(b.next_with(0.0), Duration::from_millis(500));
        assert_eq!(b.next_with(0.999_999).as_millis(), 1999);
        assert_eq!(b.next_with(f64::NAN), Duration::from_secs(3));
        assert_eq!(b.attempt(), 3);
        b.reset();
        assert_eq!(b.next_with(1.0), Duration::from_secs(1));
        for _ in 0..100 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(8));
        }
    }

    #[test]
    fn cap_below_base_is_raised_to_base() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.nominal(3), Duration::from_secs(5));
    }

    #[test]
    fn heartbeat_jitter_bounds() {
        let i = Duration::from_secs(10);
        assert_eq!(jittered(i, 0.1, 0.0), Duration::from_secs(9));
        assert_eq!(jittered(i, 0.1, 0.5), Duration::from_secs(10));
        assert_eq!(jittered(i, 0.1, 1.0), Duration::from_secs(11));
        assert_eq!(jittered(i, 5.0, 0.0), Duration::ZERO);
    }
}
