//! The daemon's Unix socket: its folder 0700 (when the daemon creates it), the socket 0600,
//! and a lock beside it so that only one daemon serves a socket.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::DaemonError;

/// A bound socket plus the lock that makes it ours.
pub struct BoundSocket {
    pub(super) listener: UnixListener,
    pub(super) path: PathBuf,
    /// The descriptor socket beside it ([`crate::direct`]), bound first so that a client
    /// that finds the daemon's socket finds this one too (None: bound later, or not at
    /// all; runs then stream their output through the daemon).
    pub(super) fds: Option<std::os::unix::net::UnixListener>,
    /// Held while the daemon lives: a second daemon fails to take it.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Makes sure `dir` is a private folder of this user: created 0700 when missing; an
/// existing one must be a real folder (not a symlink), owned by this user and writable by
/// no one else, since whoever can write in it can replace the socket (what OpenSSH's agent,
/// tmux and systemd insist on too).
pub fn private_dir(dir: &Path, what: &str) -> Result<(), DaemonError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::Setup(format!("creating {what} {}: {e}", dir.display()))),
        Err(e) => Err(DaemonError::Setup(format!(
            "checking {what} {}: {e}",
            dir.display()
        ))),
        Ok(m) => {
            let me = nix::unistd::geteuid().as_raw();
            let problem = if m.file_type().is_symlink() {
                Some("is a symlink".to_string())
            } else if !m.is_dir() {
                Some("is not a folder".to_string())
            } else if m.uid() != me {
                Some(format!("is owned by uid {}, not you (uid {me})", m.uid()))
            } else if m.mode() & 0o022 != 0 {
                Some(format!(
                    "is writable by others (mode {:o})",
                    m.mode() & 0o777
                ))
            } else {
                None
            };
            match problem {
                None => Ok(()),
                Some(p) => Err(DaemonError::Setup(format!(
                    "{what} {} {p}: another user could replace the socket in it. Remove it \
                     (or `chmod 700` it if it is yours), or set CRABBOX_SOCKET to a path in a \
                     private folder such as $XDG_RUNTIME_DIR",
                    dir.display()
                ))),
            }
        }
    }
}

/// Binds the daemon's Unix socket: its folder 0700 (when we create it), the socket 0600.
/// A stale socket (nothing answers) is replaced; a live daemon is refused.
pub fn bind_unix(path: &Path) -> Result<BoundSocket, DaemonError> {
    let setup = |what: &str, e: std::io::Error| DaemonError::Setup(format!("{what}: {e}"));
    let dir = path.parent().ok_or_else(|| {
        DaemonError::Setup(format!("socket path {} has no folder", path.display()))
    })?;
    private_dir(dir, "the socket folder")?;
    let lock = take_lock(path)?;
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
    let fds = bind_fds(path);
    // The folder is ours and private (checked above), so no one else can reach the socket
    // between the bind and the chmod. (Not a umask around bind: the umask is the whole
    // process's, and would race with anything else creating files at that moment.)
    let listener =
        UnixListener::bind(path).map_err(|e| setup(&format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup(&format!("securing {}", path.display()), e))?;
    // What is at the path now must be the socket just bound, ours and private.
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| setup(&format!("checking {}", path.display()), e))?;
    if !meta.file_type().is_socket()
        || meta.uid() != nix::unistd::geteuid().as_raw()
        || meta.mode() & 0o077 != 0
    {
        return Err(DaemonError::Setup(format!(
            "{} changed under the daemon as it was bound (not a private socket of yours): \
             something else writes in {}; use a private folder",
            path.display(),
            dir.display()
        )));
    }
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        fds,
        _lock: lock,
    })
}

/// Binds the descriptor socket beside `socket` (0600; its folder must already be known
/// private, and the daemon's lock held: a socket left there is a dead daemon's).
pub(super) fn bind_fds(socket: &Path) -> Option<std::os::unix::net::UnixListener> {
    let path = crate::direct::socket_path(socket);
    let _ = std::fs::remove_file(&path);
    let bound = std::os::unix::net::UnixListener::bind(&path).and_then(|l| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        Ok(l)
    });
    match bound {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no descriptor socket: run output goes through the daemon");
            None
        }
    }
}

