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
use crate::provider::{ExecExit, ExecOutput, ExecSpec, Input, ProviderError, ProviderErrorKind};

impl DaytonaProvider {
    /// Runs a command in a private session, streaming its output; the session is deleted
    /// either way (which ends whatever still runs in it).
    pub(super) async fn exec_command(
        &self,
        sandbox: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
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
            .exec_in_session(sandbox, &base, &session, spec, input, out, cancel)
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

/// A WebSocket to the toolbox.
pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl DaytonaProvider {
    /// Opens a WebSocket at `url` (http(s) turned into ws(s)) with the credentials and the
    /// given subprotocols, answering the subprotocol the server chose. The handshake is a
    /// GET under the same retry policy as every other call: a 429 is waited out
    /// (Retry-After honoured), a 5xx or a dropped or half-done handshake is tried again
    /// with backoff.
    pub(super) async fn websocket(
        &self,
        url: &str,
        what: &str,
        subprotocols: &[&str],
    ) -> Result<(Socket, Option<String>), ProviderError> {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let ws_url = url.replacen("http", "ws", 1);
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                ws_url.as_str(),
            )
            .map_err(|err| e(ProviderErrorKind::Other, format!("{what} URL: {err}")))?;
        request.headers_mut().extend(self.client.auth_headers()?);
        if !subprotocols.is_empty() {
            let value = subprotocols.join(", ");
            request.headers_mut().insert(
                "sec-websocket-protocol",
                value.parse().map_err(|err| {
                    e(
                        ProviderErrorKind::Other,
                        format!("{what} subprotocol: {err}"),
                    )
                })?,
            );
        }
        let mut retries = client::Retries::new(self.client.retry, Idempotent::Yes);
        loop {
            let err = match tokio_tungstenite::connect_async(request.clone()).await {
                Ok((ws, resp)) => {
                    let chosen = resp
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    return Ok((ws, chosen));
                }
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
                        self.client.redact(&format!("opening {what}: {err}")),
                    ));
                }
            };
            match retries.after_failure(status, retry_after) {
                Ok(delay) => {
                    tracing::debug!(
                        ?status,
                        ?delay,
                        what,
                        "websocket handshake failed; retrying"
                    );
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
                            .redact(&format!("opening {what}: {err}{detail}")),
                    ));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn exec_in_session(
        &self,
        sandbox: &str,
        base: &str,
        session: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        let script = session_script(spec, input.is_some());
        let exec_url = format!("{base}/process/session/{session}/exec");
        // Input is not echoed into the command's output (Daytona's default echoes it).
        let body = json!({
            "command": script,
            "runAsync": true,
            "async": true,
            "suppressInputEcho": true,
        });
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
        let ws_url = format!("{base}/process/session/{session}/command/{cmd}/logs?follow=true");
        let (mut ws, _) = self
            .websocket(&ws_url, "the command's log stream", &[])
            .await?;
        // The client's stdin, sent through the input endpoint as it comes; ended with the
        // command (dropping the task's handle does not stop it: it is aborted below).
        let feeder = input.map(|input| {
            let client = self.client.clone();
            let url = format!("{base}/process/session/{session}/command/{cmd}/input");
            tokio::spawn(feed_input(client, url, input))
        });
        let _stop_feeder = feeder.map(AbortOnDrop);
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

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The bytes of stdin per input call. Daytona's input endpoint takes a JSON string (so the
/// bytes travel as base64) and adds a newline to each call: one call is one base64 line of
/// at most 64 KiB.
const INPUT_CHUNK: usize = 48 * 1024;

/// The line that ends stdin: not base64, so it cannot be data.
const INPUT_EOF: &str = ".\n";

/// Decodes the base64 lines the input endpoint delivers into the command's stdin, flushing
/// each at once (a stdio server gets every request as it is sent), until the end line.
/// python3 is the one decoder found in sandbox images that neither buffers a whole block
/// (coreutils' `base64 -d` waits for 40 KiB or EOF) nor reads byte by byte (`read`).
const DECODER: &str = "import sys,base64,os
o=sys.stdout.buffer
for l in sys.stdin.buffer:
    l=l.strip()
    if l==b'.':break
    if not l:continue
    try:
        o.write(base64.b64decode(l));o.flush()
    except BrokenPipeError:
        os._exit(0)
";

/// The shell text a session runs for `spec`: into the working folder, the environment, then
/// the command, its stdin either empty or (with `stdin`) fed by the decoder through a FIFO.
/// Never `exit`: Daytona sources it in the session's shell.
pub(super) fn session_script(spec: &ExecSpec, stdin: bool) -> String {
    let mut script = format!("cd {} && ", quote(&spec.cwd));
    for (k, v) in &spec.env {
        script.push_str(&format!("export {k}={}; ", quote(v)));
    }
    if !stdin {
        // A session keeps its commands' stdin open (for its input endpoint): without this a
        // command that reads stdin would wait forever. It reads an empty stdin instead, as
        // with `ssh host cmd < /dev/null`.
        script.push_str(&format!("{{ {}\n}} < /dev/null", spec.command));
        return script;
    }
    // The session's stdin (fd 3 here) only ever carries base64 lines and never ends while
    // the command runs; the decoder turns them into the command's stdin and ends it at the
    // end line. Without python3 the command reads an empty stdin, and is told so.
    script.push_str(&format!(
        "if command -v python3 >/dev/null 2>&1 && __cbx_d=$(mktemp -d) && mkfifo \"$__cbx_d/in\"; then \
         {{ python3 -c {decoder} <&3 > \"$__cbx_d/in\" & __cbx_p=$!; \
         {{ {command}\n}} < \"$__cbx_d/in\"; __cbx_c=$?; \
         kill $__cbx_p 2>/dev/null; rm -rf \"$__cbx_d\"; (exit $__cbx_c); }} 3<&0; \
         else echo 'crabbox: python3 is not in this sandbox image, so stdin is not forwarded: \
         the command reads an empty stdin (use an image with python3, or pass -n)' >&2; \
         {{ {command}\n}} < /dev/null; fi",
        decoder = quote(DECODER),
        command = spec.command,
    ));
    script
}

/// Sends what arrives on `input` through the input endpoint, in order, one call at a time
/// (so a slow command holds the client back), then the end line. Stops at the first
/// refusal: the command has ended (410) or the sandbox is gone.
async fn feed_input(client: client::Client, url: String, mut input: mpsc::Receiver<Input>) {
    use base64::Engine;
    let send = |data: String| {
        let client = &client;
        let url = &url;
        async move {
            client
                .json(
                    Method::POST,
                    url,
                    Some(&json!({ "data": data })),
                    Idempotent::No,
                )
                .await
        }
    };
    while let Some(msg) = input.recv().await {
        let Input::Data(bytes) = msg else { continue };
        for piece in bytes.chunks(INPUT_CHUNK) {
            let mut line = base64::engine::general_purpose::STANDARD.encode(piece);
            line.push('\n');
            if let Err(h) = send(line).await {
                tracing::debug!(error = %h.error, "stdin refused; the command has ended");
                return;
            }
        }
    }
    let _ = send(INPUT_EOF.to_string()).await;
}
