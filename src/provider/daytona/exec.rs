//! Commands: one session per lease, an async exec, and the logs WebSocket, so stdout and
//! stderr arrive live and apart and the exit code comes at the stream's end; cancel deletes
//! the session, which ends the command.

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
    /// The lease's session (one per sandbox, made on first use and kept: a warm run costs
    /// an exec and its log stream, nothing more).
    async fn session_for(&self, sandbox: &str, base: &str) -> Result<String, ProviderError> {
        if let Some(s) = self.sessions.get(sandbox) {
            return Ok(s.clone());
        }
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
        self.sessions.insert(sandbox.to_string(), session.clone());
        Ok(session)
    }

    /// Deletes the sandbox's session (which ends whatever still runs in it) and forgets it.
    pub(super) async fn drop_session(&self, sandbox: &str, base: &str) {
        if let Some((_, session)) = self.sessions.remove(sandbox) {
            let _ = self
                .client
                .json(
                    Method::DELETE,
                    &format!("{base}/process/session/{session}"),
                    None,
                    Idempotent::Yes,
                )
                .await;
        }
    }

    /// Runs a command in the lease's session, streaming its output. A command that did not
    /// end by itself (cancelled, timed out, its stream broken) ends with the session, which
    /// is deleted; the next command gets a new one.
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
        let mut input = input;
        let session = self.session_for(sandbox, &base).await?;
        let mut result = self
            .exec_in_session(sandbox, &base, &session, spec, &mut input, &out, &cancel)
            .await;
        // A kept session can be gone (the sandbox was stopped and started): the command
        // did not start; once more in a new one.
        if matches!(&result, Err(err) if err.kind == ProviderErrorKind::NotFound) {
            self.sessions.remove(sandbox);
            let session = self.session_for(sandbox, &base).await?;
            result = self
                .exec_in_session(sandbox, &base, &session, spec, &mut input, &out, &cancel)
                .await;
        }
        // A command stopped (cancelled, timed out, or its output's reader gone) may still
        // run in its session: deleting the session ends it.
        if !matches!(&result, Ok(exit) if !exit.cancelled && !exit.timed_out && exit.signal.is_none())
        {
            self.drop_session(sandbox, &base).await;
        }
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
        input: &mut Option<mpsc::Receiver<Input>>,
        out: &mpsc::Sender<ExecOutput>,
        cancel: &CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        let nonce = format!("{:016x}", rand::random::<u64>());
        let script = session_script(spec, input.is_some(), &nonce);
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
        let feeder = input.take().map(|input| {
            let client = self.client.clone();
            let url = format!("{base}/process/session/{session}/command/{cmd}/input");
            tokio::spawn(feed_input(client, url, input))
        });
        let _stop_feeder = feeder.map(AbortOnDrop);
        let output = Output::new(out, &spec.direct);
        let mut demux = demux::Demux::default();
        let mut trailer = ExitTrailer::new(&nonce);
        let timeout = async {
            match spec.timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);
        // Daytona's idle clock: the exec itself counts as activity; a long command keeps
        // it fed once a minute.
        let mut activity = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let (mut cancelled, mut timed_out, mut broken) = (false, false, false);
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let chunks = tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(b))) => trailer.filter(demux.push(&b)),
                    Some(Ok(Message::Text(t))) => trailer.filter(demux.push(t.as_bytes())),
                    // Daytona closes with 1000 once the command has exited and all of its
                    // output was sent; any other close means the output is not whole.
                    Some(Ok(Message::Close(Some(frame))))
                        if frame.code != tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal =>
                    {
                        return Err(e(
                            ProviderErrorKind::Unavailable,
                            format!(
                                "the command's log stream ended abnormally ({}: {}): its output may be incomplete, so its outcome is not reported",
                                u16::from(frame.code),
                                frame.reason
                            ),
                        ));
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => {
                        return Err(e(ProviderErrorKind::Unavailable, format!("the command's log stream broke: {err}")));
                    }
                },
                () = cancel.cancelled() => { cancelled = true; break; }
                () = &mut timeout => { timed_out = true; break; }
                _ = activity.tick() => {
                    let _ = self.api(Method::POST, &format!("/sandbox/{sandbox}/last-activity"), None, Idempotent::Yes).await;
                    continue;
                }
            };
            // Passing the output on waits for a slow reader, as a pipe makes a command
            // wait; a cancel or the timeout still ends the wait.
            tokio::select! {
                ok = output.send(chunks) => if !ok { broken = true; break; },
                () = cancel.cancelled() => { cancelled = true; break; }
                () = &mut timeout => { timed_out = true; break; }
            }
        }
        if !(broken || cancelled || timed_out) {
            broken = !output.send(trailer.filter(demux.finish())).await
                || !output.send(trailer.finish()).await;
        }
        // Everything written where the client handed it, before the exit is told.
        broken |= !output.finish(cancelled || timed_out).await;
        if cancelled || timed_out || broken {
            let _ = ws.close(None).await;
            // Deleting the session (done by the caller) ends the command.
            return Ok(if broken {
                // What a command writing into that pipe itself would have met.
                ExecExit {
                    code: crate::error::exit::BROKEN_PIPE,
                    signal: Some("SIGPIPE".into()),
                    timed_out: false,
                    cancelled: false,
                }
            } else {
                stopped(timed_out)
            });
        }
        // The script could not get into the working folder: the command never ran.
        if trailer.workdir_failed {
            return Err(e(
                ProviderErrorKind::Invalid,
                format!(
                    "the working folder {} cannot be made or entered in the sandbox (a file is \
                     in its way, or it is not writable there): pick a folder with --workdir",
                    spec.cwd
                ),
            ));
        }
        // The command said its exit code at its end, in the stream.
        if let Some(code) = trailer.code {
            return Ok(ExecExit {
                code,
                signal: (code > 128).then(|| signal_name(code - 128)),
                timed_out: false,
                cancelled: false,
            });
        }
        // It did not (its shell was killed): ask. The code may lag a moment behind.
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

