//! Team mode's background work, wired by the daemon: every lease change mirrored to the
//! team registry, a heartbeat, a full rewrite after a missed write, leases the reaper
//! released while this daemon was away released here too, and the reaper itself when this
//! daemon leads it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::lease::store::Store;
use crate::lease::{LeaseMsg, LeaseState};
use crate::provider::Providers;
use crate::registry::Registry;
use crate::team::{Team, live_ids};

/// Before the registry picks up the stored leases: the ones the team's reaper released
/// while this daemon was away are released in the store, with the reaper's reason (their
/// sandboxes are gone already). A database that does not answer changes nothing: the
/// ticking loop asks again.
pub async fn reconcile_at_start(team: &Team, store: &Store) {
    let Ok(stored) = store.all_leases() else {
        return;
    };
    let live = live_ids(&stored);
    let reaped = match team.reaped(&live).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "team registry not reachable at start; checked again later");
            return;
        }
    };
    for (id, reason) in reaped {
        let Some(mut r) = stored.iter().find(|r| r.id == id).cloned() else {
            continue;
        };
        tracing::info!(lease = %id, %reason, "released by the team while this daemon was away");
        r.state = LeaseState::Released;
        r.reason = Some(reason);
        r.sandbox_cleaned = true;
        if let Err(e) = store.put_lease(&r) {
            tracing::warn!(lease = %id, error = %e, "could not record a lease the team released");
            continue;
        }
        let _ = store.delete_manifest(&id);
    }
}

/// Starts the mirror and the ticking loop; both end with `token`.
pub fn spawn(team: Arc<Team>, registry: Registry, providers: Providers, token: CancellationToken) {
    let mut feed = registry.index.subscribe();
    {
        let team = team.clone();
        let token = token.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = feed.recv() => c,
                    () = token.cancelled() => return,
                };
                match change {
                    Ok(c) => {
                        team.mirror(&c.lease).await;
                        // A sandbox this daemon made for a pool is the team's to take.
                        if c.message == "pooled"
                            && c.lease.state == LeaseState::Pooled
                            && let Err(e) = team.pool_add(&c.lease).await
                        {
                            tracing::warn!(lease = %c.lease.id, error = %e, "could not offer a pooled sandbox to the team");
                        }
                    }
                    // Missed changes: the next tick writes everything again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => team.mark_dirty(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    tokio::spawn(async move {
        let every = team.settings.heartbeat;
        // A daemon silent for three heartbeats is gone as far as the reaper is concerned.
        let stale = every * 3;
        let mut ticker = super::Ticker::new(every, token);
        while ticker.tick().await {
            if let Err(e) = team.heartbeat().await {
                tracing::debug!(error = %e, "team heartbeat failed; existing leases go on");
                continue;
            }
            let records = registry.index.records();
            if let Err(e) = team.resync(&records).await {
                tracing::debug!(error = %e, "team registry rewrite deferred");
            }
            match team.reaped(&live_ids(&records)).await {
                Ok(reaped) => {
                    for (id, reason) in reaped {
                        if let Some(h) = registry.index.get(&id) {
                            tracing::info!(lease = %id, %reason, "released by the team while this daemon was away");
                            h.tell(LeaseMsg::Release {
                                reason: reason.clone(),
                                reply: None,
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not ask the team registry what it reaped")
                }
            }
            if team.lead().await {
                match team.reap(&providers, stale).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "team reaper pass"),
                    Err(e) => tracing::warn!(error = %e, "team reaper pass failed"),
                }
            }
        }
    });
}
