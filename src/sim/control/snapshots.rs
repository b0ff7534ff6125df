//! `/api/snapshots`: images pulled or built from a Dockerfile, as Daytona moves them.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, SimSnapshot, build_info, dockerfile_error, lock, query_pairs, uuid};
use crate::clock::now_ms;
use crate::sim::{ApiError, ApiJson, Principal, Sim};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct CreateSnapshot {
    name: Option<String>,
    image_name: Option<String>,
    build_info: Option<Value>,
    entrypoint: Option<Vec<String>>,
    cpu: Option<i64>,
    gpu: Option<i64>,
    memory: Option<i64>,
    disk: Option<i64>,
}

pub(super) async fn create_snapshot(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> ApiResult {
    who.require("write:snapshots")?;
    let name = req
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let dockerfile = match &req.build_info {
        Some(bi) => Some(
            bi.get("dockerfileContent")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad_request("buildInfo.dockerfileContent must be a string")
                })?
                .to_string(),
        ),
        None => None,
    };
    match (&req.image_name, &dockerfile) {
        (None, None) => {
            return Err(ApiError::bad_request(
                "either imageName or buildInfo is required",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "imageName and buildInfo cannot be used together",
            ));
        }
        (Some(image), None) => {
            let tag = image
                .rsplit_once(':')
                .map(|(_, t)| t)
                .filter(|t| !t.contains('/'));
            match tag {
                Some("latest") => {
                    return Err(ApiError::bad_request(
                        "Images with tag latest are not allowed: pin a version (for example python:3.12)",
                    ));
                }
                None => {
                    return Err(ApiError::bad_request(
                        "Image must include a tag (for example python:3.12)",
                    ));
                }
                Some(_) => {}
            }
        }
        (None, Some(_)) => {}
    }
    let now = now_ms();
    let snap = {
        let mut snaps = lock(&sim.snapshots)?;
        if snaps.values().any(|s| s.name == name) {
            return Err(ApiError::conflict(format!(
                "Snapshot with name {name} already exists"
            )));
        }
        let id = uuid();
        let s = SimSnapshot {
            build_info: req
                .build_info
                .as_ref()
                .map(|b| build_info(b, &format!("sim-snapshot-{id}"), now)),
            id,
            name,
            image_name: req.image_name.clone(),
            state: "pending".into(),
            error_reason: None,
            cpu: req.cpu.unwrap_or(1),
            gpu: req.gpu.unwrap_or(0),
            mem: req.memory.unwrap_or(1),
            disk: req.disk.unwrap_or(3),
            entrypoint: req.entrypoint.clone(),
            created_ms: now,
            updated_ms: now,
            build_log: Vec::new(),
        };
        snaps.insert(s.id.clone(), s.clone());
        s
    };
    let failure = dockerfile.as_deref().and_then(dockerfile_error);
    let (sim2, id, delay) = (
        sim.clone(),
        snap.id.clone(),
        sim.jittered(sim.config.snapshot_delay),
    );
    let middle = if dockerfile.is_some() {
        "building"
    } else {
        "pulling"
    };
    // The build's log as docker prints it: a step per instruction, spread over the
    // building time, then the outcome.
    let steps: Vec<String> = dockerfile
        .as_deref()
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    tokio::spawn(async move {
        let set = |f: &dyn Fn(&mut SimSnapshot)| {
            let Ok(mut snaps) = sim2.snapshots.lock() else {
                return false;
            };
            let Some(s) = snaps.get_mut(&id) else {
                return false;
            };
            f(s);
            s.updated_ms = now_ms();
            true
        };
        tokio::time::sleep(delay).await;
        if !set(&|s| s.state = middle.to_string()) {
            return;
        }
        let each = delay / (steps.len() as u32 + 1);
        for (i, step) in steps.iter().enumerate() {
            let line = format!("Step {}/{} : {step}", i + 1, steps.len());
            if !set(&|s| s.build_log.push(line.clone())) {
                return;
            }
            tokio::time::sleep(each).await;
        }
        tokio::time::sleep(each).await;
        set(&|s| {
            match &failure {
                Some(reason) => {
                    s.build_log.push(format!("ERROR: {reason}"));
                    s.state = "build_failed".into();
                }
                None => {
                    if !steps.is_empty() {
                        s.build_log.push(format!(
                            "Successfully built {}",
                            &s.id[..12.min(s.id.len())]
                        ));
                    }
                    s.state = "active".into();
                }
            }
            s.error_reason = failure.clone();
        });
    });
    Ok(Json(snap.to_json(&sim)))
}

