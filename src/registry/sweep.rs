//! The registry's sweep, on the daemon's ticker: expired leases are released, provider work
//! that should be in flight but is not is started again, live leases are compared with
//! their provider now and then, and sandboxes this daemon owns that no lease holds are
//! deleted.

use std::collections::BTreeMap;

use super::{RegistryMsg, RegistryState};
use crate::clock::now_ms;
use crate::lease::record::owned_by;
use crate::lease::{LeaseMsg, LeaseRecord};
use crate::lease::{LeaseState, Task};

/// Every this many sweeps, live leases are compared with their provider.
const RECONCILE_EVERY: u64 = 6;
/// Every this many sweeps (and at start), providers are searched for orphaned sandboxes.
const ORPHAN_SCAN_EVERY: u64 = 60;

impl RegistryState {
    pub(super) fn sweep(&mut self) {
        self.sweeps += 1;
        let now = now_ms();
        let reconcile = self.sweeps.is_multiple_of(RECONCILE_EVERY);
        for h in self.index.handles() {
            let r = h.record();
            if matches!(r.state, LeaseState::Releasing | LeaseState::Released) {
                if r.task == Task::Idle && r.state == LeaseState::Releasing {
                    h.tell(LeaseMsg::Retry);
                }
                continue;
            }
            // In team mode a pooled lease is retired from the team's pool before it goes
            // (another daemon may have claimed it): the pool's fill does that.
            let team_pooled = r.state == LeaseState::Pooled && self.ctx.team.is_some();
            if !team_pooled && let Some(reason) = r.expiry_reason(now) {
                tracing::info!(lease = %r.id, %reason, "releasing expired lease");
                h.tell(LeaseMsg::Release {
                    reason,
                    reply: None,
                });
                continue;
            }
            let stalled = r.task == Task::Idle
                && (r.state == LeaseState::Creating
                    || (r.state == LeaseState::Failed && !r.sandbox_cleaned));
            if stalled {
                h.tell(LeaseMsg::Retry);
            }
            if reconcile {
                h.tell(LeaseMsg::Reconcile);
            }
        }
        if self.sweeps.is_multiple_of(ORPHAN_SCAN_EVERY) {
            self.scan_orphans();
        }
    }

    /// Looks for sandboxes this daemon owns (by label) that no live lease holds. Every
    /// lease is stored before its sandbox is created, so a sandbox whose lease the store
    /// does not know at all means the store lost it: it is adopted back from its labels.
    /// A sandbox whose lease is released or failed is an orphan (a crash mid-release, a lost
    /// race) and is deleted.
    pub(super) fn scan_orphans(&self) {
        let ctx = self.ctx.clone();
        let index = self.index.clone();
        let Some(registry) = self.myself.clone() else {
            return;
        };
        tokio::spawn(async move {
            let filter = BTreeMap::from([
                ("crabbox".to_string(), "true".to_string()),
                ("owner".to_string(), ctx.daemon_id.clone()),
            ]);
            for (name, provider) in &ctx.providers {
                let sandboxes = match provider.list(&filter).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(provider = %name, error = %e, "orphan scan skipped");
                        continue;
                    }
                };
                for sb in sandboxes {
                    if !owned_by(&sb.labels, &ctx.daemon_id) {
                        continue;
                    }
                    let lease = sb.labels.get("lease").cloned().unwrap_or_default();
                    if index.get(&lease).is_some() {
                        continue;
                    }
                    let stored = match ctx.store.get_lease(&lease) {
                        Ok(r) => r,
                        // The store cannot say: leave the sandbox for the next scan.
                        Err(_) => continue,
                    };
                    match stored {
                        None => {
                            if let Some(record) = LeaseRecord::from_labels(
                                name,
                                &ctx.daemon_id,
                                &sb.id,
                                &sb.name,
                                &sb.labels,
                            ) {
                                let _ = registry.send_message(RegistryMsg::Adopt(Box::new(record)));
                                continue;
                            }
                        }
                        Some(r) if r.state.is_live() || r.state == LeaseState::Releasing => {
                            continue;
                        }
                        Some(_) => {}
                    }
                    tracing::warn!(provider = %name, sandbox = %sb.name, %lease, "deleting orphaned sandbox");
                    match provider.release(&sb.id).await {
                        Ok(()) => crate::metrics::orphan_reaped(),
                        Err(e) => {
                            tracing::warn!(sandbox = %sb.name, error = %e, "could not delete orphaned sandbox");
                        }
                    }
                }
            }
        });
    }
}
