//! The one wall clock, and how times and durations are written for people.
//!
//! Everything that stamps a time asks [`now_ms`], so tests and the lifecycle's pure step
//! function can take "now" as a plain number instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z), in Unix milliseconds.
/// Later times are written as this one rather than failing.
const RFC3339_MAX_MS: u64 = 253_402_300_799_999;

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, seconds) for Unix milliseconds. Never fails: a time past year 9999 is
/// written as the last second of 9999.
pub fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.min(RFC3339_MAX_MS));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 3339 (UTC, milliseconds) for Unix milliseconds, as Daytona writes its times.
pub fn rfc3339_millis(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.min(RFC3339_MAX_MS));
    humantime::format_rfc3339_millis(t).to_string()
}

/// `5400` -> `1h30m`, for messages.
pub fn human_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(5400), "1h30m");
        assert_eq!(human_secs(90), "1m30s");
    }

    #[test]
    fn times_past_year_9999_do_not_panic() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_millis(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
