//! The jail a sandbox command starts in: bubblewrap's namespaces and mounts, the sandbox's
//! cgroups joined between fork and exec, every signal at its default, and nothing outliving
//! the daemon. Used by [`super::process`] (a command started by the daemon or the sim) and
//! [`super::agent`] (a local sandbox's agent, started once in it).

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// A bubblewrap jail for a command: the rest of the system read-only, `/dev` minimal, a
/// `/proc` of its own, and nothing outliving the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jail {
    /// daytona-sim's: `/home` and `/tmp` are this host folder's `home/` and `tmp/`, so
    /// that sandbox paths such as `/home/daytona` are real for the command.
    Sim(PathBuf),
    /// The local provider's: a fresh PID namespace (no host process to see or signal),
    /// the sandbox folder writable at its own path, its own `/tmp`, the `hide` folders
    /// (the user's home, the daemon's state and socket folders) empty, and with
    /// `block_network` a network of its own with only loopback.
    Local {
        dir: PathBuf,
        tmp: PathBuf,
        hide: Vec<PathBuf>,
        /// Host paths shown at their own path (writable when true), after the hiding.
        mounts: Vec<(PathBuf, bool)>,
        block_network: bool,
    },
}

/// Is bubblewrap available for a jail ([`super::process::ProcessSpec::jail`])?
pub fn jail_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::process::Command::new("bwrap")
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Every signal back to its default action, as a command must start: an ignored signal
/// stays ignored across exec, and a daemon started in the background (an asynchronous list
/// of a shell without job control, as `(crabboxd &)`) ignores SIGINT and SIGQUIT, which the
/// command's shell then cannot even trap (Ctrl-C on `run -t` would do nothing). Only
/// async-signal-safe calls: for between fork and exec.
pub fn default_signals() {
    for s in 1..32 {
        if s != nix::libc::SIGKILL && s != nix::libc::SIGSTOP {
            // SAFETY: signal() is async-signal-safe; SIG_DFL installs no handler.
            unsafe {
                nix::libc::signal(s, nix::libc::SIG_DFL);
            }
        }
    }
}

/// A command that starts as `program args`, in the given cgroups: the child joins them
/// between fork and exec (writing `0`, itself, to each `cgroup.procs`: only `open`,
/// `write` and `close`, which are safe there), so everything it starts is inside.
fn starting(
    jail: Option<&Jail>,
    cgroup_procs: &[PathBuf],
    program: &[&OsStr],
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(program[0]);
    c.args(&program[1..]);
    // SAFETY: only async-signal-safe calls (default_signals).
    unsafe {
        c.pre_exec(|| {
            default_signals();
            Ok(())
        });
    }
    let files: Vec<std::ffi::CString> = cgroup_procs
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .collect();
    if !files.is_empty() {
        // SAFETY: the closure only calls async-signal-safe functions (open, write,
        // close) on memory prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                for f in &files {
                    let fd =
                        nix::libc::open(f.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let written = nix::libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    nix::libc::close(fd);
                    if written < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    if jail.is_some() {
        // The jail dies with the daemon (bubblewrap's --die-with-parent), but bubblewrap
        // asks for that only once it runs: a daemon killed between the fork and that
        // moment would leave the jail behind. Asked here already, before exec, and if the
        // daemon is already gone the command is not started.
        let daemon = nix::unistd::getpid();
        // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
        unsafe {
            c.pre_exec(move || {
                if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if nix::libc::getppid() != daemon.as_raw() {
                    return Err(io::Error::other("the daemon has gone"));
                }
                Ok(())
            });
        }
    }
    c
}

/// `program` (its path and arguments) started in `cwd` inside `jail` (none: as it is) and
/// the cgroups whose `cgroup.procs` files are given (joined as `starting` says); with `tty` in a
/// session of its own that can take a terminal. Environment and stdio are the caller's.
pub fn jailed_command(
    jail: Option<&Jail>,
    cgroup_procs: &[PathBuf],
    cwd: &Path,
    tty: bool,
    program: &[&OsStr],
) -> io::Result<tokio::process::Command> {
    let Some(jail) = jail else {
        let mut cmd = starting(None, cgroup_procs, program);
        cmd.current_dir(cwd);
        return Ok(cmd);
    };
    match jail {
        Jail::Sim(fs) => {
            for sub in ["home", "tmp"] {
                std::fs::create_dir_all(fs.join(sub))?;
            }
        }
        Jail::Local { dir, tmp, .. } => {
            std::fs::create_dir_all(dir)?;
            std::fs::create_dir_all(tmp)?;
        }
    }
    if !jail_available() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "bubblewrap (bwrap) is needed to run sandbox commands: install it (apt-get install \
             bubblewrap)",
        ));
    }
    // On a terminal, bwrap itself must not be in the terminal's foreground process group
    // (a Ctrl-C would kill it rather than reach the command): it runs in a session of its
    // own without a terminal, and the command inside takes the terminal in a new session
    // (`setsid -c`), as the only thing on it.
    let mut cmd = if tty {
        starting(
            Some(jail),
            cgroup_procs,
            &[OsStr::new("setsid"), OsStr::new("bwrap")],
        )
    } else {
        starting(Some(jail), cgroup_procs, &[OsStr::new("bwrap")])
    };
    cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
    match jail {
        Jail::Sim(fs) => {
            cmd.arg("--bind")
                .arg(fs.join("home"))
                .arg("/home")
                .arg("--bind")
                .arg(fs.join("tmp"))
                .arg("/tmp");
        }
        Jail::Local {
            dir,
            tmp,
            hide,
            mounts,
            block_network,
        } => {
            cmd.arg("--unshare-pid");
            if *block_network {
                cmd.arg("--unshare-net");
            }
            // Emptied first, then its own /tmp, then the sandbox folder (which may lie
            // inside any of them) put back at its own path.
            for h in hide
                .iter()
                .filter(|h| h.is_dir() && h.as_path() != Path::new("/"))
            {
                cmd.arg("--tmpfs").arg(h);
            }
            cmd.arg("--bind").arg(tmp).arg("/tmp");
            for (path, writable) in mounts {
                cmd.arg(if *writable { "--bind" } else { "--ro-bind" })
                    .arg(path)
                    .arg(path);
            }
            cmd.arg("--bind").arg(dir).arg(dir);
        }
    }
    cmd.args(["--die-with-parent", "--chdir"]).arg(cwd);
    if tty {
        cmd.args(["setsid", "-c"]);
    }
    cmd.args(program);
    Ok(cmd)
}
