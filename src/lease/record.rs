//! The lease record: what the store keeps and every API shows, with its expiry, its labels
//! and the ownership check that guards every sandbox the daemon touches.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::human_secs;
use crate::error::Error;

/// Where a lease is in its life (SPEC "Leases"); lowercase in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Recorded, nothing asked of the provider yet.
    Pending,
    /// The provider is creating (or starting) the sandbox.
    Creating,
    /// The sandbox is up and idle.
    Ready,
    /// A checkout is being synced into the sandbox.
    Syncing,
    /// A command is running in the sandbox.
    Running,
    /// The provider stopped the sandbox; the next use starts it again.
    Stopped,
    /// The sandbox is being deleted (the intent is persisted before the call).
    Releasing,
    /// The sandbox is gone. Terminal.
    Released,
    /// Something failed; the reason is kept on the lease and its sandbox is deleted
    /// (`sandbox_cleaned` once done). Only a release moves it on.
    Failed,
    /// A started sandbox waiting in a warm pool (`pool:` in config), claimed by nobody:
    /// the next fresh lease that matches its pool takes it (and it becomes `ready`).
    Pooled,
}

impl LeaseState {
    /// Every state, for tests and counts.
    pub const ALL: [LeaseState; 10] = [
        LeaseState::Pending,
        LeaseState::Creating,
        LeaseState::Ready,
        LeaseState::Syncing,
        LeaseState::Running,
        LeaseState::Stopped,
        LeaseState::Releasing,
        LeaseState::Released,
        LeaseState::Failed,
        LeaseState::Pooled,
    ];

    /// The lowercase name used in JSON, labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Pending => "pending",
            LeaseState::Creating => "creating",
            LeaseState::Ready => "ready",
            LeaseState::Syncing => "syncing",
            LeaseState::Running => "running",
            LeaseState::Stopped => "stopped",
            LeaseState::Releasing => "releasing",
            LeaseState::Released => "released",
            LeaseState::Failed => "failed",
            LeaseState::Pooled => "pooled",
        }
    }

    /// Does the lease still hold (or may still hold) a sandbox that can be used?
    /// Live leases are the ones `list` shows and repo claims resolve to.
    pub fn is_live(self) -> bool {
        match self {
            LeaseState::Pending
            | LeaseState::Creating
            | LeaseState::Ready
            | LeaseState::Syncing
            | LeaseState::Running
            | LeaseState::Stopped
            | LeaseState::Pooled => true,
            LeaseState::Releasing | LeaseState::Released | LeaseState::Failed => false,
        }
    }

    /// Is a run using the sandbox (so only the ttl can expire the lease)?
    pub fn in_use(self) -> bool {
        match self {
            LeaseState::Syncing | LeaseState::Running => true,
            LeaseState::Pending
            | LeaseState::Creating
            | LeaseState::Ready
            | LeaseState::Stopped
            | LeaseState::Releasing
            | LeaseState::Released
            | LeaseState::Failed
            | LeaseState::Pooled => false,
        }
    }

    /// Has the lease reached a state where waiting for it makes no more sense?
    pub fn is_settled(self) -> bool {
        match self {
            LeaseState::Ready
            | LeaseState::Stopped
            | LeaseState::Released
            | LeaseState::Failed
            | LeaseState::Pooled => true,
            LeaseState::Pending
            | LeaseState::Creating
            | LeaseState::Syncing
            | LeaseState::Running
            | LeaseState::Releasing => false,
        }
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provider work in flight for a lease (at most one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// Nothing is in flight.
    #[default]
    Idle,
    /// Creating (or adopting, or starting) the sandbox and waiting until it is ready.
    Provisioning,
    /// Deleting the sandbox (a release, or the cleanup of a failed lease). It takes over a
    /// provisioning task: the create is cancelled and settles before the delete.
    Deleting,
    /// Asking the provider how the sandbox is.
    Observing,
    /// Stopping the sandbox for a pause (its disk is kept).
    Pausing,
}

/// How the run that created a lease wants it handled when the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreshRun {
    /// Keep the lease when the command fails (`--keep-on-failure`); a run lost to a daemon
    /// restart counts as failed.
    pub keep_on_failure: bool,
}

