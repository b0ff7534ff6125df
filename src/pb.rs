//! The generated gRPC code for `crabbox.v1`, and wire time.

#![allow(clippy::all, missing_docs)]

use std::time::Duration;

tonic::include_proto!("crabbox.v1");

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crabbox_descriptor");

/// Response metadata of a `Warmup` that reused a lease: one value per note for people
/// ("lease swift-crab now has: ttl 2h (was 1h30m)", "--slug applies to new leases"),
/// UTF-8 in binary metadata (any label value fits).
pub const NOTE_METADATA: &str = "crabbox-note-bin";

/// A wire timestamp for Unix milliseconds.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Unix milliseconds from a wire timestamp (0 when absent or before 1970).
pub fn timestamp_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map(|t| {
        Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
            .as_millis()
            .min(u128::from(u64::MAX)) as u64
    })
    .unwrap_or(0)
}
