//! `/api/sandbox`: create, get, list, start, stop, delete, labels, intervals, network,
//! activity, and the auto-stop of idle sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    ApiResult, SimSandbox, build_info, dockerfile_error, find_id, lock, not_found, query_pairs,
    schedule, uuid, with_sandbox,
};
use crate::clock::now_ms;
use crate::sandbox::EngineState;
use crate::sim::{ApiError, ApiJson, Principal, Sim};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct CreateSandbox {
    name: Option<String>,
    snapshot: Option<String>,
    user: Option<String>,
    env: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
    public: Option<bool>,
    network_block_all: Option<bool>,
    network_allow_list: Option<String>,
    domain_allow_list: Option<String>,
    target: Option<String>,
    cpu: Option<i64>,
    gpu: Option<i64>,
    memory: Option<i64>,
    disk: Option<i64>,
    auto_stop_interval: Option<i64>,
    auto_archive_interval: Option<i64>,
    auto_delete_interval: Option<i64>,
    build_info: Option<Value>,
}

pub(super) async fn create_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Json<Value>, ApiError> {
    who.require("write:sandboxes")?;
    let has_resources =
        req.cpu.is_some() || req.memory.is_some() || req.disk.is_some() || req.gpu.is_some();
    if req.snapshot.is_some() && req.build_info.is_some() {
        return Err(ApiError::bad_request(
            "Cannot specify both snapshot and buildInfo",
        ));
    }
    if req.snapshot.is_some() && has_resources {
        return Err(ApiError::bad_request(
            "Cannot specify Sandbox resources when using a snapshot",
        ));
    }
    for (what, v) in [
        ("cpu", req.cpu),
        ("gpu", req.gpu),
        ("memory", req.memory),
        ("disk", req.disk),
    ] {
        if v.is_some_and(|n| n < 0) {
            return Err(ApiError::bad_request(format!(
                "{what} must not be negative"
            )));
        }
    }
    let mut resources = (1, 0, 1, 3);
    let mut build_failed = None;
    if let Some(name) = &req.snapshot {
        let snaps = lock(&sim.snapshots)?;
        let snap = snaps
            .values()
            .find(|s| &s.name == name || &s.id == name)
            .ok_or_else(|| ApiError::not_found(format!("Snapshot {name} not found")))?;
        if snap.state != "active" {
            return Err(ApiError::bad_request(format!(
                "Snapshot {name} is {}: only active snapshots can be used",
                snap.state
            )));
        }
        resources = (snap.cpu, snap.gpu, snap.mem, snap.disk);
    }
    if let Some(bi) = &req.build_info {
        let text = bi
            .get("dockerfileContent")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("buildInfo.dockerfileContent must be a string"))?;
        build_failed = dockerfile_error(text);
    }
    let resources = (
        req.cpu.unwrap_or(resources.0),
        req.gpu.unwrap_or(resources.1),
        req.memory.unwrap_or(resources.2),
        req.disk.unwrap_or(resources.3),
    );
    let id = uuid();
    let name = req
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| id.clone());
    let user = req
        .user
        .clone()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "daytona".into());
    if user.contains('/') || user == "." || user == ".." {
        return Err(ApiError::bad_request(format!("invalid user {user:?}")));
    }
    let stuck = lock(&sim.faults)?.stuck_create;
    let now = now_ms();
    let sb = {
        let mut map = lock(&sim.sandboxes)?;
        if let Some(e) = sim.quota_error(&map, None, resources.0, resources.2, resources.3) {
            return Err(e);
        }
        if find_id(&map, &name).is_some() {
            return Err(ApiError::conflict(format!(
                "Sandbox with name {name} already exists"
            )));
        }
        let labels = req.labels.clone().unwrap_or_default();
        sim.engine
            .create(
                &id,
                &name,
                labels.clone(),
                req.env.clone().unwrap_or_default(),
                EngineState::Creating,
            )
            .map_err(|e| ApiError::internal(format!("creating the sandbox folder: {e}")))?;
        let fs = sim.engine.dir(&id).join("fs");
        for dir in [fs.join("home").join(&user), fs.join("tmp")] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        }
        let sb = SimSandbox {
            id: id.clone(),
            name,
            snapshot: req.snapshot.clone(),
            user,
            env: req.env.unwrap_or_default(),
            labels,
            public: req.public.unwrap_or(false),
            network_block_all: req.network_block_all.unwrap_or(false),
            network_allow_list: req.network_allow_list,
            domain_allow_list: req.domain_allow_list,
            target: req.target.unwrap_or_else(|| "us".into()),
            cpu: resources.0,
            gpu: resources.1,
            memory: resources.2,
            disk: resources.3,
            // Built from an image: the build comes first, as on Daytona.
            state: if req.build_info.is_some() {
                "pending_build".into()
            } else {
                "creating".into()
            },
            desired_state: "started".into(),
            error_reason: None,
            build_log: Vec::new(),
            auto_stop_interval: req.auto_stop_interval.unwrap_or(15),
            auto_archive_interval: req.auto_archive_interval.unwrap_or(7 * 24 * 60),
            auto_delete_interval: req.auto_delete_interval.unwrap_or(-1),
            created_ms: now,
            updated_ms: now,
            last_activity_ms: now,
            build_info: req
                .build_info
                .as_ref()
                .map(|b| build_info(b, &format!("sim-build-{id}"), now)),
            procs: CancellationToken::new(),
            generation: 0,
        };
        map.insert(id.clone(), sb.clone());
        sim.events.emit("sandbox.created", sb.to_json(&sim, false));
        sb
    };
    // On disk before the answer: a sim killed right after still knows it whole.
    sim.flush_state().await;
    if stuck {
        return Ok(Json(sb.to_json(&sim, true)));
    }
    match &req.build_info {
        Some(bi) => {
            let dockerfile = bi
                .get("dockerfileContent")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            super::lifecycle::spawn_build(&sim, id, dockerfile, build_failed);
        }
        None => schedule(
            &sim,
            id,
            sb.generation,
            sim.config.create_delay,
            "starting",
            Some((sim.config.start_delay, "started")),
        ),
    }
    Ok(Json(sb.to_json(&sim, true)))
}

