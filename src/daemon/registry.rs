//! The registry actor: creates lease actors and supervises them, serializes claims (so two
//! runs in one repo never create two leases), and sweeps for expired leases, drift and
//! orphaned sandboxes.
//!
//! Supervision policy: a lease actor that fails (panics) leaves its lease `failed` with the
//! reason, and a fresh actor is started for the record to delete its sandbox. The lease
//! stays listed, so a person can read why.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::Shared;
use crate::error::Error;
use crate::ids;
use crate::lease::actor::{LeaseActor, LeaseArgs, LeaseMsg};
use crate::lease::{LeaseEvent, LeaseRecord, LeaseState, now_ms, owned_by};

/// Every this many sweeps, live leases are compared with their provider.
const RECONCILE_EVERY: u64 = 6;
/// Every this many sweeps (and at start), providers are searched for orphaned sandboxes.
const ORPHAN_SCAN_EVERY: u64 = 60;

/// What a new lease should be.
#[derive(Debug, Clone, Default)]
pub struct AcquireSpec {
    /// "" for the daemon's default.
    pub provider: String,
    pub slug: Option<String>,
    /// 0 for the default.
    pub ttl_secs: u64,
    pub idle_timeout_secs: u64,
    pub keep: bool,
    pub labels: BTreeMap<String, String>,
    pub repo_root: Option<String>,
    /// Answer the repo's claimed live lease instead of creating one, when it has one.
    pub reuse_claimed: bool,
    /// Provider options (Daytona: snapshot, target, user).
    pub provider_options: BTreeMap<String, String>,
}

/// A lease handed out by [`RegistryMsg::Acquire`].
#[derive(Debug, Clone)]
pub struct Acquired {
    pub record: LeaseRecord,
    /// Created for this request (a `run` releases it at the end unless kept).
    pub fresh: bool,
}

/// Messages to the registry.
pub enum RegistryMsg {
    /// Create a lease (Warmup, or a run in a repo without one).
    Acquire {
        spec: AcquireSpec,
        reply: RpcReplyPort<Result<Acquired, Error>>,
    },
    /// Claim a lease for a repo root (Claim RPC, and `--id` runs).
    Claim {
        lease_id: String,
        repo_root: String,
        reclaim: bool,
        reply: RpcReplyPort<Result<LeaseRecord, Error>>,
    },
    /// Sent by a ticker: expiry, cleanup retries, reconcile, orphan scan.
    Sweep,
}

/// The registry actor.
pub struct Registry;

