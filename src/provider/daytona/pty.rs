//! Commands on a terminal: Daytona's PTY sessions. A PTY session is a login shell on a
//! pseudo-terminal (`POST /process/pty`), attached to over a WebSocket
//! (`/process/pty/{id}/connect`, binary frames both ways), resized with `POST .../resize`
//! and killed with `DELETE`. The shell is told to `exec` a `sh -c` of the command (carried
//! in the session's environment, so the typed line is short and holds no secret): the
//! terminal's exit code is then the command's. Whatever the shell prints before the command
//! starts (its prompt, the echo of that line, a message of the day) is dropped: the command
//! prints a one-time marker first, and output starts after it; input waits for it too.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::client::Idempotent;
use super::{DaytonaProvider, e};
use crate::provider::{
    ExecExit, ExecOutput, ExecSpec, Input, ProviderError, ProviderErrorKind, PtySize,
};

/// The subprotocol that asks Daytona to say the exit code in a control message.
const EXIT_CONTROL: &str = "X-Daytona-Pty-Exit-Control";

/// How long the terminal may take to say it is connected.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Ping interval: proxies drop a WebSocket that carries nothing (the SDK pings every 20 s).
const KEEPALIVE: Duration = Duration::from_secs(20);

/// The environment variable that carries the command to the shell.
const SCRIPT_VAR: &str = "CRABBOX_TTY_SCRIPT";

/// What the shell is typed: replace itself with a plain `sh` running the command.
const LAUNCH: &[u8] = b" exec /bin/sh -c \"$CRABBOX_TTY_SCRIPT\"\n";

impl DaytonaProvider {
    /// Runs `spec` on a terminal of `size` in a private PTY session, deleted either way.
    pub(super) async fn exec_on_pty(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        size: PtySize,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        self.ready()?;
        let base = self.toolbox_url(sandbox).await?;
        let id = format!("crabbox-{:016x}", rand::random::<u64>());
        let nonce = format!("{:016x}", rand::random::<u64>());
        let mut script = format!(
            "printf '\\036crabbox-{nonce}\\036'; {}",
            super::exec::prelude(spec, None)
        );
        script.push_str(&format!("{{ {}\n}}", spec.command));
        let mut envs: BTreeMap<String, String> = BTreeMap::new();
        envs.insert(SCRIPT_VAR.into(), script);
        if let Some(term) = spec.env.get("TERM") {
            envs.insert("TERM".into(), term.clone());
        }
        let body = json!({
            "id": id,
            "envs": envs,
            "cols": size.cols,
            "rows": size.rows,
            "lazyStart": false,
        });
        // A named session: a 409 on a retry means the first try made it.
        match self
            .client
            .json(
                Method::POST,
                &format!("{base}/process/pty"),
                Some(&body),
                Idempotent::Yes,
            )
            .await
        {
            Ok(_) => {}
            Err(h) if h.status.map(|s| s.as_u16()) == Some(409) => {}
            Err(h) => return Err(h.error),
        }
        let marker = format!("\x1ecrabbox-{nonce}\x1e").into_bytes();
        let result = self
            .drive_pty(
                sandbox,
                &base,
                &id,
                &marker,
                input,
                out,
                cancel,
                spec.timeout,
            )
            .await;
        // The session goes either way (it ends whatever still runs on the terminal).
        let _ = self
            .client
            .json(
                Method::DELETE,
                &format!("{base}/process/pty/{id}"),
                None,
                Idempotent::Yes,
            )
            .await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive_pty(
        &self,
        sandbox: &str,
        base: &str,
        id: &str,
        marker: &[u8],
        mut input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
        timeout: Option<Duration>,
    ) -> Result<ExecExit, ProviderError> {
        let url = format!("{base}/process/pty/{id}/connect");
        let (mut ws, _) = self
            .websocket(&url, "the terminal", &[EXIT_CONTROL])
            .await?;
        // 1. Connected, then the command is launched.
        let connected = tokio::time::timeout(CONNECT_WAIT, async {
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Text(t)) => match control(&t) {
                        Some(c) if c.get("status").and_then(Value::as_str) == Some("connected") => {
                            return Ok(());
                        }
                        Some(c) if c.get("status").and_then(Value::as_str) == Some("error") => {
                            let why = c.get("error").and_then(Value::as_str).unwrap_or("unknown");
                            return Err(format!("Daytona refused the terminal: {why}"));
                        }
                        _ => {}
                    },
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            Err("the terminal closed before it was connected".to_string())
        })
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(e(ProviderErrorKind::Unavailable, why)),
            Err(_) => {
                return Err(e(
                    ProviderErrorKind::Unavailable,
                    format!(
                        "the terminal did not say it was connected within {} s",
                        CONNECT_WAIT.as_secs()
                    ),
                ));
            }
        }
        send(&mut ws, LAUNCH.to_vec()).await?;

