//! Daytona's toolbox over a sim sandbox: files, `process/execute`, sessions. Paths are the
//! sandbox's own (`/home/<user>/...`, `/tmp/...`, or relative to the user's home); only
//! those two trees exist for writing, and no path may go through a symlink out of them.

use std::collections::BTreeMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{ApiError, Sim};
use crate::clock::now_ms;
use crate::sandbox::process::ProcessSpec;

mod files;
mod git;
pub(crate) mod info;
mod outlog;
mod process;
mod pty;
mod search;
mod shell;

use files::{
    bulk_download, bulk_upload, create_folder, delete_path, download, file_info, list_files,
    upload_v2,
};
pub use process::{SavedSession, Sessions};
use process::{
    command_input, command_logs, create_session, delete_session, execute, get_command, get_session,
    list_sessions, session_exec,
};

/// The toolbox's routes, under `/toolbox/{sandbox_id}`.
pub fn router() -> Router<Arc<Sim>> {
    Router::new()
        .route("/files", get(list_files).delete(delete_path))
        .route("/files/info", get(file_info))
        .route("/files/folder", post(create_folder))
        .route("/files/download", get(download))
        .route("/files/bulk-download", post(bulk_download))
        .route("/files/bulk-upload", post(bulk_upload))
        .route("/files/upload-v2", post(upload_v2))
        .route("/process/execute", post(execute))
        .route("/process/session", post(create_session).get(list_sessions))
        .route(
            "/process/session/{sid}",
            get(get_session).delete(delete_session),
        )
        .route("/process/session/{sid}/exec", post(session_exec))
        .route("/process/session/{sid}/command/{cid}", get(get_command))
        .route(
            "/process/session/{sid}/command/{cid}/logs",
            get(command_logs),
        )
        .route(
            "/process/session/{sid}/command/{cid}/input",
            post(command_input),
        )
        .route("/process/pty", post(pty::create_pty).get(pty::list_ptys))
        .route("/process/pty/create-connect", get(pty::create_connect_pty))
        .route(
            "/process/pty/{sid}",
            get(pty::get_pty).delete(pty::delete_pty),
        )
        .route("/process/pty/{sid}/resize", post(pty::resize_pty))
        .route("/process/pty/{sid}/connect", get(pty::connect_pty))
        .route("/files/find", get(search::find))
        .route("/files/search", get(search::search))
        .route("/files/replace", post(search::replace))
        .route("/files/move", post(search::move_path))
        .route("/files/permissions", post(search::permissions))
        .route("/work-dir", get(info::work_dir))
        .route("/user-home-dir", get(info::user_home_dir))
        .route("/version", get(info::version))
        .route("/env", post(info::update_env))
        .route("/init", post(info::init))
        .route("/port", get(info::ports))
        .route("/port/{port}/in-use", get(info::port_in_use))
        .route("/system/metrics", get(info::metrics))
        .route("/git/clone", post(git::clone))
        .route("/git/init", post(git::init))
        .route("/git/status", get(git::status))
        .route(
            "/git/branches",
            get(git::list_branches)
                .post(git::create_branch)
                .delete(git::delete_branch),
        )
        .route("/git/add", post(git::add))
        .route("/git/commit", post(git::commit))
        .route("/git/checkout", post(git::checkout))
        .route("/git/history", get(git::history))
}

/// What a toolbox call needs of its sandbox.
#[derive(Clone)]
struct Ctx {
    id: String,
    user: String,
    fs: PathBuf,
    env: BTreeMap<String, String>,
    procs: CancellationToken,
}

/// The sandbox, which must be started; marks it active.
fn ctx(sim: &Sim, id: &str) -> Result<Ctx, ApiError> {
    let mut map = sim
        .sandboxes
        .lock()
        .map_err(|_| ApiError::internal("state lock poisoned"))?;
    let sb = map
        .get_mut(id)
        .ok_or_else(|| ApiError::not_found(format!("Sandbox {id} not found")))?;
    if sb.state != "started" {
        return Err(ApiError::bad_request(format!(
            "Sandbox {id} is {}: it must be started to use the toolbox",
            sb.state
        )));
    }
    sb.last_activity_ms = now_ms();
    Ok(Ctx {
        id: sb.id.clone(),
        user: sb.user.clone(),
        fs: sb.fs(sim),
        env: sb.env.clone(),
        procs: sb.procs.clone(),
    })
}

impl Ctx {
    fn home(&self) -> String {
        format!("/home/{}", self.user)
    }

