//! The rest of a sandbox's life on Daytona: pause (its processes frozen) and resume,
//! archive (stopped, then moved to storage), resize, and the build log of a sandbox made
//! from a declarative image.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, lock, schedule, with_sandbox};
use crate::sim::{ApiError, ApiJson, Principal, Sim};

/// Sends `signal` to every process of the sandbox (found by its `DAYTONA_SANDBOX_ID`).
pub(super) fn signal_sandbox(id: &str, signal: nix::sys::signal::Signal) {
    let needle = format!("DAYTONA_SANDBOX_ID={id}");
    for pid in crate::sim::toolbox::info::sandbox_pids(&needle) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// `POST /sandbox/{id}/pause`: `started` → `pausing` → `paused`, its processes stopped
/// (SIGSTOP) but kept; `start` resumes them.
pub(super) async fn pause_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let r = with_sandbox(&sim, &id, |sb| match sb.state.as_str() {
        "paused" | "pausing" => Ok(()),
        "started" => {
            signal_sandbox(&sb.id, nix::sys::signal::Signal::SIGSTOP);
            sb.set_state(&sim, "pausing");
            sb.desired_state = "paused".into();
            scheduled = Some((sb.id.clone(), sb.generation));
            Ok(())
        }
        other => Err(ApiError::bad_request(format!(
            "Sandbox {id} cannot be paused while {other}: only a started sandbox can"
        ))),
    });
    if let Some((sid, generation)) = scheduled {
        schedule(
            &sim,
            sid,
            generation,
            sim.config.start_delay,
            "paused",
            None,
        );
    }
    r
}

/// `POST /sandbox/{id}/archive`: a stopped sandbox → `archiving` → `archived`. Starting
/// it again takes twice as long as from `stopped`, as the files come back from storage.
pub(super) async fn archive_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let r = with_sandbox(&sim, &id, |sb| match sb.state.as_str() {
        "archived" | "archiving" => Ok(()),
        "stopped" => {
            sb.set_state(&sim, "archiving");
            sb.desired_state = "archived".into();
            scheduled = Some((sb.id.clone(), sb.generation));
            Ok(())
        }
        other => Err(ApiError::bad_request(format!(
            "Sandbox {id} cannot be archived while {other}: stop it first"
        ))),
    });
    if let Some((sid, generation)) = scheduled {
        schedule(
            &sim,
            sid,
            generation,
            sim.config.start_delay,
            "archived",
            None,
        );
    }
    r
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Resize {
    cpu: Option<i64>,
    memory: Option<i64>,
    disk: Option<i64>,
    gpu: Option<i64>,
}

/// `POST /sandbox/{id}/resize`: Daytona's rules. A started sandbox takes only more CPU
/// and memory; disk needs a stopped one and only grows; GPUs cannot change.
pub(super) async fn resize_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Resize>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    if req.gpu.is_some() {
        return Err(ApiError::bad_request(
            "GPU cannot be resized: create a new sandbox",
        ));
    }
    if req.cpu.is_none() && req.memory.is_none() && req.disk.is_none() {
        return Err(ApiError::bad_request(
            "at least one of cpu, memory or disk is required",
        ));
    }
    for (what, v) in [("cpu", req.cpu), ("memory", req.memory), ("disk", req.disk)] {
        if v.is_some_and(|n| n < 1) {
            return Err(ApiError::bad_request(format!("{what} must be at least 1")));
        }
    }
    let (json, sid, generation, back) = {
        let mut map = lock(&sim.sandboxes)?;
        let key = super::find_id(&map, &id).ok_or_else(|| super::not_found(&id))?;
        let sb = map.get(&key).ok_or_else(|| super::not_found(&id))?;
        let hot = match sb.state.as_str() {
            "started" => true,
            "stopped" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "Sandbox {id} cannot be resized while {other}"
                )));
            }
        };
        if hot {
            if req.disk.is_some() {
                return Err(ApiError::bad_request(
                    "disk can only be resized on a stopped sandbox",
                ));
            }
            if req.cpu.is_some_and(|c| c < sb.cpu) || req.memory.is_some_and(|m| m < sb.memory) {
                return Err(ApiError::bad_request(
                    "a started sandbox can only grow its cpu and memory: stop it to shrink them",
                ));
            }
        }
        if req.disk.is_some_and(|d| d < sb.disk) {
            return Err(ApiError::bad_request(format!(
                "disk cannot shrink (it is {} GiB)",
                sb.disk
            )));
        }
        let cpu = req.cpu.unwrap_or(sb.cpu);
        let memory = req.memory.unwrap_or(sb.memory);
        let disk = req.disk.unwrap_or(sb.disk);
        if let Some(e) = sim.quota_error(
            &map,
            Some(&key),
            if hot { cpu } else { 0 },
            if hot { memory } else { 0 },
            disk,
        ) {
            return Err(e);
        }
        let sb = map.get_mut(&key).ok_or_else(|| super::not_found(&id))?;
        sb.cpu = cpu;
        sb.memory = memory;
        sb.disk = req.disk.unwrap_or(sb.disk);
        let back = if hot { "started" } else { "stopped" };
        sb.set_state(&sim, "resizing");
        (sb.to_json(&sim, true), key, sb.generation, back)
    };
    schedule(
        &sim,
        sid,
        generation,
        sim.config.start_delay / 2,
        back,
        None,
    );
    Ok(Json(json))
}

