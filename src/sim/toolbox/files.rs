//! The toolbox's files: list, info, folders, delete, download (one and bulk), upload (bulk,
//! paired by index, and streamed upload-v2).

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Ctx, ctx, info_json, io_error, octal_mode, param, required_path};
use crate::sim::{ApiError, ApiJson, Sim};

pub(super) async fn list_files(
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

pub(super) async fn file_info(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let meta = std::fs::metadata(c.host(&path)?).map_err(|e| io_error(&path, e))?;
    Ok(Json(info_json(&c.guest(&path)?, &meta)))
}

pub(super) async fn create_folder(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let mode = octal_mode(&param(&raw, "mode").unwrap_or_else(|| "755".into()))?;
    let host = c.host(&path)?;
    std::fs::create_dir_all(&host).map_err(|e| io_error(&path, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(&path, e))?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn delete_path(
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

pub(super) async fn download(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let file = open_for_read(&c, &path).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

pub(super) async fn open_for_read(c: &Ctx, path: &str) -> Result<tokio::fs::File, ApiError> {
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
pub(super) struct BulkDownload {
    paths: Vec<String>,
}

/// `multipart/form-data` with a `file` part per path (or an `error` part), streamed.
pub(super) async fn bulk_download(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BulkDownload>,
) -> Result<Response, ApiError> {
    let c = ctx(&sim, &id)?;
    let boundary = format!("sim{}", crate::sim::control::uuid().replace('-', ""));
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
                    let mut s = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
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
pub(super) async fn field_to_file(
    sim: &Sim,
    field: &mut axum::extract::multipart::Field<'_>,
    dest: &FsPath,
) -> Result<u64, ApiError> {
    let mut f = tokio::fs::File::create(dest)
        .await
        .map_err(|e| io_error(&dest.display().to_string(), e))?;
    let mut n = 0u64;
    let pace = Pace::new(sim);
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?
    {
        n += chunk.len() as u64;
        pace.wait(n).await;
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))?;
    }
    f.flush()
        .await
        .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))?;
    Ok(n)
}

/// The `upload_bytes_per_sec` fault: an upload read no faster than that.
struct Pace {
    started: std::time::Instant,
    per_sec: u64,
}

impl Pace {
    fn new(sim: &Sim) -> Pace {
        let per_sec = sim.faults.lock().map_or(0, |f| f.upload_bytes_per_sec);
        Pace {
            started: std::time::Instant::now(),
            per_sec,
        }
    }

    /// Waits until `read` bytes are due at the paced rate.
    async fn wait(&self, read: u64) {
        if self.per_sec > 0 {
            let due = std::time::Duration::from_secs_f64(read as f64 / self.per_sec as f64);
            tokio::time::sleep_until((self.started + due).into()).await;
        }
    }
}

/// A temp file inside the sandbox's folder, renamed into place when complete.
pub(super) fn staging(c: &Ctx) -> Result<PathBuf, ApiError> {
    let dir = c.fs.parent().unwrap_or(&c.fs).join("uploads");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("staging uploads: {e}")))?;
    Ok(dir.join(crate::sim::control::uuid()))
}

pub(super) fn place(staged: &FsPath, dest: &FsPath, path: &str) -> Result<(), ApiError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(path, e))?;
    }
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(dest);
    }
    std::fs::rename(staged, dest).map_err(|e| io_error(path, e))
}

/// `files[i].path` text parts and `files[i].file` file parts, paired by index in any order.
pub(super) async fn bulk_upload(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    mp: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let mut mp = mp.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
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
                    let n = field_to_file(&sim, &mut field, &tmp).await?;
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
pub(super) async fn upload_v2(
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
                n = Some(field_to_file(&sim, &mut field, &tmp).await?);
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
        let pace = Pace::new(&sim);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    n += b.len() as u64;
                    pace.wait(n).await;
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
