//! Conversions between the lease layer and the wire (`crabbox.v1`).

use crate::lease::ops::sync::SyncReport;
use crate::lease::{LeaseRecord, LeaseState};
use crate::pb::{self, timestamp};
use crate::registry::AcquireSpec;

/// A lease state as the wire names it.
pub fn state_pb(s: LeaseState) -> pb::LeaseState {
    match s {
        LeaseState::Pending => pb::LeaseState::Pending,
        LeaseState::Creating => pb::LeaseState::Creating,
        LeaseState::Ready => pb::LeaseState::Ready,
        LeaseState::Syncing => pb::LeaseState::Syncing,
        LeaseState::Running => pb::LeaseState::Running,
        LeaseState::Stopped => pb::LeaseState::Stopped,
        LeaseState::Releasing => pb::LeaseState::Releasing,
        LeaseState::Released => pb::LeaseState::Released,
        LeaseState::Failed => pb::LeaseState::Failed,
    }
}

/// A lease as the wire shows it.
pub fn lease_pb(r: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        id: r.id.clone(),
        slug: r.slug.clone(),
        provider: r.provider.clone(),
        state: state_pb(r.state) as i32,
        sandbox_id: r.sandbox_id.clone().unwrap_or_default(),
        sandbox_name: r.sandbox_name.clone(),
        repo_root: r.repo_root.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created_at_ms)),
        expires_at: Some(timestamp(r.expires_at_ms())),
        last_touched_at: Some(timestamp(r.last_touched_ms)),
        keep: r.keep,
        labels: r.labels().into_iter().collect(),
        reason: r.reason.clone().unwrap_or_default(),
        ttl_secs: r.ttl_secs,
        idle_timeout_secs: r.idle_timeout_secs,
        work_root: r.work_root.clone(),
        failure_kind: match (r.state, r.failed_on_auth) {
            (LeaseState::Failed, true) => "auth".into(),
            (LeaseState::Failed, false) => "provisioning".into(),
            _ => String::new(),
        },
    }
}

/// What a new lease should be, from a Warmup request (or a Run's `fresh`): the one place
/// that reads it.
pub fn acquire_spec(req: pb::WarmupRequest, keep: bool, repo_root: &str) -> AcquireSpec {
    AcquireSpec {
        provider: req.provider,
        slug: (!req.slug.is_empty()).then_some(req.slug),
        ttl_secs: req.ttl_secs,
        idle_timeout_secs: req.idle_timeout_secs,
        keep,
        labels: req.labels.into_iter().collect(),
        repo_root: (!repo_root.is_empty()).then(|| repo_root.to_string()),
        provider_options: req.provider_options.into_iter().collect(),
        fresh_run: None,
    }
}

/// A sync's report as the wire shows it.
pub fn sync_pb(r: &SyncReport, warnings: Vec<String>) -> pb::SyncStats {
    pb::SyncStats {
        files_total: r.files_total,
        files_uploaded: r.files_uploaded,
        files_deleted: r.files_deleted,
        bytes_uploaded: r.bytes_uploaded,
        millis: r.millis,
        warnings,
    }
}
