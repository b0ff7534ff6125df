//! The registry: creates lease actors and supervises them, owns the index of live leases,
//! serializes acquires and claims (so two runs in one repo never create two leases), and
//! sweeps for expiry, drift and orphaned sandboxes.
//!
//! Supervision policy: a lease actor that fails (panics) or stops without its lease being
//! released leaves the lease `failed` with the reason (through the lease's own step
//! function), and a fresh actor is started for the record to delete its sandbox. The lease
//! stays listed, so a person can read why.
//!
//! - [`index`]: id -> live lease handle, name resolution, the event feed.
//! - [`sweep`]: expiry, retries, reconcile cadence, the orphan scan.
//! - [`pool`]: warm pools of started sandboxes, filled by the sweep, taken by acquires.

pub mod index;
pub mod pool;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::{Error, echo};
use crate::ids;
use crate::lease::actor::{LeaseActor, LeaseArgs, LeaseCtx};
use crate::lease::handle::ask;
use crate::lease::record::FreshRun;
use crate::lease::state::{Event, step};
use crate::lease::store::Store;
use crate::lease::{LeaseHandle, LeaseMsg, LeaseRecord};
use crate::lease::{LeaseState, Task};
use crate::provider::{Provider, Providers};
use index::LeaseIndex;

/// The longest ttl or idle timeout a lease may have: 30 days.
pub const MAX_LEASE_SECS: u64 = 30 * 24 * 3600;

/// Refuses a ttl or idle timeout past [`MAX_LEASE_SECS`], for a new lease and for one a
/// request reuses alike.
pub fn check_lifetimes(spec: &AcquireSpec) -> Result<(), Error> {
    for (what, secs) in [
        ("ttl", spec.ttl_secs),
        ("idle timeout", spec.idle_timeout_secs),
    ] {
        if secs > MAX_LEASE_SECS {
            return Err(Error::InvalidArgument(format!(
                "a {what} of {} is longer than the {} a lease may live; choose a shorter one \
                 (for example --ttl 8h)",
                crate::clock::human_secs(secs),
                crate::clock::human_secs(MAX_LEASE_SECS)
            )));
        }
    }
    Ok(())
}

/// Lease defaults (SPEC: ttl 90m, idle 30m).
#[derive(Debug, Clone, Copy)]
pub struct LeaseDefaults {
    pub ttl: Duration,
    pub idle: Duration,
}

