//! The daemon's metrics (`crabboxd --metrics-listen ADDR` serves them as Prometheus text at
//! `/metrics`): provider requests by route and status with their latency, retries and
//! rate-limit waits, sync volume, runs by how they ended with their duration, orphans
//! reaped, store writes; leases by state and provider are counted when scraped. A leaf:
//! the layers that do the work record here, and nothing here knows a lease.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

struct Metrics {
    registry: Registry,
    provider_requests: Family<Labels, Counter>,
    provider_seconds: Family<Labels, Histogram>,
    provider_retries: Family<Labels, Counter>,
    rate_limit_wait_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    sync_bytes: Counter,
    sync_files: Counter,
    runs: Family<Labels, Counter>,
    run_seconds: Histogram,
    orphans_reaped: Counter,
    store_write_seconds: Histogram,
}

fn histogram_seconds() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("crabbox");
    let m = Metrics {
        provider_requests: Family::default(),
        provider_seconds: Family::new_with_constructor(histogram_seconds),
        provider_retries: Family::default(),
        rate_limit_wait_seconds: Default::default(),
        sync_bytes: Counter::default(),
        sync_files: Counter::default(),
        runs: Family::default(),
        run_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
        orphans_reaped: Counter::default(),
        store_write_seconds: histogram_seconds(),
        registry: Registry::default(),
    };
    registry.register(
        "provider_requests",
        "Provider HTTP requests by provider, route and status",
        m.provider_requests.clone(),
    );
    registry.register(
        "provider_request_seconds",
        "Provider HTTP request latency by provider and route",
        m.provider_seconds.clone(),
    );
    registry.register(
        "provider_retries",
        "Provider requests sent again, by provider and why",
        m.provider_retries.clone(),
    );
    registry.register(
        "rate_limit_wait_seconds",
        "Time spent waiting out provider rate limits (429 Retry-After)",
        m.rate_limit_wait_seconds.clone(),
    );
    registry.register(
        "sync_bytes",
        "Sync archive bytes sent",
        m.sync_bytes.clone(),
    );
    registry.register("sync_files", "Files sent by syncs", m.sync_files.clone());
    registry.register("runs", "Runs by how they ended", m.runs.clone());
    registry.register(
        "run_seconds",
        "Run durations (the command's)",
        m.run_seconds.clone(),
    );
    registry.register(
        "orphans_reaped",
        "Sandboxes deleted by the orphan scan",
        m.orphans_reaped.clone(),
    );
    registry.register(
        "store_write_seconds",
        "Lease store write latency",
        m.store_write_seconds.clone(),
    );
    Metrics { registry, ..m }
});

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A provider request's route with its ids taken out (`POST /sandbox/{id}/labels`), so
/// that the series stay few.
pub fn route(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path
        .split('/')
        .map(|seg| {
            let idish = seg.len() > 16 || seg.bytes().filter(u8::is_ascii_digit).count() >= 3;
            if idish { "{id}" } else { seg }
        })
        .collect();
    format!("{method} {}", parts.join("/"))
}

/// One provider request's outcome (`status` 0: no answer).
pub fn provider_request(provider: &str, route: &str, status: u16, took: Duration) {
    let status = if status == 0 {
        "none".to_string()
    } else {
        status.to_string()
    };
    METRICS
        .provider_requests
        .get_or_create(&labels(&[
            ("provider", provider),
            ("route", route),
            ("status", &status),
        ]))
        .inc();
    METRICS
        .provider_seconds
        .get_or_create(&labels(&[("provider", provider), ("route", route)]))
        .observe(took.as_secs_f64());
}

/// A provider request about to be sent again (`why`: the status, or "connection").
pub fn provider_retry(provider: &str, why: &str, waited: Duration, rate_limited: bool) {
    METRICS
        .provider_retries
        .get_or_create(&labels(&[("provider", provider), ("why", why)]))
        .inc();
    if rate_limited {
        METRICS.rate_limit_wait_seconds.inc_by(waited.as_secs_f64());
    }
}

/// A sync's volume.
pub fn synced(bytes: u64, files: u64) {
    METRICS.sync_bytes.inc_by(bytes);
    METRICS.sync_files.inc_by(files);
}

/// A run's end: `ended` is "exit" (the command's own code), "timeout", "stalled",
/// "signal", "cancelled" or "error" (crabbox's own failure).
pub fn run(ended: &str, took: Duration) {
    METRICS
        .runs
        .get_or_create(&labels(&[("ended", ended)]))
        .inc();
    METRICS.run_seconds.observe(took.as_secs_f64());
}

/// A sandbox the orphan scan deleted.
pub fn orphan_reaped() {
    METRICS.orphans_reaped.inc();
}

/// A store write's latency.
pub fn store_write(took: Duration) {
    METRICS.store_write_seconds.observe(took.as_secs_f64());
}

/// Everything, as Prometheus text, with the lease counts (state, provider, count) of this
/// moment.
pub fn render(leases: &[(String, String, u64)]) -> String {
    let mut out = String::new();
    let mut registry = Registry::with_prefix("crabbox");
    let family: Family<Labels, Gauge> = Family::default();
    for (state, provider, n) in leases {
        family
            .get_or_create(&labels(&[("state", state), ("provider", provider)]))
            .set(*n as i64);
    }
    registry.register("leases", "Leases by state and provider", family);
    let _ = encode(&mut out, &registry);
    // The second registry's `# EOF` goes: one document.
    let leases_text = out.trim_end().trim_end_matches("# EOF").to_string();
    let mut rest = String::new();
    let _ = encode(&mut rest, &METRICS.registry);
    format!("{leases_text}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_lose_their_ids() {
        assert_eq!(
            route(
                "PUT",
                "/api/sandbox/5add7936-ad02-4b3b-adf5-256dcdb24fa4/labels"
            ),
            "PUT /api/sandbox/{id}/labels"
        );
        assert_eq!(route("GET", "/api/sandbox?labels=x"), "GET /api/sandbox");
        assert_eq!(
            route(
                "POST",
                "/toolbox/5add7936-ad02-4b3b/process/session/crabbox-9a168f1170f155e1/exec"
            ),
            "POST /toolbox/{id}/process/session/{id}/exec"
        );
    }

    #[test]
    fn the_text_is_one_prometheus_document() {
        provider_request(
            "daytona",
            "GET /api/sandbox/{id}",
            200,
            Duration::from_millis(3),
        );
        run("exit", Duration::from_millis(120));
        let text = render(&[("ready".into(), "local".into(), 3)]);
        assert!(
            text.contains("crabbox_leases{state=\"ready\",provider=\"local\"} 3"),
            "{text}"
        );
        assert!(text.contains("crabbox_provider_requests_total{"), "{text}");
        assert!(
            text.contains("crabbox_runs_total{ended=\"exit\"}"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
