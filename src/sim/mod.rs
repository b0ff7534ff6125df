//! `daytona-sim`: a Daytona-compatible server over local sandboxes, for offline use and
//! tests. It serves Daytona's control plane under `/api` and its toolbox under
//! `/toolbox/{sandboxId}`, with Daytona's status codes and error bodies, API-key and
//! JWT + organisation auth, key permissions, and scriptable faults (`/_sim/faults`).
//!
//! - [`control`]: sandboxes (with pause, archive, resize, builds), snapshots, previews,
//!   SSH access, API-key introspection, quotas.
//! - [`toolbox`]: files, process execution, sessions (one shell each), PTYs, git, ports,
//!   metrics.
//! - [`events`]: the Socket.IO channel of state changes.
//! - [`ssh`]: the SSH gateway (access token as user name, auth `none`).
//! - [`persist`]: the state on disk across restarts.
//! - [`routes`]: every route of the official SDKs, so that an unserved one is a named 501.
//!
//! Sandboxes are real: each has a folder (its `/home` and `/tmp`) and its commands run as
//! real processes, jailed with bubblewrap so that sandbox paths are real paths.

pub mod control;
pub mod events;
pub mod persist;
pub mod routes;
pub mod ssh;
pub mod toolbox;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::clock::{now_ms, rfc3339_millis};
use crate::sandbox::Engine;

/// How a sim runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub state_dir: PathBuf,
    /// Accepted API keys (`Authorization: Bearer <key>`).
    pub api_keys: Vec<String>,
    /// An accepted JWT, valid only with `X-Daytona-Organization-ID: <org>`.
    pub jwt: Option<String>,
    pub org: String,
    /// The permissions API keys have (JWTs have all).
    pub permissions: Vec<String>,
    /// Sim minutes per real minute for auto-stop (60 makes a minute last a second).
    pub time_scale: f64,
    /// How long `creating` and `starting` (and `stopping`, `destroying`) last, each.
    pub create_delay: Duration,
    pub start_delay: Duration,
    /// How long a snapshot spends in `pending` and `building`, each.
    pub snapshot_delay: Duration,
    /// How long `stopping` lasts.
    pub stop_delay: Duration,
    /// Each delay varies by up to this fraction of it, either way (0: exact).
    pub jitter: f64,
    /// The largest JSON body a route takes (Daytona answers 413 past its limit).
    pub max_json_body: usize,
    /// The SSH gateway's port, if one runs (printed in `sshCommand`).
    pub ssh_port: Option<u16>,
    pub faults: Faults,
    /// Serve the events channel (Socket.IO) at /api/socket.io/.
    pub events: bool,
}

impl SimConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        SimConfig {
            state_dir,
            api_keys: Vec::new(),
            jwt: None,
            org: "sim-org".into(),
            permissions: ALL_PERMISSIONS.iter().map(|s| s.to_string()).collect(),
            time_scale: 1.0,
            create_delay: Duration::from_millis(100),
            start_delay: Duration::from_millis(100),
            snapshot_delay: Duration::from_millis(200),
            stop_delay: Duration::from_millis(100),
            jitter: 0.0,
            max_json_body: 1024 * 1024,
            ssh_port: None,
            events: true,
            faults: Faults::default(),
        }
    }
}

/// The permissions a key may hold.
pub const ALL_PERMISSIONS: [&str; 6] = [
    "write:sandboxes",
    "delete:sandboxes",
    "write:snapshots",
    "delete:snapshots",
    "write:volumes",
    "delete:volumes",
];

