//! SSH access tokens (`/api/sandbox/{id}/ssh-access`) and `/api/api-keys/current`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use serde_json::json;

use super::{ApiResult, SshToken, find_id, lock, not_found, query_pairs, uuid, with_sandbox};
use crate::clock::{now_ms, rfc3339_millis as rfc3339_ms};
use crate::sim::{ApiError, Principal, Sim, now_rfc3339};

pub(super) async fn create_ssh(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let minutes: u64 = match q.iter().find(|(k, _)| k == "expiresInMinutes") {
        Some((_, v)) => v.parse().ok().filter(|m| *m >= 1).ok_or_else(|| {
            ApiError::bad_request("expiresInMinutes must be a whole number of minutes, at least 1")
        })?,
        None => 60,
    };
    let sandbox_id = {
        let map = lock(&sim.sandboxes)?;
        find_id(&map, &id).ok_or_else(|| not_found(&id))?
    };
    let token: String = {
        let b: [u8; 24] = rand::random();
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    let now = now_ms();
    let t = SshToken {
        id: uuid(),
        sandbox_id: sandbox_id.clone(),
        expires_ms: now + minutes * 60_000,
        created_ms: now,
    };
    lock(&sim.ssh_tokens)?.insert(token.clone(), t.clone());
    let command = match sim.config.ssh_port {
        Some(22) | None => format!("ssh {token}@127.0.0.1"),
        Some(p) => format!("ssh -p {p} {token}@127.0.0.1"),
    };
    Ok(Json(json!({
        "id": t.id,
        "sandboxId": sandbox_id,
        "token": token,
        "expiresAt": rfc3339_ms(t.expires_ms),
        "createdAt": rfc3339_ms(now),
        "updatedAt": rfc3339_ms(now),
        "sshCommand": command,
    })))
}

pub(super) async fn revoke_ssh(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let token = q.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone());
    let sandbox_id = {
        let map = lock(&sim.sandboxes)?;
        find_id(&map, &id).ok_or_else(|| not_found(&id))?
    };
    let mut tokens = lock(&sim.ssh_tokens)?;
    match token {
        Some(t) => {
            tokens.retain(|k, v| !(k == &t && v.sandbox_id == sandbox_id));
        }
        None => tokens.retain(|_, v| v.sandbox_id != sandbox_id),
    }
    drop(tokens);
    with_sandbox(&sim, &sandbox_id, |_| Ok(()))
}

/// Is this token valid now? Answers its sandbox id.
pub fn check_token(sim: &Sim, token: &str) -> Option<String> {
    let tokens = sim.ssh_tokens.lock().ok()?;
    let t = tokens.get(token)?;
    (t.expires_ms > now_ms()).then(|| t.sandbox_id.clone())
}

pub(super) async fn validate_ssh(
    State(sim): State<Arc<Sim>>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let q = query_pairs(&raw);
    let token = q
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| ApiError::bad_request("token is required"))?;
    let sandbox = check_token(&sim, &token);
    Ok(Json(
        json!({ "valid": sandbox.is_some(), "sandboxId": sandbox.unwrap_or_default() }),
    ))
}

pub(super) async fn current_key(
    State(sim): State<Arc<Sim>>,
    Extension(who): Extension<Principal>,
) -> ApiResult {
    let masked = if who.token.len() > 6 {
        format!(
            "{}{}",
            &who.token[..3],
            "*".repeat(who.token.len().min(40) - 3)
        )
    } else {
        "******".into()
    };
    Ok(Json(json!({
        "name": who.key_name,
        "value": masked,
        "createdAt": rfc3339_ms(now_ms().saturating_sub(sim.started.elapsed().as_millis() as u64)),
        "permissions": who.permissions,
        "lastUsedAt": now_rfc3339(),
        "expiresAt": null,
        "userId": "sim-user",
        "organizationId": sim.config.org,
    })))
}
