//! The `crabbox` command line: a gRPC client of `crabboxd` (started in the background when
//! no daemon answers, unless `CRABBOX_NO_AUTOSTART=1`).
//!
//! - [`commands`]: one function per subcommand.
//! - [`output`]: text and `--json` rendering.
//! - [`client`]: connecting, autostart, and status -> exit code.

pub mod client;
mod coalesce;
pub mod commands;
pub mod output;
pub mod spinner;
pub mod terminal;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::error::exit;

/// A CLI failure: what to print and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
    /// The daemon's name for what went wrong, when it said (else the code's).
    pub kind: Option<&'static str>,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
            kind: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        CliError::new(exit::USAGE, message)
    }

    /// Its kind's name, and its exit code for a command that runs a command of the
    /// user's (`run`, `ssh -- CMD`): SPEC's 1-7 become 125 there (docker's convention).
    pub fn under_users_command(&self) -> (i32, &'static str) {
        let kind = self.kind.unwrap_or_else(|| exit::kind_name(self.code));
        let code = if (1..=7).contains(&self.code) {
            exit::CRABBOX
        } else {
            self.code
        };
        (code, kind)
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let kind = crate::error::status_kind(&s);
        let message = if s.code() == tonic::Code::Unavailable && s.message().contains("transport") {
            format!("lost the connection to crabboxd: {}", s.message())
        } else {
            s.message().to_string()
        };
        let mut e = CliError::new(kind.exit_code(), message);
        e.kind = Some(kind.as_str());
        e
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::usage(e.0)
    }
}

/// Completes a lease argument with the daemon's live leases (slug, with its state and
/// repo as the help), when one answers at once; never starts a daemon.
fn lease_names() -> clap_complete::ArgValueCandidates {
    clap_complete::ArgValueCandidates::new(|| {
        let socket = std::env::var_os("CRABBOX_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(crate::config::socket_path);
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return Vec::new();
        };
        rt.block_on(async {
            let listed = tokio::time::timeout(std::time::Duration::from_millis(500), async {
                let mut c = client::connect_once(&socket).await.ok()?;
                c.leases
                    .list(crate::pb::ListRequest::default())
                    .await
                    .ok()
                    .map(|r| r.into_inner().leases)
            })
            .await;
            listed
                .ok()
                .flatten()
                .unwrap_or_default()
                .iter()
                .map(|l| {
                    let repo = if l.repo_root.is_empty() {
                        "-"
                    } else {
                        &l.repo_root
                    };
                    clap_complete::CompletionCandidate::new(&l.slug).help(Some(
                        format!("{} {} {repo}", l.id, output::state_name(l)).into(),
                    ))
                })
                .collect()
        })
    })
}

/// Lease remote sandboxes for this repository and run commands in them.
#[derive(Debug, Parser)]
#[command(name = "crabbox", version, about, propagate_version = true)]
pub struct Cli {
    /// Print one JSON document on stdout instead of text (as `-o json`).
    #[arg(long, global = true, conflicts_with = "output")]
    pub json: bool,
    /// How results are printed: `table` (text, the default), `wide` (more columns),
    /// `json` or `yaml` (one document on stdout; errors as one on stderr), `ndjson` (run
    /// only: one JSON event per line as things happen) [env: CRABBOX_OUTPUT].
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "CRABBOX_OUTPUT"
    )]
    pub output: Option<OutputFormat>,
    /// The daemon's socket [default: $CRABBOX_SOCKET, $XDG_RUNTIME_DIR/crabbox/crabboxd.sock,
    /// /tmp/crabbox-<uid>/crabboxd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where sandboxes come from [default: config `provider`, else local] [env:
    /// CRABBOX_PROVIDER]. With `list`: only leases of this provider.
    #[arg(long, global = true, value_parser = crate::config::PROVIDERS)]
    pub provider: Option<String>,
    /// More progress detail: when each step happened, the config files read, the daemon's
    /// own steps for the lease (provider calls with status and time, retries and waits),
    /// and (for run) where the time went.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress messages, only results and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// A machine class (not supported: sandboxes are sized by their provider's snapshot).
    #[arg(long, global = true, hide = true)]
    pub class: Option<String>,
    /// A machine type (not supported: see --class).
    #[arg(long = "type", global = true, hide = true)]
    pub machine_type: Option<String>,
    #[command(flatten)]
    pub daytona: DaytonaFlags,
    #[command(subcommand)]
    pub command: Command,
}

