//! The toolbox's file searches and edits: `files/find` (text in files), `files/search`
//! (names by glob), `files/replace`, `files/move`, `files/permissions`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, ctx, io_error, octal_mode, param, required_path};
use crate::sim::{ApiError, ApiJson, Sim};

/// At most this many matches or names in one answer (Daytona's daemon bounds them too).
const MAX_RESULTS: usize = 10_000;
/// Files larger than this are not searched for text.
const MAX_SEARCHED_FILE: u64 = 16 * 1024 * 1024;

/// Every file under the sandbox folder `root` (hidden ones too, `.git` not), with its
/// sandbox path.
fn files_under(c: &Ctx, root: &str) -> Result<Vec<(std::path::PathBuf, String)>, ApiError> {
    let host = c.host(root)?;
    let guest = c.guest(root)?;
    if !host.exists() {
        return Err(ApiError::not_found(format!(
            "{root}: no such file or directory"
        )));
    }
    let mut out = Vec::new();
    for e in ignore::WalkBuilder::new(&host)
        .standard_filters(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .flatten()
    {
        if !e.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = e.path().strip_prefix(&host).unwrap_or(e.path());
        let g = if rel.as_os_str().is_empty() {
            guest.clone()
        } else {
            format!("{}/{}", guest.trim_end_matches('/'), rel.display())
        };
        out.push((e.path().to_path_buf(), g));
    }
    Ok(out)
}

/// `GET /files/find?path&pattern`: the lines holding `pattern` (plain text) in the files
/// under `path`.
pub(super) async fn find(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let pattern = param(&raw, "pattern")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("pattern is required"))?;
    let files = files_under(&c, &path)?;
    let matches = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (host, guest) in files {
            if std::fs::metadata(&host).is_ok_and(|m| m.len() > MAX_SEARCHED_FILE) {
                continue;
            }
            let Ok(bytes) = std::fs::read(&host) else {
                continue;
            };
            // Binary files are skipped, as grep -I does.
            if bytes.contains(&0) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            for (i, line) in text.lines().enumerate() {
                if line.contains(&pattern) {
                    out.push(json!({ "file": guest, "line": i + 1, "content": line }));
                    if out.len() >= MAX_RESULTS {
                        return out;
                    }
                }
            }
        }
        out
    })
    .await
    .map_err(|e| ApiError::internal(format!("find: {e}")))?;
    Ok(Json(Value::Array(matches)))
}

/// `GET /files/search?path&pattern`: the files under `path` whose name matches the glob
/// `pattern` (`*.rs`; with a `/` the pattern is matched against the path below `path`).
pub(super) async fn search(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let pattern = param(&raw, "pattern")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("pattern is required"))?;
    let glob = globset::GlobBuilder::new(&pattern)
        .literal_separator(pattern.contains('/'))
        .build()
        .map_err(|e| ApiError::bad_request(format!("pattern {pattern:?} is not a glob: {e}")))?
        .compile_matcher();
    let base = c.guest(&path)?;
    let files: Vec<String> = files_under(&c, &path)?
        .into_iter()
        .map(|(_, g)| g)
        .filter(|g| {
            let rel = g.strip_prefix(&base).unwrap_or(g).trim_start_matches('/');
            let name = g.rsplit('/').next().unwrap_or(g);
            if pattern.contains('/') {
                glob.is_match(rel)
            } else {
                glob.is_match(name)
            }
        })
        .take(MAX_RESULTS)
        .collect();
    Ok(Json(json!({ "files": files })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReplaceRequest {
    files: Vec<String>,
    pattern: String,
    new_value: String,
}

/// `POST /files/replace`: every occurrence of `pattern` (plain text) in each file becomes
/// `newValue`; one result per file, failures said per file.
pub(super) async fn replace(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ReplaceRequest>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.pattern.is_empty() {
        return Err(ApiError::bad_request("pattern is required"));
    }
    let mut results = Vec::new();
    for file in &req.files {
        let result = (|| -> Result<(), String> {
            let host = c.host(file).map_err(|e| e.message)?;
            let text = std::fs::read_to_string(&host).map_err(|e| format!("{file}: {e}"))?;
            let new = text.replace(&req.pattern, &req.new_value);
            if new != text {
                let tmp = host.with_extension("daytona-replace.tmp");
                std::fs::write(&tmp, new).map_err(|e| format!("{file}: {e}"))?;
                if let Ok(meta) = std::fs::metadata(&host) {
                    let _ = std::fs::set_permissions(&tmp, meta.permissions());
                }
                std::fs::rename(&tmp, &host).map_err(|e| format!("{file}: {e}"))?;
            }
            Ok(())
        })();
        results.push(match result {
            Ok(()) => json!({ "file": file, "success": true }),
            Err(e) => json!({ "file": file, "success": false, "error": e }),
        });
    }
    Ok(Json(Value::Array(results)))
}

/// `POST /files/move?source&destination`.
pub(super) async fn move_path(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    let source =
        param(&raw, "source").ok_or_else(|| ApiError::bad_request("source is required"))?;
    let dest = param(&raw, "destination")
        .ok_or_else(|| ApiError::bad_request("destination is required"))?;
    let (from, to) = (c.host(&source)?, c.host(&dest)?);
    std::fs::symlink_metadata(&from).map_err(|e| io_error(&source, e))?;
    if to.exists() {
        return Err(ApiError::conflict(format!("{dest} already exists")));
    }
    if to.starts_with(&from) {
        return Err(ApiError::bad_request(format!(
            "cannot move {source} into itself ({dest})"
        )));
    }
    std::fs::rename(&from, &to).map_err(|e| io_error(&dest, e))?;
    Ok(StatusCode::OK)
}

/// `POST /files/permissions?path&mode&owner&group`: mode in octal; owner and group by
/// number or name (only the sandbox user's own are possible in the sim).
pub(super) async fn permissions(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let host = c.host(&path)?;
    std::fs::symlink_metadata(&host).map_err(|e| io_error(&path, e))?;
    if let Some(mode) = param(&raw, "mode").filter(|m| !m.is_empty()) {
        let bits = octal_mode(&mode)?;
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(bits))
            .map_err(|e| io_error(&path, e))?;
    }
    for (key, is_owner) in [("owner", true), ("group", false)] {
        let Some(who) = param(&raw, key).filter(|v| !v.is_empty()) else {
            continue;
        };
        let id = resolve_id(&who, is_owner, &c.user)
            .ok_or_else(|| ApiError::bad_request(format!("{key} {who:?} does not exist")))?;
        let (uid, gid) = if is_owner {
            (Some(id), None)
        } else {
            (None, Some(id))
        };
        std::os::unix::fs::lchown(&host, uid, gid).map_err(|e| io_error(&path, e))?;
    }
    Ok(StatusCode::OK)
}

/// A user or group by number or name. The sandbox user (`daytona`) is the sim's own user.
fn resolve_id(who: &str, user: bool, sandbox_user: &str) -> Option<u32> {
    if let Ok(n) = who.parse() {
        return Some(n);
    }
    if who == sandbox_user {
        return Some(if user {
            nix::unistd::geteuid().as_raw()
        } else {
            nix::unistd::getegid().as_raw()
        });
    }
    if user {
        nix::unistd::User::from_name(who)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    } else {
        nix::unistd::Group::from_name(who)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}
