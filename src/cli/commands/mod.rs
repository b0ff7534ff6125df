//! One function per subcommand.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use tokio_stream::StreamExt;

mod artifacts;
mod capture;
mod copy;
mod daemon;
mod plan;
mod pool;
mod port;
mod run;
mod show_config;

use super::client::{self, Clients};
use super::output::{self, lease_json, print_json, state_name};
use super::{Cli, CliError, Command, LeaseOpts, ListArgs, SyncPlanArgs, exit};
use crate::config::{self, Settings};
use crate::pb;

/// What every command needs.
pub(super) struct Ctx {
    /// `--json`, `-o json|yaml|ndjson`: results as a document for programs.
    json: bool,
    format: super::OutputFormat,
    quiet: bool,
    socket: PathBuf,
    settings: Settings,
    /// Why the config could not be used, for commands that go on without it.
    config_error: Option<String>,
    repo_root: Option<PathBuf>,
    /// `-v`: progress lines say when (since the command started), runs say where their
    /// time went, and the config files read are named.
    verbose: bool,
    started: std::time::Instant,
    /// Progress as a spinner line, on a terminal (not with -v, -q or a document format).
    spinner: Option<std::sync::Arc<super::spinner::Spinner>>,
}

impl Ctx {
    fn progress(&self, msg: impl AsRef<str>) {
        if self.quiet {
        } else if let Some(s) = &self.spinner {
            s.step(msg.as_ref());
        } else if self.verbose {
            say(&format!(
                "crabbox: [{:>7.3}s] {}\n",
                self.started.elapsed().as_secs_f64(),
                msg.as_ref()
            ));
        } else {
            say(&format!("crabbox: {}\n", msg.as_ref()));
        }
    }

    /// A step's counts as it goes: the spinner's line changes in place on a terminal;
    /// elsewhere a line is printed when `plain` says it is due (not for every change).
    fn progress_update(&self, msg: impl AsRef<str>, plain: bool) {
        if self.quiet {
        } else if let Some(s) = &self.spinner {
            s.update(msg.as_ref());
        } else if plain {
            self.progress(msg);
        }
    }

    /// The daemon's own steps for `lease`, as they happen, while the answer lives: with
    /// -v all of them (provider calls, retries, waits), else, while the lease is being
    /// provisioned, the ones a person waits on (an image build's output) as progress.
    pub(super) fn trace(
        &self,
        leases: &pb::lease_service_client::LeaseServiceClient<tonic::transport::Channel>,
        lease: &pb::Lease,
    ) -> Option<Trace> {
        let provisioning = matches!(state_name(lease), "pending" | "creating");
        if self.quiet || self.json || !(self.verbose || provisioning) {
            return None;
        }
        let mut leases = leases.clone();
        let verbose = self.verbose;
        let started = self.started;
        let spinner = self.spinner.clone();
        let name = lease.id.clone();
        // What the daemon did for the lease since this command began: not its earlier runs.
        let since_unix_ms = crate::clock::now_ms()
            .saturating_sub(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        Some(Trace(tokio::spawn(async move {
            let Ok(stream) = leases
                .trace(pb::TraceRequest {
                    name,
                    since_unix_ms,
                })
                .await
            else {
                return;
            };
            let mut lines = stream.into_inner();
            while let Ok(Some(l)) = lines.message().await {
                if verbose {
                    eprintln!(
                        "crabbox: [{:>7.3}s] daemon: {}",
                        started.elapsed().as_secs_f64(),
                        l.line
                    );
                } else if l.progress {
                    let text = l
                        .line
                        .split_once(' ')
                        .map_or(l.line.as_str(), |(_, t)| t.trim_start());
                    match &spinner {
                        Some(s) => s.step(text),
                        None => eprintln!("crabbox: {text}"),
                    }
                }
            }
        })))
    }

    /// Prints on stdout (through `f`) with the spinner out of the way.
    fn print<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.spinner {
            Some(s) => s.suspend(f),
            None => f(),
        }
    }

