//! Putting a checkout into a lease's sandbox: only what changed since what the store says
//! the sandbox holds, or everything into a cleaned folder when that is not known.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::Error;
use crate::lease::handle::{LeaseHandle, RunTarget};
use crate::lease::store::Store;
use crate::provider::UploadSpec;
use crate::sync::{self, Manifest};

/// What a sync sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub files_total: u64,
    pub files_uploaded: u64,
    pub files_deleted: u64,
    pub bytes_uploaded: u64,
    pub millis: u64,
    /// Of `millis`: building the archive, and sending it (with the unpacking).
    pub archive_ms: u64,
    pub upload_ms: u64,
}

/// One sync of a checkout.
pub struct SyncJob<'a> {
    pub lease: &'a LeaseHandle,
    pub target: &'a RunTarget,
    pub store: &'a Store,
    /// Where temporary archives go.
    pub tmp_dir: PathBuf,
    pub repo_root: &'a Path,
    /// The checkout's folder in the sandbox.
    pub workdir: String,
    /// What the checkout holds now.
    pub manifest: Manifest,
    /// What the store says the sandbox holds (`None`: unknown).
    pub previous: Option<Manifest>,
    /// Send everything, whatever the store says.
    pub full: bool,
    /// Refuse to delete more than this share (0 to 1) of the files the lease holds;
    /// `None`: no limit.
    pub delete_guard: Option<f64>,
    /// What the sync is sending, for whoever shows its progress.
    pub progress: SyncProgress,
}

/// A sync's upload as it goes: set when its archive is built, `sent` counted by the
/// provider. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct SyncProgress {
    /// Files sent and files deleted; the archive's size (0 until it is built).
    plan: std::sync::Arc<std::sync::OnceLock<(u64, u64, u64)>>,
    pub sent: sync::Sent,
}

impl SyncProgress {
    /// (files, deleted, archive bytes, bytes sent), once the upload has begun.
    pub fn now(&self) -> Option<(u64, u64, u64, u64)> {
        self.plan
            .get()
            .map(|&(files, deleted, total)| (files, deleted, total, self.sent.get().min(total)))
    }
}

/// The deletion guard: refuses deleting `deleted` of the `held` files a lease holds when
/// that is more than the `guard` share (and the lease holds enough files to tell).
pub fn check_deletions(guard: Option<f64>, held: usize, deleted: u64) -> Result<(), Error> {
    let Some(guard) = guard else { return Ok(()) };
    if held >= DELETE_GUARD_MIN_FILES && deleted as f64 > guard * held as f64 {
        return Err(Error::Sync(format!(
            "this sync would delete {deleted} of the {held} files the lease holds ({:.0}%), \
             more than the {:.0}% guard: that is usually a wrong folder or branch, not an \
             intent. Check where you are (and `git status`), or pass --force-sync-delete \
             (config sync.delete_guard sets the share)",
            deleted as f64 * 100.0 / held as f64,
            guard * 100.0
        )));
    }
    Ok(())
}

/// Below this many files in the lease the guard does not apply (a tiny checkout deleting
/// 2 of 3 files is a normal edit).
const DELETE_GUARD_MIN_FILES: usize = 20;

