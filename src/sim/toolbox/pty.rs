//! The toolbox's PTY sessions, as Daytona's daemon serves them: a login shell (`-i -l`) on a
//! pseudo-terminal per session, created with `POST /process/pty` (or created and attached in
//! one step at `/process/pty/create-connect`), attached to over a WebSocket at
//! `/process/pty/{id}/connect` (binary frames both ways; a `{"type":"control","status":
//! "connected"}` text frame first), resized with `POST .../resize`, killed with `DELETE`.
//! When the shell exits every client gets `{"type":"control","status":"exited","exitCode":N}`
//! if it asked for the `X-Daytona-Pty-Exit-Control` subprotocol, then a close frame whose
//! reason is `{"exitCode":N,"exitReason":...}` (1000 for 0, else 1011); the session is gone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Ctx, ctx, param};
use crate::sandbox::process::{self, ExecOutput, Input, ProcessSpec, PtySize};
use crate::sim::{ApiError, ApiJson, Sim};

/// The subprotocol a client offers to be told the exit code in a control message.
const EXIT_CONTROL: &str = "X-Daytona-Pty-Exit-Control";
/// The subprotocol prefix that carries a create-connect's environment (base64url JSON).
const ENVS_PREFIX: &str = "X-Daytona-Pty-Envs~";
/// Daytona's bound on either side of a terminal.
const MAX_SIDE: u16 = 1000;

/// One PTY session.
pub(super) struct PtySession {
    id: String,
    cwd: String,
    envs: BTreeMap<String, String>,
    created_at: String,
    lazy_start: bool,
    size: Mutex<PtySize>,
    active: AtomicBool,
    /// Killed by `DELETE` (Daytona reports 137, SIGKILL, whatever the shell died of).
    killed: AtomicBool,
    /// Input and resizes for the shell, once it runs.
    input: Mutex<Option<mpsc::Sender<Input>>>,
    /// The terminal's output, to every attached client.
    output: broadcast::Sender<Vec<u8>>,
    /// The shell's exit code, once it has exited.
    exit: watch::Sender<Option<i32>>,
    /// What the shell needs to start (taken by the start).
    pending: Mutex<Option<ProcessSpec>>,
    cancel: CancellationToken,
}

impl PtySession {
    /// Kills the shell (the sandbox stops or goes).
    pub(super) fn cancel(&self) {
        self.cancel.cancel();
    }

    fn json(&self) -> Value {
        let size = self
            .size
            .lock()
            .map(|s| *s)
            .unwrap_or(PtySize { rows: 24, cols: 80 });
        json!({
            "id": self.id,
            "cwd": self.cwd,
            "envs": self.envs,
            "cols": size.cols,
            "rows": size.rows,
            "createdAt": self.created_at,
            "active": self.active.load(Ordering::SeqCst),
            "lazyStart": self.lazy_start,
        })
    }

    /// Starts the shell (once; later calls do nothing).
    fn start(self: &Arc<Self>, sim: Arc<Sim>, sandbox: String) {
        let Some(mut spec) = self.pending.lock().ok().and_then(|mut p| p.take()) else {
            return;
        };
        spec.tty = self.size.lock().ok().map(|s| *s);
        let (in_tx, in_rx) = mpsc::channel(256);
        if let Ok(mut i) = self.input.lock() {
            *i = Some(in_tx);
        }
        self.active.store(true, Ordering::SeqCst);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let session = self.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let run =
                tokio::spawn(async move { process::run(&spec, Some(in_rx), out_tx, cancel).await });
            while let Some(out) = out_rx.recv().await {
                let (ExecOutput::Stdout(b) | ExecOutput::Stderr(b)) = out;
                // No client attached: the output is not kept (as on Daytona).
                let _ = session.output.send(b);
            }
            let code = match run.await {
                _ if session.killed.load(Ordering::SeqCst) => 137,
                Ok(Ok(exit)) => exit.code,
                _ => 1,
            };
            session.active.store(false, Ordering::SeqCst);
            if let Ok(mut i) = session.input.lock() {
                i.take();
            }
            let _ = session.exit.send(Some(code));
            // An exited session is gone, as on Daytona.
            sim.sessions.ptys.remove(&(sandbox, session.id.clone()));
        });
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct CreatePty {
    id: String,
    cwd: Option<String>,
    envs: Option<BTreeMap<String, String>>,
    cols: Option<u32>,
    rows: Option<u32>,
    lazy_start: bool,
}

fn side(v: Option<u32>, default: u16, name: &str) -> Result<u16, ApiError> {
    match v {
        None | Some(0) => Ok(default),
        Some(v) if v <= u32::from(MAX_SIDE) => Ok(v as u16),
        Some(_) => Err(ApiError::bad_request(format!(
            "invalid value for {name} - must be less than {MAX_SIDE}"
        ))),
    }
}