    /// Ends the spinner (before the command's own output, or a result).
    fn progress_done(&self) {
        if let Some(s) = &self.spinner {
            s.done();
        }
    }

    async fn clients(&self) -> Result<Clients, CliError> {
        client::connect(&self.socket, self.quiet).await
    }

    /// Where a daemon this CLI starts logs (in the state dir).
    fn daemon_log(&self) -> PathBuf {
        crate::config::state_dir().join("crabboxd.log")
    }

    fn repo(&self) -> String {
        self.repo_root
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

/// Writes one whole line to stderr in one write (`eprintln!` writes each of its pieces
/// separately to the unbuffered stderr: three writes, and three wake-ups of whoever reads
/// a pipe there, for every progress line). A stderr that cannot be written is no reason
/// to stop.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A `-v` trace being printed ([`Ctx::trace`]); stopped when dropped.
pub(super) struct Trace(tokio::task::JoinHandle<()>);

impl Trace {
    /// Lets the lines already on their way arrive, then stops.
    pub(super) async fn finish(self) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the parsed command; answers the exit code.
pub async fn dispatch(cli: Cli) -> Result<i32, CliError> {
    let format = cli.format();
    if format == super::OutputFormat::Ndjson && !matches!(cli.command, Command::Run(_)) {
        return Err(CliError::usage(
            "-o ndjson is `crabbox run`'s live event stream; for one document use -o json \
             (or -o yaml)",
        ));
    }
    if format == super::OutputFormat::Wide && !matches!(cli.command, Command::List(_)) {
        return Err(CliError::usage(
            "-o wide adds columns to `crabbox list`; this command has no table to widen: \
             use -o table (the default), json or yaml",
        ));
    }
    output::set_format(format);
    if let Command::Man { dir } = &cli.command {
        return write_man_pages(dir);
    }
    if let Command::Completions { shell } = &cli.command {
        // The shell's hook that asks `COMPLETE=<shell> crabbox` for each completion: lease
        // names come live from the daemon, commands and flags from the same definitions.
        use clap_complete::env::{self as shells, EnvCompleter};
        let hook: &dyn EnvCompleter = match shell {
            clap_complete::Shell::Bash => &shells::Bash,
            clap_complete::Shell::Zsh => &shells::Zsh,
            clap_complete::Shell::Fish => &shells::Fish,
            clap_complete::Shell::Elvish => &shells::Elvish,
            clap_complete::Shell::PowerShell => &shells::Powershell,
            other => {
                return Err(CliError::usage(format!(
                    "no completions for {other}: bash, zsh, fish, elvish and powershell have them"
                )));
            }
        };
        hook.write_registration(
            "COMPLETE",
            "crabbox",
            "crabbox",
            "crabbox",
            &mut std::io::stdout(),
        )
        .map_err(|e| CliError::new(exit::INTERNAL, format!("writing the completions: {e}")))?;
        return Ok(exit::OK);
    }
    let needs_repo = matches!(
        cli.command,
        Command::Warmup { .. }
            | Command::Run(_)
            | Command::Ssh { .. }
            | Command::Doctor
            | Command::Config
            | Command::SyncPlan(_)
            | Command::Pause { lease: None }
            | Command::Resume { lease: None }
            | Command::Stop { lease: None, .. }
            | Command::Touch { lease: None }
            | Command::Cp { .. }
            | Command::Port { .. }
            | Command::Runs {
                lease: None,
                all: false,
                ..
            }
            | Command::Status { lease: None, .. }
    );
    let sync_root = match &cli.command {
        Command::Run(r) => r.sync_root.as_ref(),
        Command::SyncPlan(SyncPlanArgs { sync_root, .. }) => sync_root.as_ref(),
        _ => None,
    };
    let repo_root = match sync_root {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .map_err(|e| CliError::usage(format!("--sync-root {}: {e}", dir.display())))?,
        ),
        _ if needs_repo => Some(client::repo_root()?),
        _ => None,
    };
    // Only the commands that lease or run need the config; the others work with a
    // warning (a broken config must not keep `crabbox daemon stop` from working), and
    // doctor reports it.
    let needs_config = matches!(
        cli.command,
        Command::Warmup { .. } | Command::Run(_) | Command::Ssh { .. } | Command::SyncPlan(_)
    );
    let mut config_error = None;
    let mut settings = match config::load(repo_root.as_deref()) {
        Ok(s) => s,
        Err(e) if !needs_config => {
            if !cli.quiet && !matches!(cli.command, Command::Doctor) {
                eprintln!(
                    "crabbox: warning: {e} (this command does not need the config and goes on \
                     without it; warmup, run and ssh refuse to until it is fixed)"
                );
            }
            config_error = Some(e.0);
            Settings::fallback()
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(p) = &cli.provider {
        settings.provider = p.clone();
    }
    // Flags of the daemon's Daytona provider would do nothing here: said, with where to
    // set them.
    let f = &cli.daytona;
    for (flag, given, env, key) in [
        (
            "--daytona-api-url",
            f.daytona_api_url.is_some(),
            "DAYTONA_API_URL",
            "daytona.apiUrl",
        ),
        (
            "--daytona-work-root",
            f.daytona_work_root.is_some(),
            "CRABBOX_DAYTONA_WORK_ROOT",
            "daytona.workRoot",
        ),
        (
            "--daytona-ssh-gateway-host",
            f.daytona_ssh_gateway_host.is_some(),
            "CRABBOX_DAYTONA_SSH_GATEWAY_HOST",
            "daytona.sshGatewayHost",
        ),
    ] {
        if given {
            return Err(CliError::usage(format!(
                "{flag} is read by crabboxd when it starts (it makes its Daytona provider once), \
                 not per command: set {env} (or {key} in ~/.config/crabbox/config.yaml) where \
                 the daemon starts, then restart it with `crabbox daemon stop`"
            )));
        }
    }
    if f.daytona_ssh_access_minutes.is_some() {
        return Err(CliError::usage(
            "--daytona-ssh-access-minutes is not a per-command flag: `crabbox ssh --ttl 30m` sets \
             how long ssh access lasts (daytona.sshAccessMinutes in the daemon's config sets the \
             default)",
        ));
    }
    // A lease-making command on another provider would drop them without a word (`config`
    // still shows what they set).
    if needs_config && settings.provider != "daytona" {
        for (flag, given) in [
            ("--daytona-snapshot", f.daytona_snapshot.is_some()),
            ("--daytona-target", f.daytona_target.is_some()),
            ("--daytona-user", f.daytona_user.is_some()),
        ] {
            if given {
                return Err(CliError::usage(format!(
                    "{flag} chooses a Daytona sandbox, but this command uses the {} provider: \
                     add --provider daytona, or drop {flag}",
                    settings.provider
                )));
            }
        }
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
    if needs_config && !cli.quiet {
        for (f, key) in &settings.ignored_daemon_keys {
            eprintln!(
                "crabbox: note: {} sets {key}, which only the daemon reads, from its own config \
                 (~/.config/crabbox/config.yaml or its environment) when it starts: it is not \
                 used from a repository's config",
                f.display()
            );
        }
        for f in &settings.ignored_pools {
            eprintln!(
                "crabbox: note: {} has pool: entries, which are not used from a repository's \
                 config: the daemon keeps pools, from its own config \
                 (~/.config/crabbox/config.yaml). Move them there and restart it \
                 (`crabbox daemon stop`)",
                f.display()
            );
        }
    }
    let ctx = Ctx {
        verbose: cli.verbose > 0,
        started: std::time::Instant::now(),
        json: cli.format().is_document(),
        format: cli.format(),
        spinner: if cli.quiet || cli.verbose > 0 || cli.format().is_document() {
            None
        } else {
            super::spinner::Spinner::for_stderr().map(std::sync::Arc::new)
        },
        quiet: cli.quiet,
        socket: cli.socket.clone().unwrap_or_else(config::socket_path),
        settings,
        config_error,
        repo_root,
    };
    if ctx.verbose {
        let files: Vec<String> = ctx
            .settings
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        ctx.progress(format!(
            "config: {}; daemon socket {}",
            if files.is_empty() {
                "no config file (built-in defaults and the environment)".to_string()
            } else {
                files.join(", ")
            },
            ctx.socket.display()
        ));
    }
    let flags = show_config::Flags::of(&cli);
    match cli.command {
        Command::Warmup {
            lease,
            keep,
            reclaim,
        } => warmup(&ctx, &lease, keep, reclaim).await,
        Command::Run(args) => run::run(&ctx, *args).await,
        Command::SyncPlan(args) => plan::sync_plan(&ctx, args).await,
        Command::Ssh {
            id,
            print,
            show_secret,
            ttl,
            command,
        } => run::ssh(&ctx, id, print, show_secret, ttl, command).await,
        Command::Stop { lease, force } => {
            let name = named_or_repos(&ctx, lease).await?;
            stop(&ctx, &name, force).await
        }
        Command::Cp { paths, any_path } => copy::cp(&ctx, &paths, any_path).await,
        Command::Runs { lease, all, limit } => runs(&ctx, lease, all, limit).await,
        Command::Port {
            words,
            forward,
            signed,
            ttl,
            show_secret,
        } => {
            let signed = signed.then(|| ttl.unwrap_or(std::time::Duration::from_secs(3600)));
            if signed.is_some_and(|d| d > std::time::Duration::from_secs(24 * 3600)) {
                return Err(CliError::usage("--ttl: a signed URL lasts at most 24h"));
            }
            port::port(&ctx, &words, forward.as_deref(), signed, show_secret).await
        }
        Command::Touch { lease } => {
            let name = named_or_repos(&ctx, lease).await?;
            touch(&ctx, &name).await
        }
        Command::Pause { lease } => pause(&ctx, lease, true).await,
        Command::Resume { lease } => pause(&ctx, lease, false).await,
        Command::Status { lease, wait } => {
            let name = named_or_repos(&ctx, lease).await?;
            status(&ctx, &name, wait).await
        }
        Command::List(args) => list(&ctx, args).await,
        Command::Claims => claims(&ctx).await,
        Command::Doctor => daemon::doctor(&ctx).await,
        Command::Config => show_config::show(&ctx, &flags),
        Command::Pool { action } => pool::pool(&ctx, action).await,
        Command::Daemon { action } => daemon::daemon(&ctx, action).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(exit::OK),
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
fn labels(ctx: &Ctx, opts: &LeaseOpts) -> Result<BTreeMap<String, String>, CliError> {
    let mut out: BTreeMap<String, String> = ctx.settings.labels.clone().into_iter().collect();
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
        wait_for_slot_secs: opts.wait_for_slot.map_or(0, |d| d.as_secs().max(1)),
    })
}

/// The non-secret provider options the daemon needs per lease.
fn provider_options(ctx: &Ctx) -> Result<BTreeMap<String, String>, CliError> {
    let mut o = BTreeMap::new();
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
    } else if let Some(env) = &ctx.settings.environment {
        // Checked all the same, so a mistake shows before the provider changes. The local
        // provider takes the network mode (its jail can block it); the rest is said.
        let mut asked = env.provider_options(ctx.repo_root.as_deref())?;
        for k in ["network_block_all", "network_allow_list", "memory", "cpu"] {
            if let Some(v) = asked.remove(k) {
                o.insert(k.to_string(), v);
            }
        }
        if !asked.is_empty() {
            ctx.progress(format!(
                "note: environment.image, resources.disk and lifecycle apply to the \
                 daytona provider; the {} provider runs on this machine's own image and uses \
                 environment.labels, network and resources.cpu and memory",
                ctx.settings.provider
            ));
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
    let trace = ctx.trace(&c.leases, lease);
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
                ctx.progress(state_line(&l.slug, last_state, &ev.message));
            }
        }
        last = l;
    }
    if let Some(t) = trace {
        t.finish().await;
    }
    Ok(last)
}

/// "swift-crab creating: waiting for the image", or "swift-crab releasing" when the
/// event's message only repeats the state.
fn state_line(slug: &str, state: &str, message: &str) -> String {
    if message.is_empty() || message == state {
        format!("{slug} {state}")
    } else {
        format!("{slug} {state}: {message}")
    }
}

fn settled_exit(l: &pb::Lease) -> Result<(), CliError> {
    match state_name(l) {
        "failed" => Err(CliError::new(
            if l.failure_kind == "auth" {
                exit::AUTH
            } else {
                exit::PROVISIONING
            },
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
    if let Some(wait) = opts.wait_for_slot {
        ctx.progress(format!(
            "if the team's quota is used up, waiting up to {} for a slot",
            crate::clock::human_secs(wait.as_secs())
        ));
    }
    let mut c = ctx.clients().await?;
    let answer = c.leases.warmup(req).await?;
    let notes: Vec<String> = answer
        .metadata()
        .get_all_bin(pb::NOTE_METADATA)
        .iter()
        .filter_map(|v| v.to_bytes().ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    let lease = answer.into_inner();
    let reused = state_name(&lease) != "pending";
    if reused {
        ctx.progress(format!(
            "reusing lease {} claimed by {}",
            lease.slug,
            ctx.repo()
        ));
    }
    for note in notes {
        ctx.progress(note);
    }
    let json = ctx.json;
    let last = follow(ctx, &mut c, &lease, |l| {
        if !json {
            ctx.print(|| println!("{}", output::leased_line(l)));
        }
    })
    .await?;
    ctx.progress_done();
    settled_exit(&last)?;
    if ctx.json {
        print_json(&lease_json(&last));
    } else {
        println!("ready");
    }
    Ok(exit::OK)
}

async fn stop(ctx: &Ctx, name: &str, force: bool) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let lease = match c.leases.stop(pb::LeaseRef { name: name.into() }).await {
        Ok(l) => l.into_inner(),
        // Not this daemon's: a team lease of another machine, in team mode.
        Err(s) if s.code() == tonic::Code::NotFound => {
            match c
                .daemon
                .team_stop(pb::TeamStopRequest {
                    name: name.into(),
                    force,
                })
                .await
            {
                Ok(t) => {
                    let t = t.into_inner();
                    if ctx.json {
                        output::team_lease_json(&t);
                    } else {
                        println!("released {} ({}) of {} on {}", t.id, t.slug, t.user, t.host);
                    }
                    return Ok(exit::OK);
                }
                Err(t) if t.code() == tonic::Code::NotFound || is_team_off(&t) => {
                    return Err(s.into());
                }
                Err(t) => return Err(t.into()),
            }
        }
        Err(s) => return Err(s.into()),
    };
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

/// `pause` (or `resume` when `!pause`) of `lease`, or of the repo's lease.
/// Writes `crabbox.1` and `crabbox-<command>.1` for every command into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<i32, CliError> {
    let io = |what: &std::path::Path, e: std::io::Error| {
        CliError::new(exit::INTERNAL, format!("writing {}: {e}", what.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Every subcommand's arguments (defined lazily, when one is parsed) and the generated
    // help and version flags, as `--help` shows them.
    cmd.build();
    let mut written = 0;
    let mut write = |name: String, page: clap::Command| -> Result<(), CliError> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page.display_name(name.clone()).bin_name(name.clone()))
            .title(name.to_uppercase())
            .render(&mut buf)
            .map_err(|e| io(&path, e))?;
        std::fs::write(&path, buf).map_err(|e| io(&path, e))?;
        written += 1;
        Ok(())
    };
    write("crabbox".into(), cmd.clone())?;
    // (Not `help`, which building added: it is no command of crabbox's own.)
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write(format!("crabbox-{}", sub.get_name()), sub.clone())?;
    }
    println!("wrote {written} man pages into {}", dir.display());
    Ok(exit::OK)
}

/// `lease`, or the lease this repository claims (as `run` uses it).
async fn named_or_repos(ctx: &Ctx, lease: Option<String>) -> Result<String, CliError> {
    if let Some(l) = lease {
        return Ok(l);
    }
    let mut c = ctx.clients().await?;
    let repo = ctx.repo();
    let page = c
        .leases
        .list(pb::ListRequest {
            repo_root: repo.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    match page.leases.first() {
        Some(l) => Ok(l.id.clone()),
        None => Err(CliError::new(
            exit::NOT_FOUND,
            format!("no lease is claimed by {repo}; name one (`crabbox list` shows them)"),
        )),
    }
}

async fn pause(ctx: &Ctx, lease: Option<String>, pause: bool) -> Result<i32, CliError> {
    let name = named_or_repos(ctx, lease).await?;
    let mut c = ctx.clients().await?;
    if pause {
        ctx.progress(format!("pausing {name}: stopping its sandbox"));
    } else {
        ctx.progress(format!("resuming {name}: starting its sandbox"));
    }
    let started = std::time::Instant::now();
    let l = if pause {
        c.leases.pause(pb::LeaseRef { name }).await?
    } else {
        c.leases.resume(pb::LeaseRef { name }).await?
    }
    .into_inner();
    if ctx.json {
        print_json(&lease_json(&l));
    } else {
        println!(
            "{} {} ({}) in {} ms: {}",
            if pause { "paused" } else { "resumed" },
            l.slug,
            l.id,
            started.elapsed().as_millis(),
            state_name(&l)
        );
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

/// The daemon said team mode is off.
fn is_team_off(s: &tonic::Status) -> bool {
    s.message().starts_with("team mode is off")
}

async fn status(ctx: &Ctx, name: &str, wait: bool) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let mut l = match c.leases.get(pb::LeaseRef { name: name.into() }).await {
        Ok(l) => l.into_inner(),
        // Not this daemon's: a team lease of another machine, in team mode.
        Err(s) if s.code() == tonic::Code::NotFound && !wait => {
            let found = c
                .daemon
                .team_list(pb::TeamListRequest {
                    name: name.into(),
                    ..Default::default()
                })
                .await;
            return match found {
                Ok(r) => {
                    let r = r.into_inner();
                    if ctx.json {
                        if let Some(l) = r.leases.first() {
                            output::team_lease_json(l);
                        }
                    } else {
                        output::team_leases(false, &r.team, &r.leases);
                    }
                    Ok(exit::OK)
                }
                Err(t) if t.code() == tonic::Code::NotFound || is_team_off(&t) => Err(s.into()),
                Err(t) => Err(t.into()),
            };
        }
        Err(s) => return Err(s.into()),
    };
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

async fn list(ctx: &Ctx, args: ListArgs) -> Result<i32, CliError> {
    if args.team && ctx.format == super::OutputFormat::Wide {
        return Err(CliError::usage(
            "-o wide is not offered for `list --team` (its table already has the user and \
             host): use -o json or -o yaml for every field",
        ));
    }
    let mut c = ctx.clients().await?;
    if args.team {
        let r = c
            .daemon
            .team_list(pb::TeamListRequest {
                user: args.user.clone().unwrap_or_default(),
                all: args.all,
                name: String::new(),
            })
            .await?
            .into_inner();
        let mut leases = r.leases;
        if let Some(n) = args.limit {
            leases.truncate(n);
        }
        output::team_leases(ctx.json, &r.team, &leases);
        return Ok(exit::OK);
    }
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.label {
        let (k, v) = l.split_once('=').ok_or_else(|| {
            CliError::usage(format!(
                "--label {l}: write it as KEY=VALUE, e.g. --label env=dev"
            ))
        })?;
        labels.insert(k.to_string(), v.to_string());
    }
    let repo_root = match &args.repo {
        Some(r) => std::fs::canonicalize(r)
            .map_err(|e| CliError::usage(format!("--repo {}: {e}", r.display())))?
            .to_string_lossy()
            .into_owned(),
        None => String::new(),
    };
    let mut req = pb::ListRequest {
        all: args.all,
        states: args.state.clone(),
        repo_root,
        provider: args.provider.clone().unwrap_or_default(),
        labels,
        page_size: crate::cli::LIST_PAGE,
        page_token: String::new(),
        // A table shows no bookkeeping labels: not sent.
        view: if ctx.json {
            pb::LeaseView::Full
        } else {
            pb::LeaseView::Basic
        } as i32,
    };
    // Every page, unless --limit says how many.
    let mut leases = Vec::new();
    loop {
        let page = c.leases.list(req.clone()).await?.into_inner();
        leases.extend(page.leases);
        if page.next_page_token.is_empty() || args.limit.is_some_and(|n| leases.len() >= n) {
            break;
        }
        req.page_token = page.next_page_token;
    }
    if let Some(n) = args.limit {
        leases.truncate(n);
    }
    if ctx.json {
        output::print_leases_json(&leases);
    } else if leases.is_empty() {
        println!(
            "no leases{}",
            if args.all {
                ""
            } else {
                " (see --all for released ones)"
            }
        );
    } else {
        print!(
            "{}",
            output::lease_table(&leases, ctx.format == super::OutputFormat::Wide)
        );
    }
    Ok(exit::OK)
}

async fn runs(
    ctx: &Ctx,
    lease: Option<String>,
    all: bool,
    limit: Option<u32>,
) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let runs = c
        .leases
        .runs(pb::RunsRequest {
            lease: lease.unwrap_or_default(),
            repo_root: if all { String::new() } else { ctx.repo() },
            all,
            limit: limit.unwrap_or(0),
        })
        .await?
        .into_inner()
        .runs;
    let ms = |t: &Option<prost_types::Timestamp>| pb::timestamp_ms(t.as_ref());
    if ctx.json {
        print_json(&serde_json::Value::Array(
            runs.iter()
                .map(|r| {
                    json!({
                        "lease_id": r.lease_id,
                        "started_at": crate::clock::rfc3339(ms(&r.started_at)),
                        "ended_at": crate::clock::rfc3339(ms(&r.ended_at)),
                        "duration_ms": ms(&r.ended_at).saturating_sub(ms(&r.started_at)),
                        "command": r.command,
                        "exit_code": r.exit_code,
                        "files_uploaded": r.files_uploaded,
                        "artifacts": r.artifacts,
                        "missing_artifacts": r.missing_artifacts,
                    })
                })
                .collect(),
        ));
        return Ok(exit::OK);
    }
    if runs.is_empty() {
        println!("no runs");
        return Ok(exit::OK);
    }
    let mut rows = vec![[
        "STARTED".to_string(),
        "LEASE".into(),
        "EXIT".into(),
        "TOOK".into(),
        "ARTIFACTS".into(),
        "COMMAND".into(),
    ]];
    for r in &runs {
        let took = ms(&r.ended_at).saturating_sub(ms(&r.started_at));
        let mut artifacts = r.artifacts.join(",");
        if !r.missing_artifacts.is_empty() {
            let sep = if artifacts.is_empty() { "" } else { " " };
            artifacts.push_str(&format!(
                "{sep}(missing: {})",
                r.missing_artifacts.join(",")
            ));
        }
        rows.push([
            crate::clock::rfc3339(ms(&r.started_at)),
            r.lease_id.clone(),
            r.exit_code.to_string(),
            if took < 10_000 {
                format!("{took}ms")
            } else {
                crate::clock::human_secs(took / 1000)
            },
            if artifacts.is_empty() {
                "-".into()
            } else {
                artifacts
            },
            r.command.clone(),
        ]);
    }
    print!("{}", output::table(&rows));
    Ok(exit::OK)
}

async fn claims(ctx: &Ctx) -> Result<i32, CliError> {
    let mut c = ctx.clients().await?;
    let leases = c
        .leases
        .list(pb::ListRequest::default())
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

#[cfg(test)]
mod tests {
    use super::state_line;

    #[test]
    fn a_state_line_says_the_message_only_when_it_adds_something() {
        assert_eq!(
            state_line("swift-crab", "releasing", "releasing"),
            "swift-crab releasing"
        );
        assert_eq!(
            state_line("swift-crab", "released", ""),
            "swift-crab released"
        );
        assert_eq!(
            state_line("swift-crab", "failed", "provisioning failed"),
            "swift-crab failed: provisioning failed"
        );
    }
}