/// The registry's state.
pub struct RegistryState {
    shared: Arc<Shared>,
    /// Which lease each supervised actor owns.
    actors: HashMap<ActorId, String>,
    sweeps: u64,
}

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<RegistryMsg>,
        shared: Arc<Shared>,
    ) -> Result<RegistryState, ActorProcessingErr> {
        let mut st = RegistryState {
            shared,
            actors: HashMap::new(),
            sweeps: 0,
        };
        // Pick up every lease the store holds that is not finished.
        let records = st.shared.store.all_leases()?;
        let mut recovered = 0;
        for record in records {
            if record.state == LeaseState::Released {
                continue;
            }
            if !st.shared.providers.contains_key(&record.provider) {
                tracing::warn!(lease = %record.id, provider = %record.provider,
                    "lease's provider is not configured; leaving it for a daemon that has it");
                continue;
            }
            st.spawn_lease(&myself, record).await?;
            recovered += 1;
        }
        if recovered > 0 {
            tracing::info!(recovered, "recovered leases from the store");
        }
        st.scan_orphans();
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        st: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Acquire { spec, reply } => {
                let r = st.acquire(&myself, spec).await;
                let _ = reply.send(r);
            }
            RegistryMsg::Claim {
                lease_id,
                repo_root,
                reclaim,
                reply,
            } => {
                let r = st.claim(&lease_id, &repo_root, reclaim).await;
                let _ = reply.send(r);
            }
            RegistryMsg::Sweep => st.sweep(),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RegistryMsg>,
        event: SupervisionEvent,
        st: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        // The default would stop the registry when any child ends: decide explicitly.
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(id) = st.actors.remove(&cell.get_id()) {
                    tracing::error!(lease = %id, error = %err, "lease actor crashed");
                    st.after_crash(&myself, &id, &format!("the lease actor crashed ({err})"))
                        .await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(id) = st.actors.remove(&cell.get_id()) {
                    let still_indexed = st.shared.leases.get(&id).is_some();
                    if still_indexed && !st.shared.shutdown.is_cancelled() {
                        let why = reason.unwrap_or_else(|| "no reason given".into());
                        st.after_crash(&myself, &id, &format!("the lease actor stopped ({why})"))
                            .await;
                    }
                }
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}

impl RegistryState {
    async fn spawn_lease(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        record: LeaseRecord,
    ) -> Result<ActorRef<LeaseMsg>, Error> {
        let id = record.id.clone();
        let (actor, _) = Actor::spawn_linked(
            None,
            LeaseActor,
            LeaseArgs {
                record,
                shared: self.shared.clone(),
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| Error::Internal(format!("starting the actor of lease {id}: {e}")))?;
        self.actors.insert(actor.get_id(), id);
        actor
            .send_message(LeaseMsg::Recover)
            .map_err(|e| Error::Internal(format!("starting lease {e}")))?;
        Ok(actor)
    }

    /// A lease actor died without releasing: mark the lease failed and start a new actor
    /// that deletes its sandbox.
    async fn after_crash(&mut self, myself: &ActorRef<RegistryMsg>, id: &str, why: &str) {
        let record = match self.shared.leases.get(id) {
            Some(h) => Some(h.record()),
            None => self.shared.store.get_lease(id).ok().flatten(),
        };
        self.shared.leases.remove(id);
        let Some(mut record) = record else { return };
        let Ok(next) = record.state.next(LeaseEvent::Fail) else {
            return;
        };
        record.state = next;
        record.sandbox_cleaned = false;
        record.reason = Some(format!(
            "internal error: {why}; its sandbox is deleted. Please report this with the daemon log"
        ));
        if let Err(e) = self.shared.store.put_lease(&record) {
            tracing::error!(lease = %id, error = %e, "could not persist the failed lease");
        }
        self.shared
            .leases
            .publish(record.clone(), "failed: lease actor crashed");
        if let Err(e) = self.spawn_lease(myself, record).await {
            tracing::error!(lease = %id, error = %e, "could not restart the lease actor");
        }
    }

    async fn acquire(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        spec: AcquireSpec,
    ) -> Result<Acquired, Error> {
        if spec.reuse_claimed
            && let Some(repo) = &spec.repo_root
            && let Some(h) = self.shared.leases.claimed_by(repo)
        {
            return Ok(Acquired {
                record: h.record(),
                fresh: false,
            });
        }
        let provider_name = if spec.provider.is_empty() {
            self.shared.default_provider.clone()
        } else {
            spec.provider.clone()
        };
        let provider = self
            .shared
            .providers
            .get(&provider_name)
            .cloned()
            .ok_or_else(|| {
                let mut known: Vec<&String> = self.shared.providers.keys().collect();
                known.sort();
                Error::InvalidArgument(format!(
                    "provider {provider_name:?} is not available in this daemon (it has: {}); \
                 check --provider or `provider:` in crabbox.yaml",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        provider.check_ready()?;
        for (k, v) in &spec.labels {
            validate_label(k, v)?;
        }
        let id = ids::new_lease_id();
        let slug = match &spec.slug {
            Some(slug) => {
                ids::validate_slug(slug).map_err(Error::InvalidArgument)?;
                if self.shared.leases.slug_taken(slug) {
                    return Err(Error::InvalidArgument(format!(
                        "slug {slug:?} is taken by a live lease; choose another --slug or stop \
                         that lease first"
                    )));
                }
                slug.clone()
            }
            None => {
                let base = ids::slug_for(&id);
                let mut slug = base.clone();
                while self.shared.leases.slug_taken(&slug) {
                    slug = ids::suffixed_slug(&base);
                }
                slug
            }
        };
        let sandbox_name = ids::sandbox_name(&slug, &id);
        let now = now_ms();
        let pick = |v: u64, d: u64| if v == 0 { d } else { v };
        if let Some(repo) = &spec.repo_root {
            self.unclaim_others(repo, &id).await;
        }
        let record = LeaseRecord {
            work_root: provider.work_root(&sandbox_name),
            id,
            slug,
            provider: provider_name,
            state: LeaseState::Pending,
            reason: None,
            sandbox_id: None,
            sandbox_name,
            repo_root: spec.repo_root.clone(),
            created_at_ms: now,
            last_touched_ms: now,
            ttl_secs: pick(spec.ttl_secs, self.shared.defaults.ttl.as_secs()),
            idle_timeout_secs: pick(spec.idle_timeout_secs, self.shared.defaults.idle.as_secs()),
            keep: spec.keep,
            user_labels: spec.labels,
            owner: self.shared.daemon_id.clone(),
            sandbox_cleaned: false,
            provider_options: {
                let mut o = spec.provider_options;
                // Let the provider stop an idle sandbox by itself if this daemon is gone
                // (crabbox releases it first when it is not).
                let idle_min =
                    pick(spec.idle_timeout_secs, self.shared.defaults.idle.as_secs()).div_ceil(60);
                o.entry("auto_stop_minutes".into())
                    .or_insert_with(|| (idle_min + 15).to_string());
                o
            },
        };
        // Persist before the actor exists and before anything is created: a crash from here
        // on finds the record (and the sandbox by its name).
        self.shared.store.put_lease(&record)?;
        self.shared.leases.publish(record.clone(), "leased");
        self.spawn_lease(myself, record.clone()).await?;
        Ok(Acquired {
            record,
            fresh: true,
        })
    }

    async fn claim(
        &mut self,
        lease_id: &str,
        repo_root: &str,
        reclaim: bool,
    ) -> Result<LeaseRecord, Error> {
        let handle = self.shared.leases.get(lease_id).ok_or_else(|| {
            Error::NotFound(format!("lease {lease_id} is not live; see `crabbox list`"))
        })?;
        let record = handle.record();
        if !record.state.is_live() {
            return Err(Error::WrongState(format!(
                "lease {} is {} and cannot be claimed",
                record.slug, record.state
            )));
        }
        match record.repo_root.as_deref() {
            Some(current) if current == repo_root => return Ok(record),
            Some(current) if !reclaim => {
                return Err(Error::Claimed {
                    lease: format!("{} ({})", record.slug, record.id),
                    by: current.to_string(),
                    repo: repo_root.to_string(),
                });
            }
            _ => {}
        }
        self.unclaim_others(repo_root, lease_id).await;
        set_repo(&handle.actor, Some(repo_root.to_string())).await
    }

    /// A repo claims one lease at a time: the newest claim wins, older leases stay alive
    /// unclaimed.
    async fn unclaim_others(&mut self, repo_root: &str, except: &str) {
        for h in self.shared.leases.handles() {
            let r = h.record();
            if r.id != except && r.repo_root.as_deref() == Some(repo_root) {
                let _ = set_repo(&h.actor, None).await;
            }
        }
    }

    fn sweep(&mut self) {
        self.sweeps += 1;
        let now = now_ms();
        for h in self.shared.leases.handles() {
            let r = h.record();
            if matches!(r.state, LeaseState::Releasing | LeaseState::Released) {
                continue;
            }
            if let Some(reason) = r.expiry_reason(now) {
                tracing::info!(lease = %r.id, %reason, "releasing expired lease");
                let _ = h.actor.send_message(LeaseMsg::Release {
                    reason,
                    reply: None,
                });
                continue;
            }
            if r.state == LeaseState::Failed && !r.sandbox_cleaned {
                let _ = h.actor.send_message(LeaseMsg::Cleanup);
            }
            if self.sweeps.is_multiple_of(RECONCILE_EVERY) {
                let _ = h.actor.send_message(LeaseMsg::Reconcile);
            }
        }
        if self.sweeps.is_multiple_of(ORPHAN_SCAN_EVERY) {
            self.scan_orphans();
        }
    }

    /// Deletes sandboxes this daemon owns (by label) that no live lease holds: what a
    /// crash between a create and its record, or a lost race, could leave behind.
    fn scan_orphans(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let filter = BTreeMap::from([
                ("crabbox".to_string(), "true".to_string()),
                ("owner".to_string(), shared.daemon_id.clone()),
            ]);
            for (name, provider) in &shared.providers {
                let sandboxes = match provider.list(&filter).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(provider = %name, error = %e, "orphan scan skipped");
                        continue;
                    }
                };
                for sb in sandboxes {
                    if !owned_by(&sb.labels, &shared.daemon_id) {
                        continue;
                    }
                    let lease = sb.labels.get("lease").cloned().unwrap_or_default();
                    if shared.leases.get(&lease).is_some() {
                        continue;
                    }
                    let live_in_store = shared
                        .store
                        .get_lease(&lease)
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.state.is_live() || r.state == LeaseState::Releasing);
                    if live_in_store {
                        continue;
                    }
                    tracing::warn!(provider = %name, sandbox = %sb.name, %lease, "deleting orphaned sandbox");
                    if let Err(e) = provider.release(&sb.id).await {
                        tracing::warn!(sandbox = %sb.name, error = %e, "could not delete orphaned sandbox");
                    }
                }
            }
        });
    }
}

async fn set_repo(
    actor: &ActorRef<LeaseMsg>,
    repo_root: Option<String>,
) -> Result<LeaseRecord, Error> {
    actor
        .call(
            |reply| LeaseMsg::SetRepo { repo_root, reply },
            Some(super::ACTOR_CALL_TIMEOUT),
        )
        .await
        .map_err(|e| Error::Internal(format!("lease actor unreachable: {e}")))
        .and_then(super::call_result)
}

/// Label keys: 1 to 63 of `[A-Za-z0-9._/-]`; values at most 255 characters.
fn validate_label(k: &str, v: &str) -> Result<(), Error> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if !key_ok || v.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "invalid label {k:?}: keys are 1-63 characters of letters, digits, '.', '_', '-', \
             '/', values at most 255 characters (for example --label team=infra)"
        )));
    }
    Ok(())
}