/// Where a command's output goes: into the descriptors its client handed over
/// ([`crate::direct`]: the daemon writes there itself, with no trip through the gRPC stream
/// and the client), else to `out`.
struct Output<'a> {
    out: &'a mpsc::Sender<ExecOutput>,
    stdout: Option<crate::direct::Sink>,
    stderr: Option<crate::direct::Sink>,
}

impl<'a> Output<'a> {
    fn new(out: &'a mpsc::Sender<ExecOutput>, direct: &crate::direct::DirectOutput) -> Self {
        Output {
            out,
            stdout: direct.stdout.clone().map(crate::direct::Sink::start),
            stderr: direct.stderr.clone().map(crate::direct::Sink::start),
        }
    }

    /// Passes `chunks` on; false when a handed descriptor's reader has gone.
    async fn send(&self, chunks: Vec<ExecOutput>) -> bool {
        for chunk in chunks {
            let sink = match &chunk {
                ExecOutput::Stdout(_) => &self.stdout,
                ExecOutput::Stderr(_) => &self.stderr,
            };
            match (sink, chunk) {
                (Some(sink), ExecOutput::Stdout(b) | ExecOutput::Stderr(b)) => {
                    if !sink.write(b).await {
                        return false;
                    }
                }
                (None, chunk) => {
                    let _ = self.out.send(chunk).await;
                }
            }
        }
        true
    }

