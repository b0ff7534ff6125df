//! Daytona's events channel, as a client: Socket.IO (Engine.IO v4) over a WebSocket at
//! `<api>/socket.io/`, the token in the connect packet. Daytona pushes every sandbox state
//! change of the organization (`sandbox.state.updated`, `sandbox.created`), so a waiting
//! lease learns that its sandbox started the moment it did, instead of at its next poll.
//!
//! One connection per provider, opened on first need and kept; when it is down (the server
//! does not offer it, refuses the token, or the link broke) waiters poll often instead, and
//! it is tried again in the background. The channel only ever speeds a wait up: a missed
//! event costs a poll interval, never a wrong answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

use super::client::Client;

/// A sandbox's new state as the channel told it, with its DTO.
#[derive(Debug, Clone)]
pub struct StateEvent {
    pub id: String,
    pub state: String,
    pub sandbox: Value,
}

/// The channel's shared end.
pub struct Events {
    tx: broadcast::Sender<StateEvent>,
    up: Arc<AtomicBool>,
    started: std::sync::Once,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
            up: Arc::new(AtomicBool::new(false)),
            started: std::sync::Once::new(),
        }
    }
}

/// How the link ended.
enum End {
    /// The server does not serve the channel or refuses our token: try again much later.
    Refused(String),
    /// It broke: try again soon.
    Broke(String),
}

/// Retry delay after a refusal (an old server, or credentials it will not take here).
const AFTER_REFUSAL: Duration = Duration::from_secs(300);
/// Retry delay after a break, doubled up to the cap.
const AFTER_BREAK: Duration = Duration::from_secs(1);
const AFTER_BREAK_MAX: Duration = Duration::from_secs(30);

impl Events {
    /// Subscribes to state events, opening the channel on first use. Subscribe before
    /// reading the state, so no change falls between the two.
    pub fn subscribe(&self, client: &Client) -> broadcast::Receiver<StateEvent> {
        let rx = self.tx.subscribe();
        self.started.call_once(|| {
            let (client, tx, up) = (client.clone(), self.tx.clone(), self.up.clone());
            tokio::spawn(run(client, tx, up));
        });
        rx
    }

    /// Is the channel connected now?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}

async fn run(client: Client, tx: broadcast::Sender<StateEvent>, up: Arc<AtomicBool>) {
    let mut delay = AFTER_BREAK;
    loop {
        let ended = link(&client, &tx, &up).await;
        up.store(false, Ordering::SeqCst);
        match ended {
            End::Refused(why) => {
                tracing::debug!(%why, "daytona events channel unavailable; polling instead");
                tokio::time::sleep(AFTER_REFUSAL).await;
                delay = AFTER_BREAK;
            }
            End::Broke(why) => {
                tracing::debug!(%why, ?delay, "daytona events channel broke; reconnecting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(AFTER_BREAK_MAX);
            }
        }
    }
}

/// One connection, until it ends.
async fn link(client: &Client, tx: &broadcast::Sender<StateEvent>, up: &AtomicBool) -> End {
    let Some((token, org)) = client.event_credentials() else {
        return End::Refused("no credentials".into());
    };
    let mut url = format!(
        "{}/socket.io/?EIO=4&transport=websocket",
        client.api_url().replacen("http", "ws", 1)
    );
    if let Some(org) = &org {
        url.push_str("&organizationId=");
        url.extend(form_urlencoded::byte_serialize(org.as_bytes()));
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok(x) => x,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            return End::Refused(format!("HTTP {}", resp.status()));
        }
        Err(e) => return End::Broke(client.redact(&e.to_string())),
    };
    // Engine.IO open, then the Socket.IO connect with the token.
    let mut ping_every = Duration::from_secs(25);
    let mut ping_grace = Duration::from_secs(20);
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.starts_with('0') => {
            if let Ok(open) = serde_json::from_str::<Value>(&t[1..]) {
                let ms = |k: &str, d: Duration| {
                    open.get(k)
                        .and_then(Value::as_u64)
                        .map_or(d, Duration::from_millis)
                };
                ping_every = ms("pingInterval", ping_every);
                ping_grace = ms("pingTimeout", ping_grace);
            }
        }
        _ => return End::Refused("no Engine.IO open packet".into()),
    }
    let connect = format!(
        "40{}",
        json!({ "token": secrecy::ExposeSecret::expose_secret(&token) })
    );
    if let Err(e) = ws.send(Message::Text(connect.into())).await {
        return End::Broke(e.to_string());
    }
    // Anything silent for longer than a ping interval and its grace is a dead link.
    let silence = ping_every + ping_grace;
    loop {
        let msg = match tokio::time::timeout(silence, ws.next()).await {
            Err(_) => return End::Broke("no ping from the server".into()),
            Ok(None) => return End::Broke("closed".into()),
            Ok(Some(Err(e))) => return End::Broke(client.redact(&e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return End::Broke("closed".into()),
            _ => continue,
        };
        match text.as_str() {
            "2" => {
                if let Err(e) = ws.send(Message::Text("3".into())).await {
                    return End::Broke(e.to_string());
                }
            }
            t if t.starts_with("40") => up.store(true, Ordering::SeqCst),
            t if t.starts_with("44") => {
                let why = serde_json::from_str::<Value>(&t[2..])
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| "refused".into());
                return End::Refused(client.redact(&why));
            }
            t if t.starts_with("41") || t == "1" => return End::Broke("disconnected".into()),
            t if t.starts_with("42") => {
                if let Some(ev) = state_event(&t[2..]) {
                    // No one waiting: dropped.
                    let _ = tx.send(ev);
                }
            }
            _ => {}
        }
    }
}

/// `["sandbox.state.updated", {sandbox, newState}]` or `["sandbox.created", SandboxDto]`.
fn state_event(payload: &str) -> Option<StateEvent> {
    let v: Value = serde_json::from_str(payload).ok()?;
    let name = v.get(0)?.as_str()?;
    let data = v.get(1)?;
    let sandbox = match name {
        "sandbox.state.updated" => data.get("sandbox").unwrap_or(data),
        "sandbox.created" => data,
        _ => return None,
    };
    let id = sandbox.get("id")?.as_str()?.to_string();
    let state = data
        .get("newState")
        .or_else(|| sandbox.get("state"))?
        .as_str()?
        .to_string();
    Some(StateEvent {
        id,
        state,
        sandbox: sandbox.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_event_shapes_are_read() {
        let e = state_event(
            r#"["sandbox.state.updated",{"sandbox":{"id":"s1","state":"started"},"oldState":"starting","newState":"started"}]"#,
        )
        .expect("event");
        assert_eq!((e.id.as_str(), e.state.as_str()), ("s1", "started"));
        let e =
            state_event(r#"["sandbox.created",{"id":"s2","state":"creating"}]"#).expect("event");
        assert_eq!((e.id.as_str(), e.state.as_str()), ("s2", "creating"));
        assert!(state_event(r#"["volume.created",{"id":"v"}]"#).is_none());
        assert!(state_event("not json").is_none());
    }
}
