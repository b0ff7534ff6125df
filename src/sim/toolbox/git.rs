//! The toolbox's git routes, run as the real `git` inside the sandbox's jail: clone, init,
//! status, branches (list, create, delete), add, commit, checkout and history. A failing
//! git is a 400 with git's own message (credentials taken out).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::shell::quote;
use super::{Ctx, ctx, required_path, run_to_end, spec};
use crate::sim::{ApiError, ApiJson, Sim};

/// How long one git command may take in the sim.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `git ARGS` in the sandbox folder `dir`; answers its stdout, or a 400 with its
/// stderr (with `secret`, if any, taken out).
async fn git(c: &Ctx, dir: &str, args: &[&str], secret: Option<&str>) -> Result<String, ApiError> {
    let host = c.host(dir)?;
    if !host.is_dir() {
        return Err(ApiError::bad_request(format!("{dir} is not a folder")));
    }
    let command = std::iter::once("git".to_string())
        .chain(args.iter().map(|a| quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let mut env = BTreeMap::new();
    // Never a prompt for credentials: a clone that needs them fails at once.
    env.insert("GIT_TERMINAL_PROMPT".to_string(), "0".to_string());
    let p = spec(c, &command, Some(dir), &env, Some(GIT_TIMEOUT))?;
    let (exit, _, out, err) = run_to_end(c, p, "git").await?;
    if exit.code != 0 {
        let mut msg = String::from_utf8_lossy(&err).trim().to_string();
        if let Some(s) = secret.filter(|s| !s.is_empty()) {
            msg = msg.replace(s, "***");
        }
        if msg.is_empty() {
            msg = format!(
                "git {} exited with {}",
                args.first().unwrap_or(&""),
                exit.code
            );
        }
        return Err(ApiError::bad_request(msg));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[derive(Deserialize)]
pub(super) struct CloneRequest {
    url: String,
    path: String,
    branch: Option<String>,
    commit_id: Option<String>,
    depth: Option<u32>,
    username: Option<String>,
    password: Option<String>,
    #[allow(dead_code)]
    insecure_skip_tls: Option<bool>,
}

pub(super) async fn clone(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CloneRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.url.trim().is_empty() || req.url.starts_with('-') {
        return Err(ApiError::bad_request(
            "url is required (and cannot start with -)",
        ));
    }
    let target = c.host(&req.path)?;
    if target.exists() && std::fs::read_dir(&target).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ApiError::bad_request(format!(
            "{} already exists and is not an empty folder",
            req.path
        )));
    }
    let parent = c.guest(&req.path)?;
    let (parent, name) = parent.rsplit_once('/').unwrap_or(("/", ""));
    let parent = if parent.is_empty() { "/" } else { parent };
    std::fs::create_dir_all(c.host(parent)?)
        .map_err(|e| ApiError::bad_request(format!("{parent}: {e}")))?;
    let mut url = req.url.clone();
    let secret = req.password.clone();
    if let (Some(user), Some(pass)) = (&req.username, &req.password)
        && let Ok(mut u) = reqwest::Url::parse(&url)
        && matches!(u.scheme(), "http" | "https")
    {
        let _ = u.set_username(user);
        let _ = u.set_password(Some(pass));
        url = u.to_string();
    }
    let depth = req.depth.map(|d| d.to_string());
    let mut args = vec!["clone"];
    if let Some(b) = req.branch.as_deref().filter(|b| !b.is_empty()) {
        args.extend(["--branch", b]);
    }
    if let Some(d) = depth.as_deref() {
        args.extend(["--depth", d]);
    }
    args.extend(["--", url.as_str(), name]);
    git(&c, parent, &args, secret.as_deref()).await?;
    if let Some(commit) = req.commit_id.as_deref().filter(|s| !s.is_empty()) {
        git(&c, &req.path, &["checkout", "--detach", commit], None).await?;
    }
    Ok(StatusCode::OK)
}

#[derive(Deserialize)]
pub(super) struct InitRequest {
    path: String,
    bare: Option<bool>,
    initial_branch: Option<String>,
}

pub(super) async fn init(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    std::fs::create_dir_all(c.host(&req.path)?)
        .map_err(|e| ApiError::bad_request(format!("{}: {e}", req.path)))?;
    let mut args = vec!["init", "--quiet"];
    if req.bare == Some(true) {
        args.push("--bare");
    }
    if let Some(b) = req.initial_branch.as_deref().filter(|b| !b.is_empty()) {
        args.extend(["--initial-branch", b]);
    }
    git(&c, &req.path, &args, None).await?;
    Ok(StatusCode::OK)
}

/// A porcelain status letter as Daytona's `Status` enum names it.
fn status_name(ch: char) -> &'static str {
    match ch {
        'M' | 'T' => "Modified",
        'A' => "Added",
        'D' => "Deleted",
        'R' => "Renamed",
        'C' => "Copied",
        'U' => "Updated but unmerged",
        '?' => "Untracked",
        _ => "Unmodified",
    }
}

pub(super) async fn status(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let text = git(&c, &path, &["status", "--porcelain=v2", "--branch"], None).await?;
    let (mut branch, mut upstream, mut ahead, mut behind) = (String::new(), None, 0, 0);
    let mut files = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("# branch.head ") {
            branch = h.to_string();
        } else if let Some(u) = line.strip_prefix("# branch.upstream ") {
            upstream = Some(u.to_string());
        } else if let Some(ab) = line.strip_prefix("# branch.ab ") {
            for part in ab.split_whitespace() {
                if let Some(n) = part.strip_prefix('+') {
                    ahead = n.parse().unwrap_or(0);
                } else if let Some(n) = part.strip_prefix('-') {
                    behind = n.parse().unwrap_or(0);
                }
            }
        } else if let Some(name) = line.strip_prefix("? ") {
            files.push(json!({ "name": name, "staging": "Untracked", "worktree": "Untracked", "extra": "" }));
        } else if line.starts_with("1 ") || line.starts_with("2 ") || line.starts_with("u ") {
            // `1 XY sub mH mI mW hH hI path`, `2 XY ... score path<TAB>orig`, `u XY ...`.
            let fields = match line.as_bytes()[0] {
                b'1' => 9,
                b'2' => 10,
                _ => 11,
            };
            let parts: Vec<&str> = line.splitn(fields, ' ').collect();
            let xy: Vec<char> = parts
                .get(1)
                .map(|s| s.chars().collect())
                .unwrap_or_default();
            let rest = parts.last().copied().unwrap_or("");
            let (name, extra) = rest.split_once('\t').unwrap_or((rest, ""));
            let unmerged = line.starts_with("u ");
            files.push(json!({
                "name": name,
                "staging": if unmerged { "Updated but unmerged" } else { status_name(*xy.first().unwrap_or(&'.')) },
                "worktree": if unmerged { "Updated but unmerged" } else { status_name(*xy.get(1).unwrap_or(&'.')) },
                "extra": extra,
            }));
        }
    }
    let detached = branch == "(detached)";
    Ok(Json(json!({
        "currentBranch": if detached { "HEAD".to_string() } else { branch },
        "detached": detached,
        "upstream": upstream.clone().unwrap_or_default(),
        "branchPublished": upstream.is_some(),
        "ahead": ahead,
        "behind": behind,
        "fileStatus": files,
    })))
}

