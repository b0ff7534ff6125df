//! Pre-seeded pools: a pooled sandbox whose pool lists `repos:` is given one of those
//! checkouts in the background (the repo with the fewest seeds first), so that the fresh
//! lease of that repo which takes it sends only what changed since.
//!
//! A seed is an ordinary sync into the folder the repo's run would use, under the lease's
//! run lock (a run on a lease taken meanwhile waits for it). It is never trusted blindly:
//! the store keeps what was sent, the run diffs against it as against any sync, and when the
//! lease was taken by another repo in the meantime that record is dropped before the lock
//! is let go.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Api;
use crate::lease::handle::RunTarget;
use crate::lease::ops::sync::SyncJob;
use crate::lease::{LeaseHandle, LeaseMsg, LeaseState};
use crate::sync::SyncRules;

/// Seeds pooled sandboxes as they become ready, until the daemon stops.
pub fn spawn(api: Arc<Api>, pools: Vec<crate::config::PoolSettings>) {
    if pools.iter().all(|p| p.repos.is_empty()) {
        return;
    }
    let mut feed = api.registry.index.subscribe();
    tokio::spawn(async move {
        // Those already pooled (a restart), then each one as it is pooled.
        for h in api.registry.index.handles() {
            seed_if_needed(&api, &pools, &h).await;
        }
        loop {
            let change = tokio::select! {
                c = feed.recv() => c,
                _ = api.shutdown.cancelled() => return,
            };
            match change {
                Ok(c) if c.lease.state == LeaseState::Pooled && c.lease.seeded_for.is_none() => {
                    if let Some(h) = api.registry.index.get(&c.lease.id) {
                        seed_if_needed(&api, &pools, &h).await;
                    }
                }
                Ok(_) => {}
                // Missed changes: look at every lease again.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for h in api.registry.index.handles() {
                        seed_if_needed(&api, &pools, &h).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// The repo of `pool` that the fewest live pooled leases hold.
fn least_seeded(api: &Api, repos: &[PathBuf]) -> Option<PathBuf> {
    let records = api.registry.index.records();
    repos
        .iter()
        .min_by_key(|repo| {
            let repo = repo.to_string_lossy();
            records
                .iter()
                .filter(|r| r.state == LeaseState::Pooled)
                .filter(|r| r.seeded_for.as_deref() == Some(repo.as_ref()))
                .count()
        })
        .cloned()
}

async fn seed_if_needed(api: &Api, pools: &[crate::config::PoolSettings], h: &LeaseHandle) {
    let r = h.record();
    if r.state != LeaseState::Pooled || r.seeded_for.is_some() {
        return;
    }
    let Some(pool) = pools.iter().find(|p| Some(&p.name) == r.pool.as_ref()) else {
        return;
    };
    let Some(repo) = least_seeded(api, &pool.repos) else {
        return;
    };
    // The root as a run names it (canonical).
    let Ok(repo) = std::fs::canonicalize(&repo) else {
        tracing::warn!(pool = %pool.name, repo = %repo.display(), "a pool's repo cannot be read; not seeding it");
        return;
    };
    if let Err(e) = seed(api, h, &repo).await {
        tracing::warn!(lease = %r.id, repo = %repo.display(), error = %e, "could not seed a pooled sandbox");
    }
}

async fn seed(api: &Api, h: &LeaseHandle, repo: &Path) -> Result<(), crate::error::Error> {
    // A run on this lease (taken meanwhile) waits until the seed is done or dropped.
    let Ok(_lock) = h.run_lock.clone().try_lock_owned() else {
        return Ok(());
    };
    let record = h.record();
    if record.state != LeaseState::Pooled {
        return Ok(());
    }
    let repo_root = repo.to_string_lossy().into_owned();
    // The repo's own sync settings, as a run in it would read them.
    let settings =
        crate::config::load(Some(repo)).map_err(|e| crate::error::Error::InvalidArgument(e.0))?;
    let rules = SyncRules {
        exclude: settings.sync.exclude.clone(),
        include: settings.sync.include.clone(),
        git: settings.sync.git,
        ..super::run::sync_rules(api, &Default::default())
    };
    let collected = api.checkouts.collect(repo, rules, || None).await?;
    let provider = api
        .providers
        .get(&record.provider)
        .cloned()
        .ok_or_else(|| crate::error::Error::Internal("the lease's provider is gone".into()))?;
    let target = RunTarget {
        sandbox: record.sandbox_ref().to_string(),
        lease_dir: format!("{}/{}", provider.work_root(&record.sandbox_name), record.id),
        provider,
        cancel: api.shutdown.child_token(),
    };
    let repo_name = repo
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("workdir")
        .to_string();
    let report = SyncJob {
        lease: h,
        target: &target,
        store: &api.store,
        tmp_dir: api.state_dir.join("tmp"),
        repo_root: repo,
        workdir: format!("{}/{}", target.lease_dir, repo_name),
        manifest: Arc::unwrap_or_clone(collected.manifest),
        previous: None,
        full: true,
        delete_guard: None,
        progress: Default::default(),
    }
    .run()
    .await;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            api.checkouts.mark_synced(repo, &record.id, None);
            let _ = api.store.delete_manifest(&record.id);
            return Err(e);
        }
    };
    // Still pooled: it is this repo's seed now. Taken meanwhile: the record is good only
    // for this repo's lease.
    let after = h
        .ask(|reply| LeaseMsg::Seeded {
            repo_root: repo_root.clone(),
            reply,
        })
        .await?;
    let ours = match after.state {
        LeaseState::Pooled => after.seeded_for.as_deref() == Some(repo_root.as_str()),
        _ => after.repo_root.as_deref() == Some(repo_root.as_str()),
    };
    if ours {
        api.checkouts
            .mark_synced(repo, &record.id, Some(collected.generation));
        tracing::info!(lease = %record.id, repo = %repo_root, files = report.files_total,
            bytes = report.bytes_uploaded, "seeded a pooled sandbox");
    } else {
        api.checkouts.mark_synced(repo, &record.id, None);
        api.store.delete_manifest(&record.id)?;
    }
    Ok(())
}