/// Daytona options (override config `daytona:` and `CRABBOX_DAYTONA_*`).
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Daytona")]
pub struct DaytonaFlags {
    /// Read by crabboxd when it starts, not per command: refused with where to set it.
    #[arg(long, global = true, value_name = "URL", hide = true)]
    pub daytona_api_url: Option<String>,
    /// The snapshot a new Daytona lease is made from [config: daytona.snapshot] [env:
    /// CRABBOX_DAYTONA_SNAPSHOT].
    #[arg(long, global = true, value_name = "NAME")]
    pub daytona_snapshot: Option<String>,
    /// The Daytona target (region) of a new lease [config: daytona.target] [env:
    /// CRABBOX_DAYTONA_TARGET].
    #[arg(long, global = true, value_name = "TARGET")]
    pub daytona_target: Option<String>,
    /// The user inside a new Daytona sandbox [config: daytona.user] [env:
    /// CRABBOX_DAYTONA_USER].
    #[arg(long, global = true, value_name = "USER")]
    pub daytona_user: Option<String>,
    /// Read by crabboxd when it starts, not per command: refused with where to set it.
    #[arg(long, global = true, value_name = "PATH", hide = true)]
    pub daytona_work_root: Option<String>,
    /// Read by crabboxd when it starts, not per command: refused with where to set it.
    #[arg(long, global = true, value_name = "HOST", hide = true)]
    pub daytona_ssh_gateway_host: Option<String>,
    /// Refused: `crabbox ssh --ttl` sets how long ssh access lasts.
    #[arg(long, global = true, value_name = "MIN", hide = true)]
    pub daytona_ssh_access_minutes: Option<u32>,
}

// Options that shape a new lease (a plain comment: a doc comment on a flattened struct
// would replace the about of every deferred subcommand that flattens it).
#[derive(Debug, Args, Default, Clone)]
pub struct LeaseOpts {
    /// The lease's slug (lowercase a-z, 0-9, '-'; at most 41).
    #[arg(long)]
    pub slug: Option<String>,
    /// Hard lifetime (90s, 30m, 2h, 1h30m) [default: config ttl, else 90m] [env:
    /// CRABBOX_TTL].
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Release after this long unused [default: config idle_timeout, else 30m] [env:
    /// CRABBOX_IDLE_TIMEOUT].
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub idle_timeout: Option<std::time::Duration>,
    /// A label for the sandbox (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Team mode: when the team's quota is used up, wait for a slot (queued, first come
    /// first served across machines) for at most this long [default when given: 10m].
    #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "10m",
          value_parser = crate::config::parse_duration)]
    pub wait_for_slot: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