/// Faults injected into `/api` and `/toolbox` requests. Set by flags, changed at runtime
/// with `POST /_sim/faults` (a partial JSON object), read with `GET /_sim/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added to every request.
    pub latency_ms: u64,
    /// Fraction (0..1) of requests answered 503.
    pub error_rate: f64,
    /// The next this many requests whose `METHOD /path` contains `error_path` (any request
    /// when unset) are answered 503, without being served.
    pub error_next: u64,
    pub error_path: Option<String>,
    /// The next this many requests are answered 429.
    pub rate_limit_count: u64,
    /// The `Retry-After` seconds of those 429s.
    pub retry_after_secs: u64,
    /// Send `Retry-After-<bucket>` instead of `Retry-After` when set.
    pub retry_after_bucket: Option<String>,
    /// Only requests whose `METHOD /path` contains this are rate limited (all when unset).
    pub rate_limit_path: Option<String>,
    /// Fraction (0..1) of requests whose connection drops mid-answer.
    pub drop_rate: f64,
    /// The next this many requests whose `METHOD /path` contains `drop_path` (any request
    /// when unset) are served, then their connection is dropped mid-answer.
    pub drop_next: u64,
    pub drop_path: Option<String>,
    /// Let this many matching requests through before `drop_next` starts dropping (to hit
    /// the second of two calls to the same path).
    pub drop_skip: u64,
    /// New sandboxes stay `creating` forever.
    pub stuck_create: bool,
    /// The organization's total CPU quota: a create, start or resize that would take the
    /// CPUs of the sandboxes not stopped past it is refused as Daytona does (403, "Total
    /// CPU limit exceeded. Maximum allowed: N."). None: no quota.
    pub cpu_quota: Option<i64>,
    /// The same for memory, in GiB.
    pub memory_quota: Option<i64>,
    /// The organization's total disk in GiB over sandboxes not archived.
    pub disk_quota: Option<i64>,
    /// The most sandboxes (not destroyed) the organization may have.
    pub sandbox_quota: Option<i64>,
    /// Uploads are read at most this fast (bytes per second; 0: as fast as they come), as
    /// over a slow link to a remote Daytona.
    pub upload_bytes_per_sec: u64,
    /// A command's log keeps at most this many bytes (0: no limit), as a full disk would:
    /// what comes after is lost, and a follower of the log is told so.
    pub log_limit_bytes: u64,
}

/// A runtime fault request: the [`Faults`] fields to change, plus one-shot actions.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FaultsUpdate {
    latency_ms: Option<u64>,
    error_rate: Option<f64>,
    error_next: Option<u64>,
    error_path: Option<String>,
    rate_limit_count: Option<u64>,
    retry_after_secs: Option<u64>,
    retry_after_bucket: Option<String>,
    rate_limit_path: Option<String>,
    drop_rate: Option<f64>,
    drop_next: Option<u64>,
    drop_path: Option<String>,
    drop_skip: Option<u64>,
    stuck_create: Option<bool>,
    /// 0 lifts the quota.
    cpu_quota: Option<i64>,
    memory_quota: Option<i64>,
    disk_quota: Option<i64>,
    sandbox_quota: Option<i64>,
    upload_bytes_per_sec: Option<u64>,
    log_limit_bytes: Option<u64>,
    /// Push this sandbox (id or name) into `error`.
    sandbox_error: Option<String>,
    /// The `errorReason` for `sandbox_error`.
    error_reason: Option<String>,
}

