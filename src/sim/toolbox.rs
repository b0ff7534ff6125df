//! Daytona's toolbox over a sim sandbox: files, `process/execute`, sessions. Paths are the
//! sandbox's own (`/home/<user>/...`, `/tmp/...`, or relative to the user's home); only
//! those two trees exist for writing, and no path may go through a symlink out of them.

use std::collections::BTreeMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{ApiError, ApiJson, Sim};
use crate::clock::now_ms;
use crate::sandbox::process::{self, ExecOutput, ProcessSpec};

/// Default `process/execute` timeout when the request names none (Daytona documents 10 s).
const DEFAULT_EXECUTE_TIMEOUT: Duration = Duration::from_secs(10);

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

async fn list_files(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = param(&raw, "path").unwrap_or_else(|| c.home());
    let guest = c.guest(&path)?;
    let host = c.host(&path)?;
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&host).map_err(|e| io_error(&path, e))?;
    for entry in entries.flatten() {
        if let (Ok(meta), Some(name)) = (entry.metadata(), entry.file_name().to_str()) {
            out.push(info_json(
                &format!("{}/{name}", guest.trim_end_matches('/')),
                &meta,
            ));
        }
    }
    Ok(Json(Value::Array(out)))
}

async fn file_info(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let meta = std::fs::metadata(c.host(&path)?).map_err(|e| io_error(&path, e))?;
    Ok(Json(info_json(&c.guest(&path)?, &meta)))
}

async fn create_folder(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let mode = param(&raw, "mode").unwrap_or_else(|| "755".into());
    let mode = u32::from_str_radix(&mode, 8)
        .map_err(|_| ApiError::bad_request(format!("mode {mode:?} is not octal")))?;
    let host = c.host(&path)?;
    std::fs::create_dir_all(&host).map_err(|e| io_error(&path, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(&path, e))?;
    Ok(StatusCode::CREATED)
}

async fn delete_path(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let recursive = param(&raw, "recursive").is_some_and(|v| v == "true");
    let host = c.host(&path)?;
    let meta = std::fs::symlink_metadata(&host).map_err(|e| io_error(&path, e))?;
    if meta.is_dir() {
        if !recursive {
            return Err(ApiError::bad_request(format!(
                "{path} is a directory: pass recursive=true"
            )));
        }
        std::fs::remove_dir_all(&host).map_err(|e| io_error(&path, e))?;
    } else {
        std::fs::remove_file(&host).map_err(|e| io_error(&path, e))?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn download(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let file = open_for_read(&c, &path).await?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn open_for_read(c: &Ctx, path: &str) -> Result<tokio::fs::File, ApiError> {
    let host = c.host(path)?;
    // A symlink as the last component must still land inside the sandbox.
    let real = std::fs::canonicalize(&host).map_err(|e| io_error(path, e))?;
    let root = std::fs::canonicalize(&c.fs).map_err(|e| io_error(path, e))?;
    if !real.starts_with(&root) {
        return Err(ApiError::bad_request(format!(
            "{path} points outside the sandbox"
        )));
    }
    if real.is_dir() {
        return Err(ApiError::bad_request(format!("{path} is a directory")));
    }
    tokio::fs::File::open(&real)
        .await
        .map_err(|e| io_error(path, e))
}

#[derive(Deserialize)]
struct BulkDownload {
    paths: Vec<String>,
}

/// `multipart/form-data` with a `file` part per path (or an `error` part), streamed.
async fn bulk_download(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BulkDownload>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let boundary = format!("sim{}", super::control::uuid().replace('-', ""));
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let b = boundary.clone();
    tokio::spawn(async move {
        for path in req.paths {
            let disposition = |name: &str| {
                format!(
                    "--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{}\"\r\n",
                    path.replace('"', "%22")
                )
            };
            match open_for_read(&c, &path).await {
                Ok(file) => {
                    let head = format!(
                        "{}Content-Type: application/octet-stream\r\n\r\n",
                        disposition("file")
                    );
                    if tx.send(Ok(Bytes::from(head))).await.is_err() {
                        return;
                    }
                    let mut s = tokio_util::io::ReaderStream::new(file);
                    while let Some(chunk) = s.next().await {
                        if tx.send(chunk).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let body = json!({"message": e.message, "statusCode": e.status.as_u16(), "code": "FILE_ERROR"});
                    let part = format!(
                        "{}Content-Type: application/json\r\n\r\n{body}",
                        disposition("error")
                    );
                    if tx.send(Ok(Bytes::from(part))).await.is_err() {
                        return;
                    }
                }
            }
            if tx.send(Ok(Bytes::from_static(b"\r\n"))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Bytes::from(format!("--{b}--\r\n")))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )],
        body,
    )
        .into_response())
}

/// Streams a multipart field into a file (never the whole of it in memory).
async fn field_to_file(
    field: &mut axum::extract::multipart::Field<'_>,
    dest: &FsPath,
) -> Result<u64, ApiError> {
    let mut f = tokio::fs::File::create(dest)
        .await
        .map_err(|e| io_error(&dest.display().to_string(), e))?;
    let mut n = 0u64;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?
    {
        n += chunk.len() as u64;
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))?;
    }
    f.flush()
        .await
        .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))?;
    Ok(n)
}