    /// A sandbox path, normalized, with `..` resolved inside it.
    fn guest(&self, path: &str) -> Result<String, ApiError> {
        if path.is_empty() {
            return Err(ApiError::bad_request("path is required"));
        }
        let full = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.home())
        };
        let mut parts: Vec<&str> = Vec::new();
        for c in FsPath::new(&full).components() {
            match c {
                Component::Normal(p) => parts.push(p.to_str().unwrap_or("")),
                Component::ParentDir => {
                    parts.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        Ok(format!("/{}", parts.join("/")))
    }

    /// The host path behind a sandbox path. Refuses paths outside `/home` and `/tmp`, and
    /// any whose existing ancestors include a symlink.
    fn host(&self, path: &str) -> Result<PathBuf, ApiError> {
        let guest = self.guest(path)?;
        let rel = guest.trim_start_matches('/');
        let top = rel.split('/').next().unwrap_or("");
        if top != "home" && top != "tmp" {
            return Err(ApiError::bad_request(format!(
                "path {path} is outside the sandbox's writable area (/home, /tmp)"
            )));
        }
        let mut host = self.fs.clone();
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            host.push(part);
            if i + 1 < parts.len()
                && std::fs::symlink_metadata(&host).is_ok_and(|m| m.file_type().is_symlink())
            {
                return Err(ApiError::bad_request(format!(
                    "path {path} goes through a symlink"
                )));
            }
        }
        Ok(host)
    }

    fn env(&self, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.insert("HOME".into(), self.home());
        env.insert("USER".into(), self.user.clone());
        env.insert("DAYTONA_SANDBOX_ID".into(), self.id.clone());
        env.extend(extra.clone());
        env
    }
}

/// A command to run in the sandbox `c` (jailed), in `cwd` (a sandbox path; the user's home
/// by default), with the sandbox's environment and `env` on top.
fn spec(
    c: &Ctx,
    command: &str,
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
    timeout: Option<Duration>,
) -> Result<ProcessSpec, ApiError> {
    let cwd = match cwd.filter(|s| !s.is_empty()) {
        Some(p) => p.to_string(),
        None => c.home(),
    };
    let guest = c.guest(&cwd)?;
    let host = c.host(&cwd)?;
    if !host.is_dir() {
        return Err(ApiError::bad_request(format!(
            "working directory {cwd} does not exist"
        )));
    }
    Ok(ProcessSpec {
        command: command.to_string(),
        cwd: PathBuf::from(guest),
        env: c.env(env),
        timeout,
        jail: Some(crate::sandbox::jail::Jail::Sim(c.fs.clone())),
        tty: None,
        direct: Default::default(),
        cgroup_procs: Vec::new(),
        agent: None,
    })
}

/// A file mode in octal (`755`, `0644`), at most `7777`.
fn octal_mode(text: &str) -> Result<u32, ApiError> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|b| *b <= 0o7777)
        .ok_or_else(|| ApiError::bad_request(format!("mode {text:?} is not octal (e.g. 0755)")))
}

/// Runs `p` in the sandbox `c` to its end: how it ended, and its output (both streams in
/// the order read, stdout, stderr).
async fn run_to_end(
    c: &Ctx,
    p: ProcessSpec,
    what: &str,
) -> Result<(crate::sandbox::process::ExecExit, Vec<u8>, Vec<u8>, Vec<u8>), ApiError> {
    use crate::sandbox::process::{self, ExecOutput};
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let cancel = c.procs.child_token();
    let run = tokio::spawn(async move { process::run(&p, None, tx, cancel).await });
    let (mut all, mut out, mut err) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(o) = rx.recv().await {
        match o {
            ExecOutput::Stdout(b) => {
                all.extend_from_slice(&b);
                out.extend(b);
            }
            ExecOutput::Stderr(b) => {
                all.extend_from_slice(&b);
                err.extend(b);
            }
        }
    }
    let exit = run
        .await
        .map_err(|e| ApiError::internal(format!("{what} task: {e}")))?
        .map_err(|e| ApiError::internal(format!("starting {what}: {e}")))?;
    Ok((exit, all, out, err))
}

/// Ends a WebSocket as the protocol asks (RFC 6455 7.1.1): the close frame (none: a plain
/// close), then what the client still sends is read until its own close frame (at most
/// [`CLOSE_WAIT`]), so that the connection is not dropped with the client's bytes unread:
/// the kernel then resets it, and a client may lose what was sent before the reset (the
/// exit, the close frame) to a "connection reset" error.
async fn close_socket(
    socket: &mut axum::extract::ws::WebSocket,
    frame: Option<axum::extract::ws::CloseFrame>,
) {
    use axum::extract::ws::Message;
    if socket.send(Message::Close(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long a closing WebSocket waits for the client's close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn query(raw: &Option<String>) -> Vec<(String, String)> {
    raw.as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn param(raw: &Option<String>, key: &str) -> Option<String> {
    query(raw)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The `path` query parameter, which the call cannot do without.
fn required_path(raw: &Option<String>) -> Result<String, ApiError> {
    param(raw, "path").ok_or_else(|| ApiError::bad_request("path is required"))
}

fn io_error(path: &str, e: std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::not_found(format!("{path}: no such file or directory"))
        }
        std::io::ErrorKind::PermissionDenied => {
            ApiError::new(StatusCode::FORBIDDEN, format!("{path}: permission denied"))
        }
        _ => ApiError::bad_request(format!("{path}: {e}")),
    }
}

fn info_json(guest: &str, meta: &std::fs::Metadata) -> Value {
    use std::os::unix::fs::MetadataExt;
    let modified = meta
        .modified()
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default();
    let name = guest.rsplit('/').next().unwrap_or("").to_string();
    json!({
        "name": name,
        "path": guest,
        "isDir": meta.is_dir(),
        "size": meta.len(),
        "mode": format!("{:o}", meta.mode() & 0o7777),
        "permissions": format!("{:o}", meta.mode() & 0o777),
        "modTime": modified,
        "modifiedAt": modified,
        "owner": meta.uid().to_string(),
        "group": meta.gid().to_string(),
    })
}
