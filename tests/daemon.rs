//! The daemon's actors, gRPC surface and lifecycle, driven through a real gRPC client and
//! the real CLI: a slow provider, a crashing lease actor, run serialization, reflection,
//! health, sockets, restarts and orphans.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::{Daemon, eventually, repo};
use crabbox::daemon::{self, Providers};
use crabbox::pb;
use crabbox::provider::local::LocalProvider;
use crabbox::provider::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// The real local provider with faults injected: a slow create, and a `work_root` that
/// panics on demand (it is called inside the lease actor's handler).
struct Faulty {
    inner: LocalProvider,
    create_delay: Duration,
    panic_in_actor: Arc<AtomicBool>,
}

#[async_trait]
impl Provider for Faulty {
    fn name(&self) -> &str {
        "local"
    }
    fn work_root(&self, name: &str) -> String {
        if self.panic_in_actor.load(Ordering::SeqCst) {
            panic!("injected fault in work_root");
        }
        self.inner.work_root(name)
    }
    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        tokio::time::sleep(self.create_delay).await;
        self.inner.create(spec).await
    }
    async fn get(&self, s: &str) -> Result<Option<SandboxInfo>, ProviderError> {
        self.inner.get(s).await
    }
    async fn wait_ready(&self, s: &str, d: Duration) -> Result<SandboxInfo, ProviderError> {
        self.inner.wait_ready(s, d).await
    }
    async fn start(&self, s: &str) -> Result<SandboxInfo, ProviderError> {
        self.inner.start(s).await
    }
    async fn set_labels(&self, s: &str, l: &BTreeMap<String, String>) -> Result<(), ProviderError> {
        self.inner.set_labels(s, l).await
    }
    async fn list(&self, l: &BTreeMap<String, String>) -> Result<Vec<SandboxInfo>, ProviderError> {
        self.inner.list(l).await
    }
    async fn upload(&self, s: &str, spec: &UploadSpec) -> Result<(), ProviderError> {
        self.inner.upload(s, spec).await
    }
    async fn exec(
        &self,
        s: &str,
        spec: &ExecSpec,
        input: Option<mpsc::Receiver<Input>>,
        out: mpsc::Sender<ExecOutput>,
        cancel: CancellationToken,
    ) -> Result<ExecExit, ProviderError> {
        self.inner.exec(s, spec, input, out, cancel).await
    }
    async fn ssh_access(&self, s: &str, m: u32) -> Result<SshAccessInfo, ProviderError> {
        self.inner.ssh_access(s, m).await
    }
    async fn release(&self, s: &str) -> Result<(), ProviderError> {
        self.inner.release(s).await
    }
}

fn faulty(
    create_delay: Duration,
    panic_in_actor: Arc<AtomicBool>,
) -> impl FnOnce(&Path) -> Providers {
    move |state| {
        let inner = LocalProvider::open(state.join("sandboxes")).expect("local");
        let mut p: Providers = Default::default();
        p.insert(
            "local".into(),
            Arc::new(Faulty {
                inner,
                create_delay,
                panic_in_actor,
            }),
        );
        p
    }
}

fn state(l: &pb::Lease) -> pb::LeaseState {
    pb::LeaseState::try_from(l.state).expect("known state")
}

