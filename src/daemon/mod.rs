//! The daemon, the composition root: [`run`] opens the store, starts the registry (which
//! picks up every unfinished lease), and serves the gRPC API on a Unix socket (and TCP when
//! asked) until its shutdown future resolves, then stops within a deadline. Tests embed it
//! on a temp socket.
//!
//! - [`socket`]: binding the socket safely, one daemon per socket.

pub mod socket;
mod team;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::lease::store::Store;
pub use crate::provider::Providers;
use crate::provider::local::LocalProvider;
pub use crate::registry::LeaseDefaults;
use crate::registry::{Registry, RegistryCtx};
use crate::rpc::{self, Api, Caller};
pub use socket::{BoundSocket, bind_unix, from_systemd};

/// How often the daemon looks for checkouts to stop watching
/// ([`crate::sync::watch::IDLE_WATCH`]).
const PRUNE_CHECKOUTS_EVERY: Duration = Duration::from_secs(60);

/// The pace of the daemon's periodic work (the sweep, the store's flusher, the checkouts'
/// pruner, team heartbeats): a tick every `period`, a late one not made up for with a
/// burst, until the daemon stops.
pub(crate) struct Ticker {
    interval: tokio::time::Interval,
    token: CancellationToken,
}

impl Ticker {
    pub(crate) fn new(period: Duration, token: CancellationToken) -> Ticker {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval, token }
    }

    /// Waits for the next tick; false once the daemon is stopping.
    pub(crate) async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => true,
            () = self.token.cancelled() => false,
        }
    }
}

/// How a daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Also serve on TCP (no authentication: bind loopback).
    pub tcp: Option<SocketAddr>,
    /// The provider for requests that name none.
    pub default_provider: String,
    pub defaults: LeaseDefaults,
    /// How often expiry is checked.
    pub sweep_interval: Duration,
    /// How long a sandbox may take to become ready.
    pub provision_deadline: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_deadline: Duration,
    /// Warm pools to keep (`pool:` in the daemon's config).
    pub pools: Vec<crate::config::PoolSettings>,
    /// Team mode (`team:` in the daemon's config).
    pub team: Option<crate::config::TeamSettings>,
    /// Serve Prometheus metrics at `/metrics` on this address.
    pub metrics: Option<Arc<std::net::TcpListener>>,
}

impl DaemonConfig {
    /// The SPEC defaults for a socket and state dir.
    pub fn new(socket: PathBuf, state_dir: PathBuf) -> Self {
        DaemonConfig {
            socket,
            state_dir,
            tcp: None,
            default_provider: "local".into(),
            defaults: LeaseDefaults::default(),
            sweep_interval: Duration::from_secs(5),
            provision_deadline: Duration::from_secs(600),
            shutdown_deadline: Duration::from_secs(10),
            pools: Vec::new(),
            team: None,
            metrics: None,
        }
    }
}

/// Why the daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon answers on the socket.
    #[error(
        "another crabboxd is already serving on {socket}{pid}; stop it with `crabbox daemon stop`, or use another --socket"
    )]
    AlreadyRunning { socket: String, pid: String },
    /// The socket or state dir cannot be set up.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] Error),
    #[error("serving gRPC: {0}")]
    Serve(String),
}

/// The providers a daemon has with no configuration: `local`, under the state dir.
pub fn default_providers(state_dir: &Path) -> Result<Providers, DaemonError> {
    local_providers(state_dir, &crate::config::LocalConfig::default())
}

/// `local` with config `local:`.
fn local_providers(
    state_dir: &Path,
    local: &crate::config::LocalConfig,
) -> Result<Providers, DaemonError> {
    let local = LocalProvider::open_with(state_dir.join("sandboxes"), local)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let mut p: Providers = HashMap::new();
    p.insert("local".into(), Arc::new(local));
    Ok(p)
}

