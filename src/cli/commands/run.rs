//! `run` and `ssh`: the commands that run something in a lease.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;
use tokio_stream::StreamExt;

use super::{Ctx, warmup_request};
use crate::cli::output::{lease_json, print_json, state_name};
use crate::cli::{CliError, OutputFormat, RunArgs, exit};
use crate::pb;

pub(super) fn env_pairs(names: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut env = BTreeMap::new();
    for n in names {
        match n.split_once('=') {
            Some((k, v)) => {
                env.insert(k.to_string(), v.to_string());
            }
            None => {
                let v = std::env::var(n).map_err(|e| {
                    CliError::usage(match e {
                        std::env::VarError::NotPresent => format!(
                            "--env {n}: {n} is not set here; set it, or pass --env {n}=VALUE"
                        ),
                        std::env::VarError::NotUnicode(_) => format!(
                            "--env {n}: the value of {n} here is not UTF-8, and commands get \
                             their environment as text; pass --env {n}=VALUE with a UTF-8 value"
                        ),
                    })
                })?;
                env.insert(n.clone(), v);
            }
        }
    }
    Ok(env)
}

pub(super) async fn run(ctx: &Ctx, args: RunArgs) -> Result<i32, CliError> {
    let scripted = args.script.is_some() || args.script_stdin;
    if args.command.is_empty() && !args.sync_only && !scripted {
        return Err(CliError::usage(
            "no command to run: put it after `--`, for example `crabbox run -- cargo test`",
        ));
    }
    if args.sync_root.is_none()
        && !args.no_sync
        && let Some(root) = &ctx.repo_root
        && let Some(what) = too_wide_to_sync(root)
    {
        return Err(CliError::usage(format!(
            "refusing to sync {} ({what}) as a checkout: run from a project folder, name what \
             to sync with --sync-root DIR, or pass --no-sync",
            root.display()
        )));
    }
    let workdir = match &args.workdir {
        Some(w) => w.clone(),
        // The folder the CLI was started in, inside the checkout (as `docker -w` and ssh
        // users expect).
        None => ctx
            .repo_root
            .as_ref()
            .and_then(|root| {
                let cwd = std::fs::canonicalize(std::env::current_dir().ok()?).ok()?;
                Some(cwd.strip_prefix(root).ok()?.to_string_lossy().into_owned())
            })
            .unwrap_or_default(),
    };
    let env = env_pairs(&args.env)?;
    let stdin_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    // As ssh: a terminal is only made when there is one here to drive it.
    let tty = args.tty && stdin_is_terminal;
    if args.tty && !tty {
        ctx.progress(
            "no terminal is allocated because stdin is not a terminal (-t needs one): the \
             command runs on pipes",
        );
    }
    // environment.lifecycle.preserve: a fresh lease outlives its run, as with --keep.
    let preserve = ctx
        .settings
        .environment
        .as_ref()
        .and_then(|e| e.lifecycle.preserve)
        .unwrap_or(false);
    let fresh = warmup_request(ctx, &args.lease, args.keep || preserve, args.reclaim)?;
    let wanted = super::artifacts::Wanted::from_args(&args)?;
    let script = read_script(&args)?;
    let mut capture = super::capture::Capture::open(&args, ctx.quiet)?;
    let stall_timeout = args.stall_timeout.or(ctx.settings.stall_timeout);
    // The command may write to this process's own stdout/stderr itself (no copy through
    // the daemon and this process) when nothing here needs to see its output: no document
    // or event format, no capture, no stall watchdog, no terminal for the command; and
    // only streams that are not a terminal here (a command must not find a terminal it was
    // not given with -t).
    let direct = !(tty
        || args.sync_only
        || ctx.json
        || ctx.format == OutputFormat::Ndjson
        || capture.sees_output()
        || stall_timeout.is_some());
    let req = pb::RunRequest {
        direct_output: String::new(),
        artifacts: wanted.sources.clone(),
        script,
        lease: args.id.clone().unwrap_or_default(),
        repo_root: ctx.repo(),
        argv: args.command.clone(),
        shell: args.shell,
        env,
        sync: Some(pb::SyncOptions {
            skip: args.no_sync,
            full_resync: args.full_resync,
            force_large: args.force_sync_large,
            force_delete: args.force_sync_delete,
            delete_guard_percent: ctx.settings.sync.delete_guard.unwrap_or(0),
            git: ctx.settings.sync.git,
            exclude: ctx.settings.sync.exclude.clone(),
            include: ctx.settings.sync.include.clone(),
        }),
        sync_only: args.sync_only,
        timeout_secs: args.timeout.map_or(0, |d| d.as_secs().max(1)),
        stall_timeout_secs: stall_timeout.map_or(0, |d| d.as_secs().max(1)),
        keep: args.keep || preserve,
        keep_on_failure: args.keep_on_failure,
        reclaim: args.reclaim,
        fresh: Some(fresh),
        workdir,
        tty: tty.then(|| {
            let (rows, cols) = crate::cli::terminal::window_size();
            pb::WindowSize {
                rows: rows.into(),
                cols: cols.into(),
            }
        }),
        term: if tty {
            std::env::var("TERM").unwrap_or_default()
        } else {
            String::new()
        },
    };
    let send_stdin =
        !args.no_stdin && !args.script_stdin && (tty || args.interactive || stdin_has_input());
    let ndjson = ctx.format == OutputFormat::Ndjson;
    let result = stream_run(
        ctx,
        &args,
        req,
        Streams {
            stdin: send_stdin,
            direct,
        },
        ndjson,
        &wanted,
        &mut capture,
    )
    .await;
    if preserve && !args.keep && result.is_ok() {
        ctx.progress(
            "environment.lifecycle.preserve keeps this run's lease (as --keep does): \
             `crabbox list` shows it, `crabbox stop` in this repository releases it",
        );
    }
    if ndjson && let Err(e) = &result {
        // The stream's last line says how it ended, whatever ended it.
        let (code, kind) = e.under_users_command();
        event(&json!({"event": "error", "exit_code": code, "kind": kind, "message": e.message}));
    }
    result
}