/// The shared state of a running sim.
pub struct Sim {
    pub config: SimConfig,
    pub engine: Engine,
    /// `http://ADDR`, for `toolboxProxyUrl`.
    pub base_url: String,
    pub sandboxes: Mutex<HashMap<String, control::SimSandbox>>,
    pub snapshots: Mutex<HashMap<String, control::SimSnapshot>>,
    pub ssh_tokens: Mutex<HashMap<String, control::SshToken>>,
    /// Preview tokens (plain and signed) by token.
    pub previews: Mutex<HashMap<String, control::previews::Grant>>,
    pub sessions: toolbox::Sessions,
    /// The events channel (Socket.IO) and its clients.
    pub events: events::Events,
    /// The last requests served (`METHOD /path [body bytes]`), for tests and benches
    /// counting round trips and bytes (`GET /_sim/requests`).
    pub requests: Mutex<Vec<String>>,
    pub faults: Mutex<Faults>,
    pub started: Instant,
    pub shutdown: CancellationToken,
    /// Asks the state saver ([`persist`]) to write now; it answers once written.
    pub flush: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Sim {
    /// Registers active snapshots by name (`--snapshot`).
    pub fn preload_snapshots(&self, names: &[String]) {
        if let Ok(mut snaps) = self.snapshots.lock() {
            for name in names {
                if !snaps.values().any(|s| &s.name == name) {
                    let s = control::SimSnapshot::preloaded(name);
                    snaps.insert(s.id.clone(), s);
                }
            }
        }
    }

    /// Would the organization's quotas (CPU and memory of the sandboxes that run, the
    /// count of sandboxes) be exceeded if `sandbox` (None: a new one) ran with `cpu` CPUs
    /// and `memory` GiB? Answers Daytona's 403 when so. Call with the sandboxes locked
    /// out of `map`.
    pub fn quota_error(
        &self,
        map: &HashMap<String, control::SimSandbox>,
        sandbox: Option<&str>,
        cpu: i64,
        memory: i64,
        disk: i64,
    ) -> Option<ApiError> {
        let f = self.faults.lock().map(|f| f.clone()).unwrap_or_default();
        // Daytona's own words (its API's validateOrganizationQuotas).
        let upgrade = "To increase concurrency limits, upgrade your organization's Tier by \
                       visiting https://app.daytona.io/dashboard/limits.";
        let others = || map.values().filter(move |s| Some(s.id.as_str()) != sandbox);
        let running = |s: &&control::SimSandbox| {
            !matches!(
                s.state.as_str(),
                "stopped"
                    | "archived"
                    | "archiving"
                    | "destroyed"
                    | "destroying"
                    | "error"
                    | "build_failed"
            )
        };
        let forbid = |m: String| Some(ApiError::new(StatusCode::FORBIDDEN, m));
        if sandbox.is_none()
            && let Some(q) = f.sandbox_quota
            && others().filter(|s| s.state != "destroyed").count() as i64 >= q
        {
            // Daytona has no such quota of its own: the sim's, worded like the others.
            return forbid(format!(
                "Total sandbox limit exceeded. Maximum allowed: {q}.\n{upgrade}"
            ));
        }
        if let Some(q) = f.cpu_quota
            && others().filter(running).map(|s| s.cpu).sum::<i64>() + cpu > q
        {
            return forbid(format!(
                "Total CPU limit exceeded. Maximum allowed: {q}.\n{upgrade}"
            ));
        }
        if let Some(q) = f.memory_quota
            && others().filter(running).map(|s| s.memory).sum::<i64>() + memory > q
        {
            return forbid(format!(
                "Total memory limit exceeded. Maximum allowed: {q}GiB.\n{upgrade}"
            ));
        }
        // A stopped sandbox keeps its disk; an archived one has given it back.
        if let Some(q) = f.disk_quota
            && others()
                .filter(|s| !matches!(s.state.as_str(), "archived" | "destroyed" | "destroying"))
                .map(|s| s.disk)
                .sum::<i64>()
                + disk
                > q
        {
            return forbid(format!(
                "Total disk limit exceeded. Maximum allowed: {q}GiB.\nConsider archiving your \
                 unused Sandboxes to free up available storage.\n{upgrade}"
            ));
        }
        None
    }

    /// `delay` give or take the configured jitter (a fraction of it, uniformly), so that
    /// clients meet the spread of a real control plane, not one fixed figure.
    pub fn jittered(&self, delay: Duration) -> Duration {
        jitter(delay, self.config.jitter, rand::random::<f64>())
    }

    /// Returns once the state is on disk (or the saver is gone).
    pub async fn flush_state(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flush.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Real time for `minutes` of sim time.
    pub fn scaled_minutes(&self, minutes: f64) -> Duration {
        Duration::from_secs_f64((minutes * 60.0 / self.config.time_scale.max(1e-6)).max(0.0))
    }
}

/// `delay` scaled by `1 + fraction * (2 * r - 1)`: `r` uniform in [0, 1) spreads it over
/// ±`fraction` of itself (the fraction clamped to [0, 1]).
fn jitter(delay: Duration, fraction: f64, r: f64) -> Duration {
    let j = fraction.clamp(0.0, 1.0);
    if j == 0.0 || delay.is_zero() {
        return delay;
    }
    delay.mul_f64((1.0 + j * (r * 2.0 - 1.0)).max(0.0))
}

/// A Daytona-shaped error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Extra headers (Retry-After...).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
}

tokio::task_local! {
    /// The request's path and method, for error bodies.
    static REQUEST: (String, String);
}

/// Now as Daytona writes times (RFC 3339 with milliseconds, UTC).
pub fn now_rfc3339() -> String {
    rfc3339_millis(now_ms())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (path, method) = REQUEST.try_with(|r| r.clone()).unwrap_or_default();
        let toolbox = path.starts_with("/toolbox");
        let code = match self.status {
            StatusCode::BAD_REQUEST => "BAD_REQUEST",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "FORBIDDEN",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::REQUEST_TIMEOUT => "REQUEST_TIMEOUT",
            StatusCode::CONFLICT => "CONFLICT",
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
            StatusCode::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
            StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
            _ => "INTERNAL_SERVER_ERROR",
        };
        let mut body = json!({
            "statusCode": self.status.as_u16(),
            "message": self.message,
            "error": self.status.canonical_reason().unwrap_or("Error"),
            "code": code,
            "source": if toolbox { "DAYTONA_DAEMON" } else { "DAYTONA_API" },
            "path": path,
            "timestamp": now_rfc3339(),
        });
        if toolbox {
            body["method"] = json!(method);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::try_from(k),
                axum::http::HeaderValue::try_from(v),
            ) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

/// How much of a too-large body is read (and dropped) before the 413, so that the client
/// gets to finish sending and reads the answer rather than a broken pipe.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

type SharedBody = Arc<tokio::sync::Mutex<Option<axum::body::BodyDataStream>>>;

/// `req` with its body read through a handle the caller keeps, to drain what the handler
/// leaves unread (see the gate).
fn shared_body(req: Request) -> (Request, SharedBody) {
    let (parts, body) = req.into_parts();
    let shared: SharedBody = Arc::new(tokio::sync::Mutex::new(Some(body.into_data_stream())));
    let stream = futures_util::stream::unfold(shared.clone(), |shared| async move {
        let item = {
            let mut guard = shared.lock().await;
            let s = guard.as_mut()?;
            futures_util::StreamExt::next(s).await?
        };
        Some((item, shared))
    });
    (
        Request::from_parts(parts, axum::body::Body::from_stream(stream)),
        shared,
    )
}

/// Reads and drops what is left of a shared body, up to [`DRAIN_LIMIT`] bytes and 10 s.
async fn drain(shared: SharedBody) {
    let Some(mut rest) = shared.lock().await.take() else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut rest).await {
            seen = seen.saturating_add(chunk.len());
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// The body, if it is at most `limit` bytes; else Daytona's 413 once the rest was drained
/// (up to [`DRAIN_LIMIT`]).
async fn read_bounded(body: axum::body::Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            out.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request entity too large: a JSON body is at most {limit} bytes"),
        ));
    }
    Ok(out)
}

