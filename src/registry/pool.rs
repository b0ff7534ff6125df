//! Warm pools (`pool:` in the daemon's config): started sandboxes kept ready, each a lease
//! in the `pooled` state, so that a fresh lease that asks what a pool holds (the same
//! provider and provider options) takes one instead of waiting for a create.
//!
//! The registry keeps them: its sweep refills each pool to its size (never past its max),
//! backing off after failures (the error is shown by `crabbox pool status`); a take
//! (inside an acquire, so two never take the same one) checks that the sandbox is still
//! started and this daemon's, moves the lease out of the pool through its own step
//! function (persisted before anything else), and asks for a refill. A pooled lease expires
//! after the pool's `idle_ttl` like any lease and is replaced.

use std::collections::BTreeMap;
use std::time::Duration;

use ractor::ActorRef;

use super::{AcquireSpec, Acquired, RegistryMsg, RegistryState};
use crate::clock::now_ms;
use crate::config::PoolSettings;
use crate::error::Error;
use crate::lease::state::Taking;
use crate::lease::{LeaseHandle, LeaseMsg, LeaseRecord, LeaseState};
use crate::provider::SandboxState;

/// How long a take waits for the provider to say the pooled sandbox is still there.
const HEALTH_CHECK: Duration = Duration::from_secs(3);

/// What the registry remembers of a pool between sweeps.
#[derive(Debug, Clone, Default)]
pub struct PoolHealth {
    /// Failed fills in a row.
    pub failures: u32,
    /// The last failure, for `pool status` and `doctor`.
    pub last_error: Option<String>,
    /// No fill before this (Unix ms), after failures.
    pub retry_at_ms: u64,
    /// When the last failure was counted (Unix ms): only a pooled sandbox made after it
    /// ends the run of failures (the ones that fit beside it, made with it, do not).
    pub failed_at_ms: u64,
    /// Sandboxes taken from the pool since the daemon started.
    pub taken: u64,
    /// Drained: not filled again until `pool fill` (or a daemon restart).
    pub drained: bool,
}

/// How long a pool waits after `failures` failed fills in a row: 2, 4, 8... seconds, at
/// most five minutes.
pub fn fill_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(1u64 << failures.min(9)).min(Duration::from_secs(300))
}

/// A pool as `pool status` shows it.
pub type PoolView = (PoolSettings, PoolCount, PoolHealth);

/// A pool's leases by state, as `pool status` shows them.
#[derive(Debug, Clone, Default)]
pub struct PoolCount {
    /// Started and waiting.
    pub ready: u32,
    /// Being made.
    pub filling: u32,
}