// Each subcommand's arguments are defined only when it is the one parsed (Command::defer):
// a CLI start builds one subcommand, not all of them.
#[command(defer = true)]
pub enum Command {
    /// Lease a sandbox for this repo and keep it warm.
    Warmup {
        #[command(flatten)]
        lease: LeaseOpts,
        /// Keep the lease (recorded on it; only `run` releases fresh leases at exit).
        #[arg(long)]
        keep: bool,
        /// Take the repo's claim even from a lease claimed elsewhere.
        #[arg(long)]
        reclaim: bool,
    },
    /// Sync this checkout into the lease and run a command there.
    Run(Box<RunArgs>),
    /// Show what a run's sync would send and delete, without leasing or sending anything.
    SyncPlan(SyncPlanArgs),
    /// Open a shell in the lease over SSH.
    Ssh {
        /// The lease (id, slug or sandbox name) [default: this repo's].
        #[arg(long = "id", value_name = "LEASE", add = lease_names())]
        id: Option<String>,
        /// Print the ssh command instead of running it.
        #[arg(long)]
        print: bool,
        /// With --print, show the access token instead of redacting it.
        #[arg(long)]
        show_secret: bool,
        /// How long the access lasts (30m, 2h; at most 24h) [default: daytona.sshAccessMinutes].
        #[arg(long, value_parser = crate::config::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// A command to run instead of a shell (after `--`).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Release a lease: its sandbox is deleted.
    #[command(alias = "release")]
    Stop {
        /// Id, slug or sandbox name (team mode: any of the team's leases) [default: this
        /// repo's lease].
        #[arg(add = lease_names())]
        lease: Option<String>,
        /// Team mode: stop another user's lease (recorded).
        #[arg(long)]
        force: bool,
    },
    /// Pause a lease: its sandbox is stopped and its disk kept (Daytona stop). The next
    /// run or ssh (or `resume`) starts it again; its expiry still runs.
    Pause {
        /// Id, slug or sandbox name [default: this repo's lease].
        #[arg(add = lease_names())]
        lease: Option<String>,
    },
    /// Start a paused lease's sandbox again and wait until it is ready.
    Resume {
        /// Id, slug or sandbox name [default: this repo's lease].
        #[arg(add = lease_names())]
        lease: Option<String>,
    },
    /// Mark a lease used now, pushing back its idle expiry.
    #[command(alias = "heartbeat")]
    Touch {
        /// Id, slug or sandbox name [default: this repo's lease].
        #[arg(add = lease_names())]
        lease: Option<String>,
    },
    /// Copy files between this machine and a lease's sandbox, as `docker cp` does:
    /// `crabbox cp :target/report.xml .` or `crabbox cp ./fixtures swift-crab:tests/`.
    /// Folders are copied whole, modes, mtimes and symlinks kept; remote paths start at
    /// the checkout and may be bash globs (`:target/**/*.xml`); local files are written
    /// atomically.
    Cp {
        /// Sources, then the destination. A remote one is LEASE:PATH, or :PATH for this
        /// repo's lease (write ./a:b for a local name with a colon).
        #[arg(required = true, num_args = 2.., value_name = "SRC... DST")]
        paths: Vec<String>,
        /// Allow remote paths outside the lease's work root.
        #[arg(long)]
        any_path: bool,
    },
    /// A URL for a port served in the lease (Daytona: its preview URL, token redacted;
    /// --signed: a URL that carries its access; local: loopback), or --forward a port of
    /// this machine to it. `crabbox port 3000`, `crabbox port swift-crab --forward 8080:3000`.
    Port {
        /// [LEASE] PORT (the lease defaults to this repo's); with --forward, only [LEASE].
        #[arg(value_name = "[LEASE] PORT", num_args = 0..=2)]
        words: Vec<String>,
        /// Serve 127.0.0.1:LOCAL, reaching the lease's port REMOTE, until interrupted.
        #[arg(long, value_name = "LOCAL:REMOTE")]
        forward: Option<String>,
        /// A signed URL: its token inside, usable without headers (a browser, a
        /// colleague), for --ttl.
        #[arg(long)]
        signed: bool,
        /// How long a --signed URL works (30m, 2h; at most 24h) [default: 1h].
        #[arg(long, requires = "signed", value_parser = crate::config::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Print the access token instead of redacting it.
        #[arg(long)]
        show_secret: bool,
    },
    /// Recent runs, newest first: exit code, how long, what they brought back. Of this
    /// repo's leases (released ones too), of one lease, or of all.
    Runs {
        /// Id, slug or sandbox name [default: this repo's leases].
        #[arg(add = lease_names())]
        lease: Option<String>,
        /// Every lease's runs.
        #[arg(long, conflicts_with = "lease")]
        all: bool,
        /// At most this many [default: 20].
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_limit::<u32>)]
        limit: Option<u32>,
    },
    /// Show one lease.
    Status {
        /// Id, slug or sandbox name [default: this repo's lease].
        #[arg(add = lease_names())]
        lease: Option<String>,
        /// Wait until the lease is ready, failed or released.
        #[arg(long)]
        wait: bool,
    },
    /// List the leases this daemon holds.
    List(ListArgs),
    /// Show which repository claims which lease.
    Claims,
    /// Check the daemon, the machine and the provider settings.
    Doctor,
    /// The effective configuration for this folder: each value and where it came from
    /// (flag, environment, config file, default), secrets redacted.
    Config,
    /// The daemon's warm pools of started sandboxes (`pool:` in its config).
    Pool {
        #[command(subcommand)]
        action: PoolAction,
    },
    /// Start, stop or inspect crabboxd.
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (crabbox.1 and one per command) into DIR, e.g.
    /// `crabbox man ~/.local/share/man/man1` (then `man crabbox-run`).
    Man {
        /// Where to write them (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct SyncPlanArgs {
    /// Plan against this lease (id, slug or sandbox name) [default: this repo's].
    #[arg(long = "id", value_name = "LEASE", add = lease_names())]
    pub id: Option<String>,
    /// The folder to sync, as with `run --sync-root`.
    #[arg(long, value_name = "DIR")]
    pub sync_root: Option<PathBuf>,
    /// Plan a full resync.
    #[arg(long)]
    pub full_resync: bool,
    /// Plan as with `run --force-sync-delete` (the deletion guard is off).
    #[arg(long)]
    pub force_sync_delete: bool,
}

