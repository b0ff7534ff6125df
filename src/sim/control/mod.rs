//! Daytona's control plane over local sandboxes: `/api/sandbox`, `/api/snapshots`, SSH
//! access, `/api/api-keys/current`. States move as Daytona's do, after configurable delays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{ApiError, Sim};
use crate::clock::{now_ms, rfc3339_millis as rfc3339_ms};
use crate::sandbox::EngineState;

type ApiResult = Result<Json<Value>, ApiError>;

/// One sandbox as the sim keeps it (and persists: [`crate::sim::persist`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// What the build of a sandbox made from an image printed so far.
    #[serde(default)]
    pub build_log: Vec<String>,
    /// Cancels the sandbox's running processes (stop, delete, error).
    #[serde(skip)]
    pub procs: CancellationToken,
    /// Bumped at each state change: a delayed move applies only if nothing changed since.
    #[serde(skip)]
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

    /// Moves the sandbox to `state`, telling the events channel.
    pub(super) fn set_state(&mut self, sim: &Sim, state: &str) {
        let old = std::mem::replace(&mut self.state, state.to_string());
        self.updated_ms = now_ms();
        self.generation += 1;
        sim.events.emit(
            "sandbox.state.updated",
            json!({ "sandbox": self.to_json(sim, false), "oldState": old, "newState": state }),
        );
    }

    /// A sandbox found only as a folder at start (its create was cut short before the
    /// state was saved): what its folder says, `stopped`, the default resources.
    pub fn adopted(sim: &Sim, meta: &crate::sandbox::SandboxMeta) -> SimSandbox {
        let home = sim.engine.dir(&meta.id).join("fs").join("home");
        let user = std::fs::read_dir(&home)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| e.file_name().to_str().map(str::to_string))
            .unwrap_or_else(|| "daytona".into());
        let now = now_ms();
        SimSandbox {
            id: meta.id.clone(),
            name: meta.name.clone(),
            snapshot: None,
            user,
            env: meta.env.clone(),
            labels: meta.labels.clone(),
            public: false,
            network_block_all: false,
            network_allow_list: None,
            domain_allow_list: None,
            target: "us".into(),
            cpu: 1,
            gpu: 0,
            memory: 1,
            disk: 3,
            state: "stopped".into(),
            desired_state: "stopped".into(),
            error_reason: None,
            auto_stop_interval: 15,
            auto_archive_interval: 10080,
            auto_delete_interval: -1,
            created_ms: meta.created_at_ms,
            updated_ms: now,
            last_activity_ms: now,
            build_info: None,
            build_log: Vec::new(),
            procs: CancellationToken::new(),
            generation: 0,
        }
    }

    /// The host folder behind the sandbox's `/home` and `/tmp`.
    pub fn fs(&self, sim: &Sim) -> std::path::PathBuf {
        sim.engine.dir(&self.id).join("fs")
    }
}

/// A snapshot as the sim keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// What its build printed so far (`/snapshots/{id}/build-logs`).
    pub build_log: Vec<String>,
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
            build_log: Vec::new(),
        }
    }

    /// Built, failed or gone: its build log will not grow.
    pub fn settled(&self) -> bool {
        matches!(self.state.as_str(), "active" | "error" | "build_failed")
    }
}

/// An SSH access token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

mod access;
mod lifecycle;
pub mod previews;
mod sandboxes;
mod snapshots;

pub use access::check_token;
use access::{create_ssh, current_key, revoke_ssh, validate_ssh};
use sandboxes::{
    create_sandbox, delete_sandbox, get_sandbox, last_activity, list_sandboxes, network_settings,
    put_labels, set_interval, set_public, start_sandbox, stop_sandbox, toolbox_proxy_url,
};
pub use sandboxes::{force_error, spawn_auto_stop};
use snapshots::{
    build_logs, build_logs_url, create_snapshot, delete_snapshot, get_snapshot, list_snapshots,
};

pub fn router() -> Router<Arc<Sim>> {
    Router::new()
        .route("/sandbox", post(create_sandbox).get(list_sandboxes))
        .route("/sandbox/ssh-access/validate", get(validate_ssh))
        .route("/sandbox/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandbox/{id}/start", post(start_sandbox))
        .route("/sandbox/{id}/stop", post(stop_sandbox))
        .route("/sandbox/{id}/pause", post(lifecycle::pause_sandbox))
        .route("/sandbox/{id}/archive", post(lifecycle::archive_sandbox))
        .route("/sandbox/{id}/resize", post(lifecycle::resize_sandbox))
        .route(
            "/sandbox/{id}/build-logs",
            get(lifecycle::sandbox_build_logs),
        )
        .route(
            "/sandbox/{id}/build-logs-url",
            get(lifecycle::sandbox_build_logs_url),
        )
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
        .route(
            "/sandbox/{id}/ports/{port}/preview-url",
            get(previews::preview_url),
        )
        .route(
            "/sandbox/{id}/ports/{port}/signed-preview-url",
            get(previews::signed_preview_url),
        )
        .route(
            "/sandbox/{id}/ports/{port}/signed-preview-url/{token}/expire",
            post(previews::expire_signed),
        )
        .route("/snapshots", post(create_snapshot).get(list_snapshots))
        .route("/snapshots/{id}", get(get_snapshot).delete(delete_snapshot))
        .route("/snapshots/{id}/build-logs", get(build_logs))
        .route("/snapshots/{id}/build-logs-url", get(build_logs_url))
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
    let delay = sim.jittered(delay);
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
            if to == "started" {
                sb.last_activity_ms = now_ms();
            }
            sb.set_state(&sim, to);
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

/// A build's log (a snapshot's, or a sandbox's made from an image) as text: what `read`
/// gives from line 0; with `follow`, each line as it is printed until `read` says the
/// build has settled.
fn build_log_answer(
    sim: Arc<Sim>,
    follow: bool,
    read: impl Fn(&Sim, usize) -> Option<(Vec<String>, bool)> + Clone + Send + Sync + 'static,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let text = |lines: &[String]| -> String { lines.iter().map(|l| format!("{l}\n")).collect() };
    let plain = [(axum::http::header::CONTENT_TYPE, "text/plain")];
    if !follow {
        let (lines, _) = read(&sim, 0).unwrap_or_default();
        return (plain, text(&lines)).into_response();
    }
    let stream = futures_util::stream::unfold((sim, 0usize, false), move |(sim, seen, done)| {
        let read = read.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let (lines, settled) = read(&sim, seen)?;
                if !lines.is_empty() || settled {
                    let n = lines.len();
                    return Some((
                        Ok::<_, std::convert::Infallible>(text(&lines)),
                        (sim, seen + n, settled),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    (plain, axum::body::Body::from_stream(stream)).into_response()
}

/// Query pairs, repeated keys kept.
pub(super) fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    raw.as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The `BuildInfo` Daytona answers for a create request's `buildInfo`.
pub(super) fn build_info(requested: &Value, snapshot_ref: &str, ms: u64) -> Value {
    json!({
        "dockerfileContent": requested.get("dockerfileContent").cloned().unwrap_or(Value::Null),
        "contextHashes": requested.get("contextHashes").cloned().unwrap_or_else(|| json!([])),
        "createdAt": rfc3339_ms(ms),
        "updatedAt": rfc3339_ms(ms),
        "snapshotRef": snapshot_ref,
    })
}

/// Why a Dockerfile cannot build (its first instruction is not FROM or ARG), if it cannot.
pub(super) fn dockerfile_error(text: &str) -> Option<String> {
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
