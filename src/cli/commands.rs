//! One function per subcommand.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio_stream::StreamExt;

use super::client::{self, Clients};
use super::output::{self, lease_json, print_json, state_name};
use super::{Cli, CliError, Command, DaemonAction, LeaseOpts, RunArgs, exit};
use crate::config::{self, Settings};
use crate::pb;

/// What every command needs.
struct Ctx {
    json: bool,
    quiet: bool,
    socket: PathBuf,
    settings: Settings,
    repo_root: Option<PathBuf>,
}

impl Ctx {
    fn progress(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("crabbox: {}", msg.as_ref());
        }
    }

    async fn clients(&self) -> Result<Clients, CliError> {
        client::connect(&self.socket, self.quiet).await
    }

    fn repo(&self) -> String {
        self.repo_root
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

/// Runs the parsed command; answers the exit code.
pub async fn dispatch(cli: Cli) -> Result<i32, CliError> {
    if let Command::Completions { shell } = &cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut cmd, "crabbox", &mut std::io::stdout());
        return Ok(exit::OK);
    }
    let needs_repo = matches!(
        cli.command,
        Command::Warmup { .. } | Command::Run(_) | Command::Ssh { .. } | Command::Doctor
    );
    let repo_root = if needs_repo {
        Some(client::repo_root()?)
    } else {
        None
    };
    let mut settings = config::load(repo_root.as_deref())?;
    if let Some(p) = &cli.provider {
        settings.provider = p.clone();
    }
    apply_daytona_flags(&mut settings, &cli.daytona);
    for (flag, value) in [("--class", &cli.class), ("--type", &cli.machine_type)] {
        if value.is_some() {
            return Err(CliError::usage(match settings.provider.as_str() {
                "daytona" => format!(
                    "{flag} is not supported for Daytona: its sandboxes are sized by their \
                     snapshot. Set daytona.snapshot (or environment.resources) in crabbox.yaml"
                ),
                other => format!(
                    "{flag} is not supported by the {other} provider: its sandboxes run on this \
                     machine"
                ),
            }));
        }
    }
    let ctx = Ctx {
        json: cli.json,
        quiet: cli.quiet,
        socket: cli.socket.clone().unwrap_or_else(config::socket_path),
        settings,
        repo_root,
    };
    match cli.command {
        Command::Warmup {
            lease,
            keep,
            reclaim,
        } => warmup(&ctx, &lease, keep, reclaim).await,
        Command::Run(args) => run(&ctx, args).await,
        Command::Ssh {
            id,
            print,
            show_secret,
            ttl,
        } => ssh(&ctx, id, print, show_secret, ttl).await,
        Command::Stop { lease } => stop(&ctx, &lease).await,
        Command::Touch { lease } => touch(&ctx, &lease).await,
        Command::Status { lease, wait } => status(&ctx, &lease, wait).await,
        Command::List { all } => list(&ctx, all).await,
        Command::Claims => claims(&ctx).await,
        Command::Doctor => doctor(&ctx).await,
        Command::Daemon { action } => daemon(&ctx, action).await,
        Command::Completions { .. } => Ok(exit::OK),
    }
}

fn apply_daytona_flags(s: &mut Settings, f: &super::DaytonaFlags) {
    let d = &mut s.daytona;
    for (flag, slot) in [
        (&f.daytona_api_url, &mut d.api_url),
        (&f.daytona_snapshot, &mut d.snapshot),
        (&f.daytona_target, &mut d.target),
        (&f.daytona_user, &mut d.user),
        (&f.daytona_work_root, &mut d.work_root),
        (&f.daytona_ssh_gateway_host, &mut d.ssh_gateway_host),
    ] {
        if let Some(v) = flag {
            *slot = Some(v.clone());
        }
    }
    if let Some(m) = f.daytona_ssh_access_minutes {
        d.ssh_access_minutes = Some(m);
    }
}