/// The lock beside the socket (`<socket>.lock`, holding "PID VERSION"): only one daemon
/// serves a socket.
/// How long a starting daemon waits for the lock of one that has died.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn take_lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let setup = |what: &str, e: std::io::Error| DaemonError::Setup(format!("{what}: {e}"));
    // A lock beside the socket closes the race of two daemons starting at once. Never
    // through a symlink: another user could point it at a file of ours.
    let lock_path = path.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| {
            setup(
                &format!("opening {} (it must not be a symlink)", lock_path.display()),
                e,
            )
        })?;
    // A daemon killed a moment ago may leave its lock held for a little while longer by a
    // process it was starting (a child between fork and exec shares the lock): when the
    // pid in the lock is gone, wait for the lock rather than report a daemon that is not.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut lock_file = lock_file;
    let mut lock = loop {
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((file, _)) => {
                let text = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let pid = text.split_whitespace().next().unwrap_or("");
                let owner_gone = pid.parse::<i32>().is_ok_and(|p| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None)
                        == Err(nix::errno::Errno::ESRCH)
                });
                if owner_gone && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    lock_file = file;
                    continue;
                }
                return Err(DaemonError::AlreadyRunning {
                    socket: path.display().to_string(),
                    pid: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
        }
    };
    {
        use std::io::{Seek, Write};
        let _ = lock.set_len(0);
        let _ = lock.seek(std::io::SeekFrom::Start(0));
        // The pid, and the version a CLI compares with its own.
        let _ = write!(lock, "{} {}", std::process::id(), env!("CARGO_PKG_VERSION"));
    }
    Ok(lock)
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID` is this process
/// and `LISTEN_FDS` names one descriptor, 3), for `path`; `None` when not socket-activated.
pub fn from_systemd(path: &Path) -> Result<Option<BoundSocket>, DaemonError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !ours || fds == 0 {
        return Ok(None);
    }
    if fds != 1 {
        return Err(DaemonError::Setup(format!(
            "systemd passed {fds} sockets; crabboxd serves one (one ListenStream= in its socket unit)"
        )));
    }
    use std::os::fd::{FromRawFd, OwnedFd};
    const SD_LISTEN_FDS_START: i32 = 3;
    // SAFETY: LISTEN_PID names this process, so descriptor 3 was passed to it by systemd
    // for it alone (sd_listen_fds(3)), and nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
    let st = nix::sys::stat::fstat(&fd)
        .map_err(|e| DaemonError::Setup(format!("the socket systemd passed: {e}")))?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(DaemonError::Setup(
            "systemd passed a descriptor that is not a socket: check ListenStream= in the \
             socket unit"
                .into(),
        ));
    }
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener
        .set_nonblocking(true)
        .map_err(|e| DaemonError::Setup(format!("the socket systemd passed: {e}")))?;
    let bound_at = std_listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let path = match bound_at {
        Some(p) if p != path => {
            tracing::warn!(socket = %p.display(), configured = %path.display(),
                "systemd's socket is not where crabboxd was told; serving systemd's");
            p
        }
        Some(p) => p,
        None => path.to_path_buf(),
    };
    let lock = take_lock(&path)?;
    let listener = UnixListener::from_std(std_listener)
        .map_err(|e| DaemonError::Setup(format!("the socket systemd passed: {e}")))?;
    tracing::info!(socket = %path.display(), "serving the socket systemd passed");
    // Beside systemd's socket, when its folder is private (the first client may find the
    // daemon's socket before this one: its output then goes through the daemon).
    let fds = path
        .parent()
        .filter(|dir| private_dir(dir, "the socket folder").is_ok())
        .and_then(|_| bind_fds(&path));
    Ok(Some(BoundSocket {
        listener,
        path,
        fds,
        _lock: lock,
    }))
}

/// Tells systemd the daemon is ready (`Type=notify`), when it asked (`NOTIFY_SOCKET`).
pub fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let sent = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| sock.send_to_addr(b"READY=1", &a))
        }
        None => sock.send_to(b"READY=1", &target),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not tell systemd that crabboxd is ready");
    }
}