        // 2. Output after the marker; input once the command runs.
        let mut before = Vec::new();
        let mut started = false;
        let mut queued: Vec<Vec<u8>> = Vec::new();
        let mut exit_code: Option<i32> = None;
        let deadline = async {
            match timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut ping = tokio::time::interval(KEEPALIVE);
        let mut activity = tokio::time::interval(Duration::from_secs(60));
        let (mut cancelled, mut timed_out) = (false, false);
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        if let Some(b) = after_marker(&mut started, &mut before, marker, &b) {
                            if !b.is_empty() {
                                let _ = out.send(ExecOutput::Stdout(b)).await;
                            }
                            for q in queued.drain(..) {
                                send(&mut ws, q).await?;
                            }
                        }
                    }
                    Some(Ok(Message::Text(t))) => match control(&t) {
                        Some(c) => {
                            if let Some(code) = c.get("exitCode").and_then(Value::as_i64) {
                                exit_code = Some(code as i32);
                            }
                        }
                        None => {
                            if let Some(b) = after_marker(&mut started, &mut before, marker, t.as_bytes())
                                && !b.is_empty()
                            {
                                let _ = out.send(ExecOutput::Stdout(b)).await;
                            }
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        if exit_code.is_none() {
                            exit_code = frame.as_ref().and_then(|f| {
                                serde_json::from_str::<Value>(&f.reason)
                                    .ok()?
                                    .get("exitCode")?
                                    .as_i64()
                                    .map(|c| c as i32)
                            });
                            if exit_code.is_none() && frame.as_ref().is_some_and(|f| u16::from(f.code) == 1000) {
                                exit_code = Some(0);
                            }
                        }
                        break;
                    }
                    None => break,
                    Some(Ok(_)) => {}
                    // The exit was told: a connection dropped after it loses nothing.
                    Some(Err(_)) if exit_code.is_some() => break,
                    Some(Err(err)) => {
                        return Err(e(ProviderErrorKind::Unavailable, format!("the terminal's stream broke: {err}")));
                    }
                },
                msg = async { input.as_mut()?.recv().await }, if input.is_some() => match msg {
                    Some(Input::Data(d)) if started => send(&mut ws, d).await?,
                    Some(Input::Data(d)) => queued.push(d),
                    Some(Input::Resize(s)) => {
                        // A resize refused (the command has just ended) changes nothing.
                        let _ = self.client.json(
                            Method::POST,
                            &format!("{base}/process/pty/{id}/resize"),
                            Some(&json!({ "cols": s.cols, "rows": s.rows })),
                            Idempotent::Yes,
                        ).await;
                    }
                    // A terminal has no end of input of its own: the command goes on.
                    None => input = None,
                },
                () = cancel.cancelled() => { cancelled = true; break; }
                () = &mut deadline => { timed_out = true; break; }
                _ = ping.tick() => { let _ = ws.send(Message::Ping(Vec::new().into())).await; }
                _ = activity.tick() => {
                    let _ = self.api(Method::POST, &format!("/sandbox/{sandbox}/last-activity"), None, Idempotent::Yes).await;
                }
            }
        }
        if cancelled || timed_out {
            let _ = ws.close(None).await;
            // Deleting the session (done by the caller) ends the command.
            return Ok(super::exec::stopped(timed_out));
        }
        let code = exit_code.ok_or_else(|| {
            e(
                ProviderErrorKind::Unavailable,
                "the terminal closed without saying how the command exited",
            )
        })?;
        Ok(ExecExit {
            code,
            signal: (code > 128).then(|| super::exec::signal_name(code - 128)),
            timed_out: false,
            cancelled: false,
        })
    }
}

async fn send(ws: &mut super::exec::Socket, data: Vec<u8>) -> Result<(), ProviderError> {
    ws.send(Message::Binary(data.into())).await.map_err(|err| {
        e(
            ProviderErrorKind::Unavailable,
            format!("sending to the terminal: {err}"),
        )
    })
}

/// A control message (`{"type":"control",...}`), if `text` is one.
fn control(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v.get("type").and_then(Value::as_str) == Some("control")).then_some(v)
}

/// Output as the user sees it: nothing until the marker has gone by, then everything.
/// Answers the bytes to show (possibly none) once started, `None` before.
fn after_marker(
    started: &mut bool,
    before: &mut Vec<u8>,
    marker: &[u8],
    chunk: &[u8],
) -> Option<Vec<u8>> {
    if *started {
        return Some(chunk.to_vec());
    }
    before.extend_from_slice(chunk);
    match before.windows(marker.len()).position(|w| w == marker) {
        Some(at) => {
            *started = true;
            let rest = before[at + marker.len()..].to_vec();
            before.clear();
            Some(rest)
        }
        None => {
            // Only a marker split across chunks needs keeping.
            let keep = before.len().saturating_sub(marker.len() - 1);
            before.drain(..keep);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_starts_after_the_marker_even_when_it_is_split() {
        let marker = b"\x1ecrabbox-1\x1e";
        let (mut started, mut before) = (false, Vec::new());
        assert_eq!(
            after_marker(
                &mut started,
                &mut before,
                marker,
                b"$ exec sh -c ... \x1ecrab"
            ),
            None
        );
        assert_eq!(
            after_marker(&mut started, &mut before, marker, b"box-1\x1ehello"),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            after_marker(&mut started, &mut before, marker, b"\x1ecrabbox-1\x1e"),
            Some(marker.to_vec()),
            "after the start, even the marker is the command's"
        );
    }

    #[test]
    fn the_echo_of_the_launch_line_never_matches() {
        let marker = b"\x1ecrabbox-1\x1e";
        let (mut started, mut before) = (false, Vec::new());
        let echo = b"prompt$  exec /bin/sh -c \"$CRABBOX_TTY_SCRIPT\"\r\n";
        assert_eq!(after_marker(&mut started, &mut before, marker, echo), None);
        assert!(before.len() < marker.len());
    }
}