/// A temp file inside the sandbox's folder, renamed into place when complete.
fn staging(c: &Ctx) -> Result<PathBuf, ApiError> {
    let dir = c.fs.parent().unwrap_or(&c.fs).join("uploads");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("staging uploads: {e}")))?;
    Ok(dir.join(super::control::uuid()))
}

fn place(staged: &FsPath, dest: &FsPath, path: &str) -> Result<(), ApiError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(path, e))?;
    }
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(dest);
    }
    std::fs::rename(staged, dest).map_err(|e| io_error(path, e))
}

/// `files[i].path` text parts and `files[i].file` file parts, paired by index in any order.
async fn bulk_upload(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    mut mp: Multipart,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let mut paths: BTreeMap<usize, String> = BTreeMap::new();
    let mut staged: BTreeMap<usize, (PathBuf, u64)> = BTreeMap::new();
    let parse_index = |name: &str| -> Option<(usize, String)> {
        let rest = name.strip_prefix("files[")?;
        let (i, field) = rest.split_once("].")?;
        Some((i.parse().ok()?, field.to_string()))
    };
    let result = async {
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?
        {
            let name = field.name().unwrap_or("").to_string();
            let Some((i, kind)) = parse_index(&name) else {
                return Err(ApiError::bad_request(format!(
                    "unexpected multipart field {name:?}"
                )));
            };
            match kind.as_str() {
                "path" => {
                    let text = field
                        .text()
                        .await
                        .map_err(|e| ApiError::bad_request(format!("reading {name}: {e}")))?;
                    paths.insert(i, text);
                }
                "file" => {
                    let tmp = staging(&c)?;
                    let n = field_to_file(&mut field, &tmp).await?;
                    staged.insert(i, (tmp, n));
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unexpected multipart field {name:?}"
                    )));
                }
            }
        }
        Ok(())
    }
    .await;
    let cleanup = |staged: &BTreeMap<usize, (PathBuf, u64)>| {
        for (tmp, _) in staged.values() {
            let _ = std::fs::remove_file(tmp);
        }
    };
    if let Err(e) = result {
        cleanup(&staged);
        return Err(e);
    }
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for (i, (tmp, n)) in &staged {
        let Some(path) = paths.get(i) else {
            errors.push(
                json!({"index": i, "message": format!("files[{i}].file has no files[{i}].path")}),
            );
            continue;
        };
        match c.host(path).and_then(|dest| place(tmp, &dest, path)) {
            Ok(()) => files
                .push(json!({"path": c.guest(path).unwrap_or_else(|_| path.clone()), "bytes": n})),
            Err(e) => errors.push(json!({"path": path, "message": e.message})),
        }
    }
    for (i, path) in &paths {
        if !staged.contains_key(i) {
            errors.push(
                json!({"path": path, "message": format!("files[{i}].path has no files[{i}].file")}),
            );
        }
    }
    cleanup(&staged);
    if !errors.is_empty() && files.is_empty() {
        return Err(ApiError::bad_request(format!(
            "upload failed: {}",
            Value::Array(errors)
        )));
    }
    Ok(Json(json!({ "files": files, "errors": errors })))
}

