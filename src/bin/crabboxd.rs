//! `crabboxd`: the per-user lease daemon. Parses arguments, binds the socket, and runs
//! the library's daemon until SIGTERM or SIGINT.
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use crabbox::daemon::{self, DaemonConfig};

/// The crabbox lease daemon (normally started by `crabbox`).
#[derive(Debug, Parser)]
#[command(name = "crabboxd", version, about)]
struct Args {
    /// The Unix socket [default: $CRABBOX_SOCKET, $XDG_RUNTIME_DIR/crabbox/crabboxd.sock, /tmp/crabbox-<uid>/crabboxd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The state dir [default: $CRABBOX_STATE_DIR, $XDG_STATE_HOME/crabbox, ~/.local/state/crabbox].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also serve gRPC on this TCP address; every call must carry `authorization: Bearer
    /// <token>` with the token from tcp-token in the state dir (made on first use, 0600).
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// How often expired leases are looked for.
    #[arg(long, default_value = "5s", value_parser = crabbox::config::parse_duration)]
    sweep_interval: std::time::Duration,
    /// How long a sandbox may take to become ready before its lease fails.
    #[arg(long, default_value = "10m", value_parser = crabbox::config::parse_duration)]
    provision_timeout: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0
    /// picks one, printed to the log). No authentication: bind loopback.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log to this file (rotated at 10 MiB, the 5 older ones kept as FILE.1 ... FILE.5)
    /// instead of stderr; under systemd stderr goes to the journal. `crabbox` starts the
    /// daemon with <state dir>/crabboxd.log.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// With --log-file: the size at which the file is rotated (10MiB, 500KB, ...).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "10MiB",
        requires = "log_file"
    )]
    log_max_size: bytesize::ByteSize,
}

fn main() -> anyhow::Result<()> {
    // A local sandbox's agent is this binary too, started by the daemon in the jail: it
    // runs before anything else (one thread, no runtime).
    crabbox::sandbox::agent::run_if_asked();
    // What this daemon inherited beyond stdio (a shell's or a CI runner's open pipes, a
    // socket-activation listener) stays its own: the sandboxes' jails and commands it
    // starts never hold them (a pipe held open there would never end for its reader).
    if let Err(e) = crabbox::fds::close_on_exec_from_3() {
        eprintln!(
            "crabboxd: warning: cannot mark inherited descriptors close-on-exec ({e}): \
             sandbox commands may hold what this daemon was started with"
        );
    }
    daemon_runtime()?.block_on(daemon_main())
}

/// The daemon's runtime: one async worker unless `TOKIO_WORKER_THREADS` says otherwise.
///
/// Why one: a run's path through the daemon is a chain of short tasks (the request, the
/// lease actor, the agent's answers, the client's stream), and with a worker per core a
/// task woken on one tends to wake another worker to take it: 16 context switches per warm
/// local run on two cores (10 with one), a third of the daemon's CPU time in switching
/// (perf), 0.1-0.4 ms of a run that takes ~3.5 ms (interleaved A/B). The daemon's heavy
/// work is off the async worker anyway: scans, archives and file copies run on tokio's
/// blocking threads, a sandbox's command in its own process, a durable store commit in
/// `block_in_place` (see `Store::durably` for the one that waits).
fn daemon_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

async fn daemon_main() -> anyhow::Result<()> {
    // Everything the daemon writes (its database, logs, local sandboxes) is this user's
    // alone, whatever the umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args = Args::parse();
    if let Err(e) = crabbox::logging::init_daemon(
        args.log_file.as_deref(),
        args.log_max_size.as_u64().max(1024),
    ) {
        let file = args
            .log_file
            .as_deref()
            .unwrap_or(std::path::Path::new("-"));
        eprintln!(
            "crabboxd: error: cannot open the log file {}: {e}; check that its folder exists and is writable",
            file.display()
        );
        std::process::exit(2);
    }
    let socket = args.socket.unwrap_or_else(crabbox::config::socket_path);
    let state_dir = args.state_dir.unwrap_or_else(crabbox::config::state_dir);
    let mut config = DaemonConfig::new(socket.clone(), state_dir.clone());
    config.tcp = args.tcp;
    config.sweep_interval = args.sweep_interval;
    // Socket activation (a systemd socket unit) first, else bind it ourselves.
    let bound = match daemon::from_systemd(&socket).and_then(|b| match b {
        Some(b) => Ok(b),
        None => daemon::bind_unix(&socket),
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("crabboxd: error: {e}");
            std::process::exit(1);
        }
    };
    // The daemon's own config: the user's file (or CRABBOX_CONFIG) and its environment.
    let settings = match crabbox::config::load(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crabboxd: error: {e}");
            std::process::exit(2);
        }
    };
    config.provision_deadline = args.provision_timeout;
    if let Some(addr) = args.metrics_listen {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    tracing::info!(metrics = %format!("http://{a}/metrics"), "serving metrics");
                }
                config.metrics = Some(std::sync::Arc::new(l));
            }
            Err(e) => {
                eprintln!("crabboxd: error: cannot listen for metrics on {addr}: {e}");
                std::process::exit(2);
            }
        }
    }
    config.pools = settings.pools.clone();
    config.team = settings.team.clone();
    let providers = daemon::providers_from_config(&state_dir, &settings.daytona, &settings.local)?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    if let Err(e) = daemon::run(config, providers, bound, shutdown).await {
        eprintln!("crabboxd: error: {e}");
        std::process::exit(1);
    }
    Ok(())
}
