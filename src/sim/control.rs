//! Daytona's control plane over local sandboxes: `/api/sandbox`, `/api/snapshots`, SSH
//! access, `/api/api-keys/current`. States move as Daytona's do, after configurable delays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{ApiError, ApiJson, Principal, Sim, now_rfc3339};
use crate::clock::{now_ms, rfc3339_millis as rfc3339_ms};
use crate::sandbox::EngineState;

type ApiResult = Result<Json<Value>, ApiError>;

/// One sandbox as the sim keeps it.
#[derive(Debug, Clone)]
pub struct SimSandbox {
    pub id: String,
    pub name: String,
    pub snapshot: Option<String>,
    pub user: String,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub public: bool,
    pub network_block_all: bool,
    pub network_allow_list: Option<String>,
    pub domain_allow_list: Option<String>,
    pub target: String,
    pub cpu: i64,
    pub gpu: i64,
    pub memory: i64,
    pub disk: i64,
    pub state: String,
    pub desired_state: String,
    pub error_reason: Option<String>,
    pub auto_stop_interval: i64,
    pub auto_archive_interval: i64,
    pub auto_delete_interval: i64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub last_activity_ms: u64,
    pub build_info: Option<Value>,
    /// Cancels the sandbox's running processes (stop, delete, error).
    pub procs: CancellationToken,
    /// Bumped at each state change: a delayed move applies only if nothing changed since.
    pub generation: u64,
}

impl SimSandbox {
    /// The `Sandbox` JSON (`full`), or the `SandboxListItem` JSON.
    pub fn to_json(&self, sim: &Sim, full: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "organizationId": sim.config.org,
            "name": self.name,
            "snapshot": self.snapshot,
            "user": self.user,
            "labels": self.labels,
            "public": self.public,
            "networkBlockAll": self.network_block_all,
            "networkAllowList": self.network_allow_list,
            "domainAllowList": self.domain_allow_list,
            "target": self.target,
            "cpu": self.cpu,
            "gpu": self.gpu,
            "memory": self.memory,
            "disk": self.disk,
            "state": self.state,
            "desiredState": self.desired_state,
            "errorReason": self.error_reason,
            "recoverable": false,
            "autoStopInterval": self.auto_stop_interval,
            "autoArchiveInterval": self.auto_archive_interval,
            "autoDeleteInterval": self.auto_delete_interval,
            "createdAt": rfc3339_ms(self.created_ms),
            "updatedAt": rfc3339_ms(self.updated_ms),
            "lastActivityAt": rfc3339_ms(self.last_activity_ms),
            "runnerId": "sim-runner",
            "sandboxClass": "small",
            "daemonVersion": env!("CARGO_PKG_VERSION"),
            "toolboxProxyUrl": format!("{}/toolbox", sim.base_url),
        });
        if full {
            v["env"] = json!(self.env);
            v["kvm"] = json!(false);
            v["volumes"] = json!([]);
            v["buildInfo"] = self.build_info.clone().unwrap_or(Value::Null);
        }
        v
    }

    fn set_state(&mut self, state: &str) {
        self.state = state.to_string();
        self.updated_ms = now_ms();
        self.generation += 1;
    }

    /// The host folder behind the sandbox's `/home` and `/tmp`.
    pub fn fs(&self, sim: &Sim) -> std::path::PathBuf {
        sim.engine.dir(&self.id).join("fs")
    }
}