/// The provider options a fresh lease asks, as a pool compares them (the auto-stop
/// interval is derived from the lease's idle timeout, not a property of the sandbox).
fn comparable(options: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    options
        .iter()
        .filter(|(k, _)| k.as_str() != "auto_stop_minutes")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

impl RegistryState {
    /// The pool named `name`.
    pub(super) fn pool(&self, name: &str) -> Option<&PoolSettings> {
        self.ctx.pools.iter().find(|p| p.name == name)
    }

    /// How many of `pool`'s leases are ready and being made.
    pub(super) fn pool_count(&self, pool: &str) -> PoolCount {
        let mut c = PoolCount::default();
        for h in self.index.handles() {
            let r = h.state.borrow();
            if r.pool.as_deref() != Some(pool) {
                continue;
            }
            match r.state {
                LeaseState::Pooled => c.ready += 1,
                LeaseState::Pending | LeaseState::Creating => c.filling += 1,
                LeaseState::Ready
                | LeaseState::Syncing
                | LeaseState::Running
                | LeaseState::Stopped
                | LeaseState::Releasing
                | LeaseState::Released
                | LeaseState::Failed => {}
            }
        }
        c
    }

    /// Brings every pool up to its size (at most `extra` more than that when asked by
    /// `pool fill`), unless it is backing off after failures (`force` ignores that).
    /// Pooled leases that failed are counted against their pool's health and released.
    pub(super) async fn fill_pools(&mut self, myself: &ActorRef<RegistryMsg>, force: bool) {
        if self.ctx.pools.is_empty() || self.ctx.shutdown.is_cancelled() {
            return;
        }
        let now = now_ms();
        // Failures first: each one counts once (it is released right away).
        for h in self.index.handles() {
            let r = h.record();
            let Some(pool) = r.pool.clone() else { continue };
            if r.state == LeaseState::Failed {
                // Those made with it that fit: ready, or still being made.
                let counts = self.pool_count(&pool);
                let kept = counts.ready + counts.filling;
                let health = self.pool_health.entry(pool.clone()).or_default();
                health.failures = health.failures.saturating_add(1);
                health.failed_at_ms = now;
                health.last_error = r.reason.as_deref().map(|why| {
                    let lower = why.to_ascii_lowercase();
                    if lower.contains("limit exceeded") || lower.contains("quota") {
                        format!(
                            "{why} (the account's quota: the pool keeps the {kept} that fit; \
                             raise the quota or lower the pool's size)"
                        )
                    } else {
                        why.to_string()
                    }
                });
                health.retry_at_ms = now + fill_backoff(health.failures).as_millis() as u64;
                tracing::warn!(pool = %pool, lease = %r.id, reason = ?r.reason,
                    failures = health.failures, "a pooled sandbox failed; the pool backs off");
                h.tell(LeaseMsg::Release {
                    reason: "failed while it was made for the pool".into(),
                    reply: None,
                });
            } else if r.state == LeaseState::Pooled
                && let Some(health) = self.pool_health.get_mut(&pool)
                && health.failures > 0
                && r.created_at_ms > health.failed_at_ms
            {
                health.failures = 0;
                health.retry_at_ms = 0;
            }
        }
        // Team mode: the pool is the team's. Pooled sandboxes other daemons took are let go
        // (not deleted), expired ones are retired from the team's pool before they go,
        // and only the team's leader fills.
        let mut team_ready: Option<std::collections::HashMap<String, i64>> = None;
        if let Some(team) = self.ctx.team.clone() {
            if let Ok(taken) = team.pool_taken_from_me().await {
                for (id, host) in taken {
                    if let Some(h) = self.index.get(&id) {
                        h.tell(LeaseMsg::HandedOver { to: host });
                    }
                    let _ = team.pool_forget(&id).await;
                }
            }
            for h in self.index.handles() {
                let r = h.record();
                if r.state != LeaseState::Pooled {
                    continue;
                }
                if let Some(reason) = r.expiry_reason(now)
                    && team.pool_retire(&r.id).await.unwrap_or(false)
                {
                    h.tell(LeaseMsg::Release {
                        reason,
                        reply: None,
                    });
                }
            }
            if !team.is_leader().await {
                return;
            }
            let mut ready = std::collections::HashMap::new();
            for pool in &self.ctx.pools {
                match team.pool_ready(&pool.name).await {
                    Ok(n) => {
                        ready.insert(pool.name.clone(), n);
                    }
                    Err(_) => return,
                }
            }
            team_ready = Some(ready);
        }
        for pool in self.ctx.pools.clone() {
            let health = self.pool_health.entry(pool.name.clone()).or_default();
            if force {
                health.drained = false;
            } else if health.retry_at_ms > now || health.drained {
                continue;
            }
            let c = self.pool_count(&pool.name);
            // In team mode the ready ones are the team's (rows), the filling ones this
            // leader's own.
            let ready = team_ready
                .as_ref()
                .and_then(|m| m.get(&pool.name))
                .map_or(c.ready, |n| (*n).max(0) as u32);
            let held = ready + c.filling;
            let want = pool.size.min(pool.max).saturating_sub(held);
            for _ in 0..want {
                if let Err(e) = self.create_pooled(myself, &pool).await {
                    let health = self.pool_health.entry(pool.name.clone()).or_default();
                    health.failures = health.failures.saturating_add(1);
                    health.failed_at_ms = now;
                    health.last_error = Some(e.to_string());
                    health.retry_at_ms = now + fill_backoff(health.failures).as_millis() as u64;
                    tracing::warn!(pool = %pool.name, error = %e, "could not fill the pool");
                    break;
                }
            }
        }
    }

    /// Records and starts one lease for `pool`.
    async fn create_pooled(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        pool: &PoolSettings,
    ) -> Result<LeaseHandle, Error> {
        let provider = self.provider(&pool.provider)?;
        provider.check_ready()?;
        let idle = pool.idle_ttl.as_secs();
        let mut options = pool.options.clone();
        options.insert(
            "auto_stop_minutes".into(),
            (idle.div_ceil(60) + 15).to_string(),
        );
        let mut record = self.new_record(&pool.provider, provider.as_ref(), None, options)?;
        record.ttl_secs = idle;
        record.idle_timeout_secs = idle;
        record.pool = Some(pool.name.clone());
        if let Some(team) = &self.ctx.team {
            team.reserve(&record, None).await?;
        }
        self.ctx.store.put_lease(&record)?;
        self.index.publish(record.clone(), "made for the pool");
        self.spawn_lease(myself, record, LeaseMsg::Start).await
    }

    /// A started pooled sandbox for `spec`, moved out of its pool into a lease as `spec`
    /// asks; `None` when no pool matches or none of its sandboxes is ready (the caller
    /// creates one). A pooled sandbox that is gone, in error or not this daemon's is
    /// released and the next one tried.
    pub(super) async fn take_pooled(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        provider_name: &str,
        spec: &AcquireSpec,
        ttl_secs: u64,
        idle_timeout_secs: u64,
    ) -> Result<Option<Acquired>, Error> {
        if let Some(team) = self.ctx.team.clone() {
            return self
                .take_from_team(
                    myself,
                    &team,
                    provider_name,
                    spec,
                    ttl_secs,
                    idle_timeout_secs,
                )
                .await;
        }
        let asked = comparable(&spec.provider_options);
        let pools: Vec<String> = self
            .ctx
            .pools
            .iter()
            .filter(|p| p.provider == provider_name && comparable(&p.options) == asked)
            .map(|p| p.name.clone())
            .collect();
        if pools.is_empty() {
            return Ok(None);
        }
        // Seeded with this repo first, then the oldest.
        let mut candidates: Vec<(bool, u64, LeaseHandle)> = self
            .index
            .handles()
            .into_iter()
            .filter_map(|h| {
                let r = h.state.borrow();
                let ok = r.state == LeaseState::Pooled
                    && r.pool.as_ref().is_some_and(|p| pools.contains(p));
                let other_seed = r.seeded_for.is_some() && r.seeded_for != spec.repo_root;
                let (ok, created) = (ok, r.created_at_ms);
                drop(r);
                ok.then_some((other_seed, created, h))
            })
            .collect();
        candidates.sort_by_key(|(other_seed, created, _)| (*other_seed, *created));
        let provider = self.provider(provider_name)?;
        for (_, _, h) in candidates {
            let r = h.record();
            let seen = tokio::time::timeout(HEALTH_CHECK, provider.get(r.sandbox_ref())).await;
            let unhealthy = match seen {
                Ok(Ok(Some(info))) if !r.owns(&info.labels) => {
                    Some("its labels are not this lease's".to_string())
                }
                Ok(Ok(Some(info))) => match info.state {
                    SandboxState::Started => None,
                    other => Some(format!("it is {other:?}")),
                },
                Ok(Ok(None)) => Some("it is gone".into()),
                // The provider did not answer: leave it, create instead.
                Ok(Err(e)) => {
                    tracing::debug!(lease = %r.id, error = %e, "pooled sandbox not checked");
                    continue;
                }
                Err(_) => continue,
            };
            if let Some(why) = unhealthy {
                tracing::info!(lease = %r.id, pool = ?r.pool, %why, "pooled sandbox unusable; releasing it and trying the next");
                h.tell(LeaseMsg::Release {
                    reason: format!("unusable in the pool: {why}"),
                    reply: None,
                });
                continue;
            }
            match self
                .take(&h, taking(spec, ttl_secs, idle_timeout_secs))
                .await
            {
                Ok(record) => {
                    if let Some(pool) = &r.pool {
                        self.pool_health.entry(pool.clone()).or_default().taken += 1;
                    }
                    tracing::info!(lease = %record.id, pool = ?r.pool, "lease taken from the pool");
                    self.fill_pools(myself, false).await;
                    return Ok(Some(Acquired {
                        lease: h,
                        fresh: true,
                    }));
                }
                // Expired or released in between: the next one.
                Err(e) => tracing::debug!(lease = %r.id, error = %e, "pooled lease not taken"),
            }
        }
        Ok(None)
    }

    /// Releases the pooled sandboxes of `pool` (every pool when `None`); answers how many.
    pub(super) async fn drain_pools(&mut self, pool: Option<&str>) -> u64 {
        for p in &self.ctx.pools {
            if pool.is_none_or(|want| want == p.name) {
                self.pool_health.entry(p.name.clone()).or_default().drained = true;
            }
        }
        let mut n = 0;
        for h in self.index.handles() {
            let r = h.record();
            let Some(p) = &r.pool else { continue };
            if pool.is_some_and(|want| want != p) || !r.state.is_live() {
                continue;
            }
            // In team mode, only what can still be retired from the team's pool.
            if r.state == LeaseState::Pooled
                && let Some(team) = &self.ctx.team
                && !team.pool_retire(&r.id).await.unwrap_or(false)
            {
                continue;
            }
            h.tell(LeaseMsg::Release {
                reason: "the pool was drained".into(),
                reply: None,
            });
            n += 1;
        }
        n
    }

    /// Each pool with its counts and health.
    pub(super) fn pool_status(&self) -> Vec<PoolView> {
        self.ctx
            .pools
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    self.pool_count(&p.name),
                    self.pool_health.get(&p.name).cloned().unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// What a fresh lease asking `spec` makes of the pooled lease it takes.
fn taking(spec: &AcquireSpec, ttl_secs: u64, idle_timeout_secs: u64) -> Taking {
    Taking {
        repo_root: spec.repo_root.clone(),
        ttl_secs,
        idle_timeout_secs,
        keep: spec.keep,
        labels: spec.labels.clone(),
        fresh_run: spec.fresh_run,
    }
}

impl RegistryState {
    /// Moves the pooled lease `h` out of its pool (its step function decides), keeps
    /// `List`'s order, and gives it the repo's claim.
    async fn take(&mut self, h: &LeaseHandle, taking: Taking) -> Result<LeaseRecord, Error> {
        let before = h.record().created_at_ms;
        let repo = taking.repo_root.clone();
        let record = h
            .ask(|reply| LeaseMsg::Take {
                taking: Box::new(taking),
                reply,
            })
            .await?;
        self.index.reorder(&record.id, before, record.created_at_ms);
        if let Some(repo) = &repo {
            self.unclaim_others(repo, &record.id).await;
        }
        Ok(record)
    }

    /// Team mode's take: a ready sandbox of the team's pool, claimed atomically across
    /// daemons. One this daemon made is taken as locally; one another daemon made changes
    /// hands: checked (started, its maker's labels), recorded as a new lease of this
    /// daemon, relabelled and read back; its maker lets its pooled lease go when it next
    /// looks. An unusable one is dropped from the pool and the next one claimed.
    async fn take_from_team(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        team: &std::sync::Arc<crate::team::Team>,
        provider_name: &str,
        spec: &AcquireSpec,
        ttl_secs: u64,
        idle_timeout_secs: u64,
    ) -> Result<Option<Acquired>, Error> {
        let key = crate::team::pool::spec_key(provider_name, &spec.provider_options);
        let provider = self.provider(provider_name)?;
        for _ in 0..5 {
            let Ok(Some(claimed)) = team.pool_claim(&key).await else {
                return Ok(None);
            };
            let taking = taking(spec, ttl_secs, idle_timeout_secs);
            if claimed.owner == self.ctx.daemon_id {
                // One of this daemon's own: taken as without a team.
                let _ = team.pool_forget(&claimed.lease_id).await;
                let Some(h) = self.index.get(&claimed.lease_id) else {
                    continue;
                };
                match self.take(&h, taking).await {
                    Ok(_) => {
                        return Ok(Some(Acquired {
                            lease: h,
                            fresh: true,
                        }));
                    }
                    Err(_) => continue,
                }
            }
            // Another daemon's: check it is what the row says, then make it ours.
            let name = if claimed.sandbox_id.is_empty() {
                &claimed.sandbox_name
            } else {
                &claimed.sandbox_id
            };
            let seen = tokio::time::timeout(HEALTH_CHECK, provider.get(name)).await;
            let usable = matches!(&seen, Ok(Ok(Some(sb)))
                if sb.state == SandboxState::Started
                    && crate::lease::record::owned_by(&sb.labels, &claimed.owner)
                    && sb.labels.get("lease") == Some(&claimed.lease_id));
            if !usable {
                tracing::info!(lease = %claimed.lease_id, "a team-pooled sandbox is not usable; trying the next");
                let _ = team.pool_forget(&claimed.lease_id).await;
                continue;
            }
            let Ok(Ok(Some(sb))) = seen else { continue };
            let mut options = spec.provider_options.clone();
            options
                .entry("auto_stop_minutes".into())
                .or_insert_with(|| (idle_timeout_secs.div_ceil(60) + 15).to_string());
            // First a pooled lease of this daemon (so that the one step that takes pooled
            // leases makes it the lease asked for), never offered to the pool again.
            let mut record = self.new_record(provider_name, provider.as_ref(), None, options)?;
            record.state = LeaseState::Pooled;
            record.pool = Some(claimed.pool.clone());
            record.sandbox_id = Some(sb.id.clone());
            record.sandbox_name = sb.name.clone();
            record.work_root = provider.work_root(&sb.name);
            self.ctx.store.put_lease(&record)?;
            // Ours from here: labels pushed and read back before anything uses it.
            let relabelled = provider.set_labels(&sb.id, &record.labels()).await;
            let owned = match relabelled {
                Ok(()) => matches!(provider.get(&sb.id).await,
                    Ok(Some(after)) if record.owns(&after.labels)),
                Err(_) => false,
            };
            if !owned {
                tracing::warn!(sandbox = %sb.name, "could not make a team-pooled sandbox this daemon's; creating instead");
                record.state = LeaseState::Released;
                record.reason = Some("could not take it from the team's pool".into());
                let _ = self.ctx.store.put_lease(&record);
                continue;
            }
            self.index
                .publish(record.clone(), "taken over from the team's pool");
            let lease = self.spawn_lease(myself, record, LeaseMsg::Recover).await?;
            let taken = self.take(&lease, taking).await?;
            tracing::info!(lease = %taken.id, from = %claimed.lease_id, "lease taken over from the team's pool");
            return Ok(Some(Acquired { lease, fresh: true }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_five_minutes() {
        assert_eq!(fill_backoff(0), Duration::ZERO);
        assert_eq!(fill_backoff(1), Duration::from_secs(2));
        assert_eq!(fill_backoff(3), Duration::from_secs(8));
        assert_eq!(fill_backoff(20), Duration::from_secs(300));
    }

    #[test]
    fn the_auto_stop_interval_does_not_tell_pools_apart() {
        let a = BTreeMap::from([
            ("snapshot".to_string(), "s".to_string()),
            ("auto_stop_minutes".to_string(), "45".to_string()),
        ]);
        let b = BTreeMap::from([("snapshot".to_string(), "s".to_string())]);
        assert_eq!(comparable(&a), comparable(&b));
        let c = BTreeMap::from([("snapshot".to_string(), "t".to_string())]);
        assert_ne!(comparable(&a), comparable(&c));
    }
}