pub(super) async fn get_sandbox(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> ApiResult {
    with_sandbox(&sim, &id, |_| Ok(()))
}

pub(super) async fn list_sandboxes(
    State(sim): State<Arc<Sim>>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let one = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let limit = match one("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be a whole number from 1 to 200"))?,
        None => 100,
    };
    let offset = match one("cursor").filter(|c| !c.is_empty()) {
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("invalid cursor"))?,
        None => 0,
    };
    let labels: BTreeMap<String, String> = match one("labels").filter(|l| !l.is_empty()) {
        Some(l) => serde_json::from_str(&l).map_err(|e| {
            ApiError::bad_request(format!("labels must be a JSON object of strings: {e}"))
        })?,
        None => BTreeMap::new(),
    };
    let states: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "states" || k == "states[]")
        .map(|(_, v)| v.clone())
        .collect();
    let name = one("name");
    let map = lock(&sim.sandboxes)?;
    let mut all: Vec<&SimSandbox> = map
        .values()
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .filter(|s| states.is_empty() || states.contains(&s.state))
        .filter(|s| name.as_ref().is_none_or(|n| s.name.starts_with(n.as_str())))
        .collect();
    all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|s| s.to_json(&sim, false))
        .collect();
    let next = (offset + limit < all.len()).then(|| (offset + limit).to_string());
    Ok(Json(json!({ "items": page, "nextCursor": next })))
}

