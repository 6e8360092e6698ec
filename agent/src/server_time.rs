//! The control plane's clock as the node estimates it. A node's real-time clock
//! may be hours off (no RTC battery, no NTP yet, a VM restored from a snapshot);
//! judged by it, a valid certificate looks expired (and the node would give up) or
//! a fresh one looks due (and the node would renew in a loop). The certificate's
//! dates are the server's, so the node judges them by the server's time.
//!
//! Every answer from the control plane carries an HTTP `Date` (RFC 9110; hyper
//! sends it). The server wrote it somewhere between the request leaving and the
//! answer arriving, truncated to the second; the estimate is its midpoint, anchored
//! to the monotonic clock, so neither the RTC nor a later step of it moves the
//! estimate. Before the first answer the local clock is all there is.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One `Date` observation: the server's unix time (ms) at a monotonic instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    server_ms: i64,
    at: Instant,
    /// Half the round trip plus the `Date` truncation: how far off it may be.
    error_ms: i64,
}

/// The node's estimate of the control plane's clock; shared by every client of
/// one agent (see [`crate::client::ApiClient::server_clock`]).
#[derive(Debug, Default)]
pub struct ServerClock {
    sample: Mutex<Option<Sample>>,
}

/// Unix milliseconds by the local real-time clock.
pub fn local_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ServerClock {
    pub fn new() -> Self {
        Self::default()
    }

    fn sample(&self) -> Option<Sample> {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a `Date` header value from an answer to a request sent at `sent`
    /// and answered at `received`. A value that does not parse is ignored
    /// (`false`); the estimate stays as it was.
    pub fn observe(&self, date: &str, sent: Instant, received: Instant) -> bool {
        let Ok(t) = httpdate::parse_http_date(date.trim()) else {
            return false;
        };
        let Ok(since_epoch) = t.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let received = received.max(sent);
        let half_trip = received.duration_since(sent) / 2;
        // [D, D+1) s written somewhere in [sent, received]: the middle of both.
        let sample = Sample {
            server_ms: ms(since_epoch).saturating_add(500),
            at: sent + half_trip,
            error_ms: ms(half_trip).saturating_add(500),
        };
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample);
        true
    }

    /// The server's unix time (ms) at monotonic instant `at`, if it ever answered.
    pub fn server_ms_at(&self, at: Instant) -> Option<i64> {
        let s = self.sample()?;
        let delta = match at.checked_duration_since(s.at) {
            Some(after) => ms(after),
            None => -ms(s.at.duration_since(at)),
        };
        Some(s.server_ms.saturating_add(delta))
    }

    /// How far the server's clock is ahead of the local one (ms; negative when
    /// behind), if it ever answered.
    pub fn offset_ms(&self) -> Option<i64> {
        self.server_ms_at(Instant::now())
            .map(|server| server.saturating_sub(local_unix_ms()))
    }

    /// How far off the estimate may be (ms), if there is one.
    pub fn error_ms(&self) -> Option<i64> {
        self.sample().map(|s| s.error_ms)
    }

    /// Unix seconds the server's clock has surely reached (the estimate less its
    /// error), else the local clock: what renewal is judged by, so a node never asks
    /// before the server's own renewal point.
    pub fn earliest_now(&self) -> i64 {
        let at = Instant::now();
        match self.sample() {
            Some(s) => self
                .server_ms_at(at)
                .unwrap_or(s.server_ms)
                .saturating_sub(s.error_ms)
                .div_euclid(1000),
            None => local_unix_ms().div_euclid(1000),
        }
    }

    /// Unix seconds now by the server's clock, else by the local one.
    pub fn now(&self) -> i64 {
        self.server_ms_at(Instant::now())
            .unwrap_or_else(local_unix_ms)
            .div_euclid(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Date` for unix second `secs`.
    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn before_any_answer_the_local_clock_is_used() {
        let clock = ServerClock::new();
        assert_eq!(clock.offset_ms(), None);
        assert_eq!(clock.server_ms_at(Instant::now()), None);
        let local = local_unix_ms() / 1000;
        assert!((clock.now() - local).abs() <= 1);
    }

    #[test]
    fn the_date_is_placed_at_the_middle_of_the_round_trip() {
        let clock = ServerClock::new();
        let sent = Instant::now();
        let received = sent + Duration::from_millis(400);
        assert!(clock.observe(&date(1_700_000_000), sent, received));
        // Written in [1_700_000_000.000, .999], somewhere between sent and received.
        assert_eq!(
            clock.server_ms_at(sent + Duration::from_millis(200)),
            Some(1_700_000_000_500)
        );
        assert_eq!(clock.error_ms(), Some(700));
        // What the server has surely reached lags the estimate by that error.
        let est = clock.now();
        let earliest = clock.earliest_now();
        assert!(
            est - earliest >= 0 && est - earliest <= 1,
            "{est} {earliest}"
        );
        // It runs on with the monotonic clock, forwards and backwards.
        assert_eq!(
            clock.server_ms_at(received + Duration::from_secs(3600)),
            Some(1_700_003_600_700)
        );
        assert_eq!(clock.server_ms_at(sent), Some(1_700_000_000_300));
    }

    #[test]
    fn a_node_clock_hours_off_does_not_move_the_estimate() {
        // The server says 2023-11-14T22:13:20Z; whatever the RTC says, the
        // estimate is the server's time and the offset is the RTC's error.
        let clock = ServerClock::new();
        let now = Instant::now();
        let server_secs = u64::try_from(local_unix_ms() / 1000).unwrap() + 5 * 3600;
        assert!(clock.observe(&date(server_secs), now, now));
        let offset = clock.offset_ms().unwrap();
        // Within the `Date`'s second (the RTC's sub-second part was dropped).
        assert!((offset - 5 * 3600 * 1000).abs() <= 1000, "{offset}");
        let est = clock.now();
        assert!(
            (server_secs as i64..=server_secs as i64 + 2).contains(&est),
            "{est}"
        );
        // A clock behind by a day gives a negative offset.
        let behind = ServerClock::new();
        let server_secs = u64::try_from(local_unix_ms() / 1000).unwrap() - 86_400;
        assert!(behind.observe(&date(server_secs), now, now));
        assert!(behind.offset_ms().unwrap() < -86_000_000);
    }

    #[test]
    fn garbage_dates_are_ignored_and_the_last_good_one_kept() {
        let clock = ServerClock::new();
        let now = Instant::now();
        assert!(!clock.observe("yesterday", now, now));
        assert_eq!(clock.server_ms_at(now), None);
        assert!(clock.observe(&date(1_000), now, now));
        assert!(!clock.observe("", now, now));
        assert!(!clock.observe("Mon, 99 Foo 2024 99:99:99 GMT", now, now));
        assert_eq!(clock.server_ms_at(now), Some(1_000_500));
        // A later answer replaces it (the server's clock may have been stepped).
        assert!(clock.observe(&date(5_000), now, now));
        assert_eq!(clock.server_ms_at(now), Some(5_000_500));
    }

    #[test]
    fn an_answer_before_its_request_is_read_as_an_instant_one() {
        let clock = ServerClock::new();
        let sent = Instant::now();
        assert!(clock.observe(&date(10), sent + Duration::from_secs(1), sent));
        assert_eq!(clock.error_ms(), Some(500));
    }
}
