//! The toolbox's processes: `process/execute` with its timeout, and sessions (async exec,
//! status, logs as JSON and as a follow WebSocket, input).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicU64, Ordering};

use super::outlog::{self, OutputLog};
use super::shell::Shell;
use super::{Ctx, ctx, param, run_to_end, spec};
use crate::clock::now_ms;
use crate::sandbox::process::ExecOutput;
use crate::sim::{ApiError, ApiJson, Sim};

/// Default `process/execute` timeout when the request names none (Daytona documents 10 s).
const DEFAULT_EXECUTE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct ExecuteRequest {
    command: String,
    cwd: Option<String>,
    envs: Option<BTreeMap<String, String>>,
    timeout: Option<u64>,
}

pub(super) async fn execute(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.command.trim().is_empty() {
        return Err(ApiError::bad_request("command is required"));
    }
    let timeout = match req.timeout {
        Some(0) | None => DEFAULT_EXECUTE_TIMEOUT,
        Some(s) => Duration::from_secs(s),
    };
    let p = spec(
        &c,
        &req.command,
        req.cwd.as_deref(),
        &req.envs.unwrap_or_default(),
        Some(timeout),
    )?;
    let (exit, output, _, _) = run_to_end(&c, p, "the command").await?;
    if exit.timed_out {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "command timed out after {} s and was killed",
                timeout.as_secs()
            ),
        ));
    }
    Ok(Json(
        json!({ "exitCode": exit.code, "result": String::from_utf8_lossy(&output) }),
    ))
}

// ---- sessions ----

/// A command run in a session, with its output kept in arrival order.
pub(super) struct Cmd {
    id: String,
    command: String,
    state: Mutex<CmdState>,
    changed: Notify,
    /// The command's stdin while it runs (async commands only: a sync one reads EOF).
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// Input is not echoed into the command's output (Daytona echoes it by default).
    suppress_echo: bool,
}

pub(super) struct CmdState {
    exit_code: Option<i32>,
    log: OutputLog,
}

/// The most output one round of a log follower reads from disk.
const FOLLOW_BATCH: usize = 4 * 1024 * 1024;

impl Cmd {
    fn json(&self) -> Value {
        let exit = self.state.lock().ok().and_then(|s| s.exit_code);
        let mut v = json!({ "id": self.id, "command": self.command });
        if let Some(code) = exit {
            v["exitCode"] = json!(code);
        }
        v
    }

    /// The whole log, or an error when some of it was lost (a short log would pass for
    /// the command's whole output, as the follow stream's 1011 close also says).
    fn logs(&self) -> Result<(String, String, String), ApiError> {
        let (mut all, mut out, mut err) = (Vec::new(), Vec::new(), Vec::new());
        let pieces = match self.state.lock() {
            Ok(s) => match s.log.lost() {
                Some(why) => {
                    return Err(ApiError::internal(format!(
                        "the output of command {} is incomplete: {why}. What was kept is not \
                         the command's whole output; run it again with room for its output",
                        self.id
                    )));
                }
                None => Some(s.log.after(0, usize::MAX)),
            },
            Err(_) => None,
        };
        if let Some((pieces, file)) = pieces {
            for c in &outlog::read(&file, &pieces) {
                match c {
                    ExecOutput::Stdout(b) => {
                        all.extend(b);
                        out.extend(b);
                    }
                    ExecOutput::Stderr(b) => {
                        all.extend(b);
                        err.extend(b);
                    }
                }
            }
        }
        let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        Ok((s(all), s(out), s(err)))
    }
}

/// A session: its shell, its commands, and a token that ends them all.
pub(super) struct Session {
    commands: Mutex<Vec<Arc<Cmd>>>,
    cancel: CancellationToken,
    shell: Shell,
}

/// Every session of every sandbox.
#[derive(Default)]
pub struct Sessions {
    map: DashMap<(String, String), Arc<Session>>,
    /// PTY sessions, by (sandbox, session id).
    pub(super) ptys: DashMap<(String, String), Arc<super::pty::PtySession>>,
    /// Numbers the sessions' FIFO folders (session ids are the client's, any text).
    seq: AtomicU64,
}

/// A session as the sim's state file keeps it: what it ran and how that ended, and where
/// each command's output lies.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct SavedSession {
    pub sandbox: String,
    pub id: String,
    pub commands: Vec<SavedCmd>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct SavedCmd {
    pub id: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub log: std::path::PathBuf,
}