/// One lease as the store keeps it and every API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// `cbx_` + 12 hex.
    pub id: String,
    /// `<adjective>-<crustacean>`, unique among live leases.
    pub slug: String,
    /// The provider that holds the sandbox (`local`, `daytona`).
    pub provider: String,
    pub state: LeaseState,
    /// Why the lease failed or was released.
    pub reason: Option<String>,
    /// The provider's id for the sandbox, once it is known.
    pub sandbox_id: Option<String>,
    /// Chosen before the create call, so a crash mid-create can find the sandbox again.
    pub sandbox_name: String,
    /// The canonical repo root that claims the lease.
    pub repo_root: Option<String>,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    pub last_touched_ms: u64,
    pub ttl_secs: u64,
    pub idle_timeout_secs: u64,
    /// Keep the lease after a `run` that created it.
    pub keep: bool,
    /// The user's labels (the reserved ones are added by [`LeaseRecord::labels`]).
    pub user_labels: BTreeMap<String, String>,
    /// Where checkouts go in the sandbox.
    pub work_root: String,
    /// The daemon that owns the sandbox (its `owner` label).
    pub owner: String,
    /// The provider refused the credentials when the lease failed (so its error is an auth
    /// error, exit 3, not a provisioning one).
    #[serde(default)]
    pub failed_on_auth: bool,
    /// Set once a failed lease's sandbox has been deleted.
    #[serde(default)]
    pub sandbox_cleaned: bool,
    /// Provider options for the sandbox (kept so a restart provisions the same thing).
    #[serde(default)]
    pub provider_options: BTreeMap<String, String>,
    /// Set while the `run` that created this lease goes on: the lease is that run's, and is
    /// released when it ends unless kept. Persisted, so that a daemon that dies under the
    /// run releases the lease when it comes back instead of leaving it claimed and live.
    #[serde(default)]
    pub fresh_run: Option<FreshRun>,
    /// The warm pool this lease was made for (its `pool` label): set while it waits there,
    /// cleared when a fresh lease takes it.
    #[serde(default)]
    pub pool: Option<String>,
    /// The repo root whose checkout a pooled sandbox was given in advance (its sync
    /// manifest is in the store): the fresh lease of that repo sends only what changed.
    #[serde(default)]
    pub seeded_for: Option<String>,
    /// The provider work in flight. Never persisted: a new actor has none.
    #[serde(skip)]
    pub task: Task,
    /// Failed deletes in a row (the backoff of the next one). Never persisted.
    #[serde(skip)]
    pub attempts: u32,
}

impl LeaseRecord {
    /// When the lease expires: `min(last_touched + idle_timeout, created + ttl)`, in Unix ms.
    pub fn expires_at_ms(&self) -> u64 {
        self.idle_end_ms().min(self.ttl_end_ms())
    }

    fn idle_end_ms(&self) -> u64 {
        self.last_touched_ms
            .saturating_add(self.idle_timeout_secs.saturating_mul(1000))
    }

    fn ttl_end_ms(&self) -> u64 {
        self.created_at_ms
            .saturating_add(self.ttl_secs.saturating_mul(1000))
    }

    /// Why the lease has expired at `now_ms`, if it has. A lease that is syncing or running
    /// is in use: only its ttl can expire it.
    pub fn expiry_reason(&self, now_ms: u64) -> Option<String> {
        let ttl_end = self.ttl_end_ms();
        if now_ms < self.expires_at_ms() || (self.state.in_use() && now_ms < ttl_end) {
            return None;
        }
        Some(if now_ms >= ttl_end {
            format!("expired: ttl of {} reached", human_secs(self.ttl_secs))
        } else {
            format!("expired: idle for {}", human_secs(self.idle_timeout_secs))
        })
    }

    /// The sandbox's id if known, else its name (providers accept either).
    pub fn sandbox_ref(&self) -> &str {
        self.sandbox_id.as_deref().unwrap_or(&self.sandbox_name)
    }

    /// Every label the sandbox carries: the user's, then SPEC's reserved set, which wins.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.user_labels.clone();
        for (k, v) in self.reserved_labels() {
            l.insert(k.to_string(), v);
        }
        if let Some(pool) = &self.pool {
            l.insert("pool".into(), pool.clone());
        }
        l
    }

    /// SPEC's reserved labels, the one list of them.
    fn reserved_labels(&self) -> [(&'static str, String); 15] {
        let secs = |ms: u64| (ms / 1000).to_string();
        [
            ("crabbox", "true".to_string()),
            ("created_by", "crabbox".to_string()),
            ("lease", self.id.clone()),
            ("slug", self.slug.clone()),
            ("provider", self.provider.clone()),
            ("owner", self.owner.clone()),
            ("state", self.state.as_str().to_string()),
            ("keep", self.keep.to_string()),
            ("created_at", secs(self.created_at_ms)),
            ("last_touched_at", secs(self.last_touched_ms)),
            ("idle_timeout_secs", self.idle_timeout_secs.to_string()),
            ("ttl_secs", self.ttl_secs.to_string()),
            ("expires_at", secs(self.expires_at_ms())),
            ("lease_name", self.slug.clone()),
            ("work_root", self.work_root.clone()),
        ]
    }

    /// Does a sandbox with these labels belong to this lease of this daemon? The daemon never
    /// touches a sandbox that fails this check.
    pub fn owns(&self, labels: &BTreeMap<String, String>) -> bool {
        owned_by(labels, &self.owner) && labels.get("lease") == Some(&self.id)
    }

    /// The error for an operation this lease cannot take in its state; `hint` says what
    /// to do.
    pub fn not_usable(&self, hint: impl Into<String>) -> Error {
        Error::NotUsable {
            lease: self.slug.clone(),
            state: self.state.as_str(),
            reason: self.reason.clone(),
            hint: hint.into(),
        }
    }
}