/// How many leases `crabbox list` asks for per call (the daemon's largest page).
pub const LIST_PAGE: u32 = 1000;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Include released leases.
    #[arg(long)]
    pub all: bool,
    /// Only leases in this state (repeatable): pending, creating, ready, syncing, running,
    /// stopped, releasing, released, failed.
    #[arg(long, value_name = "STATE")]
    pub state: Vec<String>,
    /// Only the lease claimed by this repository folder.
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Only leases of this provider: `list --provider P`, the global flag's value (set by
    /// [`parse_args`]; a flag of its own would clash with the global one).
    #[arg(skip)]
    pub provider: Option<String>,
    /// Only leases with this label (KEY=VALUE, repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// At most this many (oldest first).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_limit::<usize>)]
    pub limit: Option<usize>,
    /// Every lease of the team (team mode), from every machine.
    #[arg(long, conflicts_with_all = ["state", "repo", "provider", "label"])]
    pub team: bool,
    /// With --team: only this user's leases.
    #[arg(long, requires = "team")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lease (id, slug or sandbox name) [default: this repo's, else a fresh one].
    #[arg(long = "id", value_name = "LEASE", add = lease_names())]
    pub id: Option<String>,
    /// Keep a lease this run creates (else it is released at exit).
    #[arg(long)]
    pub keep: bool,
    /// Keep a lease this run creates when the command fails.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Run without syncing the checkout.
    #[arg(long, conflicts_with_all = ["sync_only", "full_resync", "force_sync_large", "force_sync_delete"])]
    pub no_sync: bool,
    /// Sync, run nothing.
    #[arg(long)]
    pub sync_only: bool,
    /// Send every file again.
    #[arg(long)]
    pub full_resync: bool,
    /// Sync past the size limit (150,000 files or 20 GiB).
    #[arg(long)]
    pub force_sync_large: bool,
    /// Sync even when it deletes more than sync.delete_guard (by default 50%) of the lease's files
    /// (usually a wrong folder or branch, so it is refused without this).
    #[arg(long)]
    pub force_sync_delete: bool,
    /// Pass an environment variable: NAME (its value here) or NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME")]
    pub env: Vec<String>,
    /// Run the words as one shell command line instead of quoting each.
    #[arg(long)]
    pub shell: bool,
    /// Stop the command after this long (exit 124).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Do not send stdin to the command (it reads an empty stdin). By default a piped or
    /// redirected stdin is sent, as ssh does; a terminal only with -i or -t.
    #[arg(short = 'n', long, conflicts_with_all = ["interactive", "tty"])]
    pub no_stdin: bool,
    /// Send stdin even when it is a terminal (typed lines go to the command).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal in the sandbox (shells, REPLs, colours and
    /// progress bars): this terminal goes raw and its keys (Ctrl-C too) go to the command.
    /// Needs a terminal on stdin, else the command runs without one (as ssh does).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Show where the run's time went (resolve, manifest, archive, upload, exec, release)
    /// on stderr at the end (always in --json and --output ndjson).
    #[arg(long)]
    pub timings: bool,
    /// Stop the command when it prints nothing and is sent nothing for this long (exit 124);
    /// output and input reset it [default: config run.stall_timeout, else off].
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub stall_timeout: Option<std::time::Duration>,
    /// Use a lease claimed by another repo, taking its claim.
    #[arg(long)]
    pub reclaim: bool,
    /// After the command, whatever its exit, fetch REMOTE (a file or folder, relative to
    /// the checkout) into LOCAL (an existing folder receives it, else it is the new name)
    /// [default LOCAL: the artifacts folder]. Repeatable; all come back as one archive.
    #[arg(long, value_name = "REMOTE[:LOCAL]")]
    pub download: Vec<String>,
    /// After the command, fetch what this bash glob matches (e.g. 'target/**/*.xml'),
    /// keeping their paths, into the artifacts folder. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub artifact_glob: Vec<String>,
    /// As --download PATH, and a missing PATH fails the run with exit 122 when the
    /// command itself succeeded. Repeatable.
    #[arg(long, value_name = "PATH")]
    pub require_artifact: Vec<String>,
    /// Where artifacts go [default: ./crabbox-artifacts/<lease id>].
    #[arg(long, value_name = "DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// Run this script (by its #! line, else with sh) instead of a command: the words
    /// after `--` are its arguments. No quoting needed for multi-line commands.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["shell", "script_stdin"])]
    pub script: Option<PathBuf>,
    /// As --script, the script read from stdin (which the command then does not get).
    #[arg(long, conflicts_with_all = ["shell", "interactive", "tty"])]
    pub script_stdin: bool,
    /// Also write the command's stdout to FILE, as it comes (with -q: only to FILE).
    #[arg(long, value_name = "FILE")]
    pub capture_stdout: Option<PathBuf>,
    /// Also write the command's stderr to FILE, as it comes (with -q: only to FILE).
    #[arg(long, value_name = "FILE")]
    pub capture_stderr: Option<PathBuf>,
    /// When the command fails, keep the last 4 MiB of its stdout and stderr, the
    /// command, its environment's names, timings and exit code in a new folder under DIR.
    #[arg(long, value_name = "DIR")]
    pub capture_on_fail: Option<PathBuf>,
    /// Where the command runs: relative to the checkout's root, or absolute in the sandbox
    /// [default: the folder you are in, inside the checkout].
    #[arg(long, value_name = "PATH")]
    pub workdir: Option<String>,
    /// The folder to sync (and claim the lease for) [default: the git repository's root,
    /// outside git the current folder; your home, / and /tmp only when named here].
    #[arg(long, value_name = "DIR")]
    pub sync_root: Option<PathBuf>,
    #[command(flatten)]
    pub lease: LeaseOpts,
    /// The command, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// How results are printed (`-o/--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people: tables, and for `run` the command's own output.
    #[default]
    #[value(alias = "text")]
    Table,
    /// As `table`, with more columns.
    Wide,
    /// One JSON document on stdout (for `run`, at the end).
    Json,
    /// The same document as YAML.
    Yaml,
    /// `run` only: one JSON object per line as things happen (lease, phase, sync,
    /// started, stdout, stderr, exit or error).
    Ndjson,
}

