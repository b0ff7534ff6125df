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
    /// With TLS: the server's (self-signed) certificate, to trust as a CA.
    pub ca: Option<PathBuf>,
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
        Self::start_with(false)
    }

    /// A server that speaks TLS only, with a self-signed certificate for `localhost`
    /// and 127.0.0.1 (made by `openssl`).
    pub fn start_tls() -> Pg {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Pg {
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
        let ca = tls.then(|| {
            let crt = dir.path().join("server.crt");
            let key = dir.path().join("server.key");
            let ca = dir.path().join("ca.crt");
            let run = |args: &[&str]| {
                let out = Command::new("openssl")
                    .current_dir(dir.path())
                    .args(args)
                    .output()
                    .expect("openssl (./test.sh installs it)");
                assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            };
            // A CA, and a certificate it signs for localhost and 127.0.0.1.
            run(&[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
                "ca.key", "-out", "ca.crt", "-subj", "/CN=crabbox-test-ca", "-addext",
                "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                "server.csr", "-subj", "/CN=localhost",
            ]);
            std::fs::write(
                dir.path().join("ext.cnf"),
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )
            .expect("ext");
            run(&[
                "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf",
            ]);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            if nix::unistd::geteuid().is_root()
                && let Ok(Some(user)) = nix::unistd::User::from_name("postgres")
            {
                for f in [&crt, &key] {
                    nix::unistd::chown(f, Some(user.uid), Some(user.gid)).expect("chown");
                }
            }
            let conf = dir.path().join("data/postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).expect("conf");
            text.push_str(&format!(
                "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                crt.display(),
                key.display()
            ));
            std::fs::write(&conf, text).expect("conf");
            // TLS only, from loopback.
            std::fs::write(
                dir.path().join("data/pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .expect("hba");
            ca
        });
        let child = Self::server(dir.path(), port);
        let pg = Pg {
            dir,
            child,
            port,
            ca,
        };
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
            // Over the Unix socket: no TLS needed to set up.
            let conn = tokio_postgres::connect(
                &format!(
                    "host={} port={} user=crabbox dbname=postgres",
                    self.dir.path().display(),
                    self.port
                ),
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
        match self.ca {
            Some(_) => format!(
                "postgres://crabbox:not-a-real-secret-pw@localhost:{}/{name}?sslmode=require",
                self.port
            ),
            None => format!(
                "postgres://crabbox:not-a-real-secret-pw@127.0.0.1:{}/{name}?sslmode=disable",
                self.port
            ),
        }
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