impl LeaseRecord {
    /// The lease a sandbox's labels describe, for a sandbox this daemon (`owner`) owns but
    /// whose record the store lost: its id, slug, times, timeouts, keep flag, work root and
    /// user labels come back; its repo claim and provider options do not (labels do not
    /// carry them). `None` when the labels are not a lease's of this owner.
    pub fn from_labels(
        provider: &str,
        owner: &str,
        sandbox_id: &str,
        sandbox_name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<LeaseRecord> {
        if !owned_by(labels, owner) {
            return None;
        }
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty());
        let secs = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let id = get("lease")
            .filter(|id| crate::ids::is_lease_id(id))?
            .clone();
        let created_at_ms = secs("created_at")?.saturating_mul(1000);
        let pool = get("pool").cloned();
        let state = match get("state").map(String::as_str) {
            // A release or failure was under way: finish it.
            Some("releasing" | "failed") => LeaseState::Releasing,
            Some("pooled") if pool.is_some() => LeaseState::Pooled,
            _ => LeaseState::Ready,
        };
        let mut record = LeaseRecord {
            slug: get("slug")
                .cloned()
                .unwrap_or_else(|| crate::ids::slug_for(&id)),
            id,
            provider: provider.to_string(),
            state,
            reason: Some("rebuilt from the sandbox's labels after the store lost it".into()),
            sandbox_id: Some(sandbox_id.to_string()),
            sandbox_name: sandbox_name.to_string(),
            repo_root: None,
            created_at_ms,
            last_touched_ms: secs("last_touched_at")
                .map(|s| s.saturating_mul(1000))
                .unwrap_or(created_at_ms),
            ttl_secs: secs("ttl_secs")?,
            idle_timeout_secs: secs("idle_timeout_secs")?,
            keep: get("keep").is_some_and(|k| k == "true"),
            user_labels: BTreeMap::new(),
            work_root: get("work_root").cloned().unwrap_or_default(),
            owner: owner.to_string(),
            failed_on_auth: false,
            sandbox_cleaned: false,
            provider_options: BTreeMap::new(),
            fresh_run: None,
            pool: if state == LeaseState::Pooled {
                pool
            } else {
                None
            },
            seeded_for: None,
            task: Task::Idle,
            attempts: 0,
        };
        // Any label that is not one of the reserved set is the user's.
        let reserved = record.reserved_labels().map(|(k, _)| k);
        record.user_labels = labels
            .iter()
            .filter(|(k, _)| !reserved.contains(&k.as_str()) && k.as_str() != "pool")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Some(record)
    }
}

#[cfg(test)]
impl LeaseRecord {
    /// A lease for unit tests: `swift-crab`, with a sandbox, claimed by `/repo`.
    pub fn sample(state: LeaseState) -> LeaseRecord {
        LeaseRecord {
            id: "cbx_0123456789ab".into(),
            slug: "swift-crab".into(),
            provider: "local".into(),
            state,
            reason: None,
            sandbox_id: Some("sb-1".into()),
            sandbox_name: "crabbox-swift-crab-01234567".into(),
            repo_root: Some("/repo".into()),
            created_at_ms: 1_000_000,
            last_touched_ms: 1_000_000,
            ttl_secs: 5400,
            idle_timeout_secs: 1800,
            keep: false,
            user_labels: BTreeMap::new(),
            work_root: "/w".into(),
            owner: "cbxd_1".into(),
            failed_on_auth: false,
            sandbox_cleaned: false,
            provider_options: BTreeMap::new(),
            fresh_run: None,
            pool: None,
            seeded_for: None,
            task: Task::Idle,
            attempts: 0,
        }
    }
}