/// Makes (and unless lazy, starts) a session.
fn create(sim: &Arc<Sim>, c: &Ctx, req: CreatePty) -> Result<Arc<PtySession>, ApiError> {
    if req.id.is_empty() {
        return Err(ApiError::bad_request("session ID is required"));
    }
    let key = (c.id.clone(), req.id.clone());
    if sim.sessions.ptys.contains_key(&key) {
        return Err(ApiError::conflict(format!(
            "PTY session with ID '{}' already exists",
            req.id
        )));
    }
    let size = PtySize {
        cols: side(req.cols, 80, "cols")?,
        rows: side(req.rows, 24, "rows")?,
    };
    let mut envs = req.envs.unwrap_or_default();
    envs.entry("TERM".into())
        .or_insert_with(|| "xterm-256color".into());
    let cwd = req
        .cwd
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| c.home());
    // The user's login shell, as Daytona starts it.
    let shell = if std::path::Path::new("/bin/bash").exists() {
        "exec /bin/bash -i -l"
    } else {
        "exec /bin/sh -i -l"
    };
    let mut spec = super::spec(c, shell, Some(&cwd), &envs, None)?;
    spec.cwd = PathBuf::from(c.guest(&cwd)?);
    let (output, _) = broadcast::channel(1024);
    let session = Arc::new(PtySession {
        id: req.id.clone(),
        cwd,
        envs,
        created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        lazy_start: req.lazy_start,
        size: Mutex::new(size),
        active: AtomicBool::new(false),
        killed: AtomicBool::new(false),
        input: Mutex::new(None),
        output,
        exit: watch::channel(None).0,
        pending: Mutex::new(Some(spec)),
        cancel: c.procs.child_token(),
    });
    sim.sessions.ptys.insert(key, session.clone());
    if !req.lazy_start {
        session.start(sim.clone(), c.id.clone());
    }
    Ok(session)
}

pub(super) async fn create_pty(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreatePty>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = ctx(&sim, &id)?;
    let s = create(&sim, &c, req)?;
    Ok((StatusCode::CREATED, Json(json!({ "sessionId": s.id }))))
}

fn find(sim: &Sim, c: &Ctx, sid: &str) -> Result<Arc<PtySession>, ApiError> {
    sim.sessions
        .ptys
        .get(&(c.id.clone(), sid.to_string()))
        .map(|s| s.clone())
        .ok_or_else(|| ApiError::not_found("PTY session not found"))
}

pub(super) async fn list_ptys(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let list: Vec<Value> = sim
        .sessions
        .ptys
        .iter()
        .filter(|e| e.key().0 == c.id)
        .map(|e| e.value().json())
        .collect();
    Ok(Json(json!({ "sessions": list })))
}

pub(super) async fn get_pty(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    Ok(Json(find(&sim, &c, &sid)?.json()))
}

pub(super) async fn delete_pty(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let s = find(&sim, &c, &sid)?;
    sim.sessions.ptys.remove(&(c.id.clone(), sid));
    s.killed.store(true, Ordering::SeqCst);
    s.cancel.cancel();
    if !s.active.load(Ordering::SeqCst) {
        // Never started (lazy): tell attached clients it is over.
        let _ = s.exit.send(Some(137));
    }
    Ok(Json(json!({ "message": "PTY session deleted" })))
}

#[derive(Deserialize)]
pub(super) struct Resize {
    cols: u32,
    rows: u32,
}

pub(super) async fn resize_pty(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
    ApiJson(req): ApiJson<Resize>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let size = PtySize {
        cols: side(Some(req.cols), 80, "cols")?,
        rows: side(Some(req.rows), 24, "rows")?,
    };
    let s = find(&sim, &c, &sid)?;
    let tx = s.input.lock().ok().and_then(|i| i.clone());
    let Some(tx) = tx.filter(|_| s.active.load(Ordering::SeqCst)) else {
        return Err(ApiError::new(
            StatusCode::GONE,
            "cannot resize inactive PTY session",
        ));
    };
    if let Ok(mut cur) = s.size.lock() {
        *cur = size;
    }
    let _ = tx.send(Input::Resize(size)).await;
    Ok(Json(s.json()))
}