/// The providers a daemon has from its environment and user config: `local`, and
/// `daytona` (whose calls explain how to give credentials when none were found).
pub fn providers_from_config(
    state_dir: &Path,
    daytona: &crate::config::DaytonaConfig,
    local: &crate::config::LocalConfig,
) -> Result<Providers, DaemonError> {
    use crate::provider::daytona::{DaytonaProvider, DaytonaSettings, auth};
    let mut providers = local_providers(state_dir, local)?;
    let (credentials, profile_url) = auth::resolve(daytona);
    let d = DaytonaSettings::default();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let settings = DaytonaSettings {
        api_url: daytona
            .api_url
            .clone()
            .or_else(|| env("DAYTONA_API_URL"))
            .or(profile_url)
            .unwrap_or(d.api_url),
        work_root: daytona.work_root.clone().unwrap_or(d.work_root),
        ssh_gateway_host: daytona
            .ssh_gateway_host
            .clone()
            .unwrap_or(d.ssh_gateway_host),
        ssh_access_minutes: daytona.ssh_access_minutes.unwrap_or(d.ssh_access_minutes),
        snapshot: daytona.snapshot.clone(),
        target: daytona.target.clone().or_else(|| env("DAYTONA_TARGET")),
        user: daytona.user.clone().unwrap_or(d.user),
    };
    tracing::info!(api_url = %settings.api_url, credentials = auth::describe(&credentials), "daytona provider");
    let provider = DaytonaProvider::new(settings, credentials)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    providers.insert("daytona".into(), Arc::new(provider));
    Ok(providers)
}

/// The token TCP clients must send, made once (random, 0600) and kept in the state dir.
fn tcp_token(state_dir: &Path) -> Result<String, DaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("tcp-token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && t.trim().len() >= 32
    {
        return Ok(t.trim().to_string());
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| DaemonError::Setup(format!("writing {}: {e}", path.display())))?;
    f.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| DaemonError::Setup(format!("writing {}: {e}", path.display())))?;
    Ok(token)
}

/// The state dir holds the database (commands as typed), logs and local sandboxes (copies of
/// checkouts): 0700 when made, and an existing one that others can read is tightened (never
/// loosened), with a note.
pub fn secure_state_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::Setup(format!("creating state dir {}: {e}", dir.display()))),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
                    .map_err(|e| {
                        DaemonError::Setup(format!("securing state dir {}: {e}", dir.display()))
                    })?;
                tracing::warn!(dir = %dir.display(), from = format!("{mode:o}"), to = format!("{:o}", mode & 0o700),
                    "tightened the state dir: others could read leases, commands, logs and synced files");
            }
            Ok(())
        }
    }
}

