//! `doctor` and `daemon start|stop|status`.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{Ctx, provider_options};
use crate::cli::client::{self};
use crate::cli::output::print_json;
use crate::cli::{CliError, DaemonAction, exit};
use crate::config;
use crate::pb;

pub(super) async fn doctor(ctx: &Ctx) -> Result<i32, CliError> {
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    match client::connect_once(&ctx.socket).await {
        Ok(mut c) => {
            match c.daemon.info(pb::InfoRequest {}).await {
                Ok(info) => {
                    let i = info.into_inner();
                    let has = i.providers.contains(&ctx.settings.provider);
                    checks.push((
                        "daemon".into(),
                        true,
                        format!(
                            "crabboxd {} (pid {}) on {}",
                            i.version,
                            i.pid,
                            ctx.socket.display()
                        ),
                    ));
                    checks.push((
                    "provider".into(),
                    has,
                    if has {
                        format!("{} (daemon has: {})", ctx.settings.provider, i.providers.join(", "))
                    } else {
                        format!(
                            "{} is not available in the daemon (it has: {}); use --provider local",
                            ctx.settings.provider,
                            i.providers.join(", ")
                        )
                    },
                ));
                }
                Err(s) => checks.push((
                    "daemon".into(),
                    false,
                    format!("answers but Info failed: {}", s.message()),
                )),
            }
            // Each warm pool: filling as it should, or why not.
            if let Ok(status) = c.daemon.pool_status(pb::PoolStatusRequest {}).await {
                for p in status.into_inner().pools {
                    let ok = p.last_error.is_empty() || p.failures == 0;
                    checks.push((
                        format!("pool {}", p.name),
                        ok,
                        if ok {
                            format!("{} of {} ready ({})", p.ready, p.size, p.provider)
                        } else {
                            format!(
                                "failing ({} in a row, backing off): {}; fix the pool's entry \
                                 in the daemon's config and run `crabbox pool fill`",
                                p.failures, p.last_error
                            )
                        },
                    ));
                }
            }
        }
        Err(e) => checks.push((
            "daemon".into(),
            false,
            format!(
                "not answering on {} ({e}); start it with `crabbox daemon start`",
                ctx.socket.display()
            ),
        )),
    }
    let git = std::process::Command::new("git").arg("--version").output();
    checks.push(match git {
        Ok(o) if o.status.success() => (
            "git".into(),
            true,
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        ),
        _ => (
            "git".into(),
            false,
            "git not found: install git (sync falls back to a plain walk)".into(),
        ),
    });
    if let Ok(mut c) = client::connect_once(&ctx.socket).await
        && let Ok(r) = c
            .daemon
            .doctor(pb::DoctorRequest {
                provider: ctx.settings.provider.clone(),
                provider_options: provider_options(ctx).unwrap_or_default(),
            })
            .await
    {
        for check in r.into_inner().checks {
            checks.push((check.name, check.ok, check.detail));
        }
    }
    if ctx.settings.provider == "daytona" {
        let ssh = std::process::Command::new("ssh").arg("-V").output();
        checks.push(match ssh {
            Ok(o) if o.status.success() => (
                "ssh client".into(),
                true,
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            ),
            _ => (
                "ssh client".into(),
                false,
                "ssh not found: install an OpenSSH client for `crabbox ssh`".into(),
            ),
        });
    }
    let state = config::state_dir();
    let writable = std::fs::create_dir_all(&state).is_ok() && tempfile::tempfile_in(&state).is_ok();
    checks.push((
        "state dir".into(),
        writable,
        if writable {
            state.display().to_string()
        } else {
            format!("{} is not writable: set CRABBOX_STATE_DIR", state.display())
        },
    ));
    let sources: Vec<String> = ctx
        .settings
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    checks.push(match &ctx.config_error {
        Some(e) => ("config".into(), false, e.clone()),
        None => (
            "config".into(),
            true,
            if sources.is_empty() {
                "defaults (no config file)".into()
            } else {
                sources.join(", ")
            },
        ),
    });
    let ok = checks.iter().all(|(_, ok, _)| *ok);
    if ctx.json {
        print_json(&json!({
            "ok": ok,
            "checks": checks.iter().map(|(n, ok, d)| json!({"check": n, "ok": ok, "detail": d})).collect::<Vec<_>>(),
        }));
    } else {
        for (name, ok, detail) in &checks {
            println!("{} {name}: {detail}", if *ok { "ok  " } else { "FAIL" });
        }
    }
    Ok(if ok { exit::OK } else { exit::INTERNAL })
}