impl Default for LeaseDefaults {
    fn default() -> Self {
        LeaseDefaults {
            ttl: crate::config::DEFAULT_TTL,
            idle: crate::config::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What the registry works with.
pub struct RegistryCtx {
    pub store: Arc<Store>,
    pub providers: Providers,
    /// The provider for requests that name none.
    pub default_provider: String,
    /// This daemon's id: the `owner` label of every sandbox it creates.
    pub daemon_id: String,
    pub defaults: LeaseDefaults,
    /// How long a sandbox may take to become ready.
    pub provision_deadline: Duration,
    /// Cancelled at shutdown; every lease's run token is a child of it.
    pub shutdown: CancellationToken,
    /// Warm pools to keep.
    pub pools: Vec<crate::config::PoolSettings>,
    /// Team mode: quotas are checked (and the lease's slot reserved) before a create.
    pub team: Option<Arc<crate::team::Team>>,
}

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
    /// Provider options (Daytona: snapshot, target, user).
    pub provider_options: BTreeMap<String, String>,
    /// A new lease is for one `run`, released when it ends (not when it reuses one).
    pub fresh_run: Option<FreshRun>,
    /// Team mode: this request's place in the queue for a slot (`--wait-for-slot`).
    pub slot_ticket: Option<i64>,
}

/// A lease handed out by [`Registry::acquire`].
#[derive(Clone)]
pub struct Acquired {
    pub lease: LeaseHandle,
    /// Created for this request (a `run` releases it at the end unless kept).
    pub fresh: bool,
}

/// Messages to the registry actor.
pub enum RegistryMsg {
    /// Warmup, or a run in a repo without a lease: the repo's claimed live lease, else a
    /// new one.
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
    /// Sent by the daemon's ticker: expiry, retries, reconcile, orphan scan.
    Sweep,
    /// Sent by the orphan scan: a sandbox this daemon owns whose lease the store does not
    /// know (the store was lost or damaged), rebuilt from its labels.
    Adopt(Box<LeaseRecord>),
    /// `crabbox pool status`.
    PoolStatus {
        reply: RpcReplyPort<Result<Vec<pool::PoolView>, Error>>,
    },
    /// `crabbox pool fill`: fill now, past any backoff.
    PoolFill {
        reply: RpcReplyPort<Result<(), Error>>,
    },
    /// `crabbox pool drain [NAME]`, and `daemon stop --drain`: release pooled sandboxes.
    PoolDrain {
        pool: Option<String>,
        reply: RpcReplyPort<Result<u64, Error>>,
    },
}

/// The registry as the rest of the daemon holds it: its actor and its index.
#[derive(Clone)]
pub struct Registry {
    actor: ActorRef<RegistryMsg>,
    /// The live leases, readable without the registry's mailbox.
    pub index: Arc<LeaseIndex>,
}

impl Registry {
    /// Starts the registry, which picks up every unfinished lease the store holds.
    pub async fn start(ctx: RegistryCtx) -> Result<(Registry, JoinHandle<()>), Error> {
        let index = Arc::new(LeaseIndex::default());
        let (actor, join) = Actor::spawn(
            None,
            RegistryActor,
            RegistryState {
                ctx: Arc::new(ctx),
                index: index.clone(),
                actors: HashMap::new(),
                sweeps: 0,
                myself: None,
                pool_health: HashMap::new(),
            },
        )
        .await
        .map_err(|e| Error::Internal(format!("starting the registry: {e}")))?;
        Ok((Registry { actor, index }, join))
    }

    /// The repo's claimed live lease (when `spec.repo_root` has one), else a new lease.
    pub async fn acquire(&self, spec: AcquireSpec) -> Result<Acquired, Error> {
        ask(&self.actor, "registry", |reply| RegistryMsg::Acquire {
            spec,
            reply,
        })
        .await
    }

    /// Claims a live lease for a repo root; another repo's claim needs `reclaim`.
    pub async fn claim(
        &self,
        lease_id: String,
        repo_root: String,
        reclaim: bool,
    ) -> Result<LeaseRecord, Error> {
        ask(&self.actor, "registry", |reply| RegistryMsg::Claim {
            lease_id,
            repo_root,
            reclaim,
            reply,
        })
        .await
    }

    /// Each pool with its counts and health.
    pub async fn pool_status(&self) -> Result<Vec<pool::PoolView>, Error> {
        ask(&self.actor, "registry", |reply| RegistryMsg::PoolStatus {
            reply,
        })
        .await
    }

    /// Fills every pool to its size now.
    pub async fn pool_fill(&self) -> Result<(), Error> {
        ask(&self.actor, "registry", |reply| RegistryMsg::PoolFill {
            reply,
        })
        .await
    }

    /// Releases the pooled sandboxes of one pool, or of all; answers how many.
    pub async fn pool_drain(&self, pool: Option<String>) -> Result<u64, Error> {
        ask(&self.actor, "registry", |reply| RegistryMsg::PoolDrain {
            pool,
            reply,
        })
        .await
    }

    /// Asks for a sweep (the daemon's ticker).
    pub fn sweep(&self) {
        let _ = self.actor.send_message(RegistryMsg::Sweep);
    }

    /// Stops the registry, then every lease actor, each within `bound`. Every lease is
    /// persisted at each move, so nothing is lost.
    pub async fn stop(&self, join: JoinHandle<()>, bound: Duration) {
        self.actor.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(bound, join).await;
        for h in self.index.handles() {
            let _ =
                tokio::time::timeout(bound, h.actor.stop_and_wait(Some("shutdown".into()), None))
                    .await;
        }
    }
}

/// The registry actor.
pub struct RegistryActor;

/// The registry's state.
pub struct RegistryState {
    ctx: Arc<RegistryCtx>,
    index: Arc<LeaseIndex>,
    /// Which lease each supervised actor owns.
    actors: HashMap<ActorId, String>,
    sweeps: u64,
    /// The registry itself, for the orphan scan's task to send adoptions to (set at start).
    myself: Option<ActorRef<RegistryMsg>>,
    /// What each pool's fills did lately.
    pool_health: HashMap<String, pool::PoolHealth>,
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryState;

    async fn pre_start(
        &self,
        myself: ActorRef<RegistryMsg>,
        mut st: RegistryState,
    ) -> Result<RegistryState, ActorProcessingErr> {
        st.myself = Some(myself.clone());
        // Pick up every lease the store holds that is not finished.
        let mut recovered = 0;
        for record in st.ctx.store.all_leases()? {
            if record.state == LeaseState::Released {
                continue;
            }
            if !st.ctx.providers.contains_key(&record.provider) {
                tracing::warn!(lease = %record.id, provider = %record.provider,
                    "lease's provider is not configured; leaving it for a daemon that has it");
                continue;
            }
            st.spawn_lease(&myself, record, LeaseMsg::Recover).await?;
            recovered += 1;
        }
        if recovered > 0 {
            tracing::info!(recovered, "recovered leases from the store");
        }
        st.scan_orphans();
        st.fill_pools(&myself, false).await;
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
            RegistryMsg::Sweep => {
                st.sweep();
                st.fill_pools(&myself, false).await;
            }
            RegistryMsg::Adopt(record) => st.adopt(&myself, *record).await,
            RegistryMsg::PoolStatus { reply } => {
                let _ = reply.send(Ok(st.pool_status()));
            }
            RegistryMsg::PoolFill { reply } => {
                st.fill_pools(&myself, true).await;
                let _ = reply.send(Ok(()));
            }
            RegistryMsg::PoolDrain { pool, reply } => {
                let r = match &pool {
                    Some(name) if st.pool(name).is_none() => Err(Error::NotFound(format!(
                        "no pool is named {}; `crabbox pool status` lists them",
                        echo(name)
                    ))),
                    _ => Ok(st.drain_pools(pool.as_deref()).await),
                };
                let _ = reply.send(r);
            }
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
                    let released = st
                        .index
                        .get(&id)
                        .is_none_or(|h| h.record().state == LeaseState::Released);
                    if released || st.ctx.shutdown.is_cancelled() {
                        st.index.remove(&id);
                    } else {
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
    fn provider(&self, name: &str) -> Result<Arc<dyn Provider>, Error> {
        self.ctx.providers.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.ctx.providers.keys().map(String::as_str).collect();
            known.sort();
            Error::InvalidArgument(format!(
                "provider {} is not available in this daemon (it has: {}); check \
                 --provider or `provider:` in crabbox.yaml",
                echo(name),
                known.join(", ")
            ))
        })
    }

    /// Starts the actor of `record`, indexes it, and sends it `first` (`Start` for a new
    /// lease, `Recover` for a stored one).
    async fn spawn_lease(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        record: LeaseRecord,
        first: LeaseMsg,
    ) -> Result<LeaseHandle, Error> {
        let id = record.id.clone();
        let ctx = LeaseCtx {
            store: self.ctx.store.clone(),
            provider: self.provider(&record.provider)?,
            events: self.index.feed(),
            provision_deadline: self.ctx.provision_deadline,
            shutdown: self.ctx.shutdown.clone(),
        };
        let (tx, state) = watch::channel(record.clone());
        let publish = crate::lease::Publisher::new(tx, self.index.counts());
        let (actor, _) = Actor::spawn_linked(
            None,
            LeaseActor,
            LeaseArgs {
                record,
                ctx,
                publish,
            },
            myself.get_cell(),
        )
        .await
        .map_err(|e| Error::Internal(format!("starting the actor of lease {id}: {e}")))?;
        self.actors.insert(actor.get_id(), id.clone());
        let handle = LeaseHandle::new(actor, state);
        self.index.insert(id, handle.clone());
        handle.tell(first);
        Ok(handle)
    }

    /// A lease actor died without releasing: its lease fails (through the lease's step
    /// function) and a new actor deletes its sandbox.
    async fn after_crash(&mut self, myself: &ActorRef<RegistryMsg>, id: &str, why: &str) {
        let record = match self.index.get(id) {
            Some(h) => Some(h.record()),
            None => self.ctx.store.get_lease(id).ok().flatten(),
        };
        self.index.remove(id);
        let Some(record) = record else { return };
        let crashed = Event::Crashed {
            why: why.to_string(),
        };
        let Ok(step) = step(&record, crashed, now_ms()) else {
            return;
        };
        if step.effects.is_empty() {
            return; // released already
        }
        let mut record = step.record;
        record.task = Task::Idle;
        if let Err(e) = self.ctx.store.put_lease(&record) {
            tracing::error!(lease = %id, error = %e, "could not persist the failed lease");
        }
        self.index
            .publish(record.clone(), "failed: lease actor crashed");
        if let Err(e) = self.spawn_lease(myself, record, LeaseMsg::Recover).await {
            tracing::error!(lease = %id, error = %e, "could not restart the lease actor");
        }
    }

    async fn acquire(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        spec: AcquireSpec,
    ) -> Result<Acquired, Error> {
        if let Some(repo) = &spec.repo_root
            && let Some(lease) = self.index.claimed_by(repo)
        {
            return Ok(Acquired {
                lease,
                fresh: false,
            });
        }
        let provider_name = if spec.provider.is_empty() {
            self.ctx.default_provider.clone()
        } else {
            spec.provider.clone()
        };
        let provider = self.provider(&provider_name)?;
        provider.check_ready()?;
        check_lifetimes(&spec)?;
        for (k, v) in &spec.labels {
            validate_label(k, v)?;
        }
        let pick = |v: u64, d: u64| if v == 0 { d } else { v };
        let ttl_secs = pick(spec.ttl_secs, self.ctx.defaults.ttl.as_secs());
        let idle_timeout_secs = pick(spec.idle_timeout_secs, self.ctx.defaults.idle.as_secs());
        // A warm pool that holds what this lease asks for hands one out (not for a chosen
        // slug: pooled sandboxes have theirs).
        if spec.slug.is_none()
            && let Some(acquired) = self
                .take_pooled(myself, &provider_name, &spec, ttl_secs, idle_timeout_secs)
                .await?
        {
            return Ok(acquired);
        }
        let spec_ticket = spec.slot_ticket;
        let mut provider_options = spec.provider_options;
        // Let the provider stop an idle sandbox by itself if this daemon is gone (crabbox
        // releases it first when it is not).
        provider_options
            .entry("auto_stop_minutes".into())
            .or_insert_with(|| (idle_timeout_secs.div_ceil(60) + 15).to_string());
        let mut record = self.new_record(
            &provider_name,
            provider.as_ref(),
            spec.slug.as_deref(),
            provider_options,
        )?;
        if let Some(repo) = &spec.repo_root {
            self.unclaim_others(repo, &record.id).await;
        }
        record.repo_root = spec.repo_root;
        record.ttl_secs = ttl_secs;
        record.idle_timeout_secs = idle_timeout_secs;
        record.keep = spec.keep;
        record.user_labels = spec.labels;
        record.fresh_run = spec.fresh_run;
        // The team's quotas first: refused, nothing is created.
        if let Some(team) = &self.ctx.team {
            team.reserve(&record, spec_ticket).await?;
        }
        // Persist before the actor exists and before anything is created: a crash from here
        // on finds the record (and the sandbox by its name).
        self.ctx.store.put_lease(&record)?;
        self.index.publish(record.clone(), "leased");
        tracing::info!(lease = %record.id, slug = %record.slug, provider = %record.provider,
            repo = record.repo_root.as_deref().unwrap_or(""), "lease created");
        let lease = self.spawn_lease(myself, record, LeaseMsg::Start).await?;
        Ok(Acquired { lease, fresh: true })
    }

    /// A new lease's record (pending, owned by this daemon, defaults for the rest), with a
    /// fresh id, its slug (`slug`, or one made from the id) and its sandbox's name.
    fn new_record(
        &self,
        provider_name: &str,
        provider: &dyn Provider,
        slug: Option<&str>,
        provider_options: BTreeMap<String, String>,
    ) -> Result<LeaseRecord, Error> {
        let id = ids::new_lease_id();
        let slug = match slug {
            Some(slug) => {
                ids::validate_slug(slug).map_err(Error::InvalidArgument)?;
                if self.index.slug_taken(slug) {
                    return Err(Error::InvalidArgument(format!(
                        "slug {slug:?} is taken by a live lease; choose another --slug or stop \
                         that lease first"
                    )));
                }
                slug.to_string()
            }
            None => {
                let base = ids::slug_for(&id);
                let mut slug = base.clone();
                while self.index.slug_taken(&slug) {
                    slug = ids::suffixed_slug(&base);
                }
                slug
            }
        };
        let sandbox_name = ids::sandbox_name(&slug, &id);
        let now = now_ms();
        Ok(LeaseRecord {
            work_root: provider.work_root(&sandbox_name),
            id,
            slug,
            provider: provider_name.to_string(),
            state: LeaseState::Pending,
            reason: None,
            sandbox_id: None,
            sandbox_name,
            repo_root: None,
            created_at_ms: now,
            last_touched_ms: now,
            ttl_secs: self.ctx.defaults.ttl.as_secs(),
            idle_timeout_secs: self.ctx.defaults.idle.as_secs(),
            keep: false,
            user_labels: BTreeMap::new(),
            owner: self.ctx.daemon_id.clone(),
            failed_on_auth: false,
            sandbox_cleaned: false,
            provider_options,
            fresh_run: None,
            pool: None,
            seeded_for: None,
            task: Task::Idle,
            attempts: 0,
        })
    }

    async fn claim(
        &mut self,
        lease_id: &str,
        repo_root: &str,
        reclaim: bool,
    ) -> Result<LeaseRecord, Error> {
        let handle = self.index.get(lease_id).ok_or_else(|| {
            Error::NotFound(format!("lease {lease_id} is not live; see `crabbox list`"))
        })?;
        let record = handle.record();
        match record.repo_root.as_deref() {
            Some(current) if current == repo_root && record.state.is_live() => {
                return Ok(record);
            }
            Some(current) if !reclaim && record.state.is_live() => {
                return Err(Error::Claimed {
                    lease: format!("{} ({})", record.slug, record.id),
                    by: current.to_string(),
                    repo: repo_root.to_string(),
                });
            }
            _ => {}
        }
        let record = handle
            .ask(|reply| LeaseMsg::Claim {
                repo_root: Some(repo_root.to_string()),
                reply,
            })
            .await?;
        self.unclaim_others(repo_root, lease_id).await;
        Ok(record)
    }

    /// Takes back a lease the store lost, as its sandbox's labels describe it; recovery
    /// then compares it with the provider (or finishes its release).
    async fn adopt(&mut self, myself: &ActorRef<RegistryMsg>, record: LeaseRecord) {
        let known = self.index.get(&record.id).is_some()
            || self
                .ctx
                .store
                .get_lease(&record.id)
                .ok()
                .flatten()
                .is_some();
        if known {
            return;
        }
        tracing::warn!(lease = %record.id, slug = %record.slug, sandbox = %record.sandbox_name,
            "the store did not know this lease; rebuilt it from its sandbox's labels");
        if let Err(e) = self.ctx.store.put_lease(&record) {
            tracing::error!(lease = %record.id, error = %e, "could not store the rebuilt lease");
            return;
        }
        self.index
            .publish(record.clone(), "rebuilt from its sandbox's labels");
        if let Err(e) = self.spawn_lease(myself, record, LeaseMsg::Recover).await {
            tracing::error!(error = %e, "could not start the rebuilt lease");
        }
    }

    /// A repo claims one lease at a time: the newest claim wins, older leases stay alive
    /// unclaimed.
    async fn unclaim_others(&mut self, repo_root: &str, except: &str) {
        for h in self.index.handles() {
            let r = h.record();
            if r.id != except && r.repo_root.as_deref() == Some(repo_root) {
                let _ = h
                    .ask(|reply| LeaseMsg::Claim {
                        repo_root: None,
                        reply,
                    })
                    .await;
            }
        }
    }
}

/// Label keys: 1 to 63 of `[A-Za-z0-9._/-]`; values at most 255 characters.
pub fn validate_label(k: &str, v: &str) -> Result<(), Error> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if !key_ok || v.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "invalid label {}: keys are 1-63 characters of letters, digits, '.', '_', '-', \
             '/', values at most 255 characters (for example --label team=infra)",
            echo(k)
        )));
    }
    Ok(())
}