/// The JSON body limit of this sim, put in each request's extensions by the gate.
#[derive(Clone, Copy)]
pub struct JsonLimit(pub usize);

/// JSON bodies whose rejection is a Daytona-shaped 400 (not axum's plain text).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Whatever the content type says, as Daytona's daemon binds JSON (the SDK sends
        // some JSON bodies, `/env`'s, with none). Bounded as Daytona bounds them.
        let _ = state;
        let limit = req
            .extensions()
            .get::<JsonLimit>()
            .map_or(1024 * 1024, |l| l.0);
        let bytes = read_bounded(req.into_body(), limit).await?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_name: String,
    pub permissions: Vec<String>,
    /// The token itself (to show masked in `api-keys/current`).
    pub token: String,
}

impl Principal {
    pub fn require(&self, permission: &str) -> Result<(), ApiError> {
        if self.permissions.iter().any(|p| p == permission) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Forbidden: the API key lacks the required permission {permission}"),
            ))
        }
    }
}

fn authenticate(sim: &Sim, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: invalid or missing credentials",
        )
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(unauthorized)?;
    if sim.config.api_keys.iter().any(|k| k == token) {
        return Ok(Principal {
            key_name: "sim-key".into(),
            permissions: sim.config.permissions.clone(),
            token: token.to_string(),
        });
    }
    if sim.config.jwt.as_deref() == Some(token) {
        let org = headers
            .get("x-daytona-organization-id")
            .and_then(|v| v.to_str().ok());
        return match org {
            Some(o) if o == sim.config.org => Ok(Principal {
                key_name: "jwt".into(),
                permissions: ALL_PERMISSIONS.iter().map(|s| s.to_string()).collect(),
                token: token.to_string(),
            }),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden: not a member of that organization",
            )),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Forbidden: X-Daytona-Organization-ID is required with a JWT",
            )),
        };
    }
    Err(unauthorized())
}