pub(super) async fn list_branches(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let text = git(
        &c,
        &path,
        &["branch", "--format=%(HEAD) %(refname:short)"],
        None,
    )
    .await?;
    let mut branches = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let (head, name) = line.split_at(line.len().min(2));
        if name.starts_with('(') {
            continue;
        }
        if head.starts_with('*') {
            current = name.to_string();
        }
        branches.push(name.to_string());
    }
    Ok(Json(json!({ "branches": branches, "current": current })))
}

#[derive(Deserialize)]
pub(super) struct BranchRequest {
    name: String,
    path: String,
}

fn branch_name(name: &str) -> Result<&str, ApiError> {
    if name.trim().is_empty() || name.starts_with('-') {
        return Err(ApiError::bad_request(
            "name is required (a branch name, not starting with -)",
        ));
    }
    Ok(name)
}

pub(super) async fn create_branch(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BranchRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    git(
        &c,
        &req.path,
        &["branch", "--", branch_name(&req.name)?],
        None,
    )
    .await?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn delete_branch(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<BranchRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    git(
        &c,
        &req.path,
        &["branch", "-D", "--", branch_name(&req.name)?],
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(super) struct AddRequest {
    files: Vec<String>,
    path: String,
}

pub(super) async fn add(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AddRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.files.is_empty() {
        return Err(ApiError::bad_request("files is required (use . for all)"));
    }
    let mut args = vec!["add", "--"];
    args.extend(req.files.iter().map(String::as_str));
    git(&c, &req.path, &args, None).await?;
    Ok(StatusCode::OK)
}

#[derive(Deserialize)]
pub(super) struct CommitRequest {
    path: String,
    message: String,
    author: String,
    email: String,
    allow_empty: Option<bool>,
}

pub(super) async fn commit(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    if req.message.trim().is_empty() {
        return Err(ApiError::bad_request("message is required"));
    }
    let name = format!("user.name={}", req.author);
    let email = format!("user.email={}", req.email);
    let mut args = vec![
        "-c",
        &name,
        "-c",
        &email,
        "commit",
        "--quiet",
        "-m",
        &req.message,
    ];
    if req.allow_empty == Some(true) {
        args.push("--allow-empty");
    }
    git(&c, &req.path, &args, None).await?;
    let hash = git(&c, &req.path, &["rev-parse", "HEAD"], None).await?;
    Ok(Json(json!({ "hash": hash.trim() })))
}

#[derive(Deserialize)]
pub(super) struct CheckoutRequest {
    branch: String,
    path: String,
}

pub(super) async fn checkout(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CheckoutRequest>,
) -> Result<StatusCode, ApiError> {
    let c = ctx(&sim, &id)?;
    git(
        &c,
        &req.path,
        &["checkout", "--quiet", branch_name(&req.branch)?, "--"],
        None,
    )
    .await?;
    Ok(StatusCode::OK)
}

pub(super) async fn history(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let path = required_path(&raw)?;
    let text = git(
        &c,
        &path,
        &["log", "--format=%H%x00%an%x00%ae%x00%aI%x00%B%x1e"],
        None,
    )
    .await?;
    let commits: Vec<Value> = text
        .split('\x1e')
        .map(str::trim_start)
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let f: Vec<&str> = r.splitn(5, '\0').collect();
            (f.len() == 5).then(|| {
                json!({ "hash": f[0], "author": f[1], "email": f[2], "timestamp": f[3], "message": f[4].trim_end() })
            })
        })
        .collect();
    Ok(Json(Value::Array(commits)))
}
