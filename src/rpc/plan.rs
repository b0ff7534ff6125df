//! The SyncPlan use case: what a run's sync would send (and delete) against the repo's
//! lease, without leasing, creating or sending anything.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::run::{delete_guard, sync_rules};
use super::wire::lease_pb;
use super::{Api, validate_repo_root};
use crate::error::Error;
use crate::lease::ops::sync::check_deletions;
use crate::pb;
use crate::registry::index::Resolved;
use crate::sync::Manifest;

/// How many changes a plan lists one by one.
const CHANGES_SHOWN: usize = 200;

/// How many of the largest files and folders a plan names.
const LARGEST: usize = 10;

pub async fn plan(api: &Api, req: pb::SyncPlanRequest) -> Result<pb::SyncPlanResponse, Error> {
    validate_repo_root(&req.repo_root)?;
    let handle = if !req.lease.is_empty() {
        match api.resolve(&req.lease)? {
            Resolved::Live(h) => Some(h),
            Resolved::Stored(r) => return Err(r.not_usable("plan without --id")),
        }
    } else {
        api.registry.index.claimed_by(&req.repo_root)
    };
    let opts = req.sync.unwrap_or_default();
    let rules = sync_rules(api, &opts);
    let lease = handle.as_ref().map(|h| h.record());
    let store = api.store.clone();
    let id = lease.as_ref().map(|l| l.id.clone());
    let cache = move || store.get_manifest(&id?).ok().flatten();
    let collected = api
        .checkouts
        .collect(Path::new(&req.repo_root), rules, cache)
        .await?;
    let untrusted = handle
        .as_ref()
        .is_some_and(|h| h.manifest_untrusted.load(Ordering::SeqCst));
    let previous = match &lease {
        Some(l) if !opts.full_resync && !untrusted => api.store.get_manifest(&l.id)?,
        _ => None,
    };
    let full = previous.is_none();
    let empty = Manifest::default();
    let before = previous.as_ref().unwrap_or(&empty);
    let manifest = &collected.manifest;
    let mut diff = manifest.diff(before);

    let mut changes: Vec<pb::PlannedChange> = diff
        .changed
        .iter()
        .map(|p| pb::PlannedChange {
            path: p.clone(),
            kind: if before.files.contains_key(p) {
                "modified"
            } else {
                "added"
            }
            .into(),
        })
        .chain(
            before
                .files
                .keys()
                .filter(|p| !manifest.files.contains_key(*p))
                .map(|p| pb::PlannedChange {
                    path: p.clone(),
                    kind: "deleted".into(),
                }),
        )
        .collect();
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    let changes_total = changes.len() as u64;
    changes.truncate(CHANGES_SHOWN);

    let mut warnings = collected.warnings.clone();
    if !full && let Err(e) = check_deletions(delete_guard(&opts), before.files.len(), diff.deleted)
    {
        warnings.push(e.to_string());
    }
    // Large files the lease holds an earlier version of go as deltas: only their new
    // chunks count.
    let deltas = if full {
        Vec::new()
    } else {
        crate::sync::delta::plan_all(&mut diff, before, manifest)
    };
    let bytes_to_send = diff
        .changed
        .iter()
        .filter_map(|p| manifest.files.get(p))
        .map(|f| f.size)
        .sum::<u64>()
        + deltas.iter().map(|d| d.literal_bytes()).sum::<u64>();
    Ok(pb::SyncPlanResponse {
        lease: lease.as_ref().map(lease_pb),
        files_total: manifest.files.len() as u64,
        bytes_total: collected.total_bytes,
        files_to_send: (diff.changed.len() + deltas.len()) as u64,
        bytes_to_send,
        files_to_delete: diff.deleted,
        largest_files: largest(manifest.files.iter().map(|(p, f)| (p.clone(), f.size))),
        largest_folders: largest(folders(manifest)),
        changes,
        changes_total,
        warnings,
        full,
    })
}

/// The top-level folders' sizes.
fn folders(m: &Manifest) -> HashMap<String, u64> {
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for (path, f) in &m.files {
        if let Some((top, _)) = path.split_once('/') {
            *sizes.entry(format!("{top}/")).or_insert(0) += f.size;
        }
    }
    sizes
}

/// The [`LARGEST`] biggest, biggest first (ties by path).
fn largest(items: impl IntoIterator<Item = (String, u64)>) -> Vec<pb::PathSize> {
    let mut v: Vec<(String, u64)> = items.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(LARGEST);
    v.into_iter()
        .map(|(path, bytes)| pb::PathSize { path, bytes })
        .collect()
}