/// How many requests `/_sim/requests` remembers.
const REQUEST_LOG: usize = 10_000;

/// Faults, then auth; puts the [`Principal`] in the request's extensions.
async fn gate(State(sim): State<Arc<Sim>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    REQUEST
        .scope((path, method), async move {
            let faults = sim.faults.lock().map(|f| f.clone()).unwrap_or_default();
            if faults.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
            }
            let line = format!("{} {}", req.method(), req.uri().path());
            // With the body's size when it says (for benches counting bytes on the wire).
            let logged = match req
                .headers()
                .get(axum::http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
            {
                Some(n) => format!("{line} {n}"),
                None => line.clone(),
            };
            if let Ok(mut log) = sim.requests.lock() {
                // The last requests only: a long-running sim must not grow with its traffic.
                if log.len() >= REQUEST_LOG {
                    log.drain(..REQUEST_LOG / 2);
                }
                log.push(logged);
            }
            if faults.rate_limit_count > 0
                && faults
                    .rate_limit_path
                    .as_deref()
                    .is_none_or(|p| line.contains(p))
            {
                let mut take = false;
                if let Ok(mut f) = sim.faults.lock()
                    && f.rate_limit_count > 0
                {
                    f.rate_limit_count -= 1;
                    take = true;
                }
                if take {
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too Many Requests: rate limit exceeded",
                    );
                    let header = match &faults.retry_after_bucket {
                        Some(b) => format!("Retry-After-{b}"),
                        None => "Retry-After".into(),
                    };
                    e.headers
                        .push((header, faults.retry_after_secs.to_string()));
                    return e.into_response();
                }
            }
            let mut error_this = false;
            if faults.error_next > 0
                && faults
                    .error_path
                    .as_deref()
                    .is_none_or(|p| line.contains(p))
                && let Ok(mut f) = sim.faults.lock()
                && f.error_next > 0
            {
                f.error_next -= 1;
                error_this = true;
            }
            if error_this || (faults.error_rate > 0.0 && rand::random::<f64>() < faults.error_rate)
            {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service Unavailable (injected)",
                )
                .into_response();
            }
            let mut drop_this = faults.drop_rate > 0.0 && rand::random::<f64>() < faults.drop_rate;
            if faults.drop_next > 0
                && faults.drop_path.as_deref().is_none_or(|p| line.contains(p))
                && let Ok(mut f) = sim.faults.lock()
                && f.drop_next > 0
            {
                if f.drop_skip > 0 {
                    f.drop_skip -= 1;
                } else {
                    f.drop_next -= 1;
                    drop_this = true;
                }
            }
            if drop_this {
                // The request is served, then its answer is lost: headers go out, the body
                // fails, and the client sees the connection drop, not knowing what happened.
                if let Ok(p) = authenticate(&sim, req.headers()) {
                    req.extensions_mut().insert(p);
                    let _ = next.run(req).await;
                }
                let stream = futures_util::stream::once(async {
                    Err::<axum::body::Bytes, std::io::Error>(std::io::Error::other(
                        "connection dropped (injected)",
                    ))
                });
                return Response::new(axum::body::Body::from_stream(stream));
            }
            req.extensions_mut()
                .insert(JsonLimit(sim.config.max_json_body));
            // Whatever part of a body its handler leaves unread (a refusal before reading,
            // a route that takes none, bad auth) is drained after the answer is made, so
            // the client reads the answer, not a broken pipe.
            let has_body = req
                .headers()
                .contains_key(axum::http::header::TRANSFER_ENCODING)
                || req
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v != "0");
            let (mut req, leftover) = if has_body {
                let (req, rest) = shared_body(req);
                (req, Some(rest))
            } else {
                (req, None)
            };
            let resp = match authenticate(&sim, req.headers()) {
                Ok(p) => {
                    req.extensions_mut().insert(p);
                    next.run(req).await
                }
                Err(e) => {
                    drop(req);
                    e.into_response()
                }
            };
            if let Some(rest) = leftover {
                drain(rest).await;
            }
            resp
        })
        .await
}