    /// Waits for the handed descriptors to take what was written (not when the command
    /// was stopped: a reader that stopped reading must not hold its end up); false when
    /// one of them failed.
    async fn finish(self, stopped: bool) -> bool {
        let mut ok = true;
        for sink in [self.stdout, self.stderr].into_iter().flatten() {
            if !stopped {
                ok &= sink.finish().await.is_ok();
            }
        }
        ok
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

/// The shell text a session runs for `spec`: in a subshell (a session's shell is kept
/// for the lease's next commands: nothing of this one's `cd`, environment or `exit` may
/// reach it), into the working folder, the environment, then the command, its stdin either
/// empty or (with `stdin`) fed by the decoder through a FIFO; then the exit code, in the
/// output stream, behind a marker with this run's `nonce` (see [`ExitTrailer`]).
pub(super) fn session_script(spec: &ExecSpec, stdin: bool, nonce: &str) -> String {
    let mut script = format!("( {}", prelude(spec, Some(nonce)));
    if !stdin {
        // A session keeps its commands' stdin open (for its input endpoint): without this a
        // command that reads stdin would wait forever. It reads an empty stdin instead, as
        // with `ssh host cmd < /dev/null`.
        script.push_str(&format!("{{ {}\n}} < /dev/null\n)", spec.command));
    } else {
        // The session's stdin (fd 3 here) only ever carries base64 lines and never ends
        // while the command runs; the decoder turns them into the command's stdin and ends
        // it at the end line. Without python3 the command reads an empty stdin, and is told.
        script.push_str(&format!(
            "if command -v python3 >/dev/null 2>&1 && __cbx_d=$(mktemp -d) && mkfifo \"$__cbx_d/in\"; then \
             {{ python3 -c {decoder} <&3 > \"$__cbx_d/in\" & __cbx_p=$!; \
             {{ {command}\n}} < \"$__cbx_d/in\"; __cbx_c=$?; \
             kill $__cbx_p 2>/dev/null; rm -rf \"$__cbx_d\"; exit $__cbx_c; }} 3<&0; \
             else echo 'crabbox: python3 is not in this sandbox image, so stdin is not forwarded: \
             the command reads an empty stdin (use an image with python3, or pass -n)' >&2; \
             {{ {command}\n}} < /dev/null; fi\n)",
            decoder = quote(DECODER),
            command = spec.command,
        ));
    }
    script.push_str(&format!("; printf '\\036crabbox-exit-{nonce}:%d\\036' $?"));
    script
}

/// The start of a command's script (a session's or a terminal's): into its working
/// folder, made when missing (as the local provider does) or nothing else runs; then its
/// environment. With a session's `nonce`, a folder that cannot be made or entered is said
/// in the output first (`\x1ecrabbox-exit-NONCE:workdir\x1e`, see [`ExitTrailer`]): the
/// caller's mistake, told as such, not the exit 1 of a command that never ran.
pub(super) fn prelude(spec: &ExecSpec, nonce: Option<&str>) -> String {
    let dir = quote(&spec.cwd);
    let mut s = match nonce {
        Some(nonce) => format!(
            "mkdir -p -- {dir} && cd -- {dir} || {{ printf '\\036crabbox-exit-{nonce}:{WORKDIR_FAILED}\\036'; exit 1; }}; "
        ),
        None => format!("mkdir -p -- {dir} && cd -- {dir} || exit 1; "),
    };
    for (k, v) in &spec.env {
        s.push_str(&format!("export {k}={}; ", quote(v)));
    }
    s
}

/// Takes the exit code a command's script prints after it (`\x1ecrabbox-exit-NONCE:N\x1e`,
/// then perhaps the newline Daytona's log writer adds to a last unterminated line) out of
/// its stdout. Output is held back only while its end could be the marker's start, which
/// ordinary output (it would have to end in a 0x1E byte) almost never is.
pub(super) struct ExitTrailer {
    marker: Vec<u8>,
    held: Vec<u8>,
    pub code: Option<i32>,
    /// The script said its working folder could not be made or entered (the command did
    /// not run).
    pub workdir_failed: bool,
}

/// What the marker carries in place of an exit code when the working folder failed.
const WORKDIR_FAILED: &str = "workdir";

impl ExitTrailer {
    pub fn new(nonce: &str) -> ExitTrailer {
        ExitTrailer {
            marker: format!("\x1ecrabbox-exit-{nonce}:").into_bytes(),
            held: Vec::new(),
            code: None,
            workdir_failed: false,
        }
    }

    /// The output to pass on now.
    pub fn filter(&mut self, chunks: Vec<ExecOutput>) -> Vec<ExecOutput> {
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            match chunk {
                ExecOutput::Stdout(b) => {
                    let shown = self.push(b);
                    if !shown.is_empty() {
                        out.push(ExecOutput::Stdout(shown));
                    }
                }
                other => out.push(other),
            }
        }
        out
    }

    fn push(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        if self.code.is_some() {
            // After the trailer only Daytona's added newline can come.
            return if bytes == b"\n" { Vec::new() } else { bytes };
        }
        // The marker starts with 0x1E: output without one (nearly all of it) passes as it
        // is, without a copy or a search for the whole marker.
        if self.held.is_empty() && memchr::memchr(0x1e, &bytes).is_none() {
            return bytes;
        }
        self.held.extend_from_slice(&bytes);
        let mut shown = Vec::new();
        while let Some(at) = find(&self.held, &self.marker) {
            let rest = &self.held[at + self.marker.len()..];
            let Some(end) = rest.iter().position(|&b| b == 0x1e) else {
                // The marker's end has not come yet.
                shown.extend_from_slice(&self.held[..at]);
                self.held.drain(..at);
                return shown;
            };
            let value = std::str::from_utf8(&rest[..end]).ok();
            if value == Some(WORKDIR_FAILED) {
                // The exit code's own marker follows.
                self.workdir_failed = true;
                shown.extend_from_slice(&self.held[..at]);
                self.held.drain(..at + self.marker.len() + end + 1);
                continue;
            }
            if let Some(code) = value.and_then(|s| s.parse::<i32>().ok()) {
                self.code = Some(code);
                shown.extend_from_slice(&self.held[..at]);
                self.held.clear();
                return shown;
            }
            // Not ours after all: pass it on.
            shown.append(&mut self.held);
            return shown;
        }
        // Hold back only a tail that could start the marker.
        let keep = (1..self.marker.len().min(self.held.len() + 1))
            .rev()
            .find(|&n| self.held.ends_with(&self.marker[..n]))
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        shown.extend_from_slice(&self.held[..cut]);
        self.held.drain(..cut);
        shown
    }

    /// Whatever is still held at the end of the stream.
    pub fn finish(&mut self) -> Vec<ExecOutput> {
        if self.held.is_empty() {
            Vec::new()
        } else {
            vec![ExecOutput::Stdout(std::mem::take(&mut self.held))]
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// How a command that crabbox stopped (its timeout, or cancelled) ended.
pub(super) fn stopped(timed_out: bool) -> ExecExit {
    ExecExit {
        code: if timed_out {
            crate::sandbox::process::TIMEOUT_EXIT_CODE
        } else {
            130
        },
        signal: None,
        timed_out,
        cancelled: !timed_out,
    }
}

pub(super) fn signal_name(n: i32) -> String {
    nix::sys::signal::Signal::try_from(n).map_or_else(|_| format!("signal {n}"), |s| s.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn out(v: Vec<ExecOutput>) -> Vec<u8> {
        v.into_iter()
            .flat_map(|o| match o {
                ExecOutput::Stdout(b) => b,
                ExecOutput::Stderr(_) => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn the_exit_code_is_taken_out_of_the_stream_even_when_split() {
        let mut t = ExitTrailer::new("ab12");
        let mut shown = out(t.filter(vec![ExecOutput::Stdout(b"hello\n\x1ecrab".to_vec())]));
        assert_eq!(
            shown, b"hello\n",
            "only what could start the marker is held"
        );
        shown.extend(out(
            t.filter(vec![ExecOutput::Stdout(b"box-exit-ab12:4".to_vec())])
        ));
        shown.extend(out(t.filter(vec![ExecOutput::Stdout(b"2\x1e".to_vec())])));
        // Daytona's log writer ends a last unterminated line with a newline.
        shown.extend(out(t.filter(vec![ExecOutput::Stdout(b"\n".to_vec())])));
        shown.extend(out(t.finish()));
        assert_eq!(shown, b"hello\n");
        assert_eq!(t.code, Some(42));
    }

    #[test]
    fn plain_output_passes_whole_and_a_partial_marker_still_joins_the_next_chunk() {
        let mut t = ExitTrailer::new("ab12");
        let big = vec![b'x'; 100_000];
        assert_eq!(out(t.filter(vec![ExecOutput::Stdout(big.clone())])), big);
        // A marker start held back makes the next plain chunk go through the slow path.
        assert_eq!(
            out(t.filter(vec![ExecOutput::Stdout(b"y\x1e".to_vec())])),
            b"y"
        );
        assert_eq!(
            out(t.filter(vec![ExecOutput::Stdout(b"zz".to_vec())])),
            b"\x1ezz"
        );
        shown_code(&mut t, b"\x1ecrabbox-exit-ab12:0\x1e");
        assert_eq!(t.code, Some(0));
    }

    #[test]
    fn a_working_folder_that_failed_is_told_before_the_exit_code() {
        // In one chunk, with output before it.
        let mut t = ExitTrailer::new("ab12");
        let shown = out(t.filter(vec![ExecOutput::Stdout(
            b"x\x1ecrabbox-exit-ab12:workdir\x1e\x1ecrabbox-exit-ab12:1\x1e\n".to_vec(),
        )]));
        assert_eq!(shown, b"x");
        assert!(t.workdir_failed);
        assert_eq!(t.code, Some(1));
        // Split anywhere: the same.
        let all = b"\x1ecrabbox-exit-ab12:workdir\x1e\x1ecrabbox-exit-ab12:1\x1e";
        for cut in 1..all.len() {
            let mut t = ExitTrailer::new("ab12");
            let mut shown = out(t.filter(vec![ExecOutput::Stdout(all[..cut].to_vec())]));
            shown.extend(out(t.filter(vec![ExecOutput::Stdout(all[cut..].to_vec())])));
            shown.extend(out(t.finish()));
            assert!(shown.is_empty(), "cut at {cut}: {shown:?}");
            assert!(t.workdir_failed && t.code == Some(1), "cut at {cut}");
        }
        // An exit code alone is not a failed folder.
        let mut t = ExitTrailer::new("ab12");
        shown_code(&mut t, b"\x1ecrabbox-exit-ab12:1\x1e");
        assert!(!t.workdir_failed);
    }

    fn shown_code(t: &mut ExitTrailer, bytes: &[u8]) {
        assert!(out(t.filter(vec![ExecOutput::Stdout(bytes.to_vec())])).is_empty());
    }

    #[test]
    fn output_that_only_looks_like_the_marker_is_passed_on() {
        let mut t = ExitTrailer::new("ab12");
        let shown = out(t.filter(vec![
            ExecOutput::Stdout(b"a\x1e".to_vec()),
            ExecOutput::Stdout(b"b \x1ecrabbox-exit-zz99:1\x1e".to_vec()),
        ]));
        let mut all = shown;
        all.extend(out(t.finish()));
        assert_eq!(all, b"a\x1eb \x1ecrabbox-exit-zz99:1\x1e".to_vec());
        assert_eq!(t.code, None, "another nonce is not ours");
        // Stderr is never held.
        let mut t = ExitTrailer::new("ab12");
        let v = t.filter(vec![ExecOutput::Stderr(b"\x1e".to_vec())]);
        assert_eq!(v, vec![ExecOutput::Stderr(b"\x1e".to_vec())]);
    }

    #[test]
    fn the_script_runs_in_a_subshell_and_reports_its_code() {
        let spec = ExecSpec {
            command: "exit 3".into(),
            cwd: std::env::temp_dir().display().to_string(),
            env: Default::default(),
            timeout: None,
            tty: None,
            direct: Default::default(),
        };
        let script = session_script(&spec, false, "n1");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cd / && {script}"))
            .output()
            .expect("sh");
        assert_eq!(out.stdout, b"\x1ecrabbox-exit-n1:3\x1e");
        assert_eq!(
            out.status.code(),
            Some(0),
            "the session's shell survives `exit`"
        );
    }
}
