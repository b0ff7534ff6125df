//! Test harness: the real daemon, in-process on a temp socket and state dir, and the real
//! `crabbox` binary as a subprocess.
#![allow(dead_code)]

pub mod copy;
pub mod pause;
pub mod pg;
pub mod stdio;
pub mod sync;
pub mod tty;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crabbox::cli::client::{self, Clients};
use crabbox::daemon::{self, DaemonConfig, Providers};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The `crabbox` binary in `cwd`, pointed at a daemon process listening on `socket` (one a
/// test started itself), never autostarting one, reading no config.
pub fn cli_at(socket: &Path, cwd: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabbox"));
    c.current_dir(cwd)
        .env("CRABBOX_SOCKET", socket)
        .env("CRABBOX_NO_AUTOSTART", "1")
        .env("CRABBOX_CONFIG", "/dev/null");
    c
}

/// A daemon running inside the test process.
pub struct Daemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), daemon::DaemonError>>>,
}

impl Daemon {
    /// A daemon with the default providers and a fast expiry sweep.
    pub async fn start() -> Daemon {
        Self::start_with(
            |state| daemon::default_providers(state).expect("providers"),
            |_| {},
        )
        .await
    }

    /// A daemon with chosen providers and config.
    pub async fn start_with(
        providers: impl FnOnce(&Path) -> Providers,
        tweak: impl FnOnce(&mut DaemonConfig),
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/crabboxd.sock");
        let state = dir.path().join("state");
        Self::start_in(dir, socket, state, providers, tweak).await
    }

    /// A daemon on an existing socket path and state dir (restarts).
    pub async fn start_in(
        dir: TempDir,
        socket: PathBuf,
        state: PathBuf,
        providers: impl FnOnce(&Path) -> Providers,
        tweak: impl FnOnce(&mut DaemonConfig),
    ) -> Daemon {
        let mut config = DaemonConfig::new(socket.clone(), state.clone());
        config.sweep_interval = Duration::from_millis(100);
        config.shutdown_deadline = Duration::from_secs(3);
        tweak(&mut config);
        let bound = daemon::bind_unix(&socket).expect("bind socket");
        std::fs::create_dir_all(&state).expect("state dir");
        let providers = providers(&state);
        let (tx, rx) = oneshot::channel();
        let join = tokio::spawn(daemon::run(config, providers, bound, async {
            let _ = rx.await;
        }));
        let mut d = Daemon {
            dir,
            socket,
            state,
            stop: Some(tx),
            join: Some(join),
        };
        // Wait until it answers.
        for _ in 0..200 {
            if client::connect_once(&d.socket).await.is_ok() {
                return d;
            }
            if d.join.as_ref().is_some_and(|j| j.is_finished()) {
                let j = d.join.take().expect("join");
                panic!("daemon exited at start: {:?}", j.await.expect("join"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("daemon did not answer on {}", d.socket.display());
    }

    /// Stops the daemon and hands back its folder (for a restart on the same state).
    pub async fn shutdown(mut self) -> (TempDir, PathBuf, PathBuf) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            j.await.expect("join").expect("daemon ran cleanly");
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (dir, self.socket.clone(), self.state.clone())
    }

    pub async fn client(&self) -> Clients {
        client::connect_once(&self.socket).await.expect("connect")
    }

    /// The `crabbox` binary, pointed at this daemon, never autostarting one.
    pub fn cli(&self, cwd: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabbox"));
        c.current_dir(cwd)
            .env("CRABBOX_SOCKET", &self.socket)
            .env("CRABBOX_STATE_DIR", &self.state)
            .env("CRABBOX_NO_AUTOSTART", "1")
            .env("CRABBOX_CONFIG", self.dir.path().join("no-config.yaml"))
            .env_remove("CRABBOX_PROVIDER")
            .kill_on_drop(true);
        let _ = std::fs::write(self.dir.path().join("no-config.yaml"), "{}\n");
        c
    }

    /// Runs `crabbox ARGS` in `cwd` and waits for it.
    pub async fn run(&self, cwd: &Path, args: &[&str]) -> Out {
        self.run_env(cwd, &[], args).await
    }

    /// [`Daemon::run`] with these environment variables set too.
    pub async fn run_env(&self, cwd: &Path, env: &[(&str, &OsStr)], args: &[&str]) -> Out {
        let mut c = self.cli(cwd);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), c.args(args).output())
            .await
            .expect("crabbox finished within 120s")
            .expect("crabbox ran");
        Out(out)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
            // The test is over and its daemon ends with it, without releasing what it
            // holds: whatever its local sandboxes still run ends too (an agent's jail whose
            // bubblewrap was killed as it started waits forever for its parent's word, and
            // outlived the test run). Not after `shutdown`, which hands the state on.
            end_sandboxes_under(&self.state.join("sandboxes"));
        }
    }
}

/// Ends whatever the local sandboxes in `root` still run and removes their cgroups: for a
/// test whose daemon or sim ends with it, without releasing them (else a cgroup per
/// sandbox, and now and then a jail's process, outlive the test run).
pub fn end_sandboxes_under(root: &Path) {
    if let Ok(dir) = std::fs::read_dir(root) {
        for entry in dir.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                crabbox::sandbox::cgroup::remove_named(name);
            }
        }
    }
}

/// A finished `crabbox` process.
pub struct Out(pub Output);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
    /// Asserts that `run`/`ssh` failed on crabbox's side: exit 125 (docker's convention),
    /// with the failure's kind in the error line (`crabbox: error [KIND]: ...`).
    pub fn crabbox_failed(self, kind: &str) -> Self {
        let s = self.expect(125);
        assert!(
            s.stderr().contains(&format!("crabbox: error [{kind}]: ")),
            "the error line names the kind {kind}:\n{}",
            s.stderr()
        );
        s
    }

    /// Asserts the exit code, showing both streams when it differs.
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// A git repository with a couple of files.
pub fn repo() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    std::fs::write(r.join("README"), "hello\n").expect("write");
    std::fs::create_dir_all(r.join("src")).expect("mkdir");
    std::fs::write(r.join("src/lib.txt"), "lib\n").expect("write");
    git(r, &["init", "-q"]);
    git(r, &["add", "."]);
    dir
}

pub fn git(r: &Path, args: &[&str]) {
    let ok = std::process::Command::new("git")
        .arg("-C")
        .arg(r)
        .args(args)
        .output()
        .expect("git")
        .status
        .success();
    assert!(ok, "git {args:?}");
}

/// Polls `f` every 20 ms until it answers `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most `secs` seconds) until no process `pid` is left: `what` has ended.
pub async fn process_ends(secs: u64, what: &str, pid: i32) {
    eventually(secs, what, || async {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .is_err()
            .then_some(())
    })
    .await;
}