/// A request no handler took: a route of Daytona's the sim does not serve is a 501 that
/// names it; anything else is the 404 Daytona's router answers.
async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    let path = uri.path().to_string();
    REQUEST
        .scope((path.clone(), method.to_string()), async move {
            let known = if let Some(rest) = path.strip_prefix("/api/") {
                routes::sdk_route("api", method.as_str(), rest).map(|t| format!("{method} /api{t}"))
            } else if let Some(rest) = path.strip_prefix("/toolbox/") {
                rest.split_once('/').and_then(|(_, tail)| {
                    routes::sdk_route("toolbox", method.as_str(), tail)
                        .map(|t| format!("{method} /toolbox/{{sandboxId}}{t}"))
                })
            } else {
                None
            };
            let e = match known {
                Some(route) => ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "daytona-sim does not serve {route}, a route of Daytona's (use a real \
                         Daytona for it)"
                    ),
                ),
                None => ApiError::not_found(format!("Cannot {method} {path}")),
            };
            // Inside the scope: the body names the path.
            e.into_response()
        })
        .await
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Response {
    let f = sim.faults.lock().map(|f| f.clone()).unwrap_or_default();
    axum::Json(f).into_response()
}

async fn set_faults(
    State(sim): State<Arc<Sim>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Any content type: `curl -d '{...}'` (as `daytona-sim --help` shows) sends a form type.
    let u: FaultsUpdate = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the faults body is not a JSON object of fault fields: {e}"),
        )
    })?;
    if let Some(target) = &u.sandbox_error {
        let reason = u
            .error_reason
            .clone()
            .unwrap_or_else(|| "injected error".into());
        control::force_error(&sim, target, &reason)?;
    }
    let mut f = sim
        .faults
        .lock()
        .map_err(|_| ApiError::internal("faults lock poisoned"))?;
    if let Some(v) = u.latency_ms {
        f.latency_ms = v;
    }
    if let Some(v) = u.error_rate {
        f.error_rate = v.clamp(0.0, 1.0);
    }
    if let Some(v) = u.error_next {
        f.error_next = v;
    }
    if u.error_path.is_some() {
        f.error_path = u.error_path.filter(|p| !p.is_empty());
    }
    if let Some(v) = u.rate_limit_count {
        f.rate_limit_count = v;
    }
    if let Some(v) = u.retry_after_secs {
        f.retry_after_secs = v;
    }
    if u.retry_after_bucket.is_some() {
        f.retry_after_bucket = u.retry_after_bucket.filter(|b| !b.is_empty());
    }
    if u.rate_limit_path.is_some() {
        f.rate_limit_path = u.rate_limit_path.filter(|p| !p.is_empty());
    }
    if let Some(v) = u.drop_rate {
        f.drop_rate = v.clamp(0.0, 1.0);
    }
    if let Some(v) = u.drop_next {
        f.drop_next = v;
    }
    if u.drop_path.is_some() {
        f.drop_path = u.drop_path.filter(|p| !p.is_empty());
    }
    if let Some(v) = u.drop_skip {
        f.drop_skip = v;
    }
    if let Some(v) = u.cpu_quota {
        f.cpu_quota = (v > 0).then_some(v);
    }
    if let Some(v) = u.memory_quota {
        f.memory_quota = (v > 0).then_some(v);
    }
    if let Some(v) = u.disk_quota {
        f.disk_quota = (v > 0).then_some(v);
    }
    if let Some(v) = u.sandbox_quota {
        f.sandbox_quota = (v > 0).then_some(v);
    }
    if let Some(v) = u.stuck_create {
        f.stuck_create = v;
    }
    if let Some(v) = u.upload_bytes_per_sec {
        f.upload_bytes_per_sec = v;
    }
    if let Some(v) = u.log_limit_bytes {
        f.log_limit_bytes = v;
    }
    Ok(axum::Json(f.clone()).into_response())
}

