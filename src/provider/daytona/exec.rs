//! Commands: a private session per command, an async exec, and the logs WebSocket, so
//! stdout and stderr arrive live and apart; cancel deletes the session, which ends the
//! command.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::Idempotent;
use super::{DaytonaProvider, client, demux, e, quote};
use crate::provider::{ExecExit, ExecOutput, ExecSpec, ProviderError, ProviderErrorKind};

impl DaytonaProvider {
    /// Runs a command in a private session, streaming its output; the session is deleted
    /// either way (which ends whatever still runs in it).
    pub(super) async fn exec_command(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let session: String = format!("crabbox-{:016x}", rand::random::<u64>());
        // Creating a named session is idempotent: a 409 on a retry means it exists.
        match self
            .client
            .json(
                Method::POST,
                &format!("{base}/process/session"),
                Some(&json!({ "sessionId": session })),
                Idempotent::Yes,
            )
            .await
        {
            Ok(_) => {}
            Err(h) if h.status.map(|s| s.as_u16()) == Some(409) => {}
            Err(h) => return Err(h.error),
        }
        let result = self
            .exec_in_session(sandbox, &base, &session, spec, out, cancel)
            .await;
        // The session goes either way (it ends whatever still runs in it).
        let _ = self
            .client
            .json(
                Method::DELETE,
                &format!("{base}/process/session/{session}"),
                None,
                Idempotent::Yes,
            )
            .await;
        result
    }
}

impl DaytonaProvider {
    pub(super) async fn exec_in_session(
        &self,
        sandbox: &str,
        base: &str,
        session: &str,
        spec: &ExecSpec,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        let mut script = format!("cd {} && ", quote(&spec.cwd));
        for (k, v) in &spec.env {
            script.push_str(&format!("export {k}={}; ", quote(v)));
        }
        // A session keeps its commands' stdin open (for its input endpoint): without this a
        // command that reads stdin would wait forever. It reads an empty stdin instead, as
        // with `ssh host cmd < /dev/null`.
        script.push_str(&format!("{{ {}\n}} < /dev/null", spec.command));
        let exec_url = format!("{base}/process/session/{session}/exec");
        let body = json!({ "command": script, "runAsync": true, "async": true });
        let mut cmd = None;
        for attempt in 0..3 {
            match self
                .client
                .json(Method::POST, &exec_url, Some(&body), Idempotent::No)
                .await
            {
                Ok(v) => {
                    cmd = v
                        .get("cmdId")
                        .and_then(Value::as_str)
                        .filter(|c| !c.is_empty())
                        .map(str::to_string);
                    break;
                }
                // The answer was lost: the command may be running. Never start it twice:
                // look in the (fresh, private) session first.
                Err(h) if attempt < 2 && h.status.is_none_or(|s| s.is_server_error()) => {
                    let v = self
                        .client
                        .json(
                            Method::GET,
                            &format!("{base}/process/session/{session}"),
                            None,
                            Idempotent::Yes,
                        )
                        .await
                        .map_err(|h| h.error)?;
                    let found = v
                        .get("commands")
                        .and_then(Value::as_array)
                        .and_then(|cmds| {
                            cmds.iter()
                                .find(|c| {
                                    c.get("command").and_then(Value::as_str)
                                        == Some(script.as_str())
                                })
                                .and_then(|c| {
                                    c.get("id").and_then(Value::as_str).map(str::to_string)
                                })
                        });
                    if found.is_some() {
                        cmd = found;
                        break;
                    }
                }
                Err(h) => return Err(h.error),
            }
        }
        let cmd = cmd.ok_or_else(|| {
            e(
                ProviderErrorKind::Other,
                "Daytona's exec answer has no cmdId",
            )
        })?;
        let ws_url = format!("{base}/process/session/{session}/command/{cmd}/logs?follow=true")
            .replacen("http", "ws", 1);
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                ws_url.as_str(),
            )
            .map_err(|err| e(ProviderErrorKind::Other, format!("log stream URL: {err}")))?;
        request.headers_mut().extend(self.client.auth_headers()?);
        // The handshake is a GET, under the same retry policy as every other call: a 429 is
        // waited out (Retry-After honoured), a 5xx or a dropped or half-done handshake is
        // tried again with backoff.
        let mut retries = client::Retries::new(self.client.retry, Idempotent::Yes);
        let mut ws = loop {
            use tokio_tungstenite::tungstenite::Error as WsError;
            let err = match tokio_tungstenite::connect_async(request.clone()).await {
                Ok((ws, _)) => break ws,
                Err(err) => err,
            };
            let (status, retry_after) = match &err {
                WsError::Http(resp) => (Some(resp.status()), client::retry_after(resp.headers())),
                WsError::Io(_)
                | WsError::ConnectionClosed
                | WsError::AlreadyClosed
                | WsError::Protocol(_) => (None, None),
                // A bad URL, TLS setup, a frame too large: trying again cannot help.
                _ => {
                    return Err(e(
                        ProviderErrorKind::Other,
                        self.client
                            .redact(&format!("opening the command's log stream: {err}")),
                    ));
                }
            };
            match retries.after_failure(status, retry_after) {
                Ok(delay) => {
                    tracing::debug!(?status, ?delay, "log stream handshake failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(detail) => {
                    let kind = match status.map(|s| s.as_u16()) {
                        Some(401) => ProviderErrorKind::Auth,
                        Some(403) => ProviderErrorKind::Permission,
                        _ => ProviderErrorKind::Unavailable,
                    };
                    return Err(e(
                        kind,
                        self.client
                            .redact(&format!("opening the command's log stream: {err}{detail}")),
                    ));
                }
            }
        };
        let mut demux = demux::Demux::default();
        let timeout = async {
            match spec.timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        let mut activity = tokio::time::interval(Duration::from_secs(60));
        let (mut cancelled, mut timed_out) = (false, false);
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
                        for o in demux.push(&b) { let _ = out.send(o).await; }
                    }
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                        for o in demux.push(t.as_bytes()) { let _ = out.send(o).await; }
                    }
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        return Err(e(ProviderErrorKind::Unavailable, format!("the command's log stream broke: {err}")));
                    }
                },
                () = cancel.cancelled() => { cancelled = true; break; }
                () = &mut timeout => { timed_out = true; break; }
                _ = activity.tick() => {
                    let _ = self.api(Method::POST, &format!("/sandbox/{sandbox}/last-activity"), None, Idempotent::Yes).await;
                }
            }
        }
        for o in demux.finish() {
            let _ = out.send(o).await;
        }
        if cancelled || timed_out {
            let _ = ws.close(None).await;
            // Deleting the session (done by the caller) ends the command.
            return Ok(ExecExit {
                code: if timed_out {
                    crate::sandbox::process::TIMEOUT_EXIT_CODE
                } else {
                    130
                },
                signal: None,
                timed_out,
                cancelled,
            });
        }
        // The stream closed at exit; the code may lag a moment behind.
        let url = format!("{base}/process/session/{session}/command/{cmd}");
        for _ in 0..100 {
            let v = self
                .client
                .json(Method::GET, &url, None, Idempotent::Yes)
                .await
                .map_err(|h| h.error)?;
            if let Some(code) = v.get("exitCode").and_then(Value::as_i64) {
                return Ok(ExecExit {
                    code: code as i32,
                    signal: None,
                    timed_out: false,
                    cancelled: false,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(e(
            ProviderErrorKind::Other,
            "the command's log stream ended but Daytona reports no exit code",
        ))
    }
}