pub(super) async fn daemon(ctx: &Ctx, action: DaemonAction) -> Result<i32, CliError> {
    let info = match client::connect_once(&ctx.socket).await {
        Ok(mut c) => c
            .daemon
            .info(pb::InfoRequest {})
            .await
            .ok()
            .map(|i| i.into_inner()),
        Err(_) => None,
    };
    match action {
        DaemonAction::Status => {
            match &info {
                Some(i) if ctx.json => print_json(&json!({
                    "running": true, "pid": i.pid, "version": i.version,
                    "uptime_secs": i.uptime_secs, "socket": i.socket, "state_dir": i.state_dir,
                    "providers": i.providers, "lease_counts": i.lease_counts, "daemon_id": i.daemon_id,
                })),
                Some(i) => {
                    let mut counts: Vec<String> = i
                        .lease_counts
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    counts.sort();
                    println!(
                        "crabboxd {} running (pid {}, up {}) on {}\nstate dir: {}\nproviders: {}\nleases: {}",
                        i.version,
                        i.pid,
                        crate::clock::human_secs(i.uptime_secs.max(1)),
                        i.socket,
                        i.state_dir,
                        i.providers.join(", "),
                        if counts.is_empty() {
                            "none".into()
                        } else {
                            counts.join(" ")
                        }
                    );
                }
                None if ctx.json => print_json(&json!({"running": false, "socket": ctx.socket})),
                None => println!("crabboxd is not running (socket {})", ctx.socket.display()),
            }
            Ok(if info.is_some() {
                exit::OK
            } else {
                exit::INTERNAL
            })
        }
        DaemonAction::Logs { follow, since } => logs(ctx, follow, since).await,
        DaemonAction::Restart => {
            if let Some(i) = &info {
                stop_daemon(ctx, i).await?;
            }
            let mut c = client::start_daemon(&ctx.socket).await?;
            let i = c.daemon.info(pb::InfoRequest {}).await?.into_inner();
            if ctx.json {
                print_json(&json!({"running": true, "pid": i.pid, "version": i.version,
                    "stopped_pid": info.map(|o| o.pid)}));
            } else {
                println!(
                    "crabboxd {} running (pid {}) on {}",
                    i.version, i.pid, i.socket
                );
            }
            Ok(exit::OK)
        }
        DaemonAction::Start => {
            let i = match info {
                Some(i) => i,
                None => {
                    let mut c = client::start_daemon(&ctx.socket).await?;
                    c.daemon.info(pb::InfoRequest {}).await?.into_inner()
                }
            };
            if ctx.json {
                print_json(&json!({"running": true, "pid": i.pid, "socket": i.socket}));
            } else {
                println!("crabboxd running (pid {}) on {}", i.pid, i.socket);
            }
            Ok(exit::OK)
        }
        DaemonAction::Stop { drain } => {
            let Some(i) = info else {
                if ctx.json {
                    print_json(&json!({"running": false}));
                } else {
                    println!("crabboxd is not running");
                }
                return Ok(exit::OK);
            };
            if drain {
                drain_pools(ctx).await?;
            }
            stop_daemon(ctx, &i).await?;
            if ctx.json {
                print_json(&json!({"running": false, "stopped_pid": i.pid}));
            } else {
                println!("stopped crabboxd (pid {})", i.pid);
            }
            Ok(exit::OK)
        }
    }
}