/// Runs a daemon until `shutdown` resolves. The socket must be bound already
/// ([`bind_unix`]), so that "already running" is reported before anything else starts.
pub async fn run(
    config: DaemonConfig,
    providers: Providers,
    mut socket: BoundSocket,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    secure_state_dir(&config.state_dir)?;
    let (store, damage) = Store::open_or_set_aside(&config.state_dir.join("crabbox.redb"))?;
    if let Some(damage) = damage {
        tracing::warn!("{damage}");
    }
    let store = Arc::new(store);
    // Kept beside the store too: a lost store must not make every sandbox a stranger's.
    let daemon_id = store.daemon_id_kept_in(&config.state_dir.join("daemon-id"))?;
    // One token fans out: runs, watches, the ticker and the servers all end with it.
    let token = CancellationToken::new();
    let team = config
        .team
        .clone()
        .map(|t| crate::team::Team::new(t, daemon_id.clone()));
    if let Some(team) = &team {
        // Bounded: a database that does not answer must not hold the daemon's start.
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            team::reconcile_at_start(team, &store),
        )
        .await;
    }
    let (registry, registry_join) = Registry::start(RegistryCtx {
        store: store.clone(),
        providers: providers.clone(),
        default_provider: config.default_provider.clone(),
        daemon_id: daemon_id.clone(),
        defaults: config.defaults,
        provision_deadline: config.provision_deadline,
        shutdown: token.clone(),
        pools: config.pools.clone(),
        team: team.clone(),
    })
    .await?;
    if let Some(team) = &team {
        tracing::info!(team = %team.settings.name, registry = %crate::config::redact_url(&team.settings.database_url), "team mode");
        team::spawn(
            team.clone(),
            registry.clone(),
            providers.clone(),
            token.clone(),
        );
    }

    // The sweep ticker: expiry, retries, reconcile, orphans.
    let ticker = {
        let registry = registry.clone();
        let mut every = Ticker::new(config.sweep_interval, token.clone());
        tokio::spawn(async move {
            while every.tick().await {
                registry.sweep();
            }
        })
    };

    let api = Arc::new(Api {
        registry: registry.clone(),
        store,
        providers,
        default_provider: config.default_provider.clone(),
        daemon_id: daemon_id.clone(),
        socket: socket.path.clone(),
        state_dir: config.state_dir.clone(),
        never_sync: [Some(config.state_dir.as_path()), socket.path.parent()]
            .into_iter()
            .flatten()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect(),
        started: Instant::now(),
        shutdown: token.clone(),
        checkouts: Default::default(),
        team,
        handed: Default::default(),
    });
    let fds_socket = socket
        .fds
        .take()
        .and_then(|l| serve_handed(l, &socket.path, api.handed.clone(), token.clone()));
    rpc::seed::spawn(api.clone(), config.pools.clone());
    // Lazy writes (a run's phase, last use, history) become durable within a moment.
    let flusher = {
        let store = api.store.clone();
        let mut every = Ticker::new(crate::lease::store::LAZY_FLUSH_EVERY, token.clone());
        tokio::spawn(async move {
            while every.tick().await {
                // An idle daemon does nothing here.
                if !store.unflushed() {
                    continue;
                }
                let store = store.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.flush()).await {
                    tracing::warn!(error = %e, "could not flush the store");
                }
            }
        })
    };
    // Checkouts no lease claims and no run used for a while stop being watched.
    let pruner = {
        let api = api.clone();
        let mut every = Ticker::new(PRUNE_CHECKOUTS_EVERY, token.clone());
        let seeded: std::collections::HashSet<PathBuf> =
            config.pools.iter().flat_map(|p| p.repos.clone()).collect();
        tokio::spawn(async move {
            while every.tick().await {
                let (api, seeded) = (api.clone(), seeded.clone());
                let pruned = tokio::task::spawn_blocking(move || {
                    api.checkouts
                        .prune(Instant::now(), crate::sync::watch::IDLE_WATCH, |root| {
                            seeded.contains(root)
                                || root
                                    .to_str()
                                    .is_some_and(|r| api.registry.index.claimed_by(r).is_some())
                        })
                })
                .await
                .unwrap_or(0);
                if pruned > 0 {
                    tracing::debug!(pruned, "stopped watching checkouts left idle");
                }
            }
        })
    };
    if let Some(listener) = &config.metrics {
        let listener = listener
            .try_clone()
            .map_err(|e| DaemonError::Setup(format!("the metrics listener: {e}")))?;
        serve_metrics(listener, registry.clone(), token.clone())?;
    }
    let router = rpc::router(api.clone(), Caller::local());
    tracing::info!(socket = %socket.path.display(), %daemon_id, "crabboxd serving");
    // Started by systemd with Type=notify: ready now (the socket answers from here on).
    socket::notify_ready();
    let uds = {
        let token = token.clone();
        let router = router.clone();
        // Only this user's processes: the socket is 0600 in a 0700 folder, and a
        // connection from another uid is dropped all the same.
        let me = nix::unistd::geteuid().as_raw();
        let incoming = tokio_stream::StreamExt::filter(
            tokio_stream::wrappers::UnixListenerStream::new(socket.listener),
            move |conn| match conn {
                Ok(stream) => match stream.peer_cred() {
                    Ok(peer) if peer.uid() == me => true,
                    Ok(peer) => {
                        tracing::warn!(uid = peer.uid(), "refused a connection from another user");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection whose peer is unknown");
                        false
                    }
                },
                Err(_) => true,
            },
        );
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
        })
    };
    let tcp = match config.tcp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DaemonError::Setup(format!("binding TCP {addr}: {e}")))?;
            let secret = tcp_token(&config.state_dir)?;
            let router = rpc::router(api.clone(), Caller::with_token(&secret));
            tracing::warn!(%addr, token_file = %config.state_dir.join("tcp-token").display(),
                "also serving on TCP: every call must carry the token in tcp-token");
            let token = token.clone();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Some(tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await
            }))
        }
        None => None,
    };

    shutdown.await;
    tracing::info!("shutting down");
    // Stop accepting, cancel runs (their leases go back to ready and persist), then give
    // in-flight requests a bounded time to finish.
    token.cancel();
    let deadline = config.shutdown_deadline;
    let drain = async {
        let _ = uds.await;
        if let Some(tcp) = tcp {
            let _ = tcp.await;
        }
    };
    if tokio::time::timeout(deadline, drain).await.is_err() {
        tracing::warn!(
            ?deadline,
            "in-flight requests did not finish before the deadline"
        );
    }
    let _ = ticker.await;
    // Every lease is persisted at each move; stop the actors (they hold the store).
    registry.stop(registry_join, Duration::from_secs(2)).await;
    let _ = flusher.await;
    let _ = pruner.await;
    if let Err(e) = api.store.flush() {
        tracing::warn!(error = %e, "could not flush the store at shutdown");
    }
    let _ = std::fs::remove_file(&socket.path);
    if let Some(path) = fds_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Takes clients' stdout/stderr handed over beside the socket ([`crate::direct`]) until
