//! `sync-plan`: what a run's sync would send and delete, without leasing anything.

use serde_json::json;

use super::Ctx;
use super::run::human_bytes;
use crate::cli::output::{lease_json, print_json};
use crate::cli::{CliError, SyncPlanArgs, exit};
use crate::pb;

pub(super) async fn sync_plan(ctx: &Ctx, args: SyncPlanArgs) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let plan = c
        .leases
        .sync_plan(pb::SyncPlanRequest {
            repo_root: ctx.repo(),
            lease: args.id.clone().unwrap_or_default(),
            sync: Some(pb::SyncOptions {
                full_resync: args.full_resync,
                force_delete: args.force_sync_delete,
                delete_guard_percent: ctx.settings.sync.delete_guard.unwrap_or(0),
                git: ctx.settings.sync.git,
                exclude: ctx.settings.sync.exclude.clone(),
                include: ctx.settings.sync.include.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    if ctx.json {
        let sizes = |v: &[pb::PathSize]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|p| json!({"path": p.path, "bytes": p.bytes}))
                .collect()
        };
        print_json(&json!({
            "lease": plan.lease.as_ref().map(lease_json),
            "full": plan.full,
            "files_total": plan.files_total,
            "bytes_total": plan.bytes_total,
            "files_to_send": plan.files_to_send,
            "bytes_to_send": plan.bytes_to_send,
            "files_to_delete": plan.files_to_delete,
            "largest_files": sizes(&plan.largest_files),
            "largest_folders": sizes(&plan.largest_folders),
            "changes": plan.changes.iter().map(|c| json!({"path": c.path, "kind": c.kind})).collect::<Vec<_>>(),
            "changes_total": plan.changes_total,
            "warnings": plan.warnings,
        }));
        return Ok(exit::OK);
    }
    println!(
        "checkout {}: {} files, {}",
        ctx.repo(),
        plan.files_total,
        human_bytes(plan.bytes_total)
    );
    match &plan.lease {
        Some(l) if !plan.full => println!(
            "against lease {} ({}): {} files to send ({} before compression), {} to delete",
            l.slug,
            l.id,
            plan.files_to_send,
            human_bytes(plan.bytes_to_send),
            plan.files_to_delete
        ),
        Some(l) => println!(
            "against lease {} ({}): everything goes (no trusted record of what it holds): {} \
             files, {}",
            l.slug,
            l.id,
            plan.files_to_send,
            human_bytes(plan.bytes_to_send)
        ),
        None => println!(
            "no lease for this checkout yet: a run sends everything ({} files, {})",
            plan.files_to_send,
            human_bytes(plan.bytes_to_send)
        ),
    }
    let show = |title: &str, v: &[pb::PathSize]| {
        if !v.is_empty() {
            println!("{title}:");
            for p in v {
                println!("  {:>10}  {}", human_bytes(p.bytes), p.path);
            }
        }
    };
    show("largest files", &plan.largest_files);
    show("largest folders", &plan.largest_folders);
    if !plan.full && !plan.changes.is_empty() {
        println!("changes since the lease's last sync:");
        for c in &plan.changes {
            let mark = match c.kind.as_str() {
                "added" => "A",
                "deleted" => "D",
                _ => "M",
            };
            println!("  {mark} {}", c.path);
        }
        if plan.changes_total > plan.changes.len() as u64 {
            println!(
                "  ... and {} more",
                plan.changes_total - plan.changes.len() as u64
            );
        }
    }
    for w in &plan.warnings {
        eprintln!("crabbox: warning: {w}");
    }
    Ok(exit::OK)
}