impl OutputFormat {
    /// One document for programs (json or yaml; ndjson ends with one too).
    pub fn is_document(self) -> bool {
        matches!(
            self,
            OutputFormat::Json | OutputFormat::Yaml | OutputFormat::Ndjson
        )
    }
}

impl Cli {
    /// The output format `--json` and `-o` ask for.
    pub fn format(&self) -> OutputFormat {
        if self.json {
            OutputFormat::Json
        } else {
            self.output.unwrap_or_default()
        }
    }
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum PoolAction {
    /// Each pool: ready and filling sandboxes, handouts, the last failure.
    Status,
    /// Fill every pool to its size now (also past a backoff after failures).
    Fill,
    /// Release the pooled sandboxes of one pool, or of every pool.
    Drain {
        /// The pool's name [default: every pool].
        pool: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum DaemonAction {
    /// Start crabboxd in the background (no-op when running).
    Start,
    /// Stop crabboxd (SIGTERM; leases are kept in the store, and so are pooled sandboxes,
    /// for the next start within their idle ttl).
    Stop {
        /// Release the pooled sandboxes first (and wait for that).
        #[arg(long)]
        drain: bool,
    },
    /// Is crabboxd running? (exit 1 when not)
    Status,
    /// Stop crabboxd (as `stop`) and start it again: after an upgrade, or a change to its
    /// config (pools, team mode, Daytona credentials).
    Restart,
    /// Show the log of a daemon crabbox started (`<state dir>/crabboxd.log`).
    Logs {
        /// Keep printing what is written, until interrupted (as `tail -f`).
        #[arg(short, long)]
        follow: bool,
        /// Only lines of the last DURATION (10m, 2h).
        #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
        since: Option<std::time::Duration>,
    },
}

/// Runs the CLI; answers the process exit code.
pub async fn main(cli: Cli) -> i32 {
    // SPEC: `run`, and `ssh` with a command, run a command of the user's.
    let runs_users_command = match &cli.command {
        Command::Run(_) => true,
        Command::Ssh { command, .. } => !command.is_empty(),
        _ => false,
    };
    let json = cli.format().is_document();
    match commands::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => report(&e, runs_users_command, json),
    }
}

/// Prints a failure of crabbox's own (as a JSON document on stderr under --json) and
/// answers its exit code: SPEC's 1-7, or 125 for `run`/`ssh` (docker's convention: the
/// user's command owns every other code).
pub fn report(e: &CliError, runs_users_command: bool, json: bool) -> i32 {
    let (users, kind) = e.under_users_command();
    let code = if runs_users_command { users } else { e.code };
    if json {
        let hint = crate::error::ErrorKind::parse(kind).map(|k| k.hint());
        eprintln!(
            "{}",
            serde_json::json!({"error": {"kind": kind, "message": e.message, "hint": hint,
                "exit_code": code}})
        );
    } else if runs_users_command {
        eprintln!("crabbox: error [{kind}]: {}", e.message);
    } else {
        eprintln!("crabbox: error: {}", e.message);
    }
    code
}

/// A `--limit`: a whole number of at least 1 (0 would show nothing, or everything,
/// depending on the command; neither is what someone asking for a limit means).
fn parse_limit<N: TryFrom<u64>>(s: &str) -> Result<N, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("0 would show nothing: write a whole number of at least 1, like 20".into()),
        Ok(n) => N::try_from(n).map_err(|_| format!("{n} is too large")),
        Err(_) => Err(format!(
            "\"{s}\" is not a count: write a whole number of at least 1, like 20"
        )),
    }
}