pub(super) async fn get_snapshot(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> ApiResult {
    let snaps = lock(&sim.snapshots)?;
    let s = snaps
        .values()
        .find(|s| s.id == id || s.name == id)
        .ok_or_else(|| ApiError::not_found(format!("Snapshot {id} not found")))?;
    Ok(Json(s.to_json(&sim)))
}

/// `GET /snapshots/{id}/build-logs-url`: where the build log is read (`?follow=true`).
pub(super) async fn build_logs_url(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> ApiResult {
    let snaps = lock(&sim.snapshots)?;
    let s = snaps
        .values()
        .find(|s| s.id == id || s.name == id)
        .ok_or_else(|| ApiError::not_found(format!("Snapshot {id} not found")))?;
    Ok(Json(
        json!({ "url": format!("{}/api/snapshots/{}/build-logs", sim.base_url, s.id) }),
    ))
}

/// `GET /snapshots/{id}/build-logs[?follow=true]`: the build's log as text; following, it
/// streams each line as it is printed until the build ends.
pub(super) async fn build_logs(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let follow = query_pairs(&raw)
        .iter()
        .any(|(k, v)| k == "follow" && v == "true");
    let key = {
        let snaps = lock(&sim.snapshots)?;
        snaps
            .values()
            .find(|s| s.id == id || s.name == id)
            .map(|s| s.id.clone())
            .ok_or_else(|| ApiError::not_found(format!("Snapshot {id} not found")))?
    };
    let read = move |sim: &Sim, from: usize| -> Option<(Vec<String>, bool)> {
        let snaps = sim.snapshots.lock().ok()?;
        let s = snaps.get(&key)?;
        Some((
            s.build_log.iter().skip(from).cloned().collect(),
            s.settled(),
        ))
    };
    Ok(super::build_log_answer(sim, follow, read))
}

pub(super) async fn list_snapshots(
    State(sim): State<Arc<Sim>>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let one = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let page: usize = one("page")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p >= 1)
        .unwrap_or(1);
    let limit: usize = one("limit")
        .and_then(|p| p.parse().ok())
        .filter(|p| (1..=200).contains(p))
        .unwrap_or(100);
    let name = one("name");
    let snaps = lock(&sim.snapshots)?;
    let mut all: Vec<&SimSnapshot> = snaps
        .values()
        .filter(|s| name.as_ref().is_none_or(|n| s.name.contains(n.as_str())))
        .collect();
    all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    let total = all.len();
    let items: Vec<Value> = all
        .iter()
        .skip((page - 1) * limit)
        .take(limit)
        .map(|s| s.to_json(&sim))
        .collect();
    Ok(Json(json!({
        "items": items,
        "total": total,
        "page": page,
        "totalPages": total.div_ceil(limit).max(1),
    })))
}

pub(super) async fn delete_snapshot(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require("delete:snapshots")?;
    let mut snaps = lock(&sim.snapshots)?;
    let key = snaps
        .values()
        .find(|s| s.id == id || s.name == id)
        .map(|s| s.id.clone())
        .ok_or_else(|| ApiError::not_found(format!("Snapshot {id} not found")))?;
    snaps.remove(&key);
    Ok(StatusCode::OK)
}
