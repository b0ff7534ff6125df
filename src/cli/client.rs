//! Reaching the daemon: connect over the Unix socket, start `crabboxd` when nothing answers.

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

/// Connects to the daemon at `socket` once (no autostart).
pub async fn connect_once(socket: &Path) -> Result<Clients, String> {
    if !socket.exists() {
        return Err(format!("no socket at {}", socket.display()));
    }
    // The socket path goes in the URI; tonic sends `localhost` as the authority.
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .map_err(|e| format!("bad socket path {}: {e}", socket.display()))?
        .connect_timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.map_err(|e| {
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

/// Connects, starting `crabboxd` in the background when nothing answers (unless
/// `CRABBOX_NO_AUTOSTART=1`).
pub async fn connect(socket: &Path, quiet: bool) -> Result<Clients, CliError> {
    let first = match connect_once(socket).await {
        Ok(c) => return Ok(c),
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

/// The `crabboxd` next to this binary, else the one on PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("crabboxd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("crabboxd"))
}

/// Starts `crabboxd` detached (own process group, log in the state dir) and waits until it
/// answers.
pub async fn start_daemon(socket: &Path) -> Result<Clients, CliError> {
    let state_dir = crate::config::state_dir();
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        CliError::new(
            exit::INTERNAL,
            format!("cannot create the state dir {}: {e}", state_dir.display()),
        )
    })?;
    let log_path = state_dir.join("crabboxd.log");
    let log = std::fs::OpenOptions::new()
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
    let top = std::process::Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .current_dir(&cwd)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let root = top.unwrap_or(cwd);
    std::fs::canonicalize(&root).map_err(|e| {
        CliError::new(
            exit::SYNC,
            format!("cannot read the repository at {}: {e}", root.display()),
        )
    })
}
