//! `pool status|fill|drain`: the daemon's warm pools (`pool:` in its config).

use serde_json::json;

use super::Ctx;
use crate::cli::output::{lease_json, print_json};
use crate::cli::{CliError, PoolAction, exit};
use crate::clock::{human_secs, rfc3339};
use crate::pb::{self, timestamp_ms};

pub(super) async fn pool(ctx: &Ctx, action: PoolAction) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    match action {
        PoolAction::Status => {
            let status = c
                .daemon
                .pool_status(pb::PoolStatusRequest {})
                .await?
                .into_inner();
            show(ctx, &status);
            Ok(exit::OK)
        }
        PoolAction::Fill => {
            let status = c
                .daemon
                .pool_fill(pb::PoolFillRequest {})
                .await?
                .into_inner();
            show(ctx, &status);
            Ok(exit::OK)
        }
        PoolAction::Drain { pool } => {
            let r = c
                .daemon
                .pool_drain(pb::PoolDrainRequest {
                    pool: pool.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if ctx.json {
                print_json(&json!({"pool": pool, "released": r.released}));
            } else {
                println!(
                    "releasing {} pooled sandbox{}",
                    r.released,
                    if r.released == 1 { "" } else { "es" }
                );
            }
            Ok(exit::OK)
        }
    }
}

fn show(ctx: &Ctx, status: &pb::PoolStatusResponse) {
    if ctx.json {
        let pools: Vec<serde_json::Value> = status
            .pools
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "provider": p.provider,
                    "size": p.size,
                    "max": p.max,
                    "idle_ttl_secs": p.idle_ttl_secs,
                    "options": p.options,
                    "repos": p.repos,
                    "ready": p.ready,
                    "filling": p.filling,
                    "taken": p.taken,
                    "drained": p.drained,
                    "seeded": p.seeded,
                    "failures": p.failures,
                    "last_error": (!p.last_error.is_empty()).then_some(&p.last_error),
                    "retry_at": p.retry_at.as_ref().map(|t| rfc3339(timestamp_ms(Some(t)))),
                    "leases": p.leases.iter().map(lease_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&json!(pools));
        return;
    }
    if status.pools.is_empty() {
        println!(
            "no pools: add `pool:` entries to the daemon's config (~/.config/crabbox/config.yaml), \
             e.g.\n  pool:\n    - provider: local\n      size: 2\nthen restart it (`crabbox daemon stop`)"
        );
        return;
    }
    for p in &status.pools {
        println!(
            "{}  ({}, size {}, max {}, idle ttl {}): {} ready, {} filling, {} taken",
            p.name,
            p.provider,
            p.size,
            p.max,
            human_secs(p.idle_ttl_secs),
            p.ready,
            p.filling,
            p.taken
        );
        if p.drained {
            println!("  drained: not filled again until `crabbox pool fill`");
        }
        if !p.options.is_empty() {
            let mut o: Vec<String> = p
                .options
                .iter()
                .map(|(k, v)| {
                    if v.contains('\n') {
                        format!("{k}=<{} lines>", v.lines().count())
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            o.sort();
            println!("  for leases asking {}", o.join(", "));
        }
        for r in &p.repos {
            let n = p.seeded.values().filter(|s| *s == r).count();
            println!("  seeds {r} ({n} ready with it)");
        }
        if !p.last_error.is_empty() {
            let when = p
                .retry_at
                .as_ref()
                .map(|t| format!(" (next try at {})", rfc3339(timestamp_ms(Some(t)))))
                .unwrap_or_default();
            println!(
                "  failing ({} in a row): {}{when}",
                p.failures, p.last_error
            );
        }
    }
}