/// The build of a sandbox made from a declarative image, as Daytona runs it:
/// `pending_build`, then `building_snapshot` printing a step per instruction, then
/// `starting` and `started`, or `build_failed` with the reason.
pub(super) fn spawn_build(sim: &Arc<Sim>, id: String, dockerfile: String, failure: Option<String>) {
    let sim = sim.clone();
    let delay = sim.jittered(sim.config.snapshot_delay);
    let steps: Vec<String> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    tokio::spawn(async move {
        // Runs `f` on the sandbox while it is still this build's; false once it is gone or
        // moved on (deleted, stopped).
        let with = |f: &dyn Fn(&mut super::SimSandbox)| {
            let Ok(mut map) = sim.sandboxes.lock() else {
                return false;
            };
            match map.get_mut(&id) {
                Some(sb) if matches!(sb.state.as_str(), "pending_build" | "building_snapshot") => {
                    f(sb);
                    true
                }
                _ => false,
            }
        };
        tokio::time::sleep(sim.config.create_delay).await;
        if !with(&|sb| sb.set_state(&sim, "building_snapshot")) {
            return;
        }
        let each = delay / (steps.len() as u32 + 1);
        for (i, step) in steps.iter().enumerate() {
            let line = format!("Step {}/{} : {step}", i + 1, steps.len());
            if !with(&|sb| sb.build_log.push(line.clone())) {
                return;
            }
            tokio::time::sleep(each).await;
        }
        tokio::time::sleep(each).await;
        let mut generation = None;
        with(&|sb| match &failure {
            Some(reason) => {
                sb.build_log.push(format!("ERROR: {reason}"));
                sb.error_reason = Some(reason.clone());
                sb.set_state(&sim, "build_failed");
            }
            None => {
                sb.build_log.push(format!(
                    "Successfully built {}",
                    &sb.id[..12.min(sb.id.len())]
                ));
                sb.set_state(&sim, "starting");
            }
        });
        if failure.is_none()
            && let Ok(map) = sim.sandboxes.lock()
        {
            generation = map.get(&id).map(|sb| sb.generation);
        }
        if let Some(g) = generation {
            schedule(&sim, id, g, sim.config.start_delay, "started", None);
        }
    });
}

/// `GET /sandbox/{id}/build-logs[?follow=true]`: the build of a sandbox made from a
/// declarative image; following, each line as it is printed until the build ends.
pub(super) async fn sandbox_build_logs(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let follow = super::query_pairs(&raw)
        .iter()
        .any(|(k, v)| k == "follow" && v == "true");
    let key = {
        let map = lock(&sim.sandboxes)?;
        let key = super::find_id(&map, &id).ok_or_else(|| super::not_found(&id))?;
        if map.get(&key).is_some_and(|sb| sb.build_info.is_none()) {
            return Err(ApiError::bad_request(format!(
                "Sandbox {id} was made from a snapshot, not built from an image: it has no \
                 build logs"
            )));
        }
        key
    };
    let read = move |sim: &Sim, from: usize| -> Option<(Vec<String>, bool)> {
        let map = sim.sandboxes.lock().ok()?;
        let sb = map.get(&key)?;
        let building = matches!(sb.state.as_str(), "pending_build" | "building_snapshot");
        Some((sb.build_log.iter().skip(from).cloned().collect(), !building))
    };
    Ok(super::build_log_answer(sim, follow, read))
}

/// `GET /sandbox/{id}/build-logs-url`.
pub(super) async fn sandbox_build_logs_url(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> ApiResult {
    let map = lock(&sim.sandboxes)?;
    let key = super::find_id(&map, &id).ok_or_else(|| super::not_found(&id))?;
    Ok(Json(
        json!({ "url": format!("{}/api/sandbox/{key}/build-logs", sim.base_url) }),
    ))
}