/// Is stdin something to send: a pipe, a socket or a file (not a terminal, not /dev/null)?
fn stdin_has_input() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        return false;
    }
    // /proc/self/fd/0 names what fd 0 is without reading from it.
    match std::fs::metadata("/proc/self/fd/0") {
        Ok(m) => {
            let t = m.file_type();
            t.is_fifo() || t.is_socket() || t.is_file()
        }
        Err(_) => false,
    }
}

/// The RunWithInput request stream: the start, then stdin in chunks as it is read (a
/// thread reads it, blocking when the daemon is not taking it: backpressure, not memory),
/// then the end of the stream for EOF. On a terminal, window size changes go too.
fn stdin_stream(start: pb::RunRequest) -> tokio_stream::wrappers::ReceiverStream<pb::RunInput> {
    use pb::run_input::Input;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if start.tty.is_some()
        && let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                let (rows, cols) = crate::cli::terminal::window_size();
                let msg = pb::RunInput {
                    input: Some(Input::Resize(pb::WindowSize {
                        rows: rows.into(),
                        cols: cols.into(),
                    })),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    std::thread::spawn(move || {
        use std::io::Read;
        let first = pb::RunInput {
            input: Some(Input::Start(start)),
        };
        if tx.blocking_send(first).is_err() {
            return;
        }
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = pb::RunInput {
                        input: Some(Input::Stdin(buf[..n].to_vec())),
                    };
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One NDJSON line on stdout, flushed: a consumer sees each event as it happens.
fn event(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The command's output as the chosen format wants it: an NDJSON event, kept for the
/// `--json` document, or written through as it comes.
/// `--script FILE` / `--script-stdin`: the script to send, read whole (checked here).
fn read_script(args: &RunArgs) -> Result<Option<pb::Script>, CliError> {
    let (body, name) = if let Some(path) = &args.script {
        let body = std::fs::read(path)
            .map_err(|e| CliError::usage(format!("--script {}: {e}", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (body, name)
    } else if args.script_stdin {
        use std::io::{IsTerminal, Read};
        if std::io::stdin().is_terminal() {
            return Err(CliError::usage(
                "--script-stdin reads the script from stdin, which is a terminal: pipe it in \
                 (crabbox run --script-stdin < build.sh) or use --script FILE",
            ));
        }
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .map_err(|e| CliError::usage(format!("--script-stdin: reading stdin: {e}")))?;
        (body, "stdin-script".to_string())
    } else {
        return Ok(None);
    };
    if body.is_empty() {
        return Err(CliError::usage("the script is empty: nothing to run"));
    }
    Ok(Some(pb::Script { body, name }))
}

fn deliver(
    ndjson: bool,
    json: bool,
    kind: &str,
    bytes: Vec<u8>,
    captured: &mut Vec<u8>,
    through: &mut dyn Write,
) -> std::io::Result<()> {
    if ndjson {
        event(&chunk(kind, &bytes));
    } else if json {
        captured.extend(bytes);
    } else {
        through.write_all(&bytes)?;
        through.flush()?;
    }
    Ok(())
}

/// Output bytes as an event: `text` when they are UTF-8, else `base64` (never lossy).
fn chunk(kind: &str, bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({"event": kind, "text": text}),
        Err(_) => {
            use base64::Engine;
            json!({"event": kind, "base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
    }
}

/// How a run's streams travel: stdin sent over the stream; stdout/stderr handed to the
/// daemon for the command to write itself ([`hand_over_output`]).
struct Streams {
    stdin: bool,
    direct: bool,
}

async fn stream_run(
    ctx: &Ctx,
    args: &RunArgs,
    mut req: pb::RunRequest,
    streams: Streams,
    ndjson: bool,
    wanted: &super::artifacts::Wanted,
    capture: &mut super::capture::Capture,
) -> Result<i32, CliError> {
    let json = ctx.json;
    let begun = std::time::Instant::now();
    let tty = req.tty.is_some();
    let mut c = ctx.clients().await?;
    // After connecting: the daemon is up by now (this may have started it).
    // Held until this function returns: the daemon drops what its run did not take once
    // it closes.
    let _handed = if streams.direct {
        let (token, conn) = hand_over_output(ctx);
        req.direct_output = token;
        conn
    } else {
        None
    };
    let mut stream = if streams.stdin {
        c.leases
            .run_with_input(stdin_stream(req))
            .await?
            .into_inner()
    } else {
        c.leases.run(req).await?.into_inner()
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let (mut cap_out, mut cap_err) = (Vec::new(), Vec::new());
    let mut lease_seen = None;
    // -v: the daemon's steps for the run's lease, once it has one.
    let mut trace: Option<super::Trace> = None;
    let mut sync_seen = None;
    let mut upload_lines = UploadLines::default();
    let mut receiving: Option<super::artifacts::Receiving> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // On a terminal in raw mode, the end of crabbox by a signal must put it back first.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok().filter(|_| tty);
    let mut terminate = signal(SignalKind::terminate()).ok().filter(|_| tty);
    let mut raw: Option<crate::cli::terminal::RawMode> = None;
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            code = stop_signal(&mut hangup, &mut terminate) => {
                drop(stream);
                drop(raw.take());
                ctx.progress("stopped by a signal: the command is cancelled");
                return Ok(code);
            }
            _ = &mut interrupted => {
                // Dropping the stream tells the daemon the client left: it cancels the
                // command and releases a fresh, not-kept lease.
                drop(stream);
                drop(raw.take());
                ctx.progress("interrupted: the command is cancelled");
                if ndjson {
                    event(&json!({"event": "interrupted", "exit_code": exit::INTERRUPTED}));
                }
                return Ok(exit::INTERRUPTED);
            }
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(status)) if !is_connection_lost(&status) => return Err(status.into()),
            // The daemon went away under the run: say so, and what happens to the lease.
            Some(Err(_)) | None => {
                return Err(CliError::new(
                    exit::INTERNAL,
                    format!(
                        "lost the connection to crabboxd during the run (it stopped or crashed), \
                         so the command's outcome is unknown. A lease this run created is \
                         released when the daemon comes back; a warm lease comes back ready. \
                         See `crabbox daemon status` and the daemon log ({})",
                        ctx.daemon_log().display()
                    ),
                ));
            }
        };
        use pb::run_event::Event;
        match ev.event {
            Some(Event::Lease(l)) => {
                ctx.progress(format!("lease {} ({}, {})", l.slug, l.id, state_name(&l)));
                if trace.is_none() {
                    trace = ctx.trace(&c.leases, &l);
                }
                if ndjson {
                    event(&json!({"event": "lease", "lease": lease_json(&l)}));
                }
                lease_seen = Some(l);
            }
            Some(Event::Phase(p)) => {
                if ndjson {
                    event(&json!({"event": "phase", "message": p}));
                }
                ctx.progress(p)
            }
            Some(Event::Artifacts(chunk)) => match chunk.chunk {
                Some(pb::copy_chunk::Chunk::Header(h)) => {
                    let lease_id = lease_seen
                        .as_ref()
                        .map_or("", |l: &pb::Lease| l.id.as_str());
                    receiving = Some(super::artifacts::Receiving::start(wanted, &h, lease_id)?);
                }
                Some(pb::copy_chunk::Chunk::Data(d)) => {
                    if let Some(r) = &mut receiving {
                        r.feed(d);
                    }
                }
                None => {}
            },
            Some(Event::Started(st)) => {
                // The command's own output from here: no spinner under it.
                ctx.progress_done();
                if ndjson {
                    event(&json!({"event": "started", "workdir": st.workdir}));
                }
                if tty {
                    raw = Some(crate::cli::terminal::RawMode::enter().map_err(|e| {
                        CliError::new(
                            exit::INTERNAL,
                            format!("could not put this terminal in raw mode for -t: {e}"),
                        )
                    })?);
                }
            }
            Some(Event::SyncProgress(p)) => {
                if ndjson {
                    event(&json!({
                        "event": "sync_progress",
                        "files": p.files,
                        "deleted": p.deleted,
                        "bytes_total": p.bytes_total,
                        "bytes_sent": p.bytes_sent,
                        "done": p.done,
                        "elapsed_ms": p.elapsed_ms,
                    }));
                }
                let due = upload_lines.due(&p);
                ctx.progress_update(upload_line(&p), due);
            }
            Some(Event::Sync(s)) => {
                ctx.progress(format!(
                    "synced {} files: {} sent ({}), {} deleted, in {} ms",
                    s.files_total,
                    s.files_uploaded,
                    human_bytes(s.bytes_uploaded),
                    s.files_deleted,
                    s.millis
                ));
                if ndjson {
                    event(&json!({
                        "event": "sync",
                        "files_total": s.files_total,
                        "files_uploaded": s.files_uploaded,
                        "files_deleted": s.files_deleted,
                        "bytes_uploaded": s.bytes_uploaded,
                        "millis": s.millis,
                        "warnings": s.warnings,
                    }));
                }
                sync_seen = Some(s);
            }
            Some(Event::Stdout(b)) => {
                capture.keep(false, &b)?;
                if !capture.quiet_out
                    && let Err(e) = deliver(ndjson, json, "stdout", b, &mut cap_out, &mut out)
                {
                    return Ok(output_lost(ctx, "stdout", &e));
                }
            }
            Some(Event::Stderr(b)) => {
                capture.keep(true, &b)?;
                if !capture.quiet_err
                    && let Err(e) = deliver(ndjson, json, "stderr", b, &mut cap_err, &mut err)
                {
                    return Ok(output_lost(ctx, "stderr", &e));
                }
            }
            Some(Event::Exit(x)) => {
                drop(raw.take());
                if let Some(t) = trace.take() {
                    t.finish().await;
                }
                if x.stalled {
                    ctx.progress(format!(
                        "the command printed nothing for {} and was stopped (--stall-timeout, \
                         or run.stall_timeout in crabbox.yaml: raise it for quiet commands)",
                        crate::clock::human_secs(
                            args.stall_timeout
                                .or(ctx.settings.stall_timeout)
                                .map_or(0, |d| d.as_secs())
                        )
                    ));
                } else if x.timed_out {
                    ctx.progress("the command timed out and was stopped");
                } else if !x.signal.is_empty() {
                    ctx.progress(format!("the command was killed by {}", x.signal));
                }
                let received = match receiving.take() {
                    Some(r) => Some(r.finish().await?),
                    None => None,
                };
                if let Some(r) = &received {
                    if !r.files.is_empty() {
                        ctx.progress(format!(
                            "artifacts: {}",
                            r.files
                                .iter()
                                .map(|f| f.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    for m in r.missing.iter().filter(|m| !r.missing_required.contains(m)) {
                        ctx.progress(format!(
                            "warning: no artifact {m} (nothing there in the sandbox)"
                        ));
                    }
                    if x.code != 0 && !r.missing_required.is_empty() {
                        ctx.progress(format!(
                            "warning: required artifact missing: {} (the command's own exit {} is told)",
                            r.missing_required.join(", "),
                            x.code
                        ));
                    }
                }
                let artifacts_json = received.as_ref().map(|r| {
                    json!({
                        "files": r.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                        "missing": r.missing,
                    })
                });
                let total_ms = begun.elapsed().as_millis() as u64;
                // Made only for what shows it (--json, ndjson, a failure's report).
                let timings = || -> serde_json::Value {
                    x.timings
                        .iter()
                        .map(|t| json!({"phase": t.phase, "ms": t.ms}))
                        .chain([json!({"phase": "total", "ms": total_ms})])
                        .collect()
                };
                if let Some(dir) = capture.finish(x.code, &args.command, &args.env, timings)? {
                    ctx.progress(format!(
                        "the command failed (exit {}): its output's last part, the command and \
                         its timings are kept in {}",
                        x.code,
                        dir.display()
                    ));
                }
                if (args.timings || ctx.verbose) && !ctx.quiet {
                    let parts: Vec<String> = x
                        .timings
                        .iter()
                        .map(|t| format!("{} {} ms", t.phase, t.ms))
                        .collect();
                    eprintln!(
                        "crabbox: timings: {} (total {total_ms} ms, this CLI included)",
                        parts.join(", ")
                    );
                }
                if ndjson {
                    event(&json!({
                        "event": "exit",
                        "timings": timings(),
                        "exit_code": x.code,
                        "signal": if x.signal.is_empty() { None } else { Some(&x.signal) },
                        "timed_out": x.timed_out,
                        "stalled": x.stalled,
                        "command_ms": x.elapsed_ms,
                        "total_ms": total_ms,
                        "artifacts": artifacts_json,
                    }));
                } else if json {
                    print_json(&json!({
                        "timings": timings(),
                        "lease": lease_seen.as_ref().map(lease_json),
                        "exit_code": x.code,
                        "signal": if x.signal.is_empty() { None } else { Some(&x.signal) },
                        "timed_out": x.timed_out,
                        "stalled": x.stalled,
                        "stdout": String::from_utf8_lossy(&cap_out),
                        "stderr": String::from_utf8_lossy(&cap_err),
                        "sync": sync_seen.as_ref().map(|s| json!({
                            "files_total": s.files_total,
                            "files_uploaded": s.files_uploaded,
                            "files_deleted": s.files_deleted,
                            "bytes_uploaded": s.bytes_uploaded,
                            "millis": s.millis,
                        })),
                        "artifacts": artifacts_json,
                    }));
                }
                return match &received {
                    Some(r) => super::artifacts::exit_code(x.code, r),
                    None => Ok(x.code),
                };
            }
            None => {}
        }
    }
}

/// The exit code of the first SIGHUP or SIGTERM to arrive (128 + its number); never, without
/// handlers.
async fn stop_signal(
    hangup: &mut Option<tokio::signal::unix::Signal>,
    terminate: &mut Option<tokio::signal::unix::Signal>,
) -> i32 {
    async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
        let received = match s {
            Some(s) => s.recv().await.is_some(),
            None => false,
        };
        if !received {
            std::future::pending::<()>().await;
        }
    }
    tokio::select! {
        () = next(hangup) => 128 + 1,
        () = next(terminate) => 128 + 15,
    }
}

/// Is `root` (outside git) a folder no one means to sync whole: the home folder, `/`, or
/// a temp folder? Answers what it is.
fn too_wide_to_sync(root: &Path) -> Option<&'static str> {
    if root.join(".git").exists() {
        return None;
    }
    let same = |p: &Path| std::fs::canonicalize(p).is_ok_and(|c| c == root);
    if root == Path::new("/") {
        Some("the filesystem root")
    } else if std::env::var_os("HOME").is_some_and(|h| same(Path::new(&h))) {
        Some("your home folder")
    } else if ["/tmp", "/var/tmp"].iter().any(|t| same(Path::new(t))) || same(&std::env::temp_dir())
    {
        Some("a temp folder")
    } else {
        None
    }
}

/// This process's `what` could not take the command's output: the command is stopped (the
/// caller returns, and dropping the stream cancels it), as a local command writing there
/// would have been.
fn output_lost(ctx: &Ctx, what: &str, e: &std::io::Error) -> i32 {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        ctx.progress(format!(
            "{what}'s reader has gone (a closed pipe): the command was stopped (SIGPIPE)"
        ));
        exit::BROKEN_PIPE
    } else {
        ctx.progress(format!(
            "could not write the command's output to {what}: {e}; the command was stopped"
        ));
        exit::INTERNAL
    }
}

/// Did the stream break because the daemon went away, rather than answer an error?
fn is_connection_lost(status: &tonic::Status) -> bool {
    let m = status.message();
    status.metadata().get(crate::error::KIND_METADATA).is_none()
        && matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal
        )
        && (m.contains("h2 protocol error")
            || m.contains("transport")
            || m.contains("connection")
            || m.contains("broken pipe"))
}

/// Hands this process's stdout and stderr (those that are not a terminal) to the daemon
/// for the command to write to ([`crate::direct`]); answers the token for the Run request
/// (with the connection to keep open until the run ends), or "" when there is nothing to
/// hand over or the daemon does not take them (its output then comes through the daemon,
/// as always).
fn hand_over_output(ctx: &Ctx) -> (String, Option<std::os::unix::net::UnixStream>) {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    // stdout only (where the volume is): stderr keeps carrying crabbox's own lines
    // through this process, and a jail that outlives a daemon killed at the very moment it
    // started it (bubblewrap's inner process sets its parent-death signal itself, a
    // window no fork-side setting closes) then holds at most the client's stdout.
    let stdout = std::io::stdout();
    let out = (!stdout.is_terminal()).then(|| stdout.as_fd());
    let err = None;
    if out.is_none() {
        return (String::new(), None);
    }
    match crate::direct::hand_over(&crate::direct::socket_path(&ctx.socket), out, err) {
        Ok((token, conn)) => (token, Some(conn)),
        Err(why) => {
            if ctx.verbose {
                ctx.progress(format!(
                    "the command's output comes through the daemon ({why})"
                ));
            }
            (String::new(), None)
        }
    }
}

/// What a sync's upload has done, for people: "syncing: sending 3 files, deleting 1:
/// 4.2 MiB of 12.0 MiB (35%)".
fn upload_line(p: &pb::SyncProgress) -> String {
    let mut line = format!(
        "syncing: sending {} file{}",
        p.files,
        if p.files == 1 { "" } else { "s" }
    );
    if p.deleted > 0 {
        line.push_str(&format!(", deleting {}", p.deleted));
    }
    if p.bytes_sent >= p.bytes_total && !p.done {
        line.push_str(&format!(
            ": {} sent, unpacking in the sandbox",
            human_bytes(p.bytes_total)
        ));
        return line;
    }
    let pct = (p.bytes_sent.saturating_mul(100))
        .checked_div(p.bytes_total)
        .unwrap_or(100);
    line.push_str(&format!(
        ": {} of {} ({pct}%)",
        human_bytes(p.bytes_sent),
        human_bytes(p.bytes_total)
    ));
    line
}

/// When a long upload is said as plain lines (no terminal): not before it has run
/// [`Self::QUIET_FOR_MS`], then at most every [`Self::EVERY_MS`], never its end (the
/// sync's own line follows). Time is the upload's own (`elapsed_ms`, the daemon's clock),
/// not when events reach this process: a CLI starved of CPU reads them late and all at
/// once.
#[derive(Default)]
struct UploadLines {
    last_ms: Option<u64>,
}

impl UploadLines {
    const QUIET_FOR_MS: u64 = 2_000;
    const EVERY_MS: u64 = 5_000;

    fn due(&mut self, p: &pb::SyncProgress) -> bool {
        let due = !p.done
            && p.elapsed_ms >= Self::QUIET_FOR_MS
            && self
                .last_ms
                .is_none_or(|l| p.elapsed_ms.saturating_sub(l) >= Self::EVERY_MS);
        if due {
            self.last_ms = Some(p.elapsed_ms);
        }
        due
    }
}

pub(super) fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

pub(super) async fn ssh(
    ctx: &Ctx,
    id: Option<String>,
    print: bool,
    show_secret: bool,
    ttl: Option<std::time::Duration>,
    command: Vec<String>,
) -> Result<i32, CliError> {
    let ttl_minutes = match ttl {
        Some(d) if d > std::time::Duration::from_secs(24 * 3600) => {
            return Err(CliError::usage(
                "--ttl: ssh access lasts at most 24h; ask again when it runs out",
            ));
        }
        Some(d) => d.as_secs().div_ceil(60),
        None => 0,
    };
    let mut c = ctx.clients().await?;
    let access = c
        .leases
        .ssh(pb::SshRequest {
            lease: id.unwrap_or_default(),
            repo_root: ctx.repo(),
            ttl_minutes,
        })
        .await?
        .into_inner();
    // The session starts in the lease's checkout (or the home folder when there is none).
    let cd = access
        .lease
        .as_ref()
        .map(|l| {
            let repo = Path::new(&l.repo_root)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "workdir".into());
            let dir = format!("{}/{}/{repo}", l.work_root, l.id);
            format!(
                "cd {} 2>/dev/null || cd; ",
                shlex::try_quote(&dir).unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let remote = if command.is_empty() {
        format!("{cd}exec \"${{SHELL:-/bin/sh}}\" -l")
    } else {
        let words = shlex::try_join(command.iter().map(String::as_str))
            .map_err(|e| CliError::usage(format!("cannot quote the command for ssh: {e}")))?;
        format!("{cd}{words}")
    };
    let mut args: Vec<String> = Vec::new();
    if access.port != 22 {
        args.extend(["-p".to_string(), access.port.to_string()]);
    }
    // A sandbox's gateway is new to this machine: trust it on first use (as `ssh` asks a
    // person to), and refuse it if its key ever changes. Its key is kept in crabbox's own
    // known_hosts (in the state dir), not in the user's: gateways come and go with
    // providers (a daytona-sim on a new port each time, with a new key) and would pile up
    // there, and a port reused with another key would be refused for good.
    let known_hosts = crate::cli::client::state_dir_made(exit::SSH)?.join("known_hosts");
    args.extend([
        "-o".to_string(),
        "StrictHostKeyChecking=accept-new".to_string(),
        "-o".to_string(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
    ]);
    // A shell wants a terminal; a command gets one when this side has one.
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        args.push("-t".to_string());
    }
    let user = |secret: bool| {
        if secret {
            access.user.clone()
        } else {
            "<redacted>".to_string()
        }
    };
    let target = |secret: bool| format!("{}@{}", user(secret), access.host);
    if print {
        let mut words = vec!["ssh".to_string()];
        words.extend(
            args.iter()
                .map(|a| shlex::try_quote(a).map_or_else(|_| a.clone(), |q| q.into_owned())),
        );
        words.push(target(show_secret));
        words.push(shlex::try_quote(&remote).unwrap_or_default().into_owned());
        if ctx.json {
            print_json(&json!({
                "lease": access.lease.as_ref().map(lease_json),
                "host": access.host,
                "port": access.port,
                "user": user(show_secret),
                "command": words.join(" "),
            }));
        } else {
            println!("{}", words.join(" "));
        }
        if !show_secret {
            ctx.progress(
                "the access token (the ssh user) is redacted: pass --show-secret to print a \
                 command you can run, or run `crabbox ssh` without --print",
            );
        }
        return Ok(exit::OK);
    }
    // The token is the ssh user: it goes in a config file only this user can read (a
    // private temp folder, removed when ssh ends), never in ssh's argv, which every local
    // user can read in /proc. The user's own ssh config is included after it.
    let private = tempfile::Builder::new()
        .prefix("crabbox-ssh-")
        .tempdir()
        .map_err(|e| CliError::new(exit::SSH, format!("creating a private ssh config: {e}")))?;
    let config = private.path().join("config");
    let mut text = format!(
        "Host crabbox-lease\n  HostName {}\n  Port {}\n  User {}\n  StrictHostKeyChecking accept-new\n  UserKnownHostsFile \"{}\"\n",
        access.host,
        access.port,
        access.user,
        known_hosts.display()
    );
    if let Some(home) = std::env::var_os("HOME") {
        let user_config = Path::new(&home).join(".ssh/config");
        if user_config.exists() {
            text.push_str(&format!("Match all\nInclude {}\n", user_config.display()));
        }
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&config)
            .map_err(|e| CliError::new(exit::SSH, format!("writing a private ssh config: {e}")))?;
        f.write_all(text.as_bytes())
            .map_err(|e| CliError::new(exit::SSH, format!("writing a private ssh config: {e}")))?;
    }
    let mut run_args = vec!["-F".to_string(), config.display().to_string()];
    if args.iter().any(|a| a == "-t") {
        run_args.push("-t".into());
    }
    let status = std::process::Command::new("ssh")
        .args(&run_args)
        .arg("crabbox-lease")
        .arg(&remote)
        .status()
        .map_err(|e| {
            CliError::new(
                exit::SSH,
                format!("could not run ssh: {e}; install an OpenSSH client"),
            )
        })?;
    Ok(status.code().unwrap_or(exit::SSH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(elapsed_ms: u64, done: bool) -> pb::SyncProgress {
        pb::SyncProgress {
            files: 1,
            bytes_total: 100,
            bytes_sent: 50,
            done,
            elapsed_ms,
            ..Default::default()
        }
    }

    #[test]
    fn a_long_upload_gets_plain_lines_by_its_own_clock_and_a_short_one_none() {
        // Read all at once (a starved CLI) still tells a 4.7 s upload, by the upload's time.
        let mut lines = UploadLines::default();
        let due: Vec<bool> = [0, 250, 1_000, 2_000, 2_250, 3_000, 4_000, 4_700]
            .iter()
            .map(|&ms| lines.due(&at(ms, false)))
            .collect();
        assert_eq!(
            due,
            [false, false, false, true, false, false, false, false],
            "one line after 2 s, then at most one every 5 s"
        );
        assert!(!lines.due(&at(4_800, true)), "never the end");
        assert!(lines.due(&at(7_000, false)), "5 s after the last one");
        // A short upload: none.
        let mut lines = UploadLines::default();
        assert!(
            [0, 250, 1_000, 1_900]
                .iter()
                .all(|&ms| !lines.due(&at(ms, false)))
        );
        assert!(!lines.due(&at(1_950, true)));
    }
}