/// A multipart `file` field or a raw body, streamed to `path`.
async fn upload_v2(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let dest = c.host(&path)?;
    let tmp = staging(&c)?;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let written = if is_multipart {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        let mut n = None;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?
        {
            if field.name() == Some("file") {
                n = Some(field_to_file(&mut field, &tmp).await?);
            }
        }
        n.ok_or_else(|| ApiError::bad_request("the multipart body has no `file` field"))
    } else {
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| ApiError::internal(format!("staging: {e}")))?;
        let mut stream = req.into_body().into_data_stream();
        let mut n = 0u64;
        let mut res = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    n += b.len() as u64;
                    if let Err(e) = f.write_all(&b).await {
                        res = Err(ApiError::internal(format!("writing the upload: {e}")));
                        break;
                    }
                }
                Err(e) => {
                    res = Err(ApiError::bad_request(format!("reading the upload: {e}")));
                    break;
                }
            }
        }
        let _ = f.flush().await;
        res.map(|()| n)
    };
    let written = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = place(&tmp, &dest, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Json(json!({ "path": c.guest(&path)?, "bytes": written })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExecuteRequest {
    command: String,
    cwd: Option<String>,
    envs: Option<BTreeMap<String, String>>,
    timeout: Option<u64>,
}

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
        jail: Some(c.fs.clone()),
    })
}

