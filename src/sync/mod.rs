//! Syncing a checkout into a sandbox (SPEC "Sync").
//!
//! - [`manifest`]: which files go (git-aware list, excludes, `.crabboxignore`), their
//!   content hashes, the size guard, and the diff against what a lease already holds.
//! - [`archive`]: the gzip tar of what changed.
//! - [`delta`]: large files as content-defined chunks; a changed one sent as a delta.
//! - [`watch`]: what changed in a claimed checkout, without a scan.

pub mod archive;
pub mod delta;
pub mod manifest;
pub mod watch;

pub use manifest::{Collected, Diff, FileEntry, Manifest, SyncLimits, SyncRules};

/// How much of a sync's archive has reached the sandbox: counted by the provider as it
/// sends or unpacks, read by whoever shows the upload's progress.
#[derive(Debug, Clone, Default)]
pub struct Sent(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Sent {
    /// The counter the provider adds to.
    pub fn counter(&self) -> &std::sync::atomic::AtomicU64 {
        &self.0
    }

    /// `n` more bytes sent.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sending starts over (a retried upload).
    pub fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes sent so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Sync failures; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The repository folder cannot be read.
    #[error(
        "cannot read the repository at {path}: {reason}; check that it exists and that you can read it"
    )]
    Unreadable { path: String, reason: String },
    /// Over the hard size limit and `--force-sync-large` was not given.
    #[error("{0}")]
    TooLarge(String),
    /// An exclude/include pattern is malformed.
    #[error("bad sync pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    /// Listing, hashing or packing a file failed.
    #[error("{0}")]
    Io(String),
}

impl From<SyncError> for crate::error::Error {
    fn from(e: SyncError) -> Self {
        crate::error::Error::Sync(e.to_string())
    }
}