/// A snapshot as the sim keeps it.
#[derive(Debug, Clone)]
pub struct SimSnapshot {
    pub id: String,
    pub name: String,
    pub image_name: Option<String>,
    pub state: String,
    pub error_reason: Option<String>,
    pub cpu: i64,
    pub gpu: i64,
    pub mem: i64,
    pub disk: i64,
    pub entrypoint: Option<Vec<String>>,
    pub build_info: Option<Value>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl SimSnapshot {
    fn to_json(&self, sim: &Sim) -> Value {
        json!({
            "id": self.id,
            "organizationId": sim.config.org,
            "general": false,
            "name": self.name,
            "imageName": self.image_name,
            "state": self.state,
            "size": null,
            "entrypoint": self.entrypoint,
            "cpu": self.cpu,
            "gpu": self.gpu,
            "mem": self.mem,
            "disk": self.disk,
            "errorReason": self.error_reason,
            "createdAt": rfc3339_ms(self.created_ms),
            "updatedAt": rfc3339_ms(self.updated_ms),
            "lastUsedAt": null,
            "buildInfo": self.build_info,
        })
    }

    /// An active snapshot registered at start (`--snapshot NAME`).
    pub fn preloaded(name: &str) -> SimSnapshot {
        let now = now_ms();
        SimSnapshot {
            id: uuid(),
            name: name.to_string(),
            image_name: Some(format!("{name}:sim")),
            state: "active".into(),
            error_reason: None,
            cpu: 1,
            gpu: 0,
            mem: 1,
            disk: 3,
            entrypoint: None,
            build_info: None,
            created_ms: now,
            updated_ms: now,
        }
    }
}

/// An SSH access token.
#[derive(Debug, Clone)]
pub struct SshToken {
    pub id: String,
    pub sandbox_id: String,
    pub expires_ms: u64,
    pub created_ms: u64,
}

/// A random UUID (v4 layout).
pub fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub fn router() -> Router<Arc<Sim>> {
    Router::new()
        .route("/sandbox", post(create_sandbox).get(list_sandboxes))
        .route("/sandbox/ssh-access/validate", get(validate_ssh))
        .route("/sandbox/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandbox/{id}/start", post(start_sandbox))
        .route("/sandbox/{id}/stop", post(stop_sandbox))
        .route("/sandbox/{id}/labels", put(put_labels))
        .route("/sandbox/{id}/autostop/{n}", post(set_interval))
        .route("/sandbox/{id}/autoarchive/{n}", post(set_interval))
        .route("/sandbox/{id}/autodelete/{n}", post(set_interval))
        .route("/sandbox/{id}/autopause/{n}", post(set_interval))
        .route("/sandbox/{id}/ttl/{n}", post(set_interval))
        .route("/sandbox/{id}/public/{b}", post(set_public))
        .route("/sandbox/{id}/network-settings", post(network_settings))
        .route("/sandbox/{id}/last-activity", post(last_activity))
        .route("/sandbox/{id}/toolbox-proxy-url", get(toolbox_proxy_url))
        .route(
            "/sandbox/{id}/ssh-access",
            post(create_ssh).delete(revoke_ssh),
        )
        .route("/snapshots", post(create_snapshot).get(list_snapshots))
        .route("/snapshots/{id}", get(get_snapshot).delete(delete_snapshot))
        .route("/api-keys/current", get(current_key))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, ApiError> {
    m.lock()
        .map_err(|_| ApiError::internal("state lock poisoned"))
}

/// Finds a live (not yet removed) sandbox by id or name; `destroying` ones only by id.
fn find_id(
    map: &std::collections::HashMap<String, SimSandbox>,
    id_or_name: &str,
) -> Option<String> {
    if map.contains_key(id_or_name) {
        return Some(id_or_name.to_string());
    }
    map.values()
        .find(|s| s.name == id_or_name && s.state != "destroying")
        .map(|s| s.id.clone())
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Sandbox with ID or name {id} not found"))
}

/// Runs `f` on the sandbox, answers its JSON.
fn with_sandbox(
    sim: &Sim,
    id: &str,
    f: impl FnOnce(&mut SimSandbox) -> Result<(), ApiError>,
) -> ApiResult {
    let mut map = lock(&sim.sandboxes)?;
    let key = find_id(&map, id).ok_or_else(|| not_found(id))?;
    let sb = map.get_mut(&key).ok_or_else(|| not_found(id))?;
    f(sb)?;
    Ok(Json(sb.to_json(sim, true)))
}

/// After `delay`, moves the sandbox to `to` if it is still at `generation`; then runs `then`.
fn schedule(
    sim: &Arc<Sim>,
    id: String,
    generation: u64,
    delay: Duration,
    to: &'static str,
    then: Option<(Duration, &'static str)>,
) {
    let sim = sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let next_gen = {
            let Ok(mut map) = sim.sandboxes.lock() else {
                return;
            };
            let Some(sb) = map.get_mut(&id) else { return };
            if sb.generation != generation {
                return;
            }
            sb.set_state(to);
            if to == "started" {
                sb.last_activity_ms = now_ms();
            }
            sb.generation
        };
        let _ = sim.engine.update(&id, |m| {
            m.state = match to {
                "started" => EngineState::Started,
                "stopped" => EngineState::Stopped,
                _ => m.state,
            }
        });
        if let Some((d, next)) = then {
            schedule(&sim, id, next_gen, d, next, None);
        }
    });
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct CreateSandbox {
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

/// The `BuildInfo` Daytona answers for a create request's `buildInfo`.
fn build_info(requested: &Value, snapshot_ref: &str, ms: u64) -> Value {
    json!({
        "dockerfileContent": requested.get("dockerfileContent").cloned().unwrap_or(Value::Null),
        "contextHashes": requested.get("contextHashes").cloned().unwrap_or_else(|| json!([])),
        "createdAt": rfc3339_ms(ms),
        "updatedAt": rfc3339_ms(ms),
        "snapshotRef": snapshot_ref,
    })
}

fn dockerfile_error(text: &str) -> Option<String> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let word = first
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    if word == "FROM" || word == "ARG" {
        None
    } else {
        Some(format!(
            "Dockerfile parse error: the first instruction must be FROM, found {first:?}"
        ))
    }
}

async fn create_sandbox(
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
            state: if build_failed.is_some() {
                "build_failed".into()
            } else {
                "creating".into()
            },
            desired_state: "started".into(),
            error_reason: build_failed.clone(),
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
        sb
    };
    if build_failed.is_none() && !stuck {
        schedule(
            &sim,
            id,
            sb.generation,
            sim.config.create_delay,
            "starting",
            Some((sim.config.start_delay, "started")),
        );
    }
    Ok(Json(sb.to_json(&sim, true)))
}

async fn get_sandbox(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> ApiResult {
    with_sandbox(&sim, &id, |_| Ok(()))
}

/// Query pairs, repeated keys kept.
fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    raw.as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn list_sandboxes(State(sim): State<Arc<Sim>>, RawQuery(raw): RawQuery) -> ApiResult {
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

async fn delete_sandbox(
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
            sb.set_state("destroying");
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
    let delay = sim.config.start_delay;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Ok(mut map) = sim2.sandboxes.lock() {
            map.remove(&key);
        }
        let _ = sim2.engine.delete(&key);
        if let Ok(mut t) = sim2.ssh_tokens.lock() {
            t.retain(|_, v| v.sandbox_id != key);
        }
    });
    Ok(Json(json))
}

async fn start_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let r = with_sandbox(&sim, &id, |sb| {
        match sb.state.as_str() {
            "started" | "starting" => {}
            "stopped" => {
                sb.set_state("starting");
                sb.desired_state = "started".into();
                sb.procs = CancellationToken::new();
                scheduled = Some((sb.id.clone(), sb.generation));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "Sandbox {id} cannot be started while {other}"
                )));
            }
        }
        sb.last_activity_ms = now_ms();
        Ok(())
    });
    if let Some((sid, generation)) = scheduled {
        schedule(
            &sim,
            sid,
            generation,
            sim.config.start_delay,
            "started",
            None,
        );
    }
    r
}