/// Parses the arguments; a mistake is said as clap says it (with a hint for a command
/// given to `run` without `--`), and ends the process: 2, or 125 for `run`/`ssh`.
pub fn parse_args() -> Cli {
    use clap::FromArgMatches;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let parsed = command_for(&args)
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(mut cli) => {
            if let Command::List(list) = &mut cli.command {
                list.provider = cli.provider.clone();
            }
            cli
        }
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(
                e.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let words: Vec<String> = args
                .iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            // The subcommand: the first word that names one (a flag's value does not).
            let names: Vec<String> = <Cli as clap::CommandFactory>::command()
                .get_subcommands()
                .flat_map(|c| {
                    std::iter::once(c.get_name().to_string())
                        .chain(c.get_all_aliases().map(str::to_string))
                })
                .collect();
            let sub = words.iter().find(|w| names.contains(w)).cloned();
            let runs = matches!(sub.as_deref(), Some("run"))
                || (matches!(sub.as_deref(), Some("ssh")) && words.iter().any(|w| w == "--"));
            if runs {
                // As every other failure of crabbox's own under run/ssh: the kind first.
                let text = e.render().to_string();
                eprint!(
                    "crabbox: error [usage]: {}",
                    text.strip_prefix("error: ").unwrap_or(&text)
                );
            } else {
                let _ = e.print();
            }
            if e.kind() == K::InvalidUtf8
                && let Some((n, bad)) = args
                    .iter()
                    .enumerate()
                    .skip(1)
                    .find(|(_, a)| a.to_str().is_none())
            {
                // clap does not say which one.
                eprintln!(
                    "hint: argument {n} ({:?}) is not UTF-8 text, and crabbox sends a command's \
                     words and environment as text: write it in UTF-8, or put the bytes in a \
                     file the command reads",
                    bad.to_string_lossy()
                );
            }
            if runs
                && e.kind() == K::UnknownArgument
                && !words.iter().any(|w| w == "--")
                && let Some(pos) = words.iter().position(|w| Some(w) == sub.as_ref())
            {
                // Everything after the subcommand that is not one of its flags is most
                // likely the command: say where it goes.
                let rest: Vec<&str> = words[pos + 1..]
                    .iter()
                    .map(String::as_str)
                    .skip_while(|w| w.starts_with('-'))
                    .collect();
                if !rest.is_empty() {
                    eprintln!(
                        "hint: put the command after `--`: crabbox {} -- {}",
                        sub.as_deref().unwrap_or("run"),
                        rest.join(" ")
                    );
                }
            }
            std::process::exit(if runs { exit::CRABBOX } else { exit::USAGE });
        }
    }
}