pub(super) async fn delete_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("delete:sandboxes")?;
    let (json, key) = {
        let mut map = lock(&sim.sandboxes)?;
        let key = find_id(&map, &id).ok_or_else(|| not_found(&id))?;
        let sb = map.get_mut(&key).ok_or_else(|| not_found(&id))?;
        if matches!(sb.state.as_str(), "starting" | "stopping") {
            return Err(ApiError::conflict(format!(
                "Sandbox {id} is {}: a state change is in progress, retry shortly",
                sb.state
            )));
        }
        if sb.state != "destroying" {
            sb.procs.cancel();
            sb.set_state(&sim, "destroying");
            sb.desired_state = "destroyed".into();
        }
        (sb.to_json(&sim, true), key)
    };
    sim.sessions.drop_sandbox(&key);
    // The name is free at once (the folder goes after the destroying delay).
    let _ = sim
        .engine
        .update(&key, |m| m.name = format!("{}.destroying", m.id));
    let sim2 = sim.clone();
    let delay = sim.jittered(sim.config.stop_delay);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Ok(mut map) = sim2.sandboxes.lock()
            && let Some(mut sb) = map.remove(&key)
        {
            sb.set_state(&sim2, "destroyed");
        }
        let _ = sim2.engine.delete(&key);
        if let Ok(mut t) = sim2.ssh_tokens.lock() {
            t.retain(|_, v| v.sandbox_id != key);
        }
    });
    Ok(Json(json))
}

pub(super) async fn start_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let json = {
        let mut map = lock(&sim.sandboxes)?;
        let key = find_id(&map, &id).ok_or_else(|| not_found(&id))?;
        let (state, cpu, memory, disk) = map
            .get(&key)
            .map(|s| (s.state.clone(), s.cpu, s.memory, s.disk))
            .ok_or_else(|| not_found(&id))?;
        // Coming back (not `paused`: its resources were never given up) must fit the quota.
        if matches!(state.as_str(), "stopped" | "archived")
            && let Some(e) = sim.quota_error(&map, Some(&key), cpu, memory, disk)
        {
            return Err(e);
        }
        let sb = map.get_mut(&key).ok_or_else(|| not_found(&id))?;
        match state.as_str() {
            "started" | "starting" | "resuming" => {}
            "stopped" | "archived" => {
                sb.set_state(&sim, "starting");
                sb.desired_state = "started".into();
                sb.procs = CancellationToken::new();
                // An archived sandbox's files come back from storage first.
                let delay = match state.as_str() {
                    "archived" => sim.config.start_delay * 2,
                    _ => sim.config.start_delay,
                };
                scheduled = Some((sb.id.clone(), sb.generation, delay));
            }
            "paused" => {
                super::lifecycle::signal_sandbox(&sb.id, nix::sys::signal::Signal::SIGCONT);
                sb.set_state(&sim, "resuming");
                sb.desired_state = "started".into();
                scheduled = Some((sb.id.clone(), sb.generation, sim.config.start_delay));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "Sandbox {id} cannot be started while {other}"
                )));
            }
        }
        sb.last_activity_ms = now_ms();
        sb.to_json(&sim, true)
    };
    if let Some((sid, generation, delay)) = scheduled {
        schedule(&sim, sid, generation, delay, "started", None);
    }
    Ok(Json(json))
}

/// Stops a sandbox: `stopping`, its processes ended, then `stopped`.
pub(super) fn stop_now(sim: &Arc<Sim>, sb: &mut SimSandbox) -> Option<(String, u64)> {
    if sb.state == "paused" {
        // Frozen processes cannot act on SIGTERM: thaw them, then end them.
        super::lifecycle::signal_sandbox(&sb.id, nix::sys::signal::Signal::SIGCONT);
    } else if sb.state != "started" {
        return None;
    }
    sb.procs.cancel();
    sb.set_state(sim, "stopping");
    sb.desired_state = "stopped".into();
    sim.sessions.drop_sandbox(&sb.id);
    Some((sb.id.clone(), sb.generation))
}

pub(super) async fn stop_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let r = with_sandbox(&sim, &id, |sb| match sb.state.as_str() {
        "stopped" | "stopping" => Ok(()),
        "started" | "paused" => {
            scheduled = stop_now(&sim, sb);
            Ok(())
        }
        other => Err(ApiError::bad_request(format!(
            "Sandbox {id} cannot be stopped while {other}"
        ))),
    });
    if let Some((sid, generation)) = scheduled {
        schedule(
            &sim,
            sid,
            generation,
            sim.config.stop_delay,
            "stopped",
            None,
        );
    }
    r
}