/// Stops a sandbox: `stopping`, its processes ended, then `stopped`.
fn stop_now(sim: &Arc<Sim>, sb: &mut SimSandbox) -> Option<(String, u64)> {
    if sb.state != "started" {
        return None;
    }
    sb.procs.cancel();
    sb.set_state("stopping");
    sb.desired_state = "stopped".into();
    sim.sessions.drop_sandbox(&sb.id);
    Some((sb.id.clone(), sb.generation))
}

async fn stop_sandbox(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require("write:sandboxes")?;
    let mut scheduled = None;
    let r = with_sandbox(&sim, &id, |sb| match sb.state.as_str() {
        "stopped" | "stopping" => Ok(()),
        "started" => {
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
            sim.config.start_delay,
            "stopped",
            None,
        );
    }
    r
}

#[derive(Deserialize)]
struct LabelsBody {
    labels: BTreeMap<String, String>,
}

async fn put_labels(
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

async fn set_interval(
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

async fn set_public(
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
struct NetworkSettings {
    network_block_all: Option<bool>,
    network_allow_list: Option<String>,
    domain_allow_list: Option<String>,
}

async fn network_settings(
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

async fn last_activity(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _ = with_sandbox(&sim, &id, |sb| {
        sb.last_activity_ms = now_ms();
        Ok(())
    })?;
    Ok(StatusCode::CREATED)
}

async fn toolbox_proxy_url(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> ApiResult {
    let _ = with_sandbox(&sim, &id, |_| Ok(()))?;
    Ok(Json(json!({ "url": format!("{}/toolbox", sim.base_url) })))
}

/// Pushes a sandbox into `error` (the `sandbox_error` fault).
pub fn force_error(sim: &Sim, id: &str, reason: &str) -> Result<(), ApiError> {
    with_sandbox(sim, id, |sb| {
        sb.procs.cancel();
        sb.set_state("error");
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
                schedule(
                    &sim,
                    id,
                    generation,
                    sim.config.start_delay,
                    "stopped",
                    None,
                );
            }
        }
    });
}

// ---- snapshots ----

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct CreateSnapshot {
    name: Option<String>,
    image_name: Option<String>,
    build_info: Option<Value>,
    entrypoint: Option<Vec<String>>,
    cpu: Option<i64>,
    gpu: Option<i64>,
    memory: Option<i64>,
    disk: Option<i64>,
}

async fn create_snapshot(
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
        };
        snaps.insert(s.id.clone(), s.clone());
        s
    };
    let failure = dockerfile.as_deref().and_then(dockerfile_error);
    let (sim2, id, delay) = (sim.clone(), snap.id.clone(), sim.config.snapshot_delay);
    let middle = if dockerfile.is_some() {
        "building"
    } else {
        "pulling"
    };
    tokio::spawn(async move {
        for (state, reason) in [
            (middle, None),
            (
                if failure.is_some() {
                    "build_failed"
                } else {
                    "active"
                },
                failure,
            ),
        ] {
            tokio::time::sleep(delay).await;
            let Ok(mut snaps) = sim2.snapshots.lock() else {
                return;
            };
            let Some(s) = snaps.get_mut(&id) else { return };
            s.state = state.to_string();
            s.error_reason = reason;
            s.updated_ms = now_ms();
        }
    });
    Ok(Json(snap.to_json(&sim)))
}

async fn get_snapshot(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> ApiResult {
    let snaps = lock(&sim.snapshots)?;
    let s = snaps
        .values()
        .find(|s| s.id == id || s.name == id)
        .ok_or_else(|| ApiError::not_found(format!("Snapshot {id} not found")))?;
    Ok(Json(s.to_json(&sim)))
}

async fn list_snapshots(State(sim): State<Arc<Sim>>, RawQuery(raw): RawQuery) -> ApiResult {
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

async fn delete_snapshot(
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

// ---- ssh access ----

async fn create_ssh(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let minutes: u64 = match q.iter().find(|(k, _)| k == "expiresInMinutes") {
        Some((_, v)) => v.parse().ok().filter(|m| *m >= 1).ok_or_else(|| {
            ApiError::bad_request("expiresInMinutes must be a whole number of minutes, at least 1")
        })?,
        None => 60,
    };
    let sandbox_id = {
        let map = lock(&sim.sandboxes)?;
        find_id(&map, &id).ok_or_else(|| not_found(&id))?
    };
    let token: String = {
        let b: [u8; 24] = rand::random();
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    let now = now_ms();
    let t = SshToken {
        id: uuid(),
        sandbox_id: sandbox_id.clone(),
        expires_ms: now + minutes * 60_000,
        created_ms: now,
    };
    lock(&sim.ssh_tokens)?.insert(token.clone(), t.clone());
    let command = match sim.config.ssh_port {
        Some(22) | None => format!("ssh {token}@127.0.0.1"),
        Some(p) => format!("ssh -p {p} {token}@127.0.0.1"),
    };
    Ok(Json(json!({
        "id": t.id,
        "sandboxId": sandbox_id,
        "token": token,
        "expiresAt": rfc3339_ms(t.expires_ms),
        "createdAt": rfc3339_ms(now),
        "updatedAt": rfc3339_ms(now),
        "sshCommand": command,
    })))
}

async fn revoke_ssh(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let token = q.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone());
    let sandbox_id = {
        let map = lock(&sim.sandboxes)?;
        find_id(&map, &id).ok_or_else(|| not_found(&id))?
    };
    let mut tokens = lock(&sim.ssh_tokens)?;
    match token {
        Some(t) => {
            tokens.retain(|k, v| !(k == &t && v.sandbox_id == sandbox_id));
        }
        None => tokens.retain(|_, v| v.sandbox_id != sandbox_id),
    }
    drop(tokens);
    with_sandbox(&sim, &sandbox_id, |_| Ok(()))
}

/// Is this token valid now? Answers its sandbox id.
pub fn check_token(sim: &Sim, token: &str) -> Option<String> {
    let tokens = sim.ssh_tokens.lock().ok()?;
    let t = tokens.get(token)?;
    (t.expires_ms > now_ms()).then(|| t.sandbox_id.clone())
}

async fn validate_ssh(State(sim): State<Arc<Sim>>, RawQuery(raw): RawQuery) -> ApiResult {
    let q = query_pairs(&raw);
    let token = q
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| ApiError::bad_request("token is required"))?;
    let sandbox = check_token(&sim, &token);
    Ok(Json(
        json!({ "valid": sandbox.is_some(), "sandboxId": sandbox.unwrap_or_default() }),
    ))
}

async fn current_key(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
) -> ApiResult {
    let masked = if who.token.len() > 6 {
        format!(
            "{}{}",
            &who.token[..3],
            "*".repeat(who.token.len().min(40) - 3)
        )
    } else {
        "******".into()
    };
    Ok(Json(json!({
        "name": who.key_name,
        "value": masked,
        "createdAt": rfc3339_ms(now_ms().saturating_sub(sim.started.elapsed().as_millis() as u64)),
        "permissions": who.permissions,
        "lastUsedAt": now_rfc3339(),
        "expiresAt": null,
        "userId": "sim-user",
        "organizationId": sim.config.org,
    })))
}