/// The command `args` are parsed with: the whole tree, or, when they name a subcommand
/// before any other word, the top level with that one subcommand. (Before it parses,
/// clap copies each of the 15 global flags into every subcommand: 450 copies, a quarter
/// of a millisecond of every start; with one subcommand, 15.) What is parsed, its errors
/// and its help are the same either way (tested).
fn command_for(args: &[std::ffi::OsString]) -> clap::Command {
    let full = <Cli as clap::CommandFactory>::command();
    let Some(sub) = named_subcommand(&full, args).and_then(|n| full.find_subcommand(n).cloned())
    else {
        return full;
    };
    // The top level's own settings, as `#[command(...)]` on [`Cli`] and its subcommand
    // field make them (a test compares the two trees).
    let mut top = clap::Command::new("crabbox")
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(true)
        .subcommand_required(full.is_subcommand_required_set())
        .arg_required_else_help(full.is_arg_required_else_help_set());
    if let Some(a) = full.get_about() {
        top = top.about(a.clone());
    }
    top.args(full.get_arguments().cloned())
        .groups(full.get_groups().cloned())
        .subcommand(sub)
}

/// The subcommand `args` name (a name or an alias) when it comes first, after global
/// flags and their values only; None when that is not certain (a flag this does not know,
/// one whose value is optional, `--`), and the whole tree is then used.
fn named_subcommand<'a>(full: &clap::Command, args: &'a [std::ffi::OsString]) -> Option<&'a str> {
    let flag = |long: Option<&str>, short: Option<char>| {
        full.get_arguments().find(|a| {
            long.is_some_and(|l| {
                a.get_long() == Some(l) || a.get_all_aliases().is_some_and(|al| al.contains(&l))
            }) || short.is_some_and(|c| {
                a.get_short() == Some(c)
                    || a.get_all_short_aliases().is_some_and(|al| al.contains(&c))
            })
        })
    };
    // Answers whether the flag takes the next word as its value; None: not certain.
    let takes_value = |a: &clap::Arg| -> Option<bool> {
        if !a.get_action().takes_values() {
            return Some(false);
        }
        match a.get_num_args() {
            Some(r) if r.min_values() == 0 => None,
            _ => Some(true),
        }
    };
    let mut words = args.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_str()?;
        if word == "--" || word == "-" {
            return None;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, attached) = match long.split_once('=') {
                Some((n, _)) => (n, true),
                None => (long, false),
            };
            if takes_value(flag(Some(name), None)?)? && !attached {
                words.next()?;
            }
            continue;
        }
        if let Some(shorts) = word.strip_prefix('-') {
            let mut chars = shorts.chars();
            while let Some(c) = chars.next() {
                if takes_value(flag(None, Some(c))?)? {
                    // `-ojson`, `-o=json`, or `-o json`.
                    if chars.as_str().is_empty() {
                        words.next()?;
                    }
                    break;
                }
            }
            continue;
        }
        return full
            .get_subcommands()
            .any(|s| s.get_name() == word || s.get_all_aliases().any(|a| a == word))
            .then_some(word);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The narrowed tree parses, fails and helps as the whole one does.
    #[test]
    fn a_command_parsed_against_its_subcommand_alone_is_parsed_as_against_all() {
        use clap::{CommandFactory, FromArgMatches};
        let outcome = |cmd: clap::Command, argv: &[&str]| match cmd
            .try_get_matches_from(argv)
            .and_then(|m| Cli::from_arg_matches(&m))
        {
            Ok(cli) => format!("{cli:?}"),
            Err(e) => format!("{:?}: {}", e.kind(), e.render()),
        };
        let full = Cli::command();
        let mut cases: Vec<Vec<String>> = Vec::new();
        for sub in full.get_subcommands() {
            let name = sub.get_name().to_string();
            for rest in [
                vec!["--help"],
                vec!["-h"],
                vec!["--version"],
                vec!["--bogus"],
                vec!["--json"],
                vec!["-o", "yaml"],
                vec!["extra", "words"],
                vec!["--", "sh", "-c", "true"],
                vec!["--daytona-snapshot", "s", "--quiet"],
            ] {
                let mut argv = vec!["crabbox".to_string(), name.clone()];
                argv.extend(rest.iter().map(|w| w.to_string()));
                cases.push(argv);
            }
            for before in [
                vec!["--json"],
                vec!["-o", "json"],
                vec!["-ojson"],
                vec!["-vq"],
                vec!["--socket", "/s"],
                vec!["--socket=/s"],
            ] {
                let mut argv = vec!["crabbox".to_string()];
                argv.extend(before.iter().map(|w| w.to_string()));
                argv.push(name.clone());
                cases.push(argv);
            }
            for alias in sub.get_all_aliases() {
                cases.push(vec!["crabbox".into(), alias.to_string()]);
            }
        }
        for argv in cases {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let os: Vec<std::ffi::OsString> = argv.iter().map(Into::into).collect();
            let narrowed = command_for(&os);
            assert_eq!(narrowed.get_subcommands().count(), 1, "{argv:?} names one");
            assert_eq!(
                outcome(narrowed, &argv),
                outcome(Cli::command(), &argv),
                "{argv:?}"
            );
        }
        // Not certain: the whole tree.
        for argv in [
            vec!["crabbox"],
            vec!["crabbox", "bogus"],
            vec!["crabbox", "help", "run"],
            vec!["crabbox", "--bogus", "run"],
            vec!["crabbox", "--help"],
            vec!["crabbox", "-V"],
            vec!["crabbox", "--socket", "run", "list"],
            vec!["crabbox", "--", "run"],
        ] {
            let os: Vec<std::ffi::OsString> = argv.iter().map(Into::into).collect();
            let cmd = command_for(&os);
            if argv == ["crabbox", "--socket", "run", "list"] {
                // The socket's value is not the subcommand.
                assert_eq!(
                    cmd.get_subcommands()
                        .map(|s| s.get_name())
                        .collect::<Vec<_>>(),
                    ["list"]
                );
            } else {
                assert!(cmd.get_subcommands().count() > 1, "{argv:?}");
            }
            assert_eq!(
                outcome(cmd, &argv),
                outcome(Cli::command(), &argv),
                "{argv:?}"
            );
        }
    }

    #[test]
    fn a_limit_is_a_count_of_at_least_one() {
        assert_eq!(parse_limit::<usize>("20"), Ok(20));
        assert_eq!(parse_limit::<u32>("1"), Ok(1));
        for bad in ["0", "-1", "1.5", "", "ten"] {
            let e = parse_limit::<usize>(bad).expect_err(bad);
            assert!(e.contains("at least 1, like 20"), "{bad}: {e}");
        }
        assert_eq!(
            parse_limit::<u32>("5000000000"),
            Err("5000000000 is too large".into())
        );
    }

    /// The figures the run options' help writes out are the ones the daemon applies.
    #[test]
    fn the_sync_guards_help_names_their_real_defaults() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let run = cmd.find_subcommand("run").expect("run");
        let help = |flag: &str| {
            run.get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default()
        };
        let guard = format!("by default {}%", crate::config::DELETE_GUARD_DEFAULT);
        assert!(
            help("force-sync-delete").contains(&guard),
            "{}",
            help("force-sync-delete")
        );
        let limits = crate::sync::SyncLimits::default();
        // (written with a thousands comma, as the help does)
        let files = limits.max_files;
        assert!((1_000..1_000_000).contains(&files));
        let large = format!(
            "{},{:03} files or {} GiB",
            files / 1000,
            files % 1000,
            limits.max_bytes >> 30
        );
        assert!(
            help("force-sync-large").contains(&large),
            "{large}: {}",
            help("force-sync-large")
        );
    }

    /// clap's own checks of every command and argument (unique names and flags, valid
    /// references), which otherwise run only for the subcommand a test happens to parse:
    /// subcommands are defined lazily, and a global flag whose name a subcommand also uses
    /// would be found only when that subcommand is parsed.
    #[test]
    fn every_command_definition_passes_claps_checks() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