/// The whole HTTP surface.
pub fn router(sim: Arc<Sim>) -> Router {
    let gated = Router::new()
        .nest("/api", control::router())
        .nest("/toolbox/{sandbox_id}", toolbox::router())
        .layer(axum::middleware::from_fn_with_state(sim.clone(), gate));
    Router::new()
        .merge(gated)
        // Previews authenticate by their own token (or an API key), as Daytona's proxy does.
        .route(
            "/preview/{*rest}",
            axum::routing::any(control::previews::proxy),
        )
        // The events channel authenticates in its own connect packet, not in headers.
        .route("/api/socket.io", axum::routing::get(events::socket_io))
        .route("/api/socket.io/", axum::routing::get(events::socket_io))
        .route(
            "/_sim/faults",
            axum::routing::get(get_faults).post(set_faults),
        )
        .route(
            "/_sim/requests",
            axum::routing::get(|State(sim): State<Arc<Sim>>| async move {
                let log = sim.requests.lock().map(|l| l.clone()).unwrap_or_default();
                axum::Json(log)
            }),
        )
        .route(
            "/_sim/events",
            axum::routing::get(|State(sim): State<Arc<Sim>>| async move {
                axum::Json(sim.events.stats())
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(sim)
}

/// Starts a sim on `listener`; answers its shared state and a task that serves until
/// `shutdown` fires.
pub async fn start(
    config: SimConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<(
    Arc<Sim>,
    SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&config.state_dir)?;
    let engine = Engine::open(config.state_dir.join("sandboxes")).map_err(std::io::Error::other)?;
    let (flush_tx, flush_rx) = tokio::sync::mpsc::channel(64);
    let sim = Arc::new(Sim {
        faults: Mutex::new(config.faults.clone()),
        config,
        engine,
        base_url: format!("http://{addr}"),
        sandboxes: Mutex::new(HashMap::new()),
        snapshots: Mutex::new(HashMap::new()),
        ssh_tokens: Mutex::new(HashMap::new()),
        previews: Mutex::new(HashMap::new()),
        sessions: Default::default(),
        events: Default::default(),
        requests: Mutex::new(Vec::new()),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        flush: flush_tx,
    });
    let restored = persist::load(&sim).map_err(std::io::Error::other)?;
    tracing::info!("state: {restored}");
    let saver = persist::spawn_saver(sim.clone(), flush_rx, shutdown.clone());
    control::spawn_auto_stop(sim.clone());
    let app = router(sim.clone());
    // Ends once the server has stopped and the state's last write is on disk (a clean
    // stop loses nothing that happened just before it).
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        let _ = saver.await;
        served
    });
    Ok((sim, addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_spreads_a_delay_by_its_fraction_either_way() {
        let d = Duration::from_millis(200);
        assert_eq!(jitter(d, 0.0, 0.9), d, "no jitter: exact");
        assert_eq!(jitter(d, 0.5, 0.0), Duration::from_millis(100));
        assert_eq!(jitter(d, 0.5, 0.5), d);
        assert_eq!(jitter(d, 0.5, 1.0), Duration::from_millis(300));
        assert_eq!(
            jitter(d, 7.0, 0.0),
            Duration::ZERO,
            "clamped to 1: never negative"
        );
        assert_eq!(jitter(Duration::ZERO, 0.5, 1.0), Duration::ZERO);
    }
}