/// `k=v` labels, config labels first.
fn labels(ctx: &Ctx, opts: &LeaseOpts) -> Result<HashMap<String, String>, CliError> {
    let mut out: HashMap<String, String> = ctx.settings.labels.clone().into_iter().collect();
    if let Some(env) = &ctx.settings.environment {
        out.extend(env.labels.clone());
    }
    for l in &opts.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| {
            CliError::usage(format!("invalid --label {l:?}: write it as KEY=VALUE"))
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn warmup_request(
    ctx: &Ctx,
    opts: &LeaseOpts,
    keep: bool,
    reclaim: bool,
) -> Result<pb::WarmupRequest, CliError> {
    Ok(pb::WarmupRequest {
        provider: ctx.settings.provider.clone(),
        slug: opts.slug.clone().unwrap_or_default(),
        ttl_secs: opts
            .ttl
            .or(ctx.settings.ttl)
            .map_or(0, |d| d.as_secs().max(1)),
        idle_timeout_secs: opts
            .idle_timeout
            .or(ctx.settings.idle_timeout)
            .map_or(0, |d| d.as_secs().max(1)),
        keep: keep || ctx.settings.keep,
        labels: labels(ctx, opts)?,
        repo_root: ctx.repo(),
        reclaim,
        provider_options: provider_options(ctx)?,
    })
}

/// The non-secret provider options the daemon needs per lease.
fn provider_options(ctx: &Ctx) -> Result<HashMap<String, String>, CliError> {
    let mut o = HashMap::new();
    if ctx.settings.provider == "daytona" {
        let d = &ctx.settings.daytona;
        for (k, v) in [
            ("snapshot", &d.snapshot),
            ("target", &d.target),
            ("user", &d.user),
        ] {
            if let Some(v) = v {
                o.insert(k.to_string(), v.clone());
            }
        }
        if let Some(env) = &ctx.settings.environment {
            let extra = env.provider_options(ctx.repo_root.as_deref())?;
            if extra.contains_key("dockerfile") && o.contains_key("snapshot") {
                return Err(CliError::usage(
                    "daytona.snapshot and environment.image both choose the sandbox's image: keep one",
                ));
            }
            o.extend(extra);
        }
    }
    Ok(o)
}

/// Follows a lease until it settles, printing progress; answers its last state.
async fn follow(
    ctx: &Ctx,
    c: &mut Clients,
    lease: &pb::Lease,
    mut on_first_sandbox: impl FnMut(&pb::Lease),
) -> Result<pb::Lease, CliError> {
    let mut stream = c
        .leases
        .watch(pb::WatchRequest {
            name: lease.id.clone(),
            until_settled: true,
        })
        .await?
        .into_inner();
    let mut last = lease.clone();
    let mut said_sandbox = false;
    let mut last_state = "";
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let Some(l) = ev.lease else { continue };
        if !said_sandbox
            && (!l.sandbox_id.is_empty()
                || matches!(state_name(&l), "ready" | "failed" | "released"))
        {
            said_sandbox = true;
            on_first_sandbox(&l);
        }
        if state_name(&l) != last_state {
            last_state = state_name(&l);
            if !matches!(last_state, "ready") {
                ctx.progress(format!("{} {}: {}", l.slug, last_state, ev.message));
            }
        }
        last = l;
    }
    Ok(last)
}

fn settled_exit(l: &pb::Lease) -> Result<(), CliError> {
    match state_name(l) {
        "failed" => Err(CliError::new(
            exit::PROVISIONING,
            format!("lease {} failed: {}", l.slug, l.reason),
        )),
        "released" | "releasing" => Err(CliError::new(
            exit::NOT_FOUND,
            format!("lease {} was released: {}", l.slug, l.reason),
        )),
        _ => Ok(()),
    }
}

async fn warmup(ctx: &Ctx, opts: &LeaseOpts, keep: bool, reclaim: bool) -> Result<i32, CliError> {
    let req = warmup_request(ctx, opts, keep, reclaim)?;
    let mut c = ctx.clients().await?;
    let lease = c.leases.warmup(req).await?.into_inner();
    let reused = state_name(&lease) != "pending";
    if reused {
        ctx.progress(format!(
            "reusing lease {} claimed by {}",
            lease.slug,
            ctx.repo()
        ));
    }
    let json = ctx.json;
    let last = follow(ctx, &mut c, &lease, |l| {
        if !json {
            println!("{}", output::leased_line(l));
        }
    })
    .await?;
    settled_exit(&last)?;
    if ctx.json {
        print_json(&lease_json(&last));
    } else {
        println!("ready");
    }
    Ok(exit::OK)
}

fn env_pairs(names: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut env = HashMap::new();
    for n in names {
        match n.split_once('=') {
            Some((k, v)) => {
                env.insert(k.to_string(), v.to_string());
            }
            None => {
                let v = std::env::var(n).map_err(|_| {
                    CliError::usage(format!(
                        "--env {n}: {n} is not set here; set it, or pass --env {n}=VALUE"
                    ))
                })?;
                env.insert(n.clone(), v);
            }
        }
    }
    Ok(env)
}

async fn run(ctx: &Ctx, args: RunArgs) -> Result<i32, CliError> {
    if args.command.is_empty() && !args.sync_only {
        return Err(CliError::usage(
            "no command to run: put it after `--`, for example `crabbox run -- cargo test`",
        ));
    }
    let env = env_pairs(&args.env)?;
    let fresh = warmup_request(ctx, &args.lease, args.keep, args.reclaim)?;
    let req = pb::RunRequest {
        lease: args.id.clone().unwrap_or_default(),
        repo_root: ctx.repo(),
        argv: args.command.clone(),
        shell: args.shell,
        env,
        sync: Some(pb::SyncOptions {
            skip: args.no_sync,
            full_resync: args.full_resync,
            force_large: args.force_sync_large,
            exclude: ctx.settings.sync.exclude.clone(),
            include: ctx.settings.sync.include.clone(),
        }),
        sync_only: args.sync_only,
        timeout_secs: args.timeout.map_or(0, |d| d.as_secs().max(1)),
        keep: args.keep,
        keep_on_failure: args.keep_on_failure,
        reclaim: args.reclaim,
        fresh: Some(fresh),
    };
    let mut c = ctx.clients().await?;
    let mut stream = c.leases.run(req).await?.into_inner();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let (mut cap_out, mut cap_err) = (Vec::new(), Vec::new());
    let mut lease_seen = None;
    let mut sync_seen = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = &mut interrupted => {
                // Dropping the stream tells the daemon the client left: it cancels the
                // command and releases a fresh, not-kept lease.
                drop(stream);
                ctx.progress("interrupted: the command is cancelled");
                return Ok(exit::INTERRUPTED);
            }
        };
        let Some(ev) = ev else {
            return Err(CliError::new(
                exit::INTERNAL,
                "the daemon ended the run without an exit status (see the daemon log)",
            ));
        };
        use pb::run_event::Event;
        match ev?.event {
            Some(Event::Lease(l)) => {
                ctx.progress(format!("lease {} ({}, {})", l.slug, l.id, state_name(&l)));
                lease_seen = Some(l);
            }
            Some(Event::Phase(p)) => ctx.progress(p),
            Some(Event::Sync(s)) => {
                ctx.progress(format!(
                    "synced {} files: {} sent ({}), {} deleted, in {} ms",
                    s.files_total,
                    s.files_uploaded,
                    human_bytes(s.bytes_uploaded),
                    s.files_deleted,
                    s.millis
                ));
                sync_seen = Some(s);
            }
            Some(Event::Stdout(b)) => {
                if ctx.json {
                    cap_out.extend(b);
                } else {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
            }
            Some(Event::Stderr(b)) => {
                if ctx.json {
                    cap_err.extend(b);
                } else {
                    let _ = err.write_all(&b);
                    let _ = err.flush();
                }
            }
            Some(Event::Exit(x)) => {
                if x.timed_out {
                    ctx.progress("the command timed out and was stopped");
                } else if !x.signal.is_empty() {
                    ctx.progress(format!("the command was killed by {}", x.signal));
                }
                if ctx.json {
                    print_json(&json!({
                        "lease": lease_seen.as_ref().map(lease_json),
                        "exit_code": x.code,
                        "signal": if x.signal.is_empty() { None } else { Some(&x.signal) },
                        "timed_out": x.timed_out,
                        "stdout": String::from_utf8_lossy(&cap_out),
                        "stderr": String::from_utf8_lossy(&cap_err),
                        "sync": sync_seen.as_ref().map(|s| json!({
                            "files_total": s.files_total,
                            "files_uploaded": s.files_uploaded,
                            "files_deleted": s.files_deleted,
                            "bytes_uploaded": s.bytes_uploaded,
                            "millis": s.millis,
                        })),
                    }));
                }
                return Ok(x.code);
            }
            None => {}
        }
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

async fn ssh(
    ctx: &Ctx,
    id: Option<String>,
    print: bool,
    show_secret: bool,
    ttl: Option<u64>,
) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let access = c
        .leases
        .ssh(pb::SshRequest {
            lease: id.unwrap_or_default(),
            repo_root: ctx.repo(),
            ttl_minutes: ttl.unwrap_or(0),
        })
        .await?
        .into_inner();
    let port_args = if access.port == 22 {
        vec![]
    } else {
        vec!["-p".to_string(), access.port.to_string()]
    };
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
        words.extend(port_args.clone());
        words.push(target(show_secret));
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
        return Ok(exit::OK);
    }
    let status = std::process::Command::new("ssh")
        .args(&port_args)
        .arg(target(true))
        .status()
        .map_err(|e| {
            CliError::new(
                exit::SSH,
                format!("could not run ssh: {e}; install an OpenSSH client"),
            )
        })?;
    Ok(status.code().unwrap_or(exit::SSH))
}