/// `token` is cancelled; answers the descriptor socket's path. Without it (its folder is
/// not private, or it cannot be bound) runs stream their output as events, as always.
fn serve_handed(
    listener: std::os::unix::net::UnixListener,
    socket: &std::path::Path,
    handed: Arc<crate::direct::Handed>,
    token: CancellationToken,
) -> Option<std::path::PathBuf> {
    let path = crate::direct::socket_path(socket);
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no descriptor socket: run output goes through the daemon");
            return None;
        }
    };
    let me = nix::unistd::geteuid().as_raw();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = token.cancelled() => break,
            };
            let Ok((mut stream, _)) = conn else { continue };
            if !stream.peer_cred().is_ok_and(|p| p.uid() == me) {
                tracing::warn!("refused descriptors from another user");
                continue;
            }
            let handed = handed.clone();
            tokio::spawn(async move {
                let token = match handed.receive(&mut stream).await {
                    Ok(token) => token,
                    Err(why) => {
                        tracing::debug!(%why, "descriptors not taken");
                        return;
                    }
                };
                // The client keeps this open while it lives: once it closes, what its run
                // did not take is dropped (a pipe's reader must see its end).
                {
                    use tokio::io::AsyncReadExt;
                    let mut byte = [0u8; 1];
                    let _ = stream.read(&mut byte).await;
                }
                handed.forget(&token);
            });
        }
    });
    Some(path)
}

/// Serves `/metrics` (Prometheus text) on `listener` until `token` is cancelled.
fn serve_metrics(
    listener: std::net::TcpListener,
    registry: Registry,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| DaemonError::Setup(format!("the metrics listener: {e}")))?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| DaemonError::Setup(format!("the metrics listener: {e}")))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut counts: std::collections::BTreeMap<(String, String), u64> =
                    Default::default();
                for r in registry.index.records() {
                    *counts
                        .entry((r.state.as_str().to_string(), r.provider.clone()))
                        .or_default() += 1;
                }
                let leases: Vec<(String, String, u64)> =
                    counts.into_iter().map(|((s, p), n)| (s, p, n)).collect();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    crate::metrics::render(&leases),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
    });
    Ok(())
}
