//! The rest of a sandbox's life on Daytona: pause (its processes frozen) and resume,
//! archive (stopped, then moved to storage), resize, and the build log of a sandbox made
//! from a declarative image.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Response};
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
        if hot && let Some(e) = sim.quota_error(&map, Some(&key), cpu, memory) {
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

/// `GET /sandbox/{id}/build-logs`: the build of a sandbox made from a declarative image,
/// as docker prints it (a step per instruction, then the outcome).
pub(super) async fn sandbox_build_logs(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let map = lock(&sim.sandboxes)?;
    let key = super::find_id(&map, &id).ok_or_else(|| super::not_found(&id))?;
    let sb = map.get(&key).ok_or_else(|| super::not_found(&id))?;
    let Some(info) = &sb.build_info else {
        return Err(ApiError::bad_request(format!(
            "Sandbox {id} was made from a snapshot, not built from an image: it has no build logs"
        )));
    };
    let dockerfile = info
        .get("dockerfileContent")
        .and_then(|d| d.as_str())
        .unwrap_or("");
    let steps: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut text: String = steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("Step {}/{} : {s}\n", i + 1, steps.len()))
        .collect();
    match (&sb.error_reason, sb.state.as_str()) {
        (Some(reason), "build_failed" | "error") => text.push_str(&format!("ERROR: {reason}\n")),
        _ if !steps.is_empty() => text.push_str(&format!(
            "Successfully built {}\n",
            &sb.id[..12.min(sb.id.len())]
        )),
        _ => {}
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain")], text).into_response())
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