/// The subprotocols a client offered.
fn offered(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

pub(super) async fn connect_pty(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let ws = ws.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let protocols = offered(&headers);
    let exit_control = protocols.iter().any(|p| p == EXIT_CONTROL);
    let ws = if exit_control {
        ws.protocols([EXIT_CONTROL])
    } else {
        ws
    };
    let found = find(&sim, &c, &sid);
    Ok(ws.on_upgrade(move |socket| async move {
        match found {
            Ok(s) => attach(socket, s, sim, c.id, exit_control).await,
            Err(e) => refuse(socket, &e.message).await,
        }
    }))
}

/// Creates a session from the query (`id`, `cols`, `rows`, `cwd`) and the envs subprotocol,
/// and attaches to it.
pub(super) async fn create_connect_pty(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let ws = ws.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let protocols = offered(&headers);
    let exit_control = protocols.iter().any(|p| p == EXIT_CONTROL);
    let mut envs = None;
    let mut chosen = Vec::new();
    for p in &protocols {
        if let Some(encoded) = p.strip_prefix(ENVS_PREFIX) {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|e| ApiError::bad_request(format!("envs subprotocol: {e}")))?;
            envs = Some(
                serde_json::from_slice::<BTreeMap<String, String>>(&bytes)
                    .map_err(|e| ApiError::bad_request(format!("envs subprotocol: {e}")))?,
            );
        } else if p == EXIT_CONTROL {
            chosen.push(EXIT_CONTROL);
        }
    }
    let number = |key: &str| -> Result<Option<u32>, ApiError> {
        param(&raw, key)
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| ApiError::bad_request(format!("{key} must be a number")))
            })
            .transpose()
    };
    let req = CreatePty {
        id: param(&raw, "id").unwrap_or_default(),
        cwd: param(&raw, "cwd"),
        envs,
        cols: number("cols")?,
        rows: number("rows")?,
        lazy_start: false,
    };
    let session = create(&sim, &c, req)?;
    let ws = if chosen.is_empty() {
        ws
    } else {
        ws.protocols(chosen)
    };
    Ok(ws.on_upgrade(move |socket| attach(socket, session, sim, c.id, exit_control)))
}

async fn refuse(mut socket: WebSocket, message: &str) {
    let msg = json!({
        "type": "control",
        "status": "error",
        "error": format!("Failed to connect to PTY session: {message}"),
    });
    let _ = socket.send(Message::Text(msg.to_string().into())).await;
    super::close_socket(&mut socket, None).await;
}

/// One attached client: output to it, its frames to the shell, the exit at the end.
async fn attach(
    mut socket: WebSocket,
    session: Arc<PtySession>,
    sim: Arc<Sim>,
    sandbox: String,
    exit_control: bool,
) {
    let mut output = session.output.subscribe();
    let mut exit = session.exit.subscribe();
    if session.lazy_start {
        session.start(sim.clone(), sandbox);
    }
    let connected = json!({ "type": "control", "status": "connected" });
    if socket
        .send(Message::Text(connected.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let code = loop {
        let exited = *exit.borrow_and_update();
        if let Some(code) = exited {
            // What the shell printed last is sent before the exit.
            while let Ok(b) = output.try_recv() {
                if socket.send(Message::Binary(b.into())).await.is_err() {
                    return;
                }
            }
            break code;
        }
        tokio::select! {
            b = output.recv() => match b {
                Ok(b) => {
                    if socket.send(Message::Binary(b.into())).await.is_err() {
                        return;
                    }
                }
                // A client too slow for the terminal is dropped, as on Daytona.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    super::close_socket(&mut socket, Some(CloseFrame {
                        code: 1008,
                        reason: "slow consumer".into(),
                    })).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {}
            },
            _ = exit.changed() => {}
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => send_input(&session, b.to_vec()).await,
                Some(Ok(Message::Text(t))) => send_input(&session, t.as_bytes().to_vec()).await,
                Some(Ok(_)) => {}
                // The client left; the session goes on.
                None | Some(Err(_)) => return,
            },
        }
    };
    let reason = match code {
        0 => None,
        130 => Some("Ctrl+C".to_string()),
        137 => Some("SIGKILL".to_string()),
        143 => Some("SIGTERM".to_string()),
        c if c > 128 => Some(format!("signal {}", c - 128)),
        _ => Some("non-zero exit".to_string()),
    };
    if exit_control {
        let mut msg = json!({ "type": "control", "status": "exited", "exitCode": code });
        if let Some(r) = &reason {
            msg["exitReason"] = json!(r);
        }
        let _ = socket.send(Message::Text(msg.to_string().into())).await;
    }
    let mut data = json!({ "exitCode": code });
    if let Some(r) = &reason {
        data["exitReason"] = json!(r);
    }
    super::close_socket(
        &mut socket,
        Some(CloseFrame {
            code: if code == 0 { 1000 } else { 1011 },
            reason: data.to_string().into(),
        }),
    )
    .await;
}

async fn send_input(session: &PtySession, data: Vec<u8>) {
    let tx = session.input.lock().ok().and_then(|i| i.clone());
    if let Some(tx) = tx {
        let _ = tx.send(Input::Data(data)).await;
    }
}
