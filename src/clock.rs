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

/// `5400` -> `1h30m`, `2_678_400` -> `31d`, for messages: days at most (humantime's
/// months and years are 30.44 and 365.25 days, so 31 days read `1month13h26m24s`), written
/// the way `--ttl` takes them back.
pub fn human_secs(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3_600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let out: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if out.is_empty() { "0s".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(5400), "1h30m");
        assert_eq!(human_secs(90), "1m30s");
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(31 * 86_400), "31d");
        assert_eq!(human_secs(30 * 86_400 + 3_600 + 1), "30d1h1s");
        // What it writes, --ttl reads back.
        for secs in [59, 5400, 31 * 86_400, 90_061] {
            assert_eq!(
                humantime::parse_duration(&human_secs(secs)).ok(),
                Some(Duration::from_secs(secs))
            );
        }
    }

    #[test]
    fn times_past_year_9999_do_not_panic() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_millis(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