/// A bound on how long an answer may take while a 60 s create runs: a blocked mailbox
/// would take the whole minute.
const ANSWER: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_touch_and_stop_answer_while_a_slow_create_runs() {
    let d = Daemon::start_with(faulty(Duration::from_secs(60), Default::default()), |_| {}).await;
    let mut c = d.client().await;
    let lease = c
        .leases
        .warmup(pb::WarmupRequest::default())
        .await
        .expect("warmup")
        .into_inner();
    let by = pb::LeaseRef {
        name: lease.slug.clone(),
    };
    let got = eventually(10, "creating", || {
        let mut c = c.clone();
        let by = by.clone();
        async move {
            let l = tokio::time::timeout(ANSWER, c.leases.get(by))
                .await
                .ok()?
                .ok()?
                .into_inner();
            (state(&l) == pb::LeaseState::Creating).then_some(l)
        }
    })
    .await;
    assert_eq!(got.id, lease.id);
    let touched = tokio::time::timeout(ANSWER, c.leases.touch(by.clone()))
        .await
        .expect("touch answered in time")
        .expect("touch ok");
    assert_eq!(state(touched.get_ref()), pb::LeaseState::Creating);
    let stopped = tokio::time::timeout(ANSWER, c.leases.stop(by.clone()))
        .await
        .expect("stop answered in time")
        .expect("stop ok")
        .into_inner();
    assert_eq!(state(&stopped), pb::LeaseState::Releasing);
    let mut watch = c
        .leases
        .watch(pb::WatchRequest {
            name: lease.id.clone(),
            until_settled: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("settles")
    {
        last = ev.expect("event").lease;
    }
    assert_eq!(state(&last.expect("an event")), pb::LeaseState::Released);
    assert!(
        !d.state.join("sandboxes").join(&lease.sandbox_name).exists(),
        "nothing created, nothing leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_lease_actor_leaves_the_lease_failed_and_its_sandbox_deleted() {
    let boom = Arc::new(AtomicBool::new(false));
    let d = Daemon::start_with(faulty(Duration::ZERO, boom.clone()), |_| {}).await;
    let r = repo();
    let lease = d
        .run(r.path(), &["warmup", "--json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id").to_string();
    let sandbox_dir = d
        .state
        .join("sandboxes")
        .join(lease["sandbox_name"].as_str().expect("name"));
    assert!(sandbox_dir.is_dir());

    boom.store(true, Ordering::SeqCst);
    let out = d.run(r.path(), &["run", "--", "true"]).await;
    assert_eq!(out.code(), 125, "internal error: {}", out.stderr());
    assert!(
        out.stderr().contains("error [internal]"),
        "{}",
        out.stderr()
    );
    boom.store(false, Ordering::SeqCst);

    let st = eventually(20, "the lease to fail and its sandbox to go", || async {
        let st = d.run(r.path(), &["status", &id, "--json"]).await.json();
        (st["state"] == "failed" && !sandbox_dir.exists()).then_some(st)
    })
    .await;
    let reason = st["reason"].as_str().expect("reason");
    assert!(
        reason.contains("crashed") && reason.contains("injected fault"),
        "{reason}"
    );
    // The failed lease is listed, a new run in the repo gets a new lease, stop finishes it.
    let doc = d
        .run(r.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_ne!(doc["lease"]["id"], id.as_str());
    let stopped = d
        .run(r.path(), &["stop", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(stopped["state"], "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_one_lease_are_serialized() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    // Each run holds a directory lock for a while; overlapping runs would fail with 9.
    let critical = "mkdir ../held || exit 9; sleep 1; rmdir ../held";
    let args = ["run", "--", "sh", "-c", critical];
    let (a, b) = tokio::join!(d.run(r.path(), &args), d.run(r.path(), &args));
    let (a, b) = (a.expect(0), b.expect(0));
    let waited = [a.stderr(), b.stderr()]
        .iter()
        .filter(|e| e.contains("waiting: another run is using lease"))
        .count();
    assert_eq!(
        waited,
        1,
        "exactly one run says it waits:\n{}\n---\n{}",
        a.stderr(),
        b.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_different_leases_run_in_parallel() {
    let d = Daemon::start().await;
    let (r1, r2) = (repo(), repo());
    d.run(r1.path(), &["warmup"]).await.expect(0);
    d.run(r2.path(), &["warmup"]).await.expect(0);
    // A rendezvous: each run marks its arrival in its own checkout (jailed, neither sees
    // the other's) and waits for a `go` that this test puts there once both have arrived
    // (at most 20 s).
    let checkout = |r: &Path| {
        let r = r.to_path_buf();
        let d = &d;
        async move {
            let l = d.run(&r, &["status", "--json"]).await.expect(0).json();
            let name = std::fs::canonicalize(&r).expect("canonical");
            PathBuf::from(l["work_root"].as_str().expect("root"))
                .join(l["id"].as_str().expect("id"))
                .join(name.file_name().expect("name"))
        }
    };
    let (c1, c2) = (checkout(r1.path()).await, checkout(r2.path()).await);
    let script = "touch arrived; i=0; while [ ! -e go ]; do sleep 0.05; i=$((i+1)); [ $i -gt 400 ] && exit 9; done; exit 0";
    let args = ["run", "--", "sh", "-c", script];
    let meet = async {
        eventually(20, "both runs at once", || async {
            (c1.join("arrived").exists() && c2.join("arrived").exists()).then_some(())
        })
        .await;
        std::fs::write(c1.join("go"), "").expect("go");
        std::fs::write(c2.join("go"), "").expect("go");
    };
    let (a, b, ()) = tokio::join!(d.run(r1.path(), &args), d.run(r2.path(), &args), meet);
    a.expect(0);
    b.expect(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_health_and_grpc_error_codes() {
    let d = Daemon::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", d.socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp.next().await.expect("an answer").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "crabbox.v1.LeaseService",
        "crabbox.v1.DaemonService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }

    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let health = HealthClient::new(channel);
    for service in ["", "crabbox.v1.LeaseService", "crabbox.v1.DaemonService"] {
        eventually(5, "serving", || {
            let mut health = health.clone();
            async move {
                let r = health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?;
                (r.into_inner().status == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
    }

    let mut c = d.client().await;
    let info = c
        .daemon
        .info(pb::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.providers, vec!["local"]);
    assert_eq!(info.pid, std::process::id());
    let e = c
        .leases
        .get(pb::LeaseRef {
            name: "cbx_ffffffffffff".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .leases
        .warmup(pb::WarmupRequest {
            slug: "NO".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad slug");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .leases
        .warmup(pb::WarmupRequest {
            provider: "daytona".into(),
            ..Default::default()
        })
        .await
        .expect_err("no such provider here");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("it has: local"), "{}", e.message());

    // A run with an unreadable repo fails before creating anything.
    let mut s = c
        .leases
        .run(pb::RunRequest {
            repo_root: "/nonexistent/repo".into(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let e = s.next().await.expect("an item").expect_err("refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("cannot read the repository at /nonexistent/repo"),
        "{}",
        e.message()
    );
    assert_eq!(crabbox::error::status_kind(&e).exit_code(), 6);
    let list = c
        .leases
        .list(pb::ListRequest {
            all: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(list.leases.is_empty(), "nothing was created");
    let mut s = c
        .leases
        .run(pb::RunRequest {
            repo_root: "/".into(),
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let e = s.next().await.expect("an item").expect_err("no command");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_second_daemon_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/crabboxd.sock");
    std::fs::create_dir_all(socket.parent().expect("parent")).expect("mkdir");
    // A socket file nobody listens on, as a crashed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let state = dir.path().join("state");
    let d = Daemon::start_in(
        dir,
        socket.clone(),
        state.clone(),
        |s| daemon::default_providers(s).expect("p"),
        |_| {},
    )
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket is 0600");

    // In-process: refused with a clear error.
    let err = match daemon::bind_unix(&socket) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a second daemon bound a live socket"),
    };
    assert!(
        err.contains("already serving") && err.contains("crabbox daemon stop"),
        "{err}"
    );
    // The real binary too.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("other-state"))
        .output()
        .await
        .expect("ran");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first daemon is unharmed.
    let mut c = d.client().await;
    c.daemon
        .info(pb::InfoRequest {})
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_manifests_survive_a_restart_and_orphans_are_deleted() {
    let d = Daemon::start().await;
    let r = repo();
    let lease = d
        .run(r.path(), &["warmup", "--json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id").to_string();
    d.run(r.path(), &["run", "--sync-only"]).await.expect(0);
    let daemon_id = d
        .client()
        .await
        .daemon
        .info(pb::InfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .daemon_id;
    let (dir, socket, state) = d.shutdown().await;

    // While the daemon is down: an orphan of ours (no lease holds it) and a stranger's sandbox.
    let engine = crabbox::sandbox::Engine::open(state.join("sandboxes")).expect("engine");
    let ours = BTreeMap::from([
        ("crabbox".to_string(), "true".to_string()),
        ("created_by".to_string(), "crabbox".to_string()),
        ("owner".to_string(), daemon_id.clone()),
        ("lease".to_string(), "cbx_0000000dead0".to_string()),
    ]);
    engine
        .create(
            "orphan",
            "orphan",
            ours,
            BTreeMap::new(),
            crabbox::sandbox::EngineState::Started,
        )
        .expect("orphan");
    let theirs = BTreeMap::from([
        ("crabbox".to_string(), "true".to_string()),
        ("owner".to_string(), "someone-else".to_string()),
    ]);
    engine
        .create(
            "stranger",
            "stranger",
            theirs,
            BTreeMap::new(),
            crabbox::sandbox::EngineState::Started,
        )
        .expect("stranger");

    let d = Daemon::start_in(
        dir,
        socket,
        state.clone(),
        |s| daemon::default_providers(s).expect("p"),
        |_| {},
    )
    .await;
    let list = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "ready");
    // The manifest survived: nothing to send.
    let doc = d
        .run(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["sync"]["files_uploaded"], 0);
    assert_eq!(doc["stdout"], "hello\n");
    eventually(20, "the orphan to be deleted", || async {
        (!state.join("sandboxes/orphan").exists()).then_some(())
    })
    .await;
    assert!(
        state.join("sandboxes/stranger").exists(),
        "a sandbox without our labels is never touched"
    );
}

/// Ends, when dropped, the daemon whose lock file (its pid first) is at the path.
struct StopsDaemon(std::path::PathBuf);

impl Drop for StopsDaemon {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_and_stops_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/d.sock");
    let state = dir.path().join("state");
    // The daemon the CLI starts outlives this test unless stopped: a failed assertion
    // below must not leave it running (it did).
    let _stops = StopsDaemon(dir.path().join("run/d.lock"));
    let r = repo();
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabbox"));
        c.current_dir(r.path())
            .env("CRABBOX_SOCKET", &socket)
            .env("CRABBOX_STATE_DIR", &state)
            .env("CRABBOX_CONFIG", "/dev/null")
            .env_remove("CRABBOX_NO_AUTOSTART")
            .args(args);
        c
    };
    let out = cli(&["daemon", "status"]).output().await.expect("ran");
    assert_eq!(out.status.code(), Some(1), "not running yet");
    // Any command autostarts it.
    let out = cli(&["run", "--", "echo", "auto"])
        .output()
        .await
        .expect("ran");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "auto\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("starting crabboxd"));
    assert!(
        state.join("crabboxd.log").exists(),
        "the background daemon logs to the state dir"
    );
    use std::os::unix::fs::PermissionsExt;
    let dir_mode = std::fs::metadata(socket.parent().expect("dir"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let out = cli(&["daemon", "status", "--json"])
        .output()
        .await
        .expect("ran");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["running"], true);
    let out = cli(&["daemon", "start"]).output().await.expect("ran");
    assert_eq!(out.status.code(), Some(0), "start is a no-op when running");
    // Its log: all of it, the recent part, and followed as it grows.
    let out = cli(&["daemon", "logs"]).output().await.expect("ran");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("crabboxd serving") && !text.contains('\u{1b}'),
        "{text}"
    );
    let out = cli(&["daemon", "logs", "--since", "1h"])
        .output()
        .await
        .expect("ran");
    assert!(String::from_utf8_lossy(&out.stdout).contains("crabboxd serving"));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let out = cli(&["daemon", "logs", "--since", "1s"])
        .output()
        .await
        .expect("ran");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("crabboxd serving"),
        "older lines are left out"
    );
    let mut follow = cli(&["daemon", "logs", "-f", "--since", "1s"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follow");
    let mut out = follow.stdout.take().expect("stdout");
    cli(&["warmup"]).output().await.expect("warmup");
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.contains("lease created") && std::time::Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(500), out.read(&mut buf)).await
        {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(seen.contains("lease created"), "followed: {seen}");
    let _ = follow.start_kill();
    // A daemon of another version is said to be one, with what to do.
    let lock = socket.with_extension("lock");
    let text = std::fs::read_to_string(&lock).expect("lock");
    let mut words = text.split_whitespace();
    let pid = words.next().expect("pid").to_string();
    assert_eq!(words.next(), Some(env!("CARGO_PKG_VERSION")), "{text}");
    std::fs::write(&lock, format!("{pid} 0.0.1-old")).expect("w");
    let out = cli(&["list"]).output().await.expect("ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crabboxd is version 0.0.1-old") && err.contains("crabbox daemon restart"),
        "{err}"
    );
    // Restart: a new daemon, of this version, and no warning.
    let out = cli(&["daemon", "restart", "--json"])
        .output()
        .await
        .expect("ran");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["stopped_pid"].to_string(), pid, "{st}");
    assert_ne!(st["pid"].to_string(), pid, "{st}");
    let out = cli(&["list"]).output().await.expect("ran");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
    let out = cli(&["daemon", "stop"]).output().await.expect("ran");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists(), "socket removed at shutdown");
    let out = cli(&["daemon", "status"]).output().await.expect("ran");
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_gets_a_bounded_clear_answer() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    // A 16,000-character name: a clear INVALID_ARGUMENT that does not echo it whole (it used
    // to break the answer with an h2 protocol error).
    let huge = "x".repeat(16_000);
    for e in [
        c.leases
            .get(pb::LeaseRef { name: huge.clone() })
            .await
            .expect_err("refused"),
        c.leases
            .stop(pb::LeaseRef { name: huge.clone() })
            .await
            .expect_err("refused"),
    ] {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains("too long") && e.message().len() < 400,
            "{}",
            e.message()
        );
    }
    // A relative repo root or an absurd ttl from any client: refused, nothing created.
    let e = c
        .leases
        .warmup(pb::WarmupRequest {
            repo_root: "relative/path".into(),
            ..Default::default()
        })
        .await
        .expect_err("relative root");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .leases
        .warmup(pb::WarmupRequest {
            ttl_secs: 360_000_000_000,
            ..Default::default()
        })
        .await
        .expect_err("absurd ttl");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("longer than the 30d"),
        "{}",
        e.message()
    );
    let list = c
        .leases
        .list(pb::ListRequest {
            all: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(list.leases.is_empty());
    // The CLI refuses the same before asking.
    let r = repo();
    let out = d.run(r.path(), &["warmup", "--ttl", "100000000h"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("at most"), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_sandbox_is_checked_before_an_incremental_sync() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let first = d
        .run(r.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_eq!(first["sync"]["files_uploaded"], 2);
    let (dir, socket, state) = d.shutdown().await;
    let restart = |dir, socket, state| {
        Daemon::start_in(
            dir,
            socket,
            state,
            |s| daemon::default_providers(s).expect("p"),
            |_| {},
        )
    };
    // Back, nothing touched: the sandbox's digest matches the store; nothing is sent.
    let d = restart(dir, socket, state).await;
    let again = d
        .run(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    if again["sync"]["files_uploaded"] != 0 {
        // Seen once in CI under load (a fresh lease instead of the recovered one): say what
        // became of the first lease.
        let all = d.run(r.path(), &["list", "--all", "--json"]).await;
        panic!(
            "the recovered lease was not reused: {again}\nleases: {}\n{}",
            all.stdout(),
            all.stderr()
        );
    }
    assert_eq!(again["stdout"], "hello\n");
    // Someone changed the sandbox's files while the daemon was down (its digest goes with
    // them, as a sync cut short leaves it): the next sync sends everything.
    let (dir, socket, state) = d.shutdown().await;
    let digests: Vec<_> = walk(&state.join("sandboxes"))
        .into_iter()
        .filter(|p| p.ends_with(".crabbox-manifest.digest"))
        .collect();
    assert_eq!(digests.len(), 1, "{digests:?}");
    let workdir = digests[0].parent().expect("workdir").to_path_buf();
    std::fs::write(workdir.join("README"), "tampered\n").expect("tamper");
    std::fs::remove_file(&digests[0]).expect("rm digest");
    let d = restart(dir, socket, state).await;
    let fixed = d
        .run(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(fixed["sync"]["files_uploaded"], 2, "a full sync: {fixed}");
    assert_eq!(fixed["stdout"], "hello\n");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages() {
    let d = Daemon::start().await;
    let repos: Vec<_> = (0..5).map(|_| repo()).collect();
    for (i, r) in repos.iter().enumerate() {
        let team = if i % 2 == 0 { "team=a" } else { "team=b" };
        d.run(r.path(), &["warmup", "--label", team])
            .await
            .expect(0);
    }
    let mut c = d.client().await;
    let list = |req: pb::ListRequest| {
        let mut c = c.clone();
        async move { c.leases.list(req).await }
    };
    // Pages of 2, oldest first, cover everything once.
    let mut seen = Vec::new();
    let mut req = pb::ListRequest {
        page_size: 2,
        ..Default::default()
    };
    loop {
        let page = list(req.clone()).await.expect("list").into_inner();
        assert!(page.leases.len() <= 2);
        seen.extend(page.leases.into_iter().map(|l| l.id));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    let unique: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 5);
    // Filters.
    let by_label = list(pb::ListRequest {
        labels: [("team".to_string(), "a".to_string())].into(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner();
    assert_eq!(by_label.leases.len(), 3);
    assert_eq!(
        by_label.leases[0].labels["lease"], by_label.leases[0].id,
        "full view"
    );
    // The basic view leaves crabbox's bookkeeping labels out, the user's in.
    let basic = list(pb::ListRequest {
        labels: [("team".to_string(), "a".to_string())].into(),
        view: pb::LeaseView::Basic as i32,
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner();
    assert_eq!(basic.leases.len(), 3);
    assert!(
        basic
            .leases
            .iter()
            .all(|l| l.labels.is_empty() && l.user_labels["team"] == "a")
    );
    let full_size: usize = by_label
        .leases
        .iter()
        .map(prost::Message::encoded_len)
        .sum();
    let basic_size: usize = basic.leases.iter().map(prost::Message::encoded_len).sum();
    assert!(
        basic_size * 2 < full_size,
        "basic {basic_size} B vs full {full_size} B"
    );
    let root = std::fs::canonicalize(repos[1].path()).expect("canonical");
    let by_repo = list(pb::ListRequest {
        repo_root: root.to_string_lossy().into_owned(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner();
    assert_eq!(by_repo.leases.len(), 1);
    assert_eq!(by_repo.leases[0].repo_root, root.to_string_lossy());
    let ready = list(pb::ListRequest {
        states: vec!["ready".into()],
        provider: "local".into(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner();
    assert_eq!(ready.leases.len(), 5);
    // Bad input is named.
    let e = list(pb::ListRequest {
        states: vec!["warm".into()],
        ..Default::default()
    })
    .await
    .expect_err("unknown state");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("ready"), "{}", e.message());
    let e = list(pb::ListRequest {
        page_token: "garbage".into(),
        ..Default::default()
    })
    .await
    .expect_err("bad token");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The CLI.
    let out = d
        .run(
            repos[0].path(),
            &["list", "--json", "--label", "team=b", "--limit", "1"],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(out.as_array().map(Vec::len), Some(1));
    // --provider filters, before or after `list`.
    for args in [
        &["list", "--json", "--provider", "local"][..],
        &["--provider", "local", "list", "--json"],
    ] {
        let out = d.run(repos[0].path(), args).await.expect(0).json();
        assert_eq!(out.as_array().map(Vec::len), Some(5), "{args:?}");
    }
    let out = d
        .run(
            repos[0].path(),
            &["list", "--json", "--provider", "daytona"],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(out.as_array().map(Vec::len), Some(0), "no daytona lease");
    let out = d
        .run(repos[0].path(), &["list", "--label", "team"])
        .await
        .expect(2);
    assert!(out.stderr().contains("KEY=VALUE"), "{}", out.stderr());
    let info = c
        .daemon
        .info(pb::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.lease_counts.get("ready"), Some(&5));
}

/// A program on PATH, or where Debian puts it.
fn find_program(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/lib/systemd").join(name)])
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_and_readiness_work_as_systemd_does_them() {
    let activate = find_program("systemd-socket-activate")
        .expect("systemd-socket-activate (the systemd package; ./test.sh installs it)");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&run)
        .expect("run dir");
    let socket = run.join("d.sock");
    let state = dir.path().join("state");
    // systemd's readiness socket, as Type=notify services get it.
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify");
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut child = tokio::process::Command::new(&activate)
        .arg("-l")
        .arg(&socket)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("CRABBOX_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate");
    // The socket exists before any daemon runs; the first connection starts it.
    eventually(10, "the activation socket", || async {
        socket.exists().then_some(())
    })
    .await;
    let r = repo();
    let out = common::cli_at(&socket, r.path())
        .args(["run", "--", "echo", "activated"])
        .output()
        .await
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "activated\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    let _ = child.start_kill();
    let _ = child.wait().await;
    // The units in deploy/ pass systemd-analyze verify (with ExecStart at this build).
    if let Some(analyze) = find_program("systemd-analyze") {
        let units = tempfile::tempdir().expect("units");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
        let service = std::fs::read_to_string(root.join("crabboxd.service"))
            .expect("service")
            .replace("%h/.cargo/bin/crabboxd", env!("CARGO_BIN_EXE_crabboxd"));
        std::fs::write(units.path().join("crabboxd.service"), service).expect("w");
        std::fs::copy(
            root.join("crabboxd.socket"),
            units.path().join("crabboxd.socket"),
        )
        .expect("cp");
        let out = std::process::Command::new(analyze)
            .current_dir(units.path())
            .args(["verify", "./crabboxd.socket", "./crabboxd.service"])
            .output()
            .expect("verify");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_file_rotates_and_logs_follows_it_without_losing_a_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("d.sock");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    let log = state.join("crabboxd.log");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .arg("--log-file")
        .arg(&log)
        .args(["--log-max-size", "3KB"])
        .env("CRABBOX_CONFIG", "/dev/null")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("crabboxd");
    eventually(10, "the socket", || async { socket.exists().then_some(()) }).await;
    let r = repo();
    let cli = |args: &[&str]| {
        let mut c = common::cli_at(&socket, r.path());
        c.env("CRABBOX_STATE_DIR", &state).args(args);
        c
    };
    let mut follow = cli(&["daemon", "logs", "-f"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follow");
    let mut followed = follow.stdout.take().expect("stdout");
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(3), followed.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let runs = 12;
    for i in 0..runs {
        let out = cli(&["run", "--", "echo", &format!("run{i}")])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let seen = reader.await.expect("reader");
    let _ = follow.start_kill();
    // Rotated: the file stays small, older ones beside it.
    let size = std::fs::metadata(&log).expect("log").len();
    assert!(size <= 4096, "rotated at its size: {size}");
    assert!(state.join("crabboxd.log.1").exists(), "an older file kept");
    assert!(!state.join("crabboxd.log.6").exists(), "at most 5 kept");
    // Followed through every rotation: every lease's creation, once each.
    assert_eq!(
        seen.matches("lease created").count(),
        runs,
        "every line once:\n{seen}"
    );
    // --since reads the rotated files too.
    let out = cli(&["daemon", "logs", "--since", "1h"])
        .output()
        .await
        .expect("logs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("lease created").count() >= runs / 2, "{text}");
    assert!(!text.contains('\u{1b}'), "no ANSI in a log file");
    let _ = daemon.start_kill();
    let out = daemon.wait_with_output().await.expect("wait");
    assert!(
        out.stderr.is_empty(),
        "everything went to the file: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_log_goes_to_the_journal_with_priorities_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("d.sock");
    // systemd connects stderr to the journal and names that stream in JOURNAL_STREAM.
    let journal = dir.path().join("journal");
    let file = std::fs::File::create(&journal).expect("journal");
    let meta = file.metadata().expect("meta");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("CRABBOX_CONFIG", "/dev/null")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("crabboxd");
    eventually(10, "the serving line", || async {
        std::fs::read_to_string(&journal)
            .ok()
            .filter(|t| t.contains("crabboxd serving"))
    })
    .await;
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
    let text = std::fs::read_to_string(&journal).expect("read");
    let serving = text
        .lines()
        .find(|l| l.contains("crabboxd serving"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(serving.starts_with("<6>"), "info is priority 6: {serving}");
    assert!(
        !serving.contains("INFO")
            && !serving.contains(&format!("{}-", 2026))
            && !serving.contains('\u{1b}'),
        "no level word, no time of our own, no colour: {serving}"
    );
}
