//! A real PostgreSQL server for team-mode tests: `initdb` and `postgres` in a temp dir on
//! a loopback port (as the `postgres` user when the tests run as root, which PostgreSQL
//! refuses), gone when dropped.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Pg {
    dir: TempDir,
    child: Child,
    pub port: u16,
}

/// A PostgreSQL program: on PATH, else in Debian's versioned folder (the newest).
fn program(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.is_file());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("{name} not found: install PostgreSQL (./test.sh installs the postgresql package)")
    })
}

/// Runs as `postgres` when this process is root.
fn as_db_user(c: &mut Command) -> &mut Command {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("a postgres user (the postgresql package makes one)");
        c.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    c
}

impl Pg {
    pub fn start() -> Pg {
        let dir = tempfile::tempdir().expect("tempdir");
        if nix::unistd::geteuid().is_root()
            && let Ok(Some(user)) = nix::unistd::User::from_name("postgres")
        {
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let out = as_db_user(
            Command::new(program("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "crabbox", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .output()
        .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Self::server(dir.path(), port);
        let pg = Pg { dir, child, port };
        pg.wait_up();
        pg
    }

    fn server(dir: &std::path::Path, port: u16) -> Child {
        let data = dir.join("data");
        as_db_user(
            Command::new(program("postgres"))
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(dir)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=16MB",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("postgres")
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the stopped server again, on the same data and port.
    pub fn restart(&mut self) {
        self.child = Self::server(self.dir.path(), self.port);
        self.wait_up();
    }

    /// A fresh database of its own, and its URL.
    pub async fn database(&self) -> String {
        let name = format!("t{:016x}", rand::random::<u64>());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let conn = tokio_postgres::connect(
                &format!("postgres://crabbox@127.0.0.1:{}/postgres", self.port),
                tokio_postgres::NoTls,
            )
            .await;
            match conn {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("CREATE DATABASE {name}"))
                        .await
                        .expect("create database");
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "postgres does not answer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        format!(
            "postgres://crabbox:not-a-real-secret-pw@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// Stops the server (a partition, as far as daemons can tell).
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