async fn stop(ctx: &Ctx, name: &str) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let lease = c
        .leases
        .stop(pb::LeaseRef { name: name.into() })
        .await?
        .into_inner();
    let last = if state_name(&lease) == "released" {
        lease
    } else {
        follow(ctx, &mut c, &lease, |_| {}).await?
    };
    if ctx.json {
        print_json(&lease_json(&last));
    } else {
        println!("released {} ({})", last.id, last.slug);
    }
    Ok(exit::OK)
}

async fn touch(ctx: &Ctx, name: &str) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let l = c
        .leases
        .touch(pb::LeaseRef { name: name.into() })
        .await?
        .into_inner();
    if ctx.json {
        print_json(&lease_json(&l));
    } else {
        let exp = crate::pb::timestamp_ms(l.expires_at.as_ref());
        println!(
            "touched {} ({}): expires {} ({})",
            l.slug,
            l.id,
            output::until(exp),
            crate::clock::rfc3339(exp)
        );
    }
    Ok(exit::OK)
}

async fn status(ctx: &Ctx, name: &str, wait: bool) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let mut l = c
        .leases
        .get(pb::LeaseRef { name: name.into() })
        .await?
        .into_inner();
    if wait {
        l = follow(ctx, &mut c, &l, |_| {}).await?;
    }
    if ctx.json {
        print_json(&lease_json(&l));
    } else {
        print!("{}", output::lease_details(&l));
    }
    if wait && state_name(&l) == "failed" {
        return Ok(exit::PROVISIONING);
    }
    Ok(exit::OK)
}

