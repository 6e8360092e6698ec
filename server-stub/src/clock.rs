//! Wall clock with a test offset, so expiry, silence and stuck thresholds can be
//! tested without sleeping for minutes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use powernode_proto::Timestamp;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

#[derive(Debug, Clone, Default)]
pub struct Clock {
    skew_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now_ms(&self) -> Millis {
        let real = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        real + self.skew_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock (and every clone of it) forward; tests only.
    pub fn advance_secs(&self, secs: i64) {
        self.skew_ms.fetch_add(secs * 1000, Ordering::Relaxed);
    }

    pub fn now_ts(&self) -> Timestamp {
        format_ts(self.now_ms())
    }
}

/// RFC 3339 in UTC with second precision, as on the wire.
pub fn format_ts(ms: Millis) -> Timestamp {
    let t = OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_seconds() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_ts(1_795_000_000_123), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn advance_moves_all_clones() {
        let a = Clock::default();
        let b = a.clone();
        let before = b.now_ms();
        a.advance_secs(100);
        assert!(b.now_ms() - before >= 100_000);
    }
}
