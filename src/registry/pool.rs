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
use crate::lease::{LeaseHandle, LeaseMsg, LeaseState};
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
                let ready = self.pool_count(&pool).ready;
                let health = self.pool_health.entry(pool.clone()).or_default();
                health.failures = health.failures.saturating_add(1);
                health.last_error = r.reason.as_deref().map(|why| {
                    let lower = why.to_ascii_lowercase();
                    if lower.contains("limit exceeded") || lower.contains("quota") {
                        format!(
                            "{why} (the account's quota: the pool keeps the {ready} that fit; \
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
            {
                health.failures = 0;
                health.retry_at_ms = 0;
            }
        }
        for pool in self.ctx.pools.clone() {
            let health = self.pool_health.entry(pool.name.clone()).or_default();
            if force {
                health.drained = false;
            } else if health.retry_at_ms > now || health.drained {
                continue;
            }
            let c = self.pool_count(&pool.name);
            let held = c.ready + c.filling;
            let want = pool.size.min(pool.max).saturating_sub(held);
            for _ in 0..want {
                if let Err(e) = self.create_pooled(myself, &pool).await {
                    let health = self.pool_health.entry(pool.name.clone()).or_default();
                    health.failures = health.failures.saturating_add(1);
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
            let taking = Taking {
                repo_root: spec.repo_root.clone(),
                ttl_secs,
                idle_timeout_secs,
                keep: spec.keep,
                labels: spec.labels.clone(),
                fresh_run: spec.fresh_run,
            };
            let created_before = r.created_at_ms;
            match h
                .ask(|reply| LeaseMsg::Take {
                    taking: Box::new(taking),
                    reply,
                })
                .await
            {
                Ok(record) => {
                    self.index
                        .reorder(&record.id, created_before, record.created_at_ms);
                    if let Some(pool) = &r.pool {
                        self.pool_health.entry(pool.clone()).or_default().taken += 1;
                    }
                    if let Some(repo) = &spec.repo_root {
                        self.unclaim_others(repo, &record.id).await;
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
    pub(super) fn drain_pools(&mut self, pool: Option<&str>) -> u64 {
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