impl SyncJob<'_> {
    /// Sends what changed and deletes what was removed; records what the sandbox holds.
    pub async fn run(self) -> Result<SyncReport, Error> {
        let started = Instant::now();
        let id = self.lease.record().id;
        let untrusted = self.lease.manifest_untrusted.load(Ordering::SeqCst);
        let mut previous = if self.full || untrusted {
            None
        } else {
            self.previous
        };
        // The first sync by this daemon checks that the sandbox holds what the store says
        // (the store may be older than the sandbox after a crash, or the other way round):
        // one small read, then trusted until the daemon restarts.
        if let Some(p) = &previous
            && !self.lease.remote_verified.load(Ordering::SeqCst)
        {
            let remote = self
                .target
                .provider
                .synced_digest(&self.target.sandbox, &self.workdir)
                .await
                .unwrap_or_else(|e| {
                    tracing::debug!(lease = %id, error = %e, "could not read the sandbox's sync digest; sending everything");
                    None
                });
            if remote.as_deref() == Some(p.digest().as_str()) {
                self.lease.remote_verified.store(true, Ordering::SeqCst);
            } else {
                tracing::info!(lease = %id, "the sandbox does not hold what the store says; sending everything");
                previous = None;
            }
        }
        // Without a trusted record of what the sandbox holds, its folder is cleaned and
        // everything is sent.
        let clean = previous.is_none();
        let mut diff = self
            .manifest
            .diff(previous.as_ref().unwrap_or(&Manifest::default()));
        let mut deltas = Vec::new();
        if let Some(prev) = previous.as_ref() {
            check_deletions(self.delete_guard, prev.files.len(), diff.deleted)?;
            deltas = sync::delta::plan_all(&mut diff, prev, &self.manifest);
        }
        let mut report = SyncReport {
            files_total: self.manifest.files.len() as u64,
            files_uploaded: (diff.changed.len() + deltas.len()) as u64,
            files_deleted: diff.deleted,
            ..Default::default()
        };
        if diff.changed.is_empty() && diff.remove.is_empty() && deltas.is_empty() && !clean {
            report.millis = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        std::fs::create_dir_all(&self.tmp_dir)
            .map_err(|e| Error::Sync(format!("creating {}: {e}", self.tmp_dir.display())))?;
        if !deltas.is_empty() {
            let literal: u64 = deltas.iter().map(|d| d.literal_bytes()).sum();
            let whole: u64 = deltas.iter().map(|d| d.delta.size).sum();
            tracing::debug!(lease = %id, files = deltas.len(), literal, whole, "large files sent as deltas");
        }
        let archive_started = Instant::now();
        let archive = if diff.changed.is_empty() && deltas.is_empty() {
            None
        } else {
            let file = tempfile::Builder::new()
                .prefix("sync-")
                .suffix(".tgz")
                .tempfile_in(&self.tmp_dir)
                .map_err(|e| Error::Sync(format!("creating a temp archive: {e}")))?;
            let root = self.repo_root.to_path_buf();
            let paths = diff.changed.clone();
            let m = self.manifest.clone();
            let path = file.path().to_path_buf();
            let planned = deltas.clone();
            let size = tokio::task::spawn_blocking(move || {
                sync::archive::build(&root, &paths, &planned, &m, &path)
            })
            .await
            .map_err(|e| Error::Internal(format!("archive task: {e}")))??;
            report.bytes_uploaded = size;
            Some(file)
        };
        report.archive_ms = archive_started.elapsed().as_millis() as u64;
        tracing::debug!(lease = %id, files = report.files_uploaded, deleted = report.files_deleted,
            archive = %bytesize::ByteSize::b(report.bytes_uploaded), archive_ms = report.archive_ms,
            "uploading the changes");
        let _ = self.progress.plan.set((
            report.files_uploaded,
            report.files_deleted,
            report.bytes_uploaded,
        ));
        let upload_started = Instant::now();
        let upload = UploadSpec {
            workdir: self.workdir,
            archive: archive.as_ref().map(|f| f.path().to_path_buf()),
            deltas: deltas.into_iter().map(|d| d.delta).collect(),
            remove: diff.remove.clone(),
            clean,
            digest: self.manifest.digest(),
            sent: self.progress.sent.clone(),
        };
        if let Err(e) = self
            .target
            .provider
            .upload(&self.target.sandbox, &upload)
            .await
        {
            // What the sandbox holds is unknown now: the next sync sends everything. When
            // the store cannot forget, the handle remembers not to trust it.
            self.lease.remote_verified.store(false, Ordering::SeqCst);
            if let Err(store) = self.store.delete_manifest(&id) {
                tracing::warn!(lease = %id, error = %store, "could not forget the sync manifest; the next sync sends everything");
                self.lease.manifest_untrusted.store(true, Ordering::SeqCst);
            }
            return Err(e.into());
        }
        report.upload_ms = upload_started.elapsed().as_millis() as u64;
        crate::metrics::synced(report.bytes_uploaded, report.files_uploaded);
        self.store.put_manifest(&id, &self.manifest)?;
        self.lease.manifest_untrusted.store(false, Ordering::SeqCst);
        self.lease.remote_verified.store(true, Ordering::SeqCst);
        report.millis = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}