async fn execute(
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
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = c.procs.child_token();
    let run = tokio::spawn(async move { process::run(&p, tx, cancel).await });
    let mut output = Vec::new();
    while let Some(o) = rx.recv().await {
        match o {
            ExecOutput::Stdout(b) | ExecOutput::Stderr(b) => output.extend(b),
        }
    }
    let exit = run
        .await
        .map_err(|e| ApiError::internal(format!("exec task: {e}")))?
        .map_err(|e| ApiError::internal(format!("starting the command: {e}")))?;
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
struct Cmd {
    id: String,
    command: String,
    state: Mutex<CmdState>,
    changed: Notify,
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
}

#[derive(Default)]
struct CmdState {
    exit_code: Option<i32>,
    chunks: Vec<ExecOutput>,
}

impl Cmd {
    fn json(&self) -> Value {
        let exit = self.state.lock().ok().and_then(|s| s.exit_code);
        let mut v = json!({ "id": self.id, "command": self.command });
        if let Some(code) = exit {
            v["exitCode"] = json!(code);
        }
        v
    }

    fn logs(&self) -> (String, String, String) {
        let (mut all, mut out, mut err) = (Vec::new(), Vec::new(), Vec::new());
        if let Ok(s) = self.state.lock() {
            for c in &s.chunks {
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
        (s(all), s(out), s(err))
    }
}

/// A session: its commands, and a token that ends them all.
struct Session {
    commands: Mutex<Vec<Arc<Cmd>>>,
    cancel: CancellationToken,
}

/// Every session of every sandbox.
#[derive(Default)]
pub struct Sessions {
    map: DashMap<(String, String), Arc<Session>>,
}

impl Sessions {
    /// Ends a sandbox's sessions (stop, delete).
    pub fn drop_sandbox(&self, sandbox: &str) {
        self.map.retain(|(sb, _), s| {
            if sb == sandbox {
                s.cancel.cancel();
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

fn session_json(sid: &str, s: &Session) -> Value {
    let cmds: Vec<Value> = s
        .commands
        .lock()
        .map(|c| c.iter().map(|c| c.json()).collect())
        .unwrap_or_default();
    json!({ "sessionId": sid, "commands": cmds })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateSession {
    session_id: String,
}

async fn create_session(
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
    sim.sessions.map.insert(
        key,
        Arc::new(Session {
            commands: Mutex::new(Vec::new()),
            cancel: c.procs.child_token(),
        }),
    );
    Ok(StatusCode::CREATED)
}

async fn list_sessions(
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

async fn get_session(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let s = sim.sessions.get(&c.id, &sid)?;
    Ok(Json(session_json(&sid, &s)))
}

async fn delete_session(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let s = sim.sessions.get(&c.id, &sid)?;
    s.cancel.cancel();
    sim.sessions.map.remove(&(c.id, sid));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SessionExec {
    command: String,
    run_async: Option<bool>,
    #[serde(rename = "async")]
    is_async: Option<bool>,
}

async fn session_exec(
    State(sim): State<Arc<Sim>>,
    Path((id, sid)): Path<(String, String)>,
    ApiJson(req): ApiJson<SessionExec>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let session = sim.sessions.get(&c.id, &sid)?;
    if req.command.trim().is_empty() {
        return Err(ApiError::bad_request("command is required"));
    }
    let p = spec(&c, &req.command, None, &BTreeMap::new(), None)?;
    let (in_tx, in_rx) = mpsc::channel(16);
    let cmd = Arc::new(Cmd {
        id: super::control::uuid(),
        command: req.command.clone(),
        state: Mutex::new(CmdState::default()),
        changed: Notify::new(),
        input: Mutex::new(Some(in_tx)),
    });
    if let Ok(mut cmds) = session.commands.lock() {
        cmds.push(cmd.clone());
    }
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = session.cancel.child_token();
    let runner = cmd.clone();
    let sim2 = sim.clone();
    let sandbox = c.id.clone();
    let done = tokio::spawn(async move {
        let run =
            tokio::spawn(async move { process::run_with_input(&p, Some(in_rx), tx, cancel).await });
        while let Some(o) = rx.recv().await {
            if let Ok(mut s) = runner.state.lock() {
                s.chunks.push(o);
            }
            runner.changed.notify_waiters();
            if let Ok(mut map) = sim2.sandboxes.lock()
                && let Some(sb) = map.get_mut(&sandbox)
            {
                sb.last_activity_ms = now_ms();
            }
        }
        let code = match run.await {
            Ok(Ok(exit)) => exit.code,
            _ => 1,
        };
        if let Ok(mut s) = runner.state.lock() {
            s.exit_code = Some(code);
        }
        if let Ok(mut i) = runner.input.lock() {
            i.take();
        }
        runner.changed.notify_waiters();
    });
    if req.run_async.or(req.is_async).unwrap_or(false) {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "cmdId": cmd.id }))).into_response());
    }
    let _ = done.await;
    let (output, stdout, stderr) = cmd.logs();
    let code = cmd.state.lock().ok().and_then(|s| s.exit_code);
    Ok(Json(json!({ "cmdId": cmd.id, "exitCode": code, "output": output, "stdout": stdout, "stderr": stderr })).into_response())
}

fn find_cmd(sim: &Sim, c: &Ctx, sid: &str, cid: &str) -> Result<Arc<Cmd>, ApiError> {
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

async fn get_command(
    State(sim): State<Arc<Sim>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    Ok(Json(find_cmd(&sim, &c, &sid, &cid)?.json()))
}

async fn command_logs(
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
    let (output, stdout, stderr) = cmd.logs();
    Ok(Json(json!({ "output": output, "stdout": stdout, "stderr": stderr })).into_response())
}

const STDOUT_MARK: &[u8] = b"\x01\x01\x01";
const STDERR_MARK: &[u8] = b"\x02\x02\x02";

/// Sends the output so far, then new output as it comes, each chunk behind its stream's
/// marker; closes with 1000 once the command has exited and everything was sent.
async fn follow_logs(mut socket: WebSocket, cmd: Arc<Cmd>) {
    let mut sent = 0;
    loop {
        let notified = cmd.changed.notified();
        let (chunks, done) = match cmd.state.lock() {
            Ok(s) => (s.chunks[sent..].to_vec(), s.exit_code.is_some()),
            Err(_) => return,
        };
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
        sent += chunks.len();
        if done {
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "command exited".into(),
                })))
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
struct Input {
    data: String,
}

async fn command_input(
    State(sim): State<Arc<Sim>>,
    Path((id, sid, cid)): Path<(String, String, String)>,
    ApiJson(req): ApiJson<Input>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let cmd = find_cmd(&sim, &c, &sid, &cid)?;
    let tx = cmd
        .input
        .lock()
        .ok()
        .and_then(|i| i.clone())
        .ok_or_else(|| ApiError::bad_request(format!("command {cid} has exited")))?;
    tx.send(req.data.into_bytes())
        .await
        .map_err(|_| ApiError::bad_request(format!("command {cid} has exited")))?;
    Ok(StatusCode::NO_CONTENT)
}