impl Session {
    /// Its commands' logs go (the session is deleted or its sandbox stopped).
    fn remove_logs(&self) {
        if let Ok(cmds) = self.commands.lock() {
            for c in cmds.iter() {
                if let Ok(s) = c.state.lock() {
                    s.log.remove();
                }
            }
        }
    }
}

impl Sessions {
    /// Every session, for the state file (sorted, so an unchanged set saves the same).
    pub fn saved(&self) -> Vec<SavedSession> {
        let mut all: Vec<SavedSession> = self
            .map
            .iter()
            .map(|e| {
                let (sandbox, id) = e.key().clone();
                let commands = e
                    .value()
                    .commands
                    .lock()
                    .map(|cmds| {
                        cmds.iter()
                            .filter_map(|c| {
                                let st = c.state.lock().ok()?;
                                Some(SavedCmd {
                                    id: c.id.clone(),
                                    command: c.command.clone(),
                                    exit_code: st.exit_code,
                                    log: st.log.path().to_path_buf(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                SavedSession {
                    sandbox,
                    id,
                    commands,
                }
            })
            .collect();
        all.sort_by(|a, b| (&a.sandbox, &a.id).cmp(&(&b.sandbox, &b.id)));
        all
    }

    /// Sessions of an earlier run of the sim, back with their commands and output; their
    /// shells died with it, so a command that was running ended as killed
    /// ([`super::shell::GONE`]) and nothing more runs in them. Log files no kept session
    /// names are removed. Answers how many sessions came back.
    pub fn restore(&self, saved: Vec<SavedSession>, logs: &std::path::Path) -> usize {
        let mut kept = std::collections::HashSet::new();
        let mut n = 0;
        for s in saved {
            let commands = s
                .commands
                .into_iter()
                .filter_map(|c| {
                    let log = OutputLog::open(&c.log).ok()?;
                    kept.insert(c.log.clone());
                    Some(Arc::new(Cmd {
                        id: c.id,
                        command: c.command,
                        state: Mutex::new(CmdState {
                            exit_code: Some(c.exit_code.unwrap_or(super::shell::GONE)),
                            log,
                        }),
                        changed: Notify::new(),
                        input: Mutex::new(None),
                        suppress_echo: false,
                    }))
                })
                .collect();
            self.map.insert(
                (s.sandbox, s.id),
                Arc::new(Session {
                    commands: Mutex::new(commands),
                    cancel: CancellationToken::new(),
                    shell: Shell::gone(),
                }),
            );
            n += 1;
        }
        for entry in std::fs::read_dir(logs).into_iter().flatten().flatten() {
            if !kept.contains(&entry.path()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        n
    }

    /// Ends a sandbox's sessions (stop, delete).
    pub fn drop_sandbox(&self, sandbox: &str) {
        self.map.retain(|(sb, _), s| {
            if sb == sandbox {
                s.cancel.cancel();
                s.remove_logs();
                false
            } else {
                true
            }
        });
        self.ptys.retain(|(sb, _), s| {
            if sb == sandbox {
                s.cancel();
                false
            } else {
                true
            }
        });
    }

    fn get(&self, sandbox: &str, sid: &str) -> Result<Arc<Session>, ApiError> {
        self.map
            .get(&(sandbox.to_string(), sid.to_string()))
            .map(|s| s.clone())
            .ok_or_else(|| ApiError::not_found(format!("session {sid} not found")))
    }
}

pub(super) fn session_json(sid: &str, s: &Session) -> Value {
    let cmds: Vec<Value> = s
        .commands
        .lock()
        .map(|c| c.iter().map(|c| c.json()).collect())
        .unwrap_or_default();
    json!({ "sessionId": sid, "commands": cmds })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreateSession {
    session_id: String,
}

pub(super) async fn create_session(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateSession>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.session_id.is_empty() {
        return Err(ApiError::bad_request("sessionId is required"));
    }
    let key = (c.id.clone(), req.session_id.clone());
    if sim.sessions.map.contains_key(&key) {
        return Err(ApiError::conflict(format!(
            "session {} already exists",
            req.session_id
        )));
    }
    let n = sim.sessions.seq.fetch_add(1, Ordering::Relaxed);
    let guest = format!("/tmp/.daytona/sessions/{n}");
    let host = c.host(&guest)?;
    let cancel = c.procs.child_token();
    let shell = Shell::start(
        spec(&c, "", None, &BTreeMap::new(), None)?,
        host,
        guest,
        cancel.clone(),
    )
    .map_err(|e| ApiError::internal(format!("starting the session's shell: {e}")))?;
    sim.sessions.map.insert(
        key,
        Arc::new(Session {
            commands: Mutex::new(Vec::new()),
            cancel,
            shell,
        }),
    );
    Ok(StatusCode::CREATED)
}

pub(super) async fn list_sessions(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let list: Vec<Value> = sim
        .sessions
        .map
        .iter()
        .filter(|e| e.key().0 == c.id)
        .map(|e| session_json(&e.key().1, e.value()))
        .collect();
    Ok(Json(Value::Array(list)))
}

pub(super) async fn get_session(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let s = sim.sessions.get(&c.id, &sid)?;
    Ok(Json(session_json(&sid, &s)))
}

pub(super) async fn delete_session(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let s = sim.sessions.get(&c.id, &sid)?;
    s.cancel.cancel();
    s.remove_logs();
    sim.sessions.map.remove(&(c.id, sid));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct SessionExec {
    command: String,
    run_async: Option<bool>,
    #[serde(rename = "async")]
    is_async: Option<bool>,
    suppress_input_echo: Option<bool>,
}

pub(super) async fn session_exec(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
    ApiJson(req): ApiJson<SessionExec>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let session = sim.sessions.get(&c.id, &sid)?;
    if req.command.trim().is_empty() {
        return Err(ApiError::bad_request("command is required"));
    }
    let run_async = req.run_async.or(req.is_async).unwrap_or(false);
    // As on Daytona: an async command's stdin stays open for the input endpoint (it never
    // sees EOF from it); a sync one reads EOF at once.
    let (in_tx, in_rx) = match run_async {
        true => {
            let (tx, rx) = mpsc::channel(16);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let cmd = Arc::new(Cmd {
        id: crate::sim::control::uuid(),
        command: req.command.clone(),
        state: Mutex::new(CmdState {
            exit_code: None,
            log: OutputLog::create(&sim.config.state_dir.join("logs"))
                .map_err(|e| ApiError::internal(format!("creating the command's log file: {e}")))?,
        }),
        changed: Notify::new(),
        input: Mutex::new(in_tx),
        suppress_echo: req.suppress_input_echo.unwrap_or(false),
    });
    let runner = cmd.clone();
    let sim2 = sim.clone();
    let sandbox = c.id.clone();
    let output = move |o: ExecOutput| {
        let limit = sim2.faults.lock().map_or(0, |f| f.log_limit_bytes);
        if let Ok(mut s) = runner.state.lock() {
            s.log.push(o, limit);
        }
        runner.changed.notify_waiters();
        if let Ok(mut map) = sim2.sandboxes.lock()
            && let Some(sb) = map.get_mut(&sandbox)
        {
            sb.last_activity_ms = now_ms();
        }
    };
    let mut finished = match session
        .shell
        .run(&cmd.id, &req.command, in_rx, output)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            // Never run: its log goes now (no session lists it).
            if let Ok(st) = cmd.state.lock() {
                st.log.remove();
            }
            return Err(ApiError::bad_request(e.to_string()));
        }
    };
    if let Ok(mut cmds) = session.commands.lock() {
        cmds.push(cmd.clone());
    }
    let ender = cmd.clone();
    let done = tokio::spawn(async move {
        let code = finished
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|c| *c)
            .unwrap_or(1);
        if let Ok(mut s) = ender.state.lock() {
            s.exit_code = Some(code);
        }
        if let Ok(mut i) = ender.input.lock() {
            i.take();
        }
        ender.changed.notify_waiters();
    });
    if run_async {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "cmdId": cmd.id }))).into_response());
    }
    let _ = done.await;
    let (output, stdout, stderr) = cmd.logs()?;
    let code = cmd.state.lock().ok().and_then(|s| s.exit_code);
    Ok(Json(json!({ "cmdId": cmd.id, "exitCode": code, "output": output, "stdout": stdout, "stderr": stderr })).into_response())
}

pub(super) fn find_cmd(sim: &Sim, c: &Ctx, sid: &str, cid: &str) -> Result<Arc<Cmd>, ApiError> {
    let s = sim.sessions.get(&c.id, sid)?;
    let cmds = s
        .commands
        .lock()
        .map_err(|_| ApiError::internal("session lock poisoned"))?;
    cmds.iter()
        .find(|x| x.id == cid)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("command {cid} not found in session {sid}")))
}

pub(super) async fn get_command(
    State(sim): State<Arc<Sim>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    Ok(Json(find_cmd(&sim, &c, &sid, &cid)?.json()))
}

pub(super) async fn command_logs(
    State(sim): State<Arc<Sim>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let cmd = find_cmd(&sim, &c, &sid, &cid)?;
    let follow = param(&raw, "follow").is_some_and(|v| v == "true");
    if follow {
        let ws = ws.map_err(|e| {
            ApiError::bad_request(format!("follow=true needs a WebSocket upgrade: {e}"))
        })?;
        return Ok(ws.on_upgrade(move |socket| follow_logs(socket, cmd)));
    }
    let (output, stdout, stderr) = cmd.logs()?;
    Ok(Json(json!({ "output": output, "stdout": stdout, "stderr": stderr })).into_response())
}

const STDOUT_MARK: &[u8] = b"\x01\x01\x01";
const STDERR_MARK: &[u8] = b"\x02\x02\x02";

/// Sends the output so far, then new output as it comes, each chunk behind its stream's
/// marker; closes with 1000 once the command has exited and everything was sent.
pub(super) async fn follow_logs(mut socket: WebSocket, cmd: Arc<Cmd>) {
    let mut sent = 0;
    loop {
        let notified = cmd.changed.notified();
        let (pieces, file, done, total, lost) = match cmd.state.lock() {
            Ok(s) => {
                let (pieces, file) = s.log.after(sent, FOLLOW_BATCH);
                let done = s.exit_code.is_some();
                // Asked only at the end, where it decides the close.
                let lost = done.then(|| s.log.lost().map(str::to_string)).flatten();
                (pieces, file, done, s.log.len(), lost)
            }
            Err(_) => return,
        };
        let chunks = outlog::read(&file, &pieces);
        for chunk in &chunks {
            let (mark, data) = match chunk {
                ExecOutput::Stdout(b) => (STDOUT_MARK, b),
                ExecOutput::Stderr(b) => (STDERR_MARK, b),
            };
            let mut frame = Vec::with_capacity(3 + data.len());
            frame.extend_from_slice(mark);
            frame.extend_from_slice(data);
            if socket.send(Message::Binary(frame.into())).await.is_err() {
                return;
            }
        }
        sent += pieces.len();
        if sent < total {
            // More is on disk already: no waiting for news.
            continue;
        }
        if done {
            // 1000 says the log was all of the command's output; when some could not be
            // kept, an internal error (1011) with why, so no client takes a short log for
            // the whole (a close reason holds at most 123 bytes).
            let (code, reason) = match lost {
                None => (1000, "command exited".to_string()),
                Some(why) => (1011, format!("output lost: {why}")),
            };
            let mut reason = reason;
            while reason.len() > 123 {
                reason.pop();
            }
            super::close_socket(
                &mut socket,
                Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }),
            )
            .await;
            return;
        }
        tokio::select! {
            () = notified => {}
            // The client went away (or sent something): stop when it closed.
            msg = socket.recv() => {
                if matches!(msg, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                    return;
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct InputRequest {
    data: String,
}

/// Daytona's input endpoint: the data goes to the command's stdin with a newline added when
/// it has none (for `read`), and is echoed into its output unless the command was started
/// with `suppressInputEcho`. A command that has ended answers 410.
pub(super) async fn command_input(
    State(sim): State<Arc<Sim>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    ApiJson(req): ApiJson<InputRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let cmd = find_cmd(&sim, &c, &sid, &cid)?;
    let gone = || {
        let code = cmd.state.lock().ok().and_then(|s| s.exit_code).unwrap_or(0);
        ApiError::new(
            StatusCode::GONE,
            format!("command has already completed with exit code {code}"),
        )
    };
    let tx = cmd.input.lock().ok().and_then(|i| i.clone());
    let Some(tx) = tx else {
        if cmd.state.lock().ok().and_then(|s| s.exit_code).is_some() {
            return Err(gone());
        }
        return Err(ApiError::bad_request(format!(
            "command {cid} was not started with runAsync: it has no input"
        )));
    };
    let mut data = req.data.into_bytes();
    if !data.ends_with(b"\n") {
        data.push(b'\n');
    }
    if !cmd.suppress_echo {
        let limit = sim.faults.lock().map_or(0, |f| f.log_limit_bytes);
        if let Ok(mut s) = cmd.state.lock() {
            s.log.push(ExecOutput::Stdout(data.clone()), limit);
        }
        cmd.changed.notify_waiters();
    }
    tx.send(data).await.map_err(|_| gone())?;
    Ok(StatusCode::NO_CONTENT)
}