#[derive(Deserialize)]
pub(super) struct LabelsBody {
    labels: BTreeMap<String, String>,
}

pub(super) async fn put_labels(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<LabelsBody>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let labels = body.labels;
    let _ = with_sandbox(&sim, &id, |sb| {
        sb.labels = labels.clone();
        sb.updated_ms = now_ms();
        Ok(())
    })?;
    let _ = sim.engine.update(&id, |m| m.labels = labels.clone());
    Ok(Json(json!({ "labels": labels })))
}

pub(super) async fn set_interval(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    uri: axum::http::Uri,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let n: i64 = n.parse().map_err(|_| {
        ApiError::bad_request(format!("interval {n:?} must be a whole number of minutes"))
    })?;
    let path = uri.path().to_string();
    with_sandbox(&sim, &id, |sb| {
        if path.contains("/autostop/") {
            if n < 0 {
                return Err(ApiError::bad_request(
                    "autoStopInterval must not be negative",
                ));
            }
            sb.auto_stop_interval = n;
        } else if path.contains("/autoarchive/") {
            sb.auto_archive_interval = n;
        } else if path.contains("/autodelete/") {
            sb.auto_delete_interval = n;
        }
        sb.updated_ms = now_ms();
        Ok(())
    })
}

pub(super) async fn set_public(
    State(sim): State<Arc<Sim>>,
    Path((id, b)): Path<(String, String)>,
) -> ApiResult {
    let public: bool = b
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{b:?} is not true or false")))?;
    with_sandbox(&sim, &id, |sb| {
        sb.public = public;
        Ok(())
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct NetworkSettings {
    network_block_all: Option<bool>,
    network_allow_list: Option<String>,
    domain_allow_list: Option<String>,
}

pub(super) async fn network_settings(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NetworkSettings>,
) -> ApiResult {
    with_sandbox(&sim, &id, |sb| {
        if let Some(b) = body.network_block_all {
            sb.network_block_all = b;
        }
        if body.network_allow_list.is_some() {
            sb.network_allow_list = body.network_allow_list.clone();
        }
        if body.domain_allow_list.is_some() {
            sb.domain_allow_list = body.domain_allow_list.clone();
        }
        Ok(())
    })
}

pub(super) async fn last_activity(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _ = with_sandbox(&sim, &id, |sb| {
        sb.last_activity_ms = now_ms();
        Ok(())
    })?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn toolbox_proxy_url(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> ApiResult {
    let _ = with_sandbox(&sim, &id, |_| Ok(()))?;
    Ok(Json(json!({ "url": format!("{}/toolbox", sim.base_url) })))
}

/// Pushes a sandbox into `error` (the `sandbox_error` fault).
pub fn force_error(sim: &Sim, id: &str, reason: &str) -> Result<(), ApiError> {
    with_sandbox(sim, id, |sb| {
        sb.procs.cancel();
        sb.set_state(sim, "error");
        sb.error_reason = Some(reason.to_string());
        Ok(())
    })
    .map(|_| ())
}

/// Stops started sandboxes idle past their auto-stop interval (in scaled time).
pub fn spawn_auto_stop(sim: Arc<Sim>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = sim.shutdown.cancelled() => return,
            }
            let now = now_ms();
            let mut to_schedule = Vec::new();
            if let Ok(mut map) = sim.sandboxes.lock() {
                for sb in map.values_mut() {
                    if sb.state != "started" || sb.auto_stop_interval <= 0 {
                        continue;
                    }
                    let idle = Duration::from_millis(now.saturating_sub(sb.last_activity_ms));
                    if idle >= sim.scaled_minutes(sb.auto_stop_interval as f64)
                        && let Some(s) = stop_now(&sim, sb)
                    {
                        to_schedule.push(s);
                    }
                }
            }
            for (id, generation) in to_schedule {
                schedule(&sim, id, generation, sim.config.stop_delay, "stopped", None);
            }
        }
    });
}
