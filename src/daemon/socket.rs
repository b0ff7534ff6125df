//! The daemon's Unix socket: its folder 0700 (when the daemon creates it), the socket 0600,
//! and a lock beside it so that only one daemon serves a socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::DaemonError;

/// A bound socket plus the lock that makes it ours.
pub struct BoundSocket {
    pub(super) listener: UnixListener,
    pub(super) path: PathBuf,
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