/// Prints the daemon's log (the lines since `since`), then what is appended when
/// following.
async fn logs(ctx: &Ctx, follow: bool, since: Option<Duration>) -> Result<i32, CliError> {
    use std::io::{Read, Seek, Write};
    let path = ctx.daemon_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return Err(CliError::new(
                exit::NOT_FOUND,
                format!(
                    "no daemon log at {} ({e}): crabbox writes one when it starts crabboxd itself; \
                     a daemon started by hand or by systemd logs to its own stderr or the journal",
                    path.display()
                ),
            ));
        }
    };
    let cutoff = since.map(|d| crate::clock::now_ms().saturating_sub(d.as_millis() as u64));
    // With --since, the rotated files too (oldest first): the lines may be in them.
    let mut text = String::new();
    if cutoff.is_some() {
        for n in (1..=crate::logging::LOG_KEEP).rev() {
            let old = std::path::PathBuf::from(format!("{}.{n}", path.display()));
            if let Ok(t) = std::fs::read(&old) {
                text.push_str(&String::from_utf8_lossy(&t));
            }
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| CliError::new(exit::INTERNAL, format!("reading {}: {e}", path.display())))?;
    text.push_str(&String::from_utf8_lossy(&bytes));
    let mut out = std::io::stdout().lock();
    // Lines start with their RFC 3339 time; a line without one goes with the line before.
    let mut keep = cutoff.is_none();
    for line in text.lines() {
        if let Some(cut) = cutoff
            && let Some(ms) = line
                .split_whitespace()
                .next()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            keep = ms.as_millis() as u64 >= cut;
        }
        if keep {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = out.flush();
    drop(out);
    if !follow {
        return Ok(exit::OK);
    }
    // As `tail -F`: when the daemon rotates the file (renames it to .1 and starts a new
    // one), the rest of the old one is printed, then the new one from its start.
    use std::os::unix::fs::MetadataExt;
    let print = |f: &mut std::fs::File| {
        let mut chunk = Vec::new();
        let _ = f.read_to_end(&mut chunk);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&chunk);
        let _ = out.flush();
    };
    let mut ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(exit::OK),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        print(&mut file);
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() != ino => {
                if let Ok(f) = std::fs::File::open(&path) {
                    print(&mut file);
                    file = f;
                    ino = m.ino();
                    print(&mut file);
                }
            }
            Ok(m) if m.len() < file.stream_position().unwrap_or(0) => {
                // Truncated in place: from its start.
                let _ = file.seek(std::io::SeekFrom::Start(0));
            }
            _ => {}
        }
    }
}

/// SIGTERM to the daemon `i` describes, and waits (up to 20 s) until it is gone.
async fn stop_daemon(ctx: &Ctx, i: &pb::InfoResponse) -> Result<(), CliError> {
    let pid = nix::unistd::Pid::from_raw(i.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| {
        CliError::new(
            exit::INTERNAL,
            format!("could not signal crabboxd (pid {}): {e}", i.pid),
        )
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while Path::new(&ctx.socket).exists() || nix::sys::signal::kill(pid, None).is_ok() {
        if std::time::Instant::now() > deadline {
            return Err(CliError::new(
                exit::INTERNAL,
                format!("crabboxd (pid {}) did not stop within 20s", i.pid),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Releases every pooled sandbox and waits (up to a minute) until none is left.
async fn drain_pools(ctx: &Ctx) -> Result<(), CliError> {
    let mut c = ctx.clients().await?;
    let r = c
        .daemon
        .pool_drain(pb::PoolDrainRequest::default())
        .await?
        .into_inner();
    if r.released == 0 {
        return Ok(());
    }
    ctx.progress(format!(
        "releasing {} pooled sandbox{}",
        r.released,
        if r.released == 1 { "" } else { "es" }
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = c
            .daemon
            .pool_status(pb::PoolStatusRequest {})
            .await?
            .into_inner();
        let left: usize = status.pools.iter().map(|p| p.leases.len()).sum();
        if left == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(CliError::new(
                exit::INTERNAL,
                format!(
                    "{left} pooled sandbox(es) were still being released after 60s; the \
                     daemon was not stopped. Run `crabbox pool status` to see them, and stop \
                     it again"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
