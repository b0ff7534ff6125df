//! The toolbox's facts about its sandbox: working and home folders, the daemon's version,
//! its environment (`/env`), `/init`, the ports its processes listen on, and
//! `/system/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ctx;
use crate::clock::now_ms;
use crate::sim::{ApiError, ApiJson, Sim, now_rfc3339};

/// The toolbox daemon version the sim says it is.
const DAEMON_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "-sim");

pub(super) async fn work_dir(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    Ok(Json(json!({ "dir": c.home() })))
}

pub(super) async fn user_home_dir(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    Ok(Json(json!({ "dir": c.home() })))
}

pub(super) async fn version(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ctx(&sim, &id)?;
    Ok(Json(json!({ "version": DAEMON_VERSION })))
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct UpdateEnv {
    set: Option<BTreeMap<String, String>>,
    unset: Option<Vec<String>>,
    unset_value_prefix: Option<String>,
}

/// Changes the environment that processes started from now on get (sessions, PTYs and
/// `process/execute`); running ones keep theirs, as on Daytona. Answers the new set of
/// variable names, not their values (they may be secrets).
pub(super) async fn update_env(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateEnv>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let set = req.set.unwrap_or_default();
    for name in set.keys().chain(req.unset.iter().flatten()) {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "{name:?} is not an environment variable name"
            )));
        }
    }
    if set.values().any(|v| v.contains('\0')) {
        return Err(ApiError::bad_request(
            "environment values cannot contain NUL bytes",
        ));
    }
    let mut map = sim
        .sandboxes
        .lock()
        .map_err(|_| ApiError::internal("state lock poisoned"))?;
    let sb = map
        .get_mut(&c.id)
        .ok_or_else(|| ApiError::not_found(format!("Sandbox {id} not found")))?;
    for name in req.unset.iter().flatten() {
        sb.env.remove(name);
    }
    if let Some(prefix) = req.unset_value_prefix.filter(|p| !p.is_empty()) {
        sb.env
            .retain(|k, v| set.contains_key(k) || !v.starts_with(&prefix));
    }
    sb.env.extend(set);
    sb.updated_ms = now_ms();
    Ok(Json(json!({ "message": "environment updated" })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct Init {
    #[allow(dead_code)]
    token: Option<String>,
}

/// `/init`: Daytona's runner hands the toolbox its auth token; the sim authenticates the
/// toolbox by the caller's own key, so there is nothing to keep.
pub(super) async fn init(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    ApiJson(_req): ApiJson<Init>,
) -> Result<Json<Value>, ApiError> {
    ctx(&sim, &id)?;
    Ok(Json(
        json!({ "status": "initialized", "version": DAEMON_VERSION }),
    ))
}

/// The TCP ports the sandbox's processes listen on (found by their
/// `DAYTONA_SANDBOX_ID`, their sockets matched against the kernel's listening table).
pub(crate) fn listening_ports(sandbox: &str) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    let needle = format!("DAYTONA_SANDBOX_ID={sandbox}");
    for pid in sandbox_pids(&needle) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(ino) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                inodes.insert(ino);
            }
        }
    }
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode: state 0A is LISTEN.
            if cols.len() > 9
                && cols[3] == "0A"
                && cols[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i))
                && let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// The processes whose environment carries `needle` (the sandbox's id variable).
pub(crate) fn sandbox_pids(needle: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

pub(super) async fn ports(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let ports: Vec<u16> = tokio::task::spawn_blocking(move || listening_ports(&c.id))
        .await
        .map_err(|e| ApiError::internal(format!("port scan: {e}")))?
        .into_iter()
        .collect();
    Ok(Json(json!({ "ports": ports })))
}

pub(super) async fn port_in_use(
    State(sim): State<Arc<Sim>>,
    Path((id, port)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        ApiError::bad_request(format!("port {port:?} is not a port number (1-65535)"))
    })?;
    let in_use = tokio::task::spawn_blocking(move || listening_ports(&c.id).contains(&port))
        .await
        .map_err(|e| ApiError::internal(format!("port scan: {e}")))?;
    Ok(Json(json!({ "isInUse": in_use })))
}

/// `/system/metrics`: the sandbox's allotment (CPUs, memory and disk as created), the
/// memory its processes use (their resident sets) and the disk its folder takes.
pub(super) async fn metrics(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = ctx(&sim, &id)?;
    let (cpu, mem_gib, disk_gib) = sim
        .sandboxes
        .lock()
        .ok()
        .and_then(|m| m.get(&c.id).map(|s| (s.cpu, s.memory, s.disk)))
        .unwrap_or((1, 1, 3));
    let fs = c.fs.clone();
    let needle = format!("DAYTONA_SANDBOX_ID={}", c.id);
    let (mem_used, disk_used) = tokio::task::spawn_blocking(move || {
        let page = 4096u64;
        let rss: u64 = sandbox_pids(&needle)
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/statm")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * page)
            .sum();
        let disk: u64 = walkdir_size(&fs);
        (rss, disk)
    })
    .await
    .map_err(|e| ApiError::internal(format!("metrics: {e}")))?;
    let gib = 1024u64 * 1024 * 1024;
    let mem_total = mem_gib.max(0) as u64 * gib;
    let disk_total = disk_gib.max(0) as u64 * gib;
    let now = now_ms();
    Ok(Json(json!({
        "cpuCount": cpu,
        "cpuUsedPct": 0.0,
        "memTotal": mem_total,
        "memUsed": mem_used,
        "memCache": 0,
        "diskTotal": disk_total,
        "diskUsed": disk_used,
        "diskFree": disk_total.saturating_sub(disk_used),
        "timestamp": now_rfc3339(),
        "timestampUnix": now / 1000,
    })))
}

/// Bytes in the files under `dir` (not following links, hidden and ignored files too).
fn walkdir_size(dir: &std::path::Path) -> u64 {
    ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .build()
        .flatten()
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
