//! `daytona-sim`: a Daytona-compatible server over local sandboxes. Parses flags, binds,
//! prints the address and serves until SIGTERM / SIGINT.
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use crabbox::sim::{self, Faults, SimConfig};

/// A Daytona-compatible server (control plane under /api, toolbox under /toolbox) over
/// local sandboxes, for offline development and tests.
///
/// Faults can be set at start with the flags below and changed at runtime:
///   curl -X POST http://ADDR/_sim/faults -d '{"error_rate":0.05}'
/// Fields: latency_ms, error_rate (fraction answered 503), error_next + error_path (the
/// next N requests whose `METHOD /path` contains a string answered 503), rate_limit_count (next N
/// answered 429) with retry_after_secs and retry_after_bucket (Retry-After-<bucket>)
/// and rate_limit_path (only requests whose `METHOD /path` contains it),
/// drop_rate (fraction of connections dropped mid-answer), drop_next + drop_path (drop
/// the next N requests whose `METHOD /path` contains a string; drop_skip lets that many
/// matching requests through first), cpu_quota, memory_quota, disk_quota and sandbox_quota (the
/// organization's totals: a create, start or resize past one is refused with Daytona's
/// 403; 0 lifts it), stuck_create (new sandboxes
/// never leave `creating`), sandbox_error + error_reason (push a sandbox into `error`),
/// upload_bytes_per_sec (uploads read at most that fast, as over a slow link; 0 lifts it),
/// log_limit_bytes (a command's log keeps at most that much, as a full disk would: its
/// follow stream closes with 1011 and why, its plain logs answer 500; 0 lifts it).
/// GET /_sim/faults shows the current faults.
#[derive(Debug, Parser)]
#[command(name = "daytona-sim", version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on (port 0 picks one; the real address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where sandboxes live.
    #[arg(long)]
    state_dir: PathBuf,
    /// An accepted API key (repeatable).
    #[arg(long = "api-key", required_unless_present = "jwt")]
    api_keys: Vec<String>,
    /// An accepted JWT (needs --org; clients must send X-Daytona-Organization-ID).
    #[arg(long, requires = "org")]
    jwt: Option<String>,
    /// The organisation id of the JWT and of every sandbox.
    #[arg(long)]
    org: Option<String>,
    /// The API keys' permissions, comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    permissions: Option<Vec<String>>,
    /// Sim minutes per real minute for auto-stop (60: a minute lasts a second).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// How long `creating` lasts (and `starting`, with --start-delay).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    create_delay: Duration,
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    start_delay: Duration,
    /// How long `stopping` (and `destroying`) lasts.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    stop_delay: Duration,
    /// Each delay varies by up to this fraction of itself, either way (0.3: ±30%).
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// The organization's total CPUs over sandboxes that run (none: no quota).
    #[arg(long)]
    quota_cpu: Option<i64>,
    /// The organization's total memory in GiB over sandboxes that run.
    #[arg(long)]
    quota_memory: Option<i64>,
    /// The organization's total disk in GiB over sandboxes not archived.
    #[arg(long)]
    quota_disk: Option<i64>,
    /// The most sandboxes the organization may have (the sim's own: Daytona has none).
    #[arg(long)]
    quota_sandboxes: Option<i64>,
    /// The largest JSON request body taken (larger ones get 413).
    #[arg(long, default_value = "1MiB")]
    max_json_body: bytesize::ByteSize,
    /// How long a snapshot spends in each of its pending and building states.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    snapshot_delay: Duration,
    /// An active snapshot available from the start (repeatable).
    #[arg(long = "snapshot", default_value = "default")]
    snapshots: Vec<String>,
    /// Address of the SSH gateway (port 0 picks one; the real address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    ssh_listen: String,
    /// Fault: added latency per request, in ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fault: fraction of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fault: fraction of connections dropped mid-answer.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Fault: new sandboxes never leave `creating`.
    #[arg(long)]
    stuck_create: bool,
    /// Do not serve the events channel (/api/socket.io/ answers 404, as an older Daytona
    /// would): clients must poll.
    #[arg(long)]
    no_events: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(crabbox::logging::colour_stderr())
        .with_env_filter(crabbox::logging::env_filter("warn"))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Sandbox commands get their own descriptors, never what the sim was started with.
    if let Err(e) = crabbox::fds::close_on_exec_from_3() {
        tracing::warn!(error = %e, "cannot mark inherited descriptors close-on-exec");
    }
    let mut config = SimConfig::new(args.state_dir.clone());
    config.api_keys = args.api_keys;
    config.jwt = args.jwt;
    if let Some(org) = args.org {
        config.org = org;
    }
    if let Some(p) = args.permissions {
        config.permissions = p.into_iter().filter(|s| !s.is_empty()).collect();
    }
    config.time_scale = args.time_scale;
    config.create_delay = args.create_delay;
    config.start_delay = args.start_delay;
    config.snapshot_delay = args.snapshot_delay;
    config.stop_delay = args.stop_delay;
    if !(0.0..=1.0).contains(&args.jitter) {
        anyhow::bail!(
            "--jitter {} is not a fraction between 0 and 1 (0.3 varies each delay by ±30%)",
            args.jitter
        );
    }
    config.jitter = args.jitter;
    for (flag, v) in [
        ("--quota-cpu", args.quota_cpu),
        ("--quota-memory", args.quota_memory),
        ("--quota-disk", args.quota_disk),
        ("--quota-sandboxes", args.quota_sandboxes),
    ] {
        if v.is_some_and(|n| n < 1) {
            anyhow::bail!("{flag} must be at least 1 (leave it out for no quota)");
        }
    }
    config.max_json_body = usize::try_from(args.max_json_body.as_u64()).unwrap_or(usize::MAX);
    config.events = !args.no_events;
    config.faults = Faults {
        latency_ms: args.latency_ms,
        error_rate: args.error_rate,
        drop_rate: args.drop_rate,
        stuck_create: args.stuck_create,
        cpu_quota: args.quota_cpu,
        memory_quota: args.quota_memory,
        disk_quota: args.quota_disk,
        sandbox_quota: args.quota_sandboxes,
        ..Faults::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let ssh_listener = tokio::net::TcpListener::bind(&args.ssh_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} for ssh: {e}", args.ssh_listen))?;
    let ssh_addr = ssh_listener.local_addr()?;
    config.ssh_port = Some(ssh_addr.port());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (sim, addr, task) = sim::start(config, listener, shutdown.clone()).await?;
    sim.preload_snapshots(&args.snapshots);
    let gateway = sim::ssh::start(sim.clone(), ssh_listener)?;
    println!("listening on http://{addr}");
    println!("ssh gateway on {ssh_addr}");
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
    let _ = task.await;
    let _ = gateway.await;
    Ok(())
}