/// Do these sandbox labels say the sandbox is crabbox's and this daemon's?
pub fn owned_by(labels: &BTreeMap<String, String>, owner: &str) -> bool {
    labels.get("crabbox").map(String::as_str) == Some("true")
        && labels.get("created_by").map(String::as_str) == Some("crabbox")
        && labels.get("owner").map(String::as_str) == Some(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeaseRecord {
        let mut r = LeaseRecord::sample(LeaseState::Ready);
        r.sandbox_id = None;
        r.repo_root = None;
        r.ttl_secs = 90 * 60;
        r.idle_timeout_secs = 30 * 60;
        r.user_labels = BTreeMap::from([
            ("team".into(), "infra".into()),
            ("owner".into(), "mallory".into()),
        ]);
        r
    }

    #[test]
    fn expiry_is_the_earlier_of_idle_and_ttl() {
        let mut r = record();
        assert_eq!(r.expires_at_ms(), 1_000_000 + 30 * 60 * 1000);
        // Touched late: the ttl caps it.
        r.last_touched_ms = 1_000_000 + 80 * 60 * 1000;
        assert_eq!(r.expires_at_ms(), 1_000_000 + 90 * 60 * 1000);
        assert!(r.expiry_reason(r.expires_at_ms() - 1).is_none());
        let why = r.expiry_reason(r.expires_at_ms()).expect("expired");
        assert!(why.contains("ttl"), "{why}");
        let mut r = record();
        let why = r.expiry_reason(r.expires_at_ms()).expect("expired");
        assert!(why.contains("idle for 30m"), "{why}");
        // A running command is use: idle does not expire it, the ttl still does.
        r.state = LeaseState::Running;
        assert!(r.expiry_reason(r.expires_at_ms()).is_none());
        let ttl_end = r.created_at_ms + r.ttl_secs * 1000;
        assert!(r.expiry_reason(ttl_end).expect("ttl").contains("ttl"));
    }

    #[test]
    fn reserved_labels_win_and_ownership_is_checked() {
        let r = record();
        let l = r.labels();
        assert_eq!(l["team"], "infra");
        assert_eq!(l["owner"], "cbxd_1", "a user label may not claim ownership");
        // SPEC "Leases": the labels on every provider sandbox.
        for k in [
            "crabbox",
            "created_by",
            "lease",
            "slug",
            "provider",
            "owner",
            "state",
            "keep",
            "created_at",
            "last_touched_at",
            "idle_timeout_secs",
            "ttl_secs",
            "expires_at",
            "lease_name",
            "work_root",
        ] {
            assert!(l.contains_key(k), "{k}");
        }
        assert_eq!(
            l["expires_at"],
            ((1_000_000 + 30 * 60 * 1000) / 1000).to_string()
        );
        assert!(r.owns(&l));
        let mut other = l.clone();
        other.insert("owner".into(), "cbxd_2".into());
        assert!(!r.owns(&other));
        let mut other = l;
        other.insert("lease".into(), "cbx_ffffffffffff".into());
        assert!(!r.owns(&other));
    }

    #[test]
    fn a_lease_comes_back_from_its_labels() {
        let mut r = record();
        r.id = "cbx_00112233aabb".into();
        r.keep = true;
        let labels = r.labels();
        let back = LeaseRecord::from_labels("local", "cbxd_1", "sb-9", &r.sandbox_name, &labels)
            .expect("ours");
        assert_eq!(back.id, r.id);
        assert_eq!(back.slug, r.slug);
        assert_eq!(
            back.user_labels,
            r.user_labels
                .into_iter()
                .filter(|(k, _)| k != "owner")
                .collect()
        );
        assert_eq!(
            (back.ttl_secs, back.idle_timeout_secs, back.keep),
            (5400, 1800, true)
        );
        assert_eq!(back.created_at_ms, 1_000_000);
        assert_eq!(back.sandbox_id.as_deref(), Some("sb-9"));
        assert_eq!(back.state, LeaseState::Ready);
        assert_eq!(back.labels()["owner"], "cbxd_1");
        // Another daemon's sandbox, or labels that are not a lease's, give nothing.
        assert!(LeaseRecord::from_labels("local", "cbxd_2", "sb-9", "n", &labels).is_none());
        let mut broken = labels.clone();
        broken.insert("lease".into(), "not-an-id".into());
        assert!(LeaseRecord::from_labels("local", "cbxd_1", "sb-9", "n", &broken).is_none());
        let mut releasing = labels;
        releasing.insert("state".into(), "releasing".into());
        let back =
            LeaseRecord::from_labels("local", "cbxd_1", "sb", "n", &releasing).expect("ours");
        assert_eq!(back.state, LeaseState::Releasing);
    }

    #[test]
    fn the_volatile_fields_are_never_stored() {
        let mut r = record();
        r.task = Task::Deleting;
        r.attempts = 4;
        let back: LeaseRecord =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parse");
        assert_eq!(back.task, Task::Idle);
        assert_eq!(back.attempts, 0);
    }
}
