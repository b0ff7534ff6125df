//! Previews of a sandbox's ports, as Daytona serves them: `GET
//! /sandbox/{id}/ports/{port}/preview-url` ({sandboxId, url, token}: the token goes in
//! `X-Daytona-Preview-Token`, or an API key as a bearer), `GET
//! .../signed-preview-url?expiresInSeconds=N` ({sandboxId, port, token, url}: the token
//! is in the URL), `POST .../signed-preview-url/{token}/expire`. Daytona's preview hosts
//! are `{port}-{id}.proxy...`; the sim serves them by path on its own address
//! (`/preview/{id}/{port}/...`, signed `/preview/s/{token}/...`) and proxies each request
//! to the port on loopback (sim sandboxes share the host's network).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiResult, find_id, lock, query_pairs};
use crate::clock::now_ms;
use crate::sim::{ApiError, Sim};

/// A preview's access: for one sandbox's port; a signed one expires.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub sandbox_id: String,
    pub port: u16,
    /// Signed URLs only.
    pub expires_ms: Option<u64>,
}

/// The longest a signed URL may last (Daytona: 24 hours).
const MAX_SIGNED_SECS: u64 = 24 * 3600;

fn port_of(text: &str) -> Result<u16, ApiError> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| ApiError::bad_request(format!("port must be 1-65535, not {text}")))
}

fn sandbox_id(sim: &Sim, id: &str) -> Result<String, ApiError> {
    let map = lock(&sim.sandboxes)?;
    find_id(&map, id)
        .ok_or_else(|| ApiError::not_found(format!("Sandbox with ID or name {id} not found")))
}

fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `GET /sandbox/{id}/ports/{port}/preview-url`: one token per sandbox and port.
pub(in crate::sim) async fn preview_url(
    State(sim): State<Arc<Sim>>,
    Path((id, port)): Path<(String, String)>,
) -> ApiResult {
    let port = port_of(&port)?;
    let id = sandbox_id(&sim, &id)?;
    let mut grants = lock(&sim.previews)?;
    let existing = grants
        .iter()
        .find(|(_, g)| g.sandbox_id == id && g.port == port && g.expires_ms.is_none())
        .map(|(t, _)| t.clone());
    let t = existing.unwrap_or_else(|| {
        let t = token();
        grants.insert(
            t.clone(),
            Grant {
                sandbox_id: id.clone(),
                port,
                expires_ms: None,
            },
        );
        t
    });
    Ok(Json(json!({
        "sandboxId": id,
        "url": format!("{}/preview/{id}/{port}", sim.base_url),
        "token": t,
    })))
}

/// `GET /sandbox/{id}/ports/{port}/signed-preview-url?expiresInSeconds=N` (default 60).
pub(in crate::sim) async fn signed_preview_url(
    State(sim): State<Arc<Sim>>,
    Path((id, port)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let port = port_of(&port)?;
    let id = sandbox_id(&sim, &id)?;
    let secs = match query_pairs(&raw)
        .into_iter()
        .find(|(k, _)| k == "expiresInSeconds")
    {
        Some((_, v)) => v
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_SIGNED_SECS).contains(s))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "expiresInSeconds must be between 1 and {MAX_SIGNED_SECS}"
                ))
            })?,
        None => 60,
    };
    let t = token();
    lock(&sim.previews)?.insert(
        t.clone(),
        Grant {
            sandbox_id: id.clone(),
            port,
            expires_ms: Some(now_ms() + secs * 1000),
        },
    );
    Ok(Json(json!({
        "sandboxId": id,
        "port": port,
        "token": t,
        "url": format!("{}/preview/s/{t}", sim.base_url),
    })))
}

/// `POST /sandbox/{id}/ports/{port}/signed-preview-url/{token}/expire`.
pub(in crate::sim) async fn expire_signed(
    State(sim): State<Arc<Sim>>,
    Path((id, port, t)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let port = port_of(&port)?;
    let id = sandbox_id(&sim, &id)?;
    let mut grants = lock(&sim.previews)?;
    match grants.get(&t) {
        Some(g) if g.sandbox_id == id && g.port == port && g.expires_ms.is_some() => {
            grants.remove(&t);
            Ok(StatusCode::OK)
        }
        _ => Err(ApiError::not_found("Signed preview URL not found")),
    }
}

/// Proxies a preview request to the sandbox's port: `/preview/{id}/{port}/...` with the
/// token (or an API key), `/preview/s/{token}/...` signed.
pub async fn proxy(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    match forward(&sim, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(sim: &Sim, req: Request) -> Result<Response, ApiError> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/preview/").unwrap_or("");
    let mut parts = rest.splitn(3, '/');
    let (first, second) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let tail = parts.next().unwrap_or("");
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a preview token is required",
        )
    };
    let (grant, tail) = if first == "s" {
        let grants = lock(&sim.previews)?;
        let g = grants.get(second).cloned().ok_or_else(unauthorized)?;
        if g.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized: the signed preview URL expired",
            ));
        }
        (g, tail)
    } else {
        let port = port_of(second)?;
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let by_token = header("x-daytona-preview-token").is_some_and(|t| {
            lock(&sim.previews).is_ok_and(|g| {
                g.get(&t).is_some_and(|g| {
                    g.sandbox_id == first && g.port == port && g.expires_ms.is_none()
                })
            })
        });
        let by_key = header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
            .is_some_and(|k| sim.config.api_keys.contains(&k));
        if !(by_token || by_key) {
            return Err(unauthorized());
        }
        (
            Grant {
                sandbox_id: first.to_string(),
                port,
                expires_ms: None,
            },
            tail,
        )
    };
    let state = {
        let map = lock(&sim.sandboxes)?;
        map.get(&grant.sandbox_id).map(|s| s.state.clone())
    };
    match state.as_deref() {
        Some("started") => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "the sandbox is not started",
            ));
        }
        None => return Err(ApiError::not_found("Sandbox not found")),
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("http://127.0.0.1:{}/{tail}{query}", grant.port);
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    for h in [
        "host",
        "x-daytona-preview-token",
        "authorization",
        "connection",
        "content-length",
    ] {
        headers.remove(h);
    }
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let client = reqwest::Client::new();
    let answer = client
        .request(method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("nothing answers on port {} in the sandbox: {e}", grant.port),
            )
        })?;
    let mut out = Response::builder().status(answer.status().as_u16());
    for (k, v) in answer.headers() {
        if !matches!(
            k.as_str(),
            "connection" | "transfer-encoding" | "content-length"
        ) {
            out = out.header(k, v);
        }
    }
    out.body(Body::from_stream(answer.bytes_stream()))
        .map_err(|e| ApiError::internal(format!("building the answer: {e}")))
}
