//! The socket folder and the state dir are the trust boundary: held against another user of
//! the machine. These tests run as root and play the other user as `nobody` (setpriv); as
//! any other user they say so and do nothing, since they cannot switch users.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, repo};

const NOBODY: u32 = 65534;

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("not root: this test needs to play a second user and does nothing");
    false
}

/// `cmd` as `nobody` (no groups).
fn as_nobody(cmd: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(cmd);
    c
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

fn crabboxd(socket: &Path, state: &Path) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .env("CRABBOX_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crabboxd");
    // A daemon that starts would serve forever: it must refuse, at once.
    let started = std::time::Instant::now();
    let mut child = child;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("crabboxd started where it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_socket_folder_another_user_controls_is_refused_and_a_planted_lock_is_not_followed() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").expect("write");
    // The other user made the folder first, open to all, with the lock a symlink to a file
    // of the victim.
    let planted = tmp.path().join("crabbox-0");
    std::fs::create_dir(&planted).expect("mkdir");
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    chown(&planted, NOBODY);
    std::os::unix::fs::symlink(&victim, planted.join("crabboxd.lock")).expect("symlink");
    let out = crabboxd(&planted.join("crabboxd.sock"), &tmp.path().join("state"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("owned by uid 65534") && err.contains("CRABBOX_SOCKET"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious\n"
    );
    assert!(!planted.join("crabboxd.sock").exists());

    // Ours but writable by others: refused too.
    let loose = tmp.path().join("loose");
    std::fs::create_dir(&loose).expect("mkdir");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = crabboxd(&loose.join("d.sock"), &tmp.path().join("state"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by others"));

    // A private folder of ours with a planted lock symlink: not followed.
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::symlink(&victim, private.join("d.lock")).expect("symlink");
    let out = crabboxd(&private.join("d.sock"), &tmp.path().join("state"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must not be a symlink"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious\n"
    );
}

#[test]
fn the_cli_refuses_a_socket_another_user_serves() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    for p in [tmp.path(), open.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let sock = open.join("crabboxd.sock");
    // The impostor: another user listening where the CLI will connect.
    let mut impostor = as_nobody(&[
        "/usr/bin/python3",
        "-c",
        &format!(
            "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(8)\n\
             import os; os.chmod({:?}, 0o777)\nprint('up', flush=True)\n\
             while True:\n  c,_=s.accept()\n  data=c.recv(65536)\n  open({:?},'ab').write(data)\n",
            sock.display().to_string(),
            sock.display().to_string(),
            open.join("captured").display().to_string()
        ),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .expect("impostor");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = repo();
    let out = Command::new(env!("CARGO_BIN_EXE_crabbox"))
        .current_dir(r.path())
        .env("CRABBOX_SOCKET", &sock)
        .env("CRABBOX_NO_AUTOSTART", "1")
        .env("CRABBOX_CONFIG", "/dev/null")
        .args(["run", "--env", "API_TOKEN=s3cr3t-value", "--", "true"])
        .output()
        .expect("crabbox");
    let _ = impostor.kill();
    let _ = impostor.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("served by uid 65534") && err.contains("nothing was sent"),
        "{err}"
    );
    let captured = std::fs::read(open.join("captured")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&captured).contains("s3cr3t-value"),
        "the impostor got the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_can_read_nothing_under_the_state_dir_and_cannot_talk_to_the_daemon() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = tmp.path().join("state");
    // An existing state dir others could read is tightened, never loosened.
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = tmp.path().join("run/d.sock");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("CRABBOX_CONFIG", "/dev/null")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("crabboxd");
    common::eventually(20, "crabboxd", || async {
        crabbox::cli::client::connect_once(&socket)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let r = repo();
    let out = Command::new(env!("CARGO_BIN_EXE_crabbox"))
        .current_dir(r.path())
        .env("CRABBOX_SOCKET", &socket)
        .env("CRABBOX_STATE_DIR", &state)
        .env("CRABBOX_NO_AUTOSTART", "1")
        .env("CRABBOX_CONFIG", "/dev/null")
        .args(["run", "--keep", "--", "cat", "README"])
        .output()
        .expect("crabbox");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&state).expect("state").mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(state.join("crabbox.redb"))
            .expect("db")
            .mode()
            & 0o077,
        0,
        "the database is the user's alone"
    );
    // nobody reads nothing: not the database, not a synced file, not even the listing.
    let synced = walk(&state.join("sandboxes"))
        .into_iter()
        .find(|p| p.ends_with("README"))
        .expect("a synced file");
    for target in [
        state.join("crabbox.redb"),
        state.join("daemon-id"),
        synced.clone(),
    ] {
        let out = as_nobody(&["cat", &target.display().to_string()])
            .output()
            .expect("cat");
        assert!(!out.status.success(), "nobody read {}", target.display());
    }
    let out = as_nobody(&["ls", &state.display().to_string()])
        .output()
        .expect("ls");
    assert!(!out.status.success());
    // Even with the socket loosened by hand, the daemon drops another user's connection.
    let run_dir = socket.parent().expect("dir");
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = as_nobody(&[
        "/usr/bin/python3",
        "-c",
        &format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\ns.connect({:?})\n\
             s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes([0,0,0,4,0,0,0,0,0]))\n\
             print(len(s.recv(4096)))\n",
            socket.display().to_string()
        ),
    ])
    .output()
    .expect("python");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.trim() == "0" || !out.status.success(),
        "the daemon answered another user: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
    common::end_sandboxes_under(&state.join("sandboxes"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let d = Daemon::start_with(
        |s| crabbox::daemon::default_providers(s).expect("p"),
        |c| c.tcp = Some(format!("127.0.0.1:{port}").parse().expect("addr")),
    )
    .await;
    let token_file = d.state.join("tcp-token");
    let mut ready = false;
    for _ in 0..200 {
        if token_file.exists() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "a token is made for TCP");
    assert_eq!(
        std::fs::metadata(&token_file).expect("meta").mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = crabbox::pb::daemon_service_client::DaemonServiceClient::new(channel.clone());
    let e = client
        .info(crabbox::pb::InfoRequest {})
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("tcp-token"), "{}", e.message());
    let mut req = tonic::Request::new(crabbox::pb::InfoRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let info = client.info(req).await.expect("with the token").into_inner();
    assert!(!info.daemon_id.is_empty());
    let mut wrong = tonic::Request::new(crabbox::pb::InfoRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    assert_eq!(
        client.info(wrong).await.expect_err("wrong token").code(),
        tonic::Code::Unauthenticated
    );
}
