//! Conversions between the lease layer and the wire (`crabbox.v1`).

use crate::error::{Error, echo};
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
        LeaseState::Pooled => pb::LeaseState::Pooled,
    }
}

/// A lease as the wire shows it.
pub fn lease_pb(r: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        labels: r.labels(),
        ..lease_pb_basic(r)
    }
}

/// A lease on the wire without crabbox's bookkeeping labels (`ListRequest.view = BASIC`).
pub fn lease_pb_basic(r: &LeaseRecord) -> pb::Lease {
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
        labels: Default::default(),
        user_labels: r.user_labels.clone(),
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
        labels: req.labels,
        repo_root: (!repo_root.is_empty()).then(|| repo_root.to_string()),
        provider_options: req.provider_options,
        fresh_run: None,
        slot_ticket: None,
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

/// The largest page `List` answers.
pub const MAX_PAGE: usize = 1000;

/// What a `List` asks for: filters and a page.
pub struct ListFilter {
    states: Vec<LeaseState>,
    repo_root: String,
    provider: String,
    labels: Vec<(String, String)>,
    page_size: usize,
    /// The last lease of the previous page: (created ms, id).
    after: Option<(u64, String)>,
}

const STATES: [LeaseState; 10] = LeaseState::ALL;

impl ListFilter {
    /// Does the request name this state (`--state`)?
    pub fn names(&self, state: LeaseState) -> bool {
        self.states.contains(&state)
    }

    pub fn from_request(req: &pb::ListRequest) -> Result<ListFilter, Error> {
        let mut states = Vec::new();
        for s in &req.states {
            let want = s.trim().to_ascii_lowercase();
            match STATES.iter().find(|st| st.as_str() == want) {
                Some(st) => states.push(*st),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown lease state {}: use one of {}",
                        echo(s),
                        STATES.map(|s| s.as_str()).join(", ")
                    )));
                }
            }
        }
        let after = if req.page_token.is_empty() {
            None
        } else {
            let bad = || {
                Error::InvalidArgument(format!(
                    "page token {} is not one this daemon gave: start from the first page",
                    echo(&req.page_token)
                ))
            };
            let (ms, id) = req.page_token.split_once('.').ok_or_else(bad)?;
            Some((ms.parse::<u64>().map_err(|_| bad())?, id.to_string()))
        };
        Ok(ListFilter {
            states,
            repo_root: req.repo_root.clone(),
            provider: req.provider.clone(),
            labels: req
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            page_size: match req.page_size as usize {
                0 => usize::MAX,
                n => n.min(MAX_PAGE),
            },
            after,
        })
    }

    /// The page size asked (`usize::MAX`: all).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Where the page starts: after this (created ms, id).
    pub fn after(&self) -> Option<(u64, &str)> {
        self.after.as_ref().map(|(ms, id)| (*ms, id.as_str()))
    }

    /// The token of the page after the one whose last lease was `last` (none: no more).
    pub fn token_after(last: Option<(u64, String)>) -> String {
        last.map(|(ms, id)| format!("{ms}.{id}"))
            .unwrap_or_default()
    }

    pub fn matches(&self, r: &LeaseRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&r.state))
            && (self.repo_root.is_empty() || r.repo_root.as_deref() == Some(&self.repo_root))
            && (self.provider.is_empty() || r.provider == self.provider)
            && self.labels.iter().all(|(k, v)| match r.user_labels.get(k) {
                Some(have) => have == v,
                // A reserved label (crabbox, lease, created_by, ...): made when asked.
                None => r.labels().get(k).is_some_and(|have| have == v),
            })
            && self
                .after
                .as_ref()
                .is_none_or(|(ms, id)| (r.created_at_ms, &r.id) > (*ms, id))
    }

    /// The page out of `sorted` (oldest first, already filtered), and the token of the
    /// next one when there is more.
    pub fn page(&self, mut sorted: Vec<LeaseRecord>) -> (Vec<LeaseRecord>, String) {
        if sorted.len() <= self.page_size {
            return (sorted, String::new());
        }
        sorted.truncate(self.page_size);
        let last = sorted.last().map(|r| (r.created_at_ms, r.id.clone()));
        (sorted, Self::token_after(last))
    }
}