async fn list(ctx: &Ctx, all: bool) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let leases = c
        .leases
        .list(pb::ListRequest { all })
        .await?
        .into_inner()
        .leases;
    if ctx.json {
        print_json(&serde_json::Value::Array(
            leases.iter().map(lease_json).collect(),
        ));
    } else if leases.is_empty() {
        println!(
            "no leases{}",
            if all {
                ""
            } else {
                " (see --all for released ones)"
            }
        );
    } else {
        print!("{}", output::lease_table(&leases));
    }
    Ok(exit::OK)
}

async fn claims(ctx: &Ctx) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let leases = c
        .leases
        .list(pb::ListRequest { all: false })
        .await?
        .into_inner()
        .leases;
    let claimed: Vec<&pb::Lease> = leases.iter().filter(|l| !l.repo_root.is_empty()).collect();
    if ctx.json {
        print_json(&serde_json::Value::Array(
            claimed
                .iter()
                .map(|l| json!({"repo_root": l.repo_root, "lease": lease_json(l)}))
                .collect(),
        ));
    } else if claimed.is_empty() {
        println!("no claims");
    } else {
        let mut rows = vec![[
            "REPO".to_string(),
            "LEASE".into(),
            "SLUG".into(),
            "STATE".into(),
        ]];
        for l in claimed {
            rows.push([
                l.repo_root.clone(),
                l.id.clone(),
                l.slug.clone(),
                state_name(l).into(),
            ]);
        }
        print!("{}", output::table(&rows));
    }
    Ok(exit::OK)
}

async fn doctor(ctx: &Ctx) -> Result<i32, CliError> {
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
    checks.push((
        "config".into(),
        true,
        if sources.is_empty() {
            "defaults (no config file)".into()
        } else {
            sources.join(", ")
        },
    ));
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

async fn daemon(ctx: &Ctx, action: DaemonAction) -> Result<i32, CliError> {
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
        DaemonAction::Stop => {
            let Some(i) = info else {
                if ctx.json {
                    print_json(&json!({"running": false}));
                } else {
                    println!("crabboxd is not running");
                }
                return Ok(exit::OK);
            };
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
            if ctx.json {
                print_json(&json!({"running": false, "stopped_pid": i.pid}));
            } else {
                println!("stopped crabboxd (pid {})", i.pid);
            }
            Ok(exit::OK)
        }
    }
}
