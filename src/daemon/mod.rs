//! The daemon: [`run`] serves the gRPC API on a Unix socket (and TCP when asked) until its
//! shutdown future resolves, then stops within a deadline. Tests embed it on a temp socket.
//!
//! - [`index`]: live leases by id, name resolution, the event feed.
//! - [`registry`]: the actor that creates and supervises lease actors.
//! - [`rpc`]: the gRPC services (validate, call, map the error: nothing more).

pub mod index;
pub mod registry;
pub mod rpc;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::Actor;
use ractor::rpc::CallResult;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::provider::Provider;
use crate::provider::local::LocalProvider;
use crate::store::Store;
use index::LeaseIndex;
use registry::{Registry, RegistryMsg};

/// How long a handler waits for an actor to answer before giving up.
pub const ACTOR_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The providers a daemon offers, by name.
pub type Providers = HashMap<String, Arc<dyn Provider>>;

/// Lease defaults (SPEC: ttl 90m, idle 30m).
#[derive(Debug, Clone, Copy)]
pub struct LeaseDefaults {
    pub ttl: Duration,
    pub idle: Duration,
}

impl Default for LeaseDefaults {
    fn default() -> Self {
        LeaseDefaults {
            ttl: Duration::from_secs(90 * 60),
            idle: Duration::from_secs(30 * 60),
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
        }
    }
}

/// What every actor, run task and handler of one daemon shares.
pub struct Shared {
    pub store: Arc<Store>,
    pub providers: Providers,
    pub default_provider: String,
    pub leases: LeaseIndex,
    pub daemon_id: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub defaults: LeaseDefaults,
    pub provision_deadline: Duration,
    /// Cancelled at shutdown; every lease's run token is a child of it.
    pub shutdown: CancellationToken,
    pub started: Instant,
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
    let local = LocalProvider::open(state_dir.join("sandboxes"))
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
) -> Result<Providers, DaemonError> {
    use crate::provider::daytona::{DaytonaProvider, DaytonaSettings, auth};
    let mut providers = default_providers(state_dir)?;
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

/// A bound socket plus the lock that makes it ours.
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Held while the daemon lives: a second daemon fails to take it.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Binds the daemon's Unix socket: its folder 0700 (when we create it), the socket 0600.
/// A stale socket (nothing answers) is replaced; a live daemon is refused.
pub fn bind_unix(path: &Path) -> Result<BoundSocket, DaemonError> {
    let setup = |what: &str, e: std::io::Error| DaemonError::Setup(format!("{what}: {e}"));
    let dir = path.parent().ok_or_else(|| {
        DaemonError::Setup(format!("socket path {} has no folder", path.display()))
    })?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| setup(&format!("creating {}", dir.display()), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| setup(&format!("securing {}", dir.display()), e))?;
    }
    // A lock beside the socket closes the race of two daemons starting at once.
    let lock_path = path.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| setup(&format!("opening {}", lock_path.display()), e))?;
    let mut lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, _)) => {
                let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let pid = pid.trim();
                return Err(DaemonError::AlreadyRunning {
                    socket: path.display().to_string(),
                    pid: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
        };
    {
        use std::io::{Seek, Write};
        let _ = lock.set_len(0);
        let _ = lock.seek(std::io::SeekFrom::Start(0));
        let _ = write!(lock, "{}", std::process::id());
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning {
                socket: path.display().to_string(),
                pid: String::new(),
            });
        }
        tracing::info!(socket = %path.display(), "replacing stale socket");
        std::fs::remove_file(path)
            .map_err(|e| setup(&format!("removing stale {}", path.display()), e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| setup(&format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup(&format!("securing {}", path.display()), e))?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        _lock: lock,
    })
}

/// Runs a daemon until `shutdown` resolves. The socket must be bound already
/// ([`bind_unix`]), so that "already running" is reported before anything else starts.
pub async fn run(
    config: DaemonConfig,
    providers: Providers,
    socket: BoundSocket,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        DaemonError::Setup(format!(
            "creating state dir {}: {e}",
            config.state_dir.display()
        ))
    })?;
    let store = Arc::new(Store::open(&config.state_dir.join("crabbox.redb"))?);
    let daemon_id = store.daemon_id()?;
    let token = CancellationToken::new();
    let shared = Arc::new(Shared {
        store,
        providers,
        default_provider: config.default_provider.clone(),
        leases: LeaseIndex::default(),
        daemon_id,
        state_dir: config.state_dir.clone(),
        socket: socket.path.clone(),
        defaults: config.defaults,
        provision_deadline: config.provision_deadline,
        shutdown: token.clone(),
        started: Instant::now(),
    });
    let (registry, registry_join) = Actor::spawn(None, Registry, shared.clone())
        .await
        .map_err(|e| DaemonError::Setup(format!("starting the registry: {e}")))?;

    // The expiry ticker.
    let ticker = {
        let registry = registry.clone();
        let token = token.clone();
        let every = config.sweep_interval;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => { let _ = registry.send_message(RegistryMsg::Sweep); }
                    () = token.cancelled() => break,
                }
            }
        })
    };

    let router = rpc::router(shared.clone(), registry.clone());
    tracing::info!(socket = %socket.path.display(), daemon_id = %shared.daemon_id, "crabboxd serving");
    let uds = {
        let token = token.clone();
        let router = router.clone();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(socket.listener);
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
            tracing::warn!(%addr, "also serving on TCP: anyone who can reach it can use this daemon");
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
    // Every lease is persisted at each move; stop the actors (they hold the store) and the
    // registry, each within a bound.
    registry.stop(Some("shutdown".into()));
    let _ = tokio::time::timeout(Duration::from_secs(2), registry_join).await;
    for h in shared.leases.handles() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            h.actor.stop_and_wait(Some("shutdown".into()), None),
        )
        .await;
    }
    let _ = std::fs::remove_file(&socket.path);
    tracing::info!("stopped");
    Ok(())
}

/// Unwraps an actor call's answer.
pub fn call_result<T>(r: CallResult<T>) -> Result<T, Error> {
    match r {
        CallResult::Success(v) => Ok(v),
        CallResult::Timeout => Err(Error::Internal(
            "the lease actor did not answer in time".into(),
        )),
        CallResult::SenderError => Err(Error::Internal(
            "the lease actor stopped before answering (see the daemon log)".into(),
        )),
    }
}
