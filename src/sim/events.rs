//! Daytona's events channel: Socket.IO (Engine.IO v4, WebSocket transport) at
//! `/api/socket.io/`. The client sends `40{"token": <API key or JWT>}` (with
//! `?organizationId=` for a JWT) and gets `40{"sid": ...}`, or `44{"message": ...}` when
//! the token is refused; then every sandbox event of the organization as
//! `42["sandbox.created", SandboxDto]` and `42["sandbox.state.updated", {sandbox, oldState,
//! newState}]`. The server pings (`2`) every 25 s; the client answers `3`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::Sim;

const PING_INTERVAL_MS: u64 = 25_000;
const PING_TIMEOUT_MS: u64 = 20_000;

/// The events the sim sends, and what it counts of them.
pub struct Events {
    tx: broadcast::Sender<(String, Value)>,
    /// Clients that completed the Socket.IO connect.
    pub connected: AtomicU64,
    /// Events written to clients.
    pub delivered: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(4096).0,
            connected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }
}

impl Events {
    /// Sends `event` with `data` to every connected client (none connected: dropped).
    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.tx.send((event.to_string(), data));
    }

    pub fn stats(&self) -> Value {
        json!({
            "connected": self.connected.load(Ordering::SeqCst),
            "delivered": self.delivered.load(Ordering::SeqCst),
        })
    }
}

/// The WebSocket endpoint (`?EIO=4&transport=websocket`).
pub async fn socket_io(
    State(sim): State<Arc<Sim>>,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !sim.config.events {
        return super::ApiError::not_found("Cannot GET /api/socket.io/").into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return super::ApiError::new(e.status(), e.body_text()).into_response(),
    };
    let query: Vec<(String, String)> = raw
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let org = query
        .iter()
        .find(|(k, _)| k == "organizationId")
        .map(|(_, v)| v.clone());
    ws.on_upgrade(move |socket| serve(socket, sim, org))
}

async fn serve(mut socket: WebSocket, sim: Arc<Sim>, org: Option<String>) {
    let sid = super::control::uuid();
    let open = json!({
        "sid": sid,
        "upgrades": [],
        "pingInterval": PING_INTERVAL_MS,
        "pingTimeout": PING_TIMEOUT_MS,
        "maxPayload": 1_000_000,
    });
    if socket
        .send(Message::Text(format!("0{open}").into()))
        .await
        .is_err()
    {
        return;
    }
    // The Socket.IO connect to the main namespace, with the token.
    let auth = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => {
                if let Some(rest) = t.strip_prefix("40") {
                    break serde_json::from_str::<Value>(rest).unwrap_or(Value::Null);
                }
                if t.as_str() == "3" {
                    continue;
                }
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return,
        }
    };
    let token = auth.get("token").and_then(Value::as_str).unwrap_or("");
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert("authorization", v);
    }
    if let Some(o) = org.as_deref().and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert("x-daytona-organization-id", o);
    }
    if let Err(e) = super::authenticate(&sim, &headers) {
        let refusal = json!({ "message": e.message });
        let _ = socket
            .send(Message::Text(format!("44{refusal}").into()))
            .await;
        return;
    }
    // Subscribed before the ack: no event after the ack is missed.
    let mut events = sim.events.tx.subscribe();
    if socket
        .send(Message::Text(format!("40{}", json!({ "sid": sid })).into()))
        .await
        .is_err()
    {
        return;
    }
    sim.events.connected.fetch_add(1, Ordering::SeqCst);
    let mut ping = tokio::time::interval(std::time::Duration::from_millis(PING_INTERVAL_MS));
    ping.tick().await;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok((name, data)) => {
                    let packet = format!("42{}", json!([name, data]));
                    if socket.send(Message::Text(packet.into())).await.is_err() {
                        return;
                    }
                    sim.events.delivered.fetch_add(1, Ordering::SeqCst);
                }
                // Too slow to keep up: close, as a server drops a lagging client; the
                // client reconnects and reads the state again.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ping.tick() => {
                if socket.send(Message::Text("2".into())).await.is_err() {
                    return;
                }
            }
            msg = socket.recv() => match msg {
                // A Socket.IO disconnect, or the socket closed.
                Some(Ok(Message::Text(t))) if t.as_str() == "41" || t.as_str() == "1" => return,
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    if socket.send(Message::Text("3".into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            () = sim.shutdown.cancelled() => return,
        }
    }
}
