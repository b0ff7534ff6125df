//! Reaching the daemon: connect over the Unix socket, start `crabboxd` when nothing answers.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use super::{CliError, exit};
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::lease_service_client::LeaseServiceClient;

/// How long the CLI waits for an autostarted daemon to answer.
const AUTOSTART_WAIT: Duration = Duration::from_secs(15);

/// Clients of both services over one channel.
#[derive(Clone)]
pub struct Clients {
    pub leases: LeaseServiceClient<Channel>,
    pub daemon: DaemonServiceClient<Channel>,
}

/// Connects to the daemon at `socket` once (no autostart). The peer must be this user's
/// own process (SO_PEERCRED): a socket another user put there is refused before anything
/// (an `--env` value, a repo path) is sent to it.
/// The HTTP/2 flow-control window the CLI gives the daemon.
const WINDOW: u32 = 8 * 1024 * 1024;

pub async fn connect_once(socket: &Path) -> Result<Clients, String> {
    if !socket.exists() {
        return Err(format!("no socket at {}", socket.display()));
    }
    let path = socket.to_path_buf();
    // The URI is only for the authority (`localhost`, as grpc-go and grpcurl send over a
    // Unix socket); the connector below is what connects.
    // Windows of 8 MiB: with HTTP/2's 64 KiB default the daemon would wait for this
    // client's window update after every 64 KiB of a command's output (a round trip
    // each on a stream that can carry gigabytes).
    let endpoint = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW);
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                check_peer(&stream, &path)?;
                // What h2 writes in one turn goes out in one write (one wake-up of the
                // daemon instead of one per frame batch).
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    super::coalesce::Coalesced::new(stream),
                ))
            }
        }))
        .await
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        })?;
    Ok(Clients {
        leases: LeaseServiceClient::new(channel.clone()),
        daemon: DaemonServiceClient::new(channel),
    })
}

/// Refuses a socket served by another user.
fn check_peer(stream: &tokio::net::UnixStream, path: &Path) -> std::io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    let me = nix::unistd::geteuid().as_raw();
    if peer != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the socket {} is served by uid {peer}, not by you (uid {me}): another user may \
                 be impersonating crabboxd, so nothing was sent. Remove that socket's folder (or \
                 set CRABBOX_SOCKET to a path in a folder only you can write) and start the \
                 daemon again",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Connects, starting `crabboxd` in the background when nothing answers (unless
/// `CRABBOX_NO_AUTOSTART=1`).
pub async fn connect(socket: &Path, quiet: bool) -> Result<Clients, CliError> {
    let first = match connect_once(socket).await {
        Ok(c) => {
            if !quiet
                && let Some(theirs) = daemon_version(socket)
                && theirs != env!("CARGO_PKG_VERSION")
            {
                eprintln!(
                    "crabbox: warning: crabboxd is version {theirs}, this crabbox is {}: \
                     restart it with `crabbox daemon restart`",
                    env!("CARGO_PKG_VERSION")
                );
            }
            return Ok(c);
        }
        Err(e) => e,
    };
    if std::env::var("CRABBOX_NO_AUTOSTART").is_ok_and(|v| v == "1") {
        return Err(CliError::new(
            exit::INTERNAL,
            format!(
                "crabboxd is not answering on {} ({first}) and CRABBOX_NO_AUTOSTART=1: start it \
                 with `crabbox daemon start` or `crabboxd`",
                socket.display()
            ),
        ));
    }
    if !quiet {
        eprintln!("crabbox: starting crabboxd ({})", socket.display());
    }
    start_daemon(socket).await
}

/// The version the daemon on `socket` wrote beside it (`<socket>.lock`: "PID VERSION").
pub fn daemon_version(socket: &Path) -> Option<String> {
    let text = std::fs::read_to_string(socket.with_extension("lock")).ok()?;
    text.split_whitespace().nth(1).map(str::to_string)
}

/// The `crabboxd` next to this binary, else the one on PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("crabboxd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("crabboxd"))
}

/// The state dir, made (private) when missing; `code` is the exit when it cannot be.
pub fn state_dir_made(code: i32) -> Result<PathBuf, CliError> {
    let dir = crate::config::state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            CliError::new(
                code,
                format!("cannot create the state dir {}: {e}", dir.display()),
            )
        })?;
    Ok(dir)
}

/// Starts `crabboxd` detached (own process group, log in the state dir) and waits until it
/// answers.
pub async fn start_daemon(socket: &Path) -> Result<Clients, CliError> {
    let state_dir = state_dir_made(exit::INTERNAL)?;
    let log_path = state_dir.join("crabboxd.log");
    let log = std::fs::OpenOptions::new()
        .mode(0o600)
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| {
            CliError::new(
                exit::INTERNAL,
                format!("cannot open {}: {e}", log_path.display()),
            )
        })?;
    let log_err = log.try_clone().map_err(|e| {
        CliError::new(
            exit::INTERNAL,
            format!("cannot open {}: {e}", log_path.display()),
        )
    })?;
    let bin = daemon_binary();
    let mut child = std::process::Command::new(&bin)
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--log-file")
        .arg(&log_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: the terminal's Ctrl-C must not reach the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            CliError::new(
                exit::INTERNAL,
                format!(
                    "could not start {}: {e}; is crabboxd installed next to crabbox or on PATH?",
                    bin.display()
                ),
            )
        })?;
    let started = Instant::now();
    loop {
        if let Ok(c) = connect_once(socket).await {
            // Reap the child in the background so it never lingers as a zombie of ours.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(c);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CliError::new(
                exit::INTERNAL,
                format!(
                    "crabboxd exited at start ({status}); its log {} ends with:\n{}",
                    log_path.display(),
                    tail(&log_path, 8)
                ),
            ));
        }
        if started.elapsed() > AUTOSTART_WAIT {
            return Err(CliError::new(
                exit::INTERNAL,
                format!(
                    "crabboxd did not answer on {} within {}s; see its log {}",
                    socket.display(),
                    AUTOSTART_WAIT.as_secs(),
                    log_path.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The repository root for the current folder: git's top level, else the folder itself;
/// canonical either way.
pub fn repo_root() -> Result<PathBuf, CliError> {
    let cwd = std::env::current_dir().map_err(|e| {
        CliError::new(
            exit::SYNC,
            format!("cannot read the current folder: {e}; cd into your repository and retry"),
        )
    })?;
    // The nearest folder up from here with a `.git` (a folder, or a file for a worktree or
    // submodule) is the work tree's top, as `git rev-parse --show-toplevel` says, without
    // starting git; when git is told otherwise by its environment, git is asked.
    let top =
        if std::env::var_os("GIT_DIR").is_some() || std::env::var_os("GIT_WORK_TREE").is_some() {
            std::process::Command::new("git")
                .args(["rev-parse", "--show-toplevel"])
                .current_dir(&cwd)
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        } else {
            cwd.ancestors()
                .find(|dir| dir.join(".git").exists())
                .map(Path::to_path_buf)
        };
    let root = top.unwrap_or(cwd);
    std::fs::canonicalize(&root).map_err(|e| {
        CliError::new(
            exit::SYNC,
            format!("cannot read the repository at {}: {e}", root.display()),
        )
    })
}
