//! `--provider daytona` end to end through daytona-sim (never the real Daytona): the real
//! daemon in-process with the daytona provider pointed at an in-process sim, the real CLI,
//! a real OpenSSH client, and faults injected into the sim.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Daemon, Out, eventually, repo};
use crabbox::daemon::{self, Providers};
use crabbox::provider::daytona::client::Credentials;
use crabbox::provider::daytona::{DaytonaProvider, DaytonaSettings, auth};
use crabbox::sim::{self, Sim, SimConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const KEY: &str = "dtn_integration_0f1e2d3c4b5a";

/// Every log line of this test binary, at trace level (the daemon runs in-process).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut v) = self.0.lock() {
                    v.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = buf.clone();
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || W(writer.clone()))
                    .with_ansi(false)
                    // What crabboxd does with RUST_LOG=trace.
                    .with_filter(crabbox::logging::secret_safe(
                        tracing_subscriber::EnvFilter::new("trace"),
                    )),
            )
            // As crabboxd relays a lease's steps to `crabbox -v`.
            .with(crabbox::relay::Relay)
            .try_init();
        buf
    })
}

struct World {
    sim: Arc<Sim>,
    sim_url: String,
    /// The daemon's Prometheus endpoint.
    metrics_url: String,
    daemon: Daemon,
    http: reqwest::Client,
    _sim_dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        common::end_sandboxes_under(self.sim.engine.root());
    }
}

async fn world(provision_deadline: Duration) -> World {
    world_with_key(provision_deadline, KEY).await
}

/// A world whose daemon holds `key` (the sim accepts only [`KEY`]).
async fn world_with_key(provision_deadline: Duration, key: &'static str) -> World {
    world_with(provision_deadline, key, Vec::new()).await
}

/// A world whose daemon never sweeps while a test counts requests (the tests' daemons
/// sweep every 100 ms, and every sixth sweep asks the provider about each lease: a
/// request of its own in whatever window a slow run spans).
async fn quiet_world() -> World {
    world_tweaked(Duration::from_secs(60), KEY, Vec::new(), |c| {
        c.sweep_interval = Duration::from_secs(3600);
    })
    .await
}

/// A world whose daemon keeps these warm pools.
async fn world_with(
    provision_deadline: Duration,
    key: &'static str,
    pools: Vec<crabbox::config::PoolSettings>,
) -> World {
    world_tweaked(provision_deadline, key, pools, |_| {}).await
}

async fn world_tweaked(
    provision_deadline: Duration,
    key: &'static str,
    pools: Vec<crabbox::config::PoolSettings>,
    tweak: impl FnOnce(&mut crabbox::daemon::DaemonConfig),
) -> World {
    logs();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let mut config = SimConfig::new(sim_dir.path().to_path_buf());
    config.api_keys = vec![KEY.into()];
    config.create_delay = Duration::from_millis(50);
    config.start_delay = Duration::from_millis(50);
    let ssh = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    config.ssh_port = Some(ssh.local_addr().expect("addr").port());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stop = CancellationToken::new();
    let (sim, addr, _) = sim::start(config, listener, stop.clone())
        .await
        .expect("sim");
    sim.preload_snapshots(&["default".into()]);
    sim::ssh::start(sim.clone(), ssh).expect("gateway");
    let sim_url = format!("http://{addr}");
    let api = format!("{sim_url}/api");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let metrics_url = format!("http://{}/metrics", metrics.local_addr().expect("addr"));
    let metrics = Arc::new(metrics);
    let daemon = Daemon::start_with(
        move |state| {
            let mut p: Providers = daemon::default_providers(state).expect("local");
            let settings = DaytonaSettings {
                api_url: api,
                snapshot: Some("default".into()),
                ..DaytonaSettings::default()
            };
            let d = DaytonaProvider::new(
                settings,
                auth::Resolved::Found(Credentials::ApiKey(secrecy::SecretString::from(key))),
            )
            .expect("provider");
            p.insert("daytona".into(), Arc::new(d));
            p
        },
        |c| {
            c.provision_deadline = provision_deadline;
            c.pools = pools;
            c.metrics = Some(metrics);
            tweak(c);
        },
    )
    .await;
    World {
        sim,
        sim_url,
        metrics_url,
        daemon,
        http: reqwest::Client::new(),
        _sim_dir: sim_dir,
        stop,
    }
}

impl World {
    async fn cb(&self, cwd: &Path, args: &[&str]) -> Out {
        let mut all = vec!["--provider", "daytona"];
        all.extend_from_slice(args);
        let out = self.daemon.run(cwd, &all).await;
        for text in [out.stdout(), out.stderr()] {
            assert!(
                !text.contains(KEY),
                "the API key leaked into CLI output:\n{text}"
            );
        }
        out
    }

    async fn faults(&self, f: Value) {
        let r = self
            .http
            .post(format!("{}/_sim/faults", self.sim_url))
            .json(&f)
            .send()
            .await
            .expect("faults");
        assert!(r.status().is_success());
    }

    async fn get_faults(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/_sim/faults", self.sim_url))
            .send()
            .await
            .expect("get");
        r.json().await.expect("json")
    }

    fn sim_sandboxes(&self) -> Vec<(String, String)> {
        self.sim
            .sandboxes
            .lock()
            .map(|m| {
                m.values()
                    .map(|s| (s.id.clone(), s.state.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_on_daytona_with_no_secret_in_any_output() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let out = w.cb(r.path(), &["warmup"]).await.expect(0);
    assert!(
        out.stdout().contains("provider=daytona"),
        "{}",
        out.stdout()
    );
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    let sandbox = lease["sandbox_id"]
        .as_str()
        .expect("sandbox id")
        .to_string();
    assert_eq!(lease["crabbox_labels"]["provider"], "daytona");
    assert!(
        w.sim_sandboxes()
            .iter()
            .any(|(id, st)| id == &sandbox && st == "started")
    );
    // The sandbox carries SPEC's labels on Daytona's side.
    let labels = w.sim.sandboxes.lock().expect("lock")[&sandbox]
        .labels
        .clone();
    assert_eq!(
        labels.get("lease").map(String::as_str),
        lease["id"].as_str()
    );
    assert_eq!(
        labels.get("created_by").map(String::as_str),
        Some("crabbox")
    );

    let out = w
        .cb(
            r.path(),
            &[
                "run",
                "--",
                "sh",
                "-c",
                "pwd; cat README; echo to-err >&2; exit 3",
            ],
        )
        .await
        .expect(3);
    let pwd = format!(
        "/home/daytona/crabbox/{}/",
        lease["id"].as_str().expect("id")
    );
    assert!(
        out.stdout().starts_with(&pwd) && out.stdout().ends_with("hello\n"),
        "{}",
        out.stdout()
    );
    assert!(out.stderr().contains("to-err"));
    let doc = w
        .cb(
            r.path(),
            &[
                "run",
                "--json",
                "--env",
                "CBX_V=x y",
                "--",
                "sh",
                "-c",
                "echo $CBX_V",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "x y\n");
    assert_eq!(
        doc["sync"]["files_uploaded"], 0,
        "incremental: nothing changed"
    );
    std::fs::write(r.path().join("README"), "changed\n").expect("write");
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(
        (
            doc["stdout"].as_str(),
            doc["sync"]["files_uploaded"].as_u64()
        ),
        (Some("changed\n"), Some(1))
    );
    // The workdir keeps the digest of what it holds (the daemon keeps the manifest): a
    // 64-digit hex BLAKE3, new after a change.
    let digest_args = ["run", "--no-sync", "--", "cat", ".crabbox-manifest.digest"];
    let before = w.cb(r.path(), &digest_args).await.expect(0).stdout();
    assert!(
        before.len() == 64 && before.bytes().all(|b| b.is_ascii_hexdigit()),
        "{before:?}"
    );
    std::fs::write(r.path().join("probe.txt"), "a new file\n").expect("write");
    w.cb(r.path(), &["run", "--sync-only"]).await.expect(0);
    let after = w.cb(r.path(), &digest_args).await.expect(0).stdout();
    assert!(after.len() == 64 && after != before, "{before} -> {after}");

    // ssh: --print redacts; with --show-secret, the command runs a real OpenSSH client
    // through the sim's gateway.
    let printed = w.cb(r.path(), &["ssh", "--print"]).await.expect(0).stdout();
    assert!(printed.contains("<redacted>@127.0.0.1"), "{printed}");
    let cmd = w
        .daemon
        .run(
            r.path(),
            &["--provider", "daytona", "ssh", "--print", "--show-secret"],
        )
        .await
        .expect(0)
        .stdout();
    // `ssh [options] TOKEN@HOST 'cd CHECKOUT ...; exec $SHELL -l'`: keep it up to the
    // target and run a command of our own there.
    let mut words = shlex::split(&cmd).expect("a shell command line");
    let at = words
        .iter()
        .position(|w| w.contains('@'))
        .expect("user@host");
    words.truncate(at + 1);
    let token = words[at].split('@').next().expect("token").to_string();
    words.extend(
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .map(String::from),
    );
    let repo_name = std::fs::canonicalize(r.path())
        .expect("canonical")
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    words.push(format!(
        "cat crabbox/{}/{repo_name}/README",
        lease["id"].as_str().expect("id")
    ));
    let ssh = tokio::process::Command::new(&words[0])
        .args(&words[1..])
        .output()
        .await
        .expect("ssh");
    assert_eq!(
        String::from_utf8_lossy(&ssh.stdout),
        "changed\n",
        "{}",
        String::from_utf8_lossy(&ssh.stderr)
    );
    // `crabbox ssh -- CMD` runs the command in the lease's checkout, through the real
    // OpenSSH client (a fresh known_hosts: the gateway is trusted on first use).
    let home = tempfile::tempdir().expect("home");
    let out = w
        .daemon
        .cli(r.path())
        .env("HOME", home.path())
        .args([
            "--provider",
            "daytona",
            "ssh",
            "--ttl",
            "30m",
            "--",
            "cat",
            "README",
        ])
        .output()
        .await
        .expect("ssh");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "changed\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway's key went to crabbox's own known_hosts, not to the user's (which
    // OpenSSH finds through the passwd entry, whatever HOME says).
    // (Looked up with ssh-keygen -F: Debian's ssh_config hashes the names.)
    let port = words[words.iter().position(|w| w == "-p").expect("-p") + 1].clone();
    let gateway = format!("[127.0.0.1]:{port}");
    let knows = |file: &Path| {
        file.exists()
            && std::process::Command::new("ssh-keygen")
                .arg("-F")
                .arg(&gateway)
                .arg("-f")
                .arg(file)
                .output()
                .expect("ssh-keygen")
                .status
                .success()
    };
    assert!(
        knows(&w.daemon.state.join("known_hosts")),
        "{gateway} is not in crabbox's known_hosts"
    );
    if let Ok(Some(me)) = nix::unistd::User::from_uid(nix::unistd::getuid()) {
        assert!(
            !knows(&me.dir.join(".ssh/known_hosts")),
            "{gateway} was added to the user's known_hosts"
        );
    }
    // While `crabbox ssh` runs, the token is in no process's argv (other local users can
    // read every /proc/PID/cmdline).
    let mut running = w
        .daemon
        .cli(r.path())
        .env("HOME", home.path())
        .args(["--provider", "daytona", "ssh", "--", "sleep", "2"])
        .spawn()
        .expect("ssh");
    let mut saw_ssh = false;
    for _ in 0..100 {
        for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(&token), "the token is in argv: {cmdline}");
            saw_ssh |= cmdline.starts_with("ssh -F ");
        }
        if saw_ssh {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_ssh, "ssh ran with a private config");
    assert!(running.wait().await.expect("ssh").success());
    let out = w.cb(r.path(), &["ssh", "--ttl", "45", "--print"]).await;
    assert_eq!(out.code(), 2, "a bare number is not a duration");
    let doctor = w.cb(r.path(), &["doctor", "--json"]).await.expect(0).json();
    assert_eq!(doctor["ok"], true, "{doctor}");

    let list = w.cb(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(list[0]["provider"], "daytona");
    w.cb(r.path(), &["stop", lease["slug"].as_str().expect("slug")])
        .await
        .expect(0);
    eventually(10, "the sandbox to be deleted on Daytona", || async {
        w.sim_sandboxes()
            .iter()
            .all(|(id, _)| id != &sandbox)
            .then_some(())
    })
    .await;

    // Nothing secret in the daemon's trace-level log.
    let text = String::from_utf8_lossy(&logs().lock().expect("logs")).into_owned();
    assert!(text.len() > 1000, "trace logging was captured");
    let leaks: Vec<&str> = text.lines().filter(|l| l.contains(KEY)).take(3).collect();
    assert!(
        leaks.is_empty(),
        "the API key leaked into the daemon log:\n{}",
        leaks.join("\n")
    );
    let leaks: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&token))
        .take(4)
        .collect();
    assert!(
        leaks.is_empty(),
        "the SSH token leaked into the daemon log:\n{}",
        leaks.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_and_class_are_clear() {
    let d = Daemon::start_with(
        |state| {
            let mut p = daemon::default_providers(state).expect("local");
            let prov = DaytonaProvider::new(DaytonaSettings::default(), auth::Resolved::Missing)
                .expect("provider");
            p.insert("daytona".into(), Arc::new(prov));
            p
        },
        |_| {},
    )
    .await;
    let r = repo();
    let out = d.run(r.path(), &["--provider", "daytona", "warmup"]).await;
    assert_eq!(out.code(), 3, "{}", out.stderr());
    let err = out.stderr();
    assert!(
        err.contains("CRABBOX_DAYTONA_API_KEY")
            && err.contains("DAYTONA_API_KEY")
            && err.contains("DAYTONA_JWT_TOKEN"),
        "{err}"
    );
    let out = d
        .run(
            r.path(),
            &[
                "--provider",
                "daytona",
                "run",
                "--class",
                "big",
                "--",
                "true",
            ],
        )
        .await
        .crabbox_failed("usage");
    assert!(out.stderr().contains("sized by their snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_and_503s_are_ridden_out() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.faults(json!({"rate_limit_count": 12, "retry_after_secs": 0}))
        .await;
    w.cb(r.path(), &["warmup"]).await.expect(0);
    w.faults(json!({"error_rate": 0.05})).await;
    for i in 0..4 {
        std::fs::write(r.path().join("n.txt"), i.to_string()).expect("write");
        let doc = w
            .cb(r.path(), &["run", "--json", "--", "cat", "n.txt"])
            .await
            .expect(0)
            .json();
        assert_eq!(doc["stdout"], i.to_string());
    }
    w.faults(json!({"error_rate": 0.0})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_upload_is_sent_again() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    w.faults(json!({"drop_next": 1, "drop_path": "upload-v2"}))
        .await;
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "hello\n");
    let f = w.get_faults().await;
    assert_eq!(f["drop_next"], 0, "the drop happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_in_error_fails_its_lease() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    let id = lease["id"].as_str().expect("id").to_string();
    w.faults(json!({"sandbox_error": lease["sandbox_id"], "error_reason": "runner lost"}))
        .await;
    let st = eventually(20, "the lease to fail", || async {
        let st = w.cb(r.path(), &["status", &id, "--json"]).await.json();
        (st["state"] == "failed").then_some(st)
    })
    .await;
    assert!(
        st["reason"]
            .as_str()
            .expect("reason")
            .contains("runner lost"),
        "{st}"
    );
    eventually(10, "the broken sandbox to be deleted", || async {
        w.sim_sandboxes().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_slower_than_the_deadline_fails_and_leaks_nothing() {
    let w = world(Duration::from_secs(1)).await;
    let r = repo();
    w.faults(json!({"stuck_create": true})).await;
    let out = w.cb(r.path(), &["warmup"]).await.expect(5);
    assert!(
        out.stderr().contains("not started after"),
        "{}",
        out.stderr()
    );
    eventually(10, "the stuck sandbox to be deleted", || async {
        w.sim_sandboxes().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_cli_mid_run_stops_the_remote_command() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    let sandbox = lease["sandbox_id"].as_str().expect("sandbox").to_string();
    let mut child = w
        .daemon
        .cli(r.path())
        .args([
            "--provider",
            "daytona",
            "run",
            "--",
            "sh",
            "-c",
            "echo $$ > $HOME/cmd.pid; sleep 60",
        ])
        .spawn()
        .expect("spawn");
    let pidfile = w.sim.engine.dir(&sandbox).join("fs/home/daytona/cmd.pid");
    let pid: i32 = eventually(30, "the remote command to start", || async {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await;
    child.kill().await.expect("kill -9 the CLI");
    common::process_ends(20, "the remote command to be stopped", pid).await;
    // The lease itself stays (it was warmed up, not fresh) and is usable again.
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "echo", "again"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_the_daemon_writes_into_the_clients_pipe_is_exact_and_a_closed_pipe_stops_the_command()
 {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    let sandbox = lease["sandbox_id"].as_str().expect("sandbox").to_string();
    // stdout is a pipe here (not a terminal): the CLI hands it to the daemon, which writes
    // the command's output into it itself. Binary, large, with stderr apart (without the
    // bytes 1 and 2, whose runs of three are Daytona's stream markers: its log stream
    // cannot carry them, a limit of its protocol).
    let out = w
        .cb(
            r.path(),
            &[
                "run",
                "--",
                "sh",
                "-c",
                "head -c 3100000 /dev/urandom | tr -d '\\001\\002' | head -c 3000000 > $HOME/out.bin; \
                 cat $HOME/out.bin; echo apart >&2",
            ],
        )
        .await
        .expect(0);
    let file = std::fs::read(w.sim.engine.dir(&sandbox).join("fs/home/daytona/out.bin"))
        .expect("the sandbox's file");
    assert_eq!(file.len(), 3_000_000);
    assert!(
        out.0.stdout == file,
        "stdout differs from the bytes the command wrote"
    );
    assert!(out.stderr().contains("apart\n"), "{}", out.stderr());
    // A reader that goes away (`crabbox run -- yes | head -1`): the command meets what it
    // would meet writing into that pipe itself, SIGPIPE, and ends; it does not run on.
    // Both when the daemon writes into the pipe and when the output comes through the CLI
    // (which a stall watchdog needs).
    for extra in [&[][..], &["--stall-timeout", "10m"][..]] {
        let pidfile = w.sim.engine.dir(&sandbox).join("fs/home/daytona/yes.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut child = w
            .daemon
            .cli(r.path())
            .args(["--provider", "daytona", "run"])
            .args(extra)
            .args(["--", "sh", "-c", "echo $$ > $HOME/yes.pid; exec yes"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut first = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut first)
            .await
            .expect("the first line");
        assert_eq!(&first, b"y\n");
        drop(stdout);
        let ended = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("{extra:?}: crabbox ran on after its stdout's reader had gone")
            })
            .expect("wait");
        let stderr = String::from_utf8_lossy(&ended.stderr);
        assert_eq!(
            ended.status.code(),
            Some(141),
            "{extra:?}: stderr: {stderr}"
        );
        assert!(stderr.contains("SIGPIPE"), "{extra:?}: {stderr}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        common::process_ends(20, "the remote command to be stopped", pid).await;
    }
    // The lease goes on (a new session for the next command).
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "echo", "again"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "again\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_the_sandbox_could_not_keep_fails_the_run_rather_than_pass_for_whole() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    // The sandbox's disk fills up under a chatty command: its log keeps 100 kB of 300.
    w.faults(json!({"log_limit_bytes": 100_000})).await;
    for extra in [&[][..], &["--json"][..]] {
        let out = w
            .cb(
                r.path(),
                &[
                    &["run"][..],
                    extra,
                    &["--", "head", "-c", "300000", "/dev/zero"],
                ]
                .concat(),
            )
            .await;
        assert_ne!(out.code(), 0, "{extra:?}: a short log passed for the whole");
        let said = format!("{}{}", out.stdout(), out.stderr());
        assert!(
            said.contains("output may be incomplete") && said.contains("the log is full"),
            "{extra:?}: {said}"
        );
    }
    // With room again, the same run is whole.
    w.faults(json!({"log_limit_bytes": 0})).await;
    let out = w
        .cb(
            r.path(),
            &["run", "--", "head", "-c", "300000", "/dev/zero"],
        )
        .await
        .expect(0);
    assert_eq!(out.0.stdout.len(), 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_was_lost_is_recovered_not_resent() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    // The create is served, then its answer is lost.
    w.faults(json!({"drop_next": 1, "drop_path": "POST /api/sandbox"}))
        .await;
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    let sandboxes = w.sim_sandboxes();
    assert_eq!(sandboxes.len(), 1, "exactly one sandbox: {sandboxes:?}");
    assert_eq!(lease["sandbox_id"].as_str(), Some(sandboxes[0].0.as_str()));
    let f = w.get_faults().await;
    assert_eq!(f["drop_next"], 0, "the create's answer was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_builds_its_image_once_and_reports_a_failed_build() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let cfg = r.path().join("env.yaml");
    std::fs::write(
        &cfg,
        "provider: daytona\nenvironment:\n  image: { dockerfile: \"FROM python:3.12-slim\\nRUN true\\n\" }\n  \
         resources: { cpu: 2, memory: 4GB, disk: 10GB }\n  network: { mode: cidr_allow_list, allow: [\"10.0.0.0/8\"] }\n  \
         lifecycle: { auto_stop: 2h }\n  labels: { team: platform }\n",
    )
    .expect("write");
    let cli = |args: &[&str]| {
        let mut c = w.daemon.cli(r.path());
        c.env("CRABBOX_CONFIG", &cfg).args(args);
        c
    };
    // doctor names the snapshot the image resolves to, before and after it is built.
    let snapshot_check = |out: std::process::Output| -> String {
        let doc: Value = serde_json::from_slice(&out.stdout).expect("doctor json");
        doc["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["check"] == "daytona snapshot"))
            .and_then(|c| c["detail"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let before = snapshot_check(cli(&["doctor", "--json"]).output().await.expect("ran"));
    assert!(
        before.starts_with("crabbox-env-") && before.contains("does not exist yet"),
        "{before}"
    );
    let out = cli(&["warmup", "--json"]).output().await.expect("ran");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lease: Value = serde_json::from_slice(&out.stdout).expect("json");
    let after = snapshot_check(cli(&["doctor", "--json"]).output().await.expect("ran"));
    assert!(
        after.ends_with("(from environment.image) is active"),
        "{after}"
    );
    assert_eq!(
        after.split(' ').next(),
        before.split(' ').next(),
        "the same snapshot"
    );
    let snapshots: Vec<(String, String)> = w
        .sim
        .snapshots
        .lock()
        .expect("lock")
        .values()
        .filter(|s| s.name.starts_with("crabbox-env-"))
        .map(|s| (s.name.clone(), s.state.clone()))
        .collect();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(snapshots[0].1, "active");
    let sb =
        w.sim.sandboxes.lock().expect("lock")[lease["sandbox_id"].as_str().expect("id")].clone();
    assert_eq!(sb.snapshot.as_deref(), Some(snapshots[0].0.as_str()));
    assert_eq!(
        (sb.cpu, sb.memory, sb.disk),
        (2, 4, 10),
        "the snapshot carries the resources"
    );
    assert_eq!(sb.network_allow_list.as_deref(), Some("10.0.0.0/8"));
    assert_eq!(sb.auto_stop_interval, 120);
    assert_eq!(sb.labels.get("team").map(String::as_str), Some("platform"));
    // The same environment again: the image is found, not built again.
    let out = cli(&["stop", lease["id"].as_str().expect("id")])
        .output()
        .await
        .expect("ran");
    assert_eq!(out.status.code(), Some(0));
    let out = cli(&["warmup"]).output().await.expect("ran");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = w
        .sim
        .snapshots
        .lock()
        .expect("lock")
        .values()
        .filter(|s| s.name.starts_with("crabbox-env-"))
        .count();
    assert_eq!(count, 1, "built once");

    // A Dockerfile that cannot build: the lease fails with Daytona's reason.
    let other = repo();
    let bad = other.path().join("env.yaml");
    std::fs::write(
        &bad,
        "provider: daytona\nenvironment:\n  image: { dockerfile: \"RUN echo no base image\" }\n",
    )
    .expect("write");
    let out = w
        .daemon
        .cli(other.path())
        .env("CRABBOX_CONFIG", &bad)
        .args(["warmup"])
        .output()
        .await
        .expect("ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("failed") && err.contains("FROM"), "{err}");
    // Bad environment config is a usage error.
    std::fs::write(
        &bad,
        "provider: daytona\nenvironment:\n  network: { mode: sometimes }\n",
    )
    .expect("write");
    let out = w
        .daemon
        .cli(other.path())
        .env("CRABBOX_CONFIG", &bad)
        .args(["warmup"])
        .output()
        .await
        .expect("ran");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cidr_allow_list"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_whose_provisioning_fails_is_told_and_released() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    // Every request fails: provisioning fails, the CLI is told, and once the provider
    // answers again the lease is released (it used to stay `releasing` for good).
    w.faults(json!({"error_rate": 1.0})).await;
    let out = w.cb(r.path(), &["run", "--", "true"]).await;
    assert_eq!(out.code(), 125, "{}", out.stderr());
    assert!(
        out.stderr().contains("error [provisioning]"),
        "{}",
        out.stderr()
    );
    w.faults(json!({"error_rate": 0.0})).await;
    eventually(60, "the failed fresh lease to be released", || {
        all_released(&w, r.path(), 1)
    })
    .await;

    // A snapshot that does not exist: told at once, released, nothing left on the provider.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        w.cb(
            r.path(),
            &["--daytona-snapshot", "no-such-snap", "run", "--", "true"],
        ),
    )
    .await
    .expect("the CLI is told, not left waiting");
    assert_eq!(out.code(), 125, "{}", out.stderr());
    assert!(
        out.stderr().contains("error [provisioning]"),
        "{}",
        out.stderr()
    );
    assert!(out.stderr().contains("no-such-snap"), "{}", out.stderr());
    eventually(20, "the second lease to be released", || {
        all_released(&w, r.path(), 2)
    })
    .await;
    assert!(w.sim_sandboxes().is_empty(), "{:?}", w.sim_sandboxes());
}

/// `Some` when the daemon knows exactly `n` leases and all are released.
async fn all_released(w: &World, cwd: &Path, n: usize) -> Option<()> {
    let all = w.cb(cwd, &["list", "--all", "--json"]).await.json();
    let leases = all.as_array().cloned().unwrap_or_default();
    (leases.len() == n && leases.iter().all(|l| l["state"] == "released")).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_the_unpack_step_is_repeated_safely() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    w.cb(r.path(), &["run", "--", "true"]).await.expect(0);
    // A change and a deletion: the sync uploads the archive, then one execute removes and
    // unpacks, whose answer is lost after it ran: it is sent again, and the repeat must not
    // delete what the first one unpacked.
    std::fs::write(r.path().join("README"), "changed\n").expect("write");
    std::fs::remove_file(r.path().join("src/lib.txt")).expect("rm");
    w.faults(json!({"drop_next": 1, "drop_path": "process/execute"}))
        .await;
    let doc = w
        .cb(
            r.path(),
            &[
                "run",
                "--json",
                "--",
                "sh",
                "-c",
                "cat README; ls src | wc -l",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "changed\n0\n");
    let f = w.get_faults().await;
    assert_eq!(f["drop_next"], 0, "the unpack's answer was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stream_handshake_rides_out_drops_and_429s() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    // A dropped connection on the handshake ("Handshake not finished") is transient.
    w.faults(json!({"drop_next": 1, "drop_path": "/logs"}))
        .await;
    let doc = w
        .cb(
            r.path(),
            &["run", "--json", "--no-sync", "--", "echo", "hello"],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "hello\n");
    assert_eq!(w.get_faults().await["drop_next"], 0, "the drop happened");
    // A burst of 429s on the handshake is waited out like on any other call.
    w.faults(json!({"rate_limit_count": 8, "retry_after_secs": 0, "rate_limit_path": "/logs"}))
        .await;
    let doc = w
        .cb(
            r.path(),
            &["run", "--json", "--no-sync", "--", "echo", "again"],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "again\n");
    assert_eq!(
        w.get_faults().await["rate_limit_count"],
        0,
        "all 8 were answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_refused_with_503_twice_is_sent_again_once_absence_is_confirmed() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.faults(json!({"error_next": 2, "error_path": "POST /api/sandbox"}))
        .await;
    w.cb(r.path(), &["warmup"]).await.expect(0);
    assert_eq!(
        w.get_faults().await["error_next"],
        0,
        "both 503s were answered"
    );
    assert_eq!(w.sim_sandboxes().len(), 1, "exactly one sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_is_an_auth_error_everywhere() {
    let w = world_with_key(Duration::from_secs(60), "dtn_wrong_key_0000").await;
    let r = repo();
    for args in [&["warmup"][..], &["run", "--", "true"]] {
        let out = w.cb(r.path(), args).await;
        // warmup keeps SPEC's code; run says crabbox failed (125) and that it was auth.
        let want = if args[0] == "run" { 125 } else { 3 };
        assert_eq!(out.code(), want, "{args:?}: {}", out.stderr());
        assert!(
            args[0] != "run" || out.stderr().contains("error [auth]"),
            "{}",
            out.stderr()
        );
        assert!(
            !out.stderr().contains("dtn_wrong_key_0000"),
            "{}",
            out.stderr()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_command_is_stopped_on_daytona_too() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    let out = w
        .cb(
            r.path(),
            &[
                "run",
                "--no-sync",
                "--stall-timeout",
                "1s",
                "--",
                "sh",
                "-c",
                "echo a; sleep 30",
            ],
        )
        .await
        .expect(124);
    assert_eq!(out.stdout(), "a\n");
    assert!(
        out.stderr().contains("printed nothing for 1s"),
        "{}",
        out.stderr()
    );
    // The lease is usable at once: the stalled command is gone.
    let out = w
        .cb(r.path(), &["run", "--no-sync", "--", "echo", "next"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "next\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_forwarded_byte_exact_with_eof_unless_n() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::stdio::stdin_is_forwarded_byte_exact_with_eof_unless_n(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_run_behaves_like_a_terminal() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    common::tty::tty_run_behaves_like_a_terminal(&w.daemon, r.path(), &["--provider", "daytona"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_server_in_the_sandbox_is_a_stdio_transport() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::stdio::mcp_round_trips_through_a_fresh_run(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fed_forever_ends_cleanly_when_its_lease_is_stopped() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::stdio::a_run_fed_forever_ends_cleanly_when_its_lease_is_stopped(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_told_by_the_events_channel() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    // The provider connected once and was told of its sandbox's moves.
    let stats = w.sim.events.stats();
    assert_eq!(stats["connected"], 1, "{stats}");
    assert!(stats["delivered"].as_u64() >= Some(2), "{stats}");
    // A second lease rides the same link.
    let r2 = repo();
    w.cb(r2.path(), &["warmup"]).await.expect(0);
    assert_eq!(w.sim.events.stats()["connected"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_run_costs_two_requests_and_a_change_two_more() {
    let w = quiet_world().await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    // The first run syncs and makes the lease's session.
    w.cb(r.path(), &["run", "--", "true"]).await.expect(0);
    let requests = |from: usize| -> Vec<String> {
        w.sim.requests.lock().expect("log")[from..]
            .iter()
            .filter(|l| !l.contains("/_sim/"))
            .cloned()
            .collect()
    };
    let mark = w.sim.requests.lock().expect("log").len();
    let out = w
        .cb(r.path(), &["run", "--", "sh", "-c", "echo out; exit 3"])
        .await
        .expect(3);
    assert_eq!(out.stdout(), "out\n", "the exit trailer is not output");
    let seen = requests(mark);
    assert_eq!(
        seen.len(),
        2,
        "an unchanged tree and a command: the exec and its log stream only: {seen:#?}"
    );
    // A changed file adds its upload and one command that unpacks it.
    std::fs::write(r.path().join("README"), "changed\n").expect("write");
    let mark = w.sim.requests.lock().expect("log").len();
    let out = w
        .cb(r.path(), &["run", "--", "cat", "README"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "changed\n");
    let seen = requests(mark);
    assert_eq!(
        seen.len(),
        4,
        "a change costs 2 more (upload, unpack): {seen:#?}"
    );
    // A deletion too.
    std::fs::remove_file(r.path().join("src/lib.txt")).expect("rm");
    let mark = w.sim.requests.lock().expect("log").len();
    w.cb(
        r.path(),
        &["run", "--", "sh", "-c", "test ! -e src/lib.txt"],
    )
    .await
    .expect(0);
    let seen = requests(mark);
    assert_eq!(
        seen.len(),
        3,
        "a deletion costs 1 more (one command): {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_in_its_folder_or_not_at_all() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let lease = w.cb(r.path(), &["warmup", "--json"]).await.expect(0).json();
    // Never synced: the checkout's folder is made (as on local), not skipped.
    let out = w
        .cb(r.path(), &["run", "--no-sync", "--", "pwd"])
        .await
        .expect(0);
    let id = lease["id"].as_str().expect("id");
    assert!(
        out.stdout()
            .starts_with(&format!("/home/daytona/crabbox/{id}/")),
        "{}",
        out.stdout()
    );
    // A folder that cannot be made: the command does not run elsewhere.
    let out = w
        .cb(
            r.path(),
            &[
                "run",
                "--no-sync",
                "--workdir",
                "/proc/nope",
                "--",
                "echo",
                "ran",
            ],
        )
        .await
        .crabbox_failed("usage");
    assert!(!out.stdout().contains("ran"), "{}", out.stdout());
    // A file where the folder would be (the synced README): the caller's mistake, said so.
    let out = w
        .cb(
            r.path(),
            &["run", "--workdir", "README", "--", "echo", "ran"],
        )
        .await
        .crabbox_failed("usage");
    assert!(!out.stdout().contains("ran"), "{}", out.stdout());
    assert!(
        out.stderr().contains("the working folder")
            && out.stderr().contains("README cannot be made or entered")
            && out.stderr().contains("--workdir"),
        "{}",
        out.stderr()
    );
    // The same on a terminal (where the shell's own words are on the screen).
    let mut t = common::tty::Term::spawn(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
        &[
            "run",
            "-q",
            "-t",
            "--no-sync",
            "--workdir",
            "/proc/nope",
            "--",
            "echo",
            "ran",
        ],
        (24, 80),
    );
    assert_ne!(t.exit_code().await, 0);
    assert!(!t.screen().contains("ran\r\n"), "{}", t.screen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_change_sends_about_the_chunks_it_touched() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::sync::a_large_file_change_sends_about_the_chunks_it_touched(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_told_as_it_goes() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    // A slow link: 24 MiB take 3 s to reach the sandbox.
    w.faults(json!({"upload_bytes_per_sec": 8 << 20})).await;
    common::sync::an_upload_is_told_as_it_goes(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_delta_sync_is_repeated_safely() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let big = r.path().join("big.bin");
    let mut data = common::sync::noise(8 << 20, 5);
    std::fs::write(&big, &data).expect("write");
    w.cb(r.path(), &["warmup"]).await.expect(0);
    w.cb(r.path(), &["run", "--", "true"]).await.expect(0);
    // The delta is put together, moved into place, and the answer lost: the repeat must not
    // put it together again from the already new file.
    data[4 << 20] ^= 1;
    data.splice(100..100, *b"more");
    std::fs::write(&big, &data).expect("write");
    let want = std::process::Command::new("sha256sum")
        .arg(&big)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .expect("sha256sum");
    w.faults(json!({"drop_next": 1, "drop_path": "process/execute"}))
        .await;
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "ls", "-A"])
        .await
        .expect(0)
        .json();
    assert_eq!(
        w.get_faults().await["drop_next"],
        0,
        "the answer was dropped"
    );
    let sent = doc["sync"]["bytes_uploaded"].as_u64().unwrap_or(u64::MAX);
    assert!(sent < 1 << 20, "a delta: {sent} bytes");
    let out = doc["stdout"].as_str().unwrap_or("");
    assert!(!out.contains("crabbox-delta"), "{out}");
    // The content, hashed in the sandbox: not `cat` back through the log stream, whose
    // stdout/stderr markers are ambiguous in binary output (see DAYTONA.md).
    let again = w
        .cb(r.path(), &["run", "--", "sha256sum", "big.bin"])
        .await
        .expect(0);
    assert_eq!(again.stdout().split(' ').next(), Some(want.as_str()));
}

fn daytona_pool(name: &str, size: u32, options: &[(&str, &str)]) -> crabbox::config::PoolSettings {
    crabbox::config::PoolSettings {
        name: name.into(),
        provider: "daytona".into(),
        size,
        max: size,
        idle_ttl: Duration::from_secs(600),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        repos: Vec::new(),
    }
}

async fn pool_status(w: &World, cwd: &Path, name: &str) -> Value {
    let all = w
        .cb(cwd, &["--json", "pool", "status"])
        .await
        .expect(0)
        .json();
    all.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_takes_a_pooled_sandbox_and_a_broken_pool_backs_off() {
    let w = world_with(
        Duration::from_secs(60),
        KEY,
        vec![
            daytona_pool("warm", 1, &[]),
            daytona_pool("broken", 1, &[("snapshot", "no-such-snapshot")]),
        ],
    )
    .await;
    let r = repo();
    let pooled = common::eventually(30, "the pool to fill", || async {
        let p = pool_status(&w, r.path(), "warm").await;
        (p["ready"] == 1).then(|| p["leases"][0]["id"].as_str().unwrap_or("").to_string())
    })
    .await;
    let sandbox_count = w.sim_sandboxes().len();
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(
        doc["lease"]["id"],
        pooled.as_str(),
        "taken from the pool: {doc}"
    );
    assert_eq!(doc["stdout"], "hello\n");
    // The sandbox's labels are the lease's now (pushed in the background).
    let id = doc["lease"]["sandbox_id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let labels = common::eventually(10, "the relabel", || async {
        let sb = w.sim.sandboxes.lock().ok()?.get(&id).cloned()?;
        (!sb.labels.contains_key("pool")
            && sb.labels.get("state").map(String::as_str) != Some("pooled"))
        .then_some(sb.labels)
    })
    .await;
    assert_eq!(
        labels.get("lease").map(String::as_str),
        Some(pooled.as_str())
    );
    // Refilled (one new sandbox), and the fresh run's sandbox released.
    common::eventually(30, "the refill", || async {
        let p = pool_status(&w, r.path(), "warm").await;
        (p["ready"] == 1 && p["leases"][0]["id"] != pooled.as_str()).then_some(())
    })
    .await;
    assert!(w.sim_sandboxes().len() >= sandbox_count);

    // The pool whose snapshot does not exist says so and backs off (no retry storm).
    let broken = common::eventually(30, "the broken pool to report", || async {
        let p = pool_status(&w, r.path(), "broken").await;
        (p["failures"].as_u64() >= Some(1)).then_some(p)
    })
    .await;
    let err = broken["last_error"].as_str().unwrap_or("");
    assert!(err.contains("no-such-snapshot"), "{broken}");
    assert!(broken["retry_at"].is_string(), "{broken}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = pool_status(&w, r.path(), "broken").await;
    assert!(
        later["failures"].as_u64() <= Some(3),
        "backing off, not retrying every sweep: {later}"
    );
    let text = w.cb(r.path(), &["pool", "status"]).await.expect(0).stdout();
    assert!(
        text.contains("broken") && text.contains("failing ("),
        "{text}"
    );
    let doctor = w.cb(r.path(), &["doctor"]).await.stdout();
    assert!(
        doctor.contains("pool broken") && doctor.contains("no-such-snapshot"),
        "{doctor}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_lease_keeps_its_disk_and_the_next_run_resumes_it() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::pause::a_paused_lease_keeps_its_disk_and_the_next_run_resumes_it(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
    // On Daytona a pause is a real stop: the sandbox is stopped until the next use.
    let r2 = repo();
    let lease = w
        .cb(r2.path(), &["--json", "warmup"])
        .await
        .expect(0)
        .json();
    let sandbox = lease["sandbox_id"].as_str().unwrap_or_default().to_string();
    w.cb(r2.path(), &["pause"]).await.expect(0);
    let state = |w: &World| {
        w.sim_sandboxes()
            .into_iter()
            .find(|(id, _)| *id == sandbox)
            .map(|(_, s)| s)
    };
    assert_eq!(state(&w).as_deref(), Some("stopped"));
    w.cb(r2.path(), &["run", "--no-sync", "--", "true"])
        .await
        .expect(0);
    assert_eq!(state(&w).as_deref(), Some("started"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_past_the_accounts_quota_keeps_what_fits_and_says_so() {
    let w = world_with(
        Duration::from_secs(60),
        KEY,
        vec![daytona_pool("big", 3, &[])],
    )
    .await;
    let r = repo();
    common::eventually(30, "the pool to fill", || async {
        (pool_status(&w, r.path(), "big").await["ready"] == 3).then_some(())
    })
    .await;
    w.cb(r.path(), &["pool", "drain"]).await.expect(0);
    common::eventually(30, "the pool to drain", || async {
        let p = pool_status(&w, r.path(), "big").await;
        p["leases"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;
    // Two CPUs in all, a CPU each: the third create is refused as Daytona does.
    w.faults(json!({"cpu_quota": 2})).await;
    w.cb(r.path(), &["pool", "fill"]).await.expect(0);
    let p = common::eventually(30, "the quota to show", || async {
        let p = pool_status(&w, r.path(), "big").await;
        (p["ready"] == 2 && p["failures"].as_u64() >= Some(1)).then_some(p)
    })
    .await;
    let err = p["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("Total CPU limit exceeded")
            && err.contains("the account's quota: the pool keeps the 2 that fit"),
        "{p}"
    );
    // And it stays so, backing off: the two that fit beside the refused one do not end
    // the run of failures (they were made with it), sweep after sweep (every 100 ms here).
    let until = tokio::time::Instant::now() + Duration::from_millis(800);
    while tokio::time::Instant::now() < until {
        let p = pool_status(&w, r.path(), "big").await;
        assert!(
            p["failures"].as_u64() >= Some(1) && p["ready"] == 2,
            "the failures were forgotten while the pool is still at its quota: {p}"
        );
    }
    // What is ready still serves a fresh run.
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    let leases: Vec<&str> = p["leases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["id"].as_str())
        .collect();
    assert!(
        leases.contains(&doc["lease"]["id"].as_str().unwrap_or("")),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_while_filling_leaves_takes_working() {
    let w = world_with(
        Duration::from_secs(60),
        KEY,
        vec![daytona_pool("warm", 1, &[])],
    )
    .await;
    let r = repo();
    let pooled = common::eventually(30, "the pool to fill", || async {
        let p = pool_status(&w, r.path(), "warm").await;
        (p["ready"] == 1).then(|| p["leases"][0]["id"].as_str().unwrap_or("").to_string())
    })
    .await;
    // Every create is rate limited from now on: the refill waits, takes do not.
    w.faults(json!({"rate_limit_count": 100000, "retry_after_secs": 1, "rate_limit_path": "POST /api/sandbox"}))
        .await;
    let doc = w
        .cb(r.path(), &["run", "--json", "--", "echo", "served"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["lease"]["id"], pooled.as_str());
    assert_eq!(doc["stdout"], "served\n");
    let p = pool_status(&w, r.path(), "warm").await;
    assert_eq!(
        (p["ready"].clone(), p["filling"].clone()),
        (json!(0), json!(1)),
        "{p}"
    );
    // The storm passes: the pool fills.
    w.faults(json!({"rate_limit_count": 0})).await;
    common::eventually(30, "the pool to fill again", || async {
        (pool_status(&w, r.path(), "warm").await["ready"] == 1).then_some(())
    })
    .await;
}

/// Checks a Prometheus text document as promtool would: HELP and TYPE before each family's
/// samples, every sample `name{labels} value` with a number, `# EOF` last; answers the
/// samples as (name with labels, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap_or("").to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap_or("");
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no TYPE line:\n{text}");
        if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
            assert!(labels.ends_with('}'), "{line}");
        }
        samples.push((series.to_string(), value));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_prometheus_metrics() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    w.cb(r.path(), &["run", "--", "sh", "-c", "exit 3"])
        .await
        .expect(3);
    w.faults(json!({"rate_limit_count": 1, "retry_after_secs": 0}))
        .await;
    w.cb(r.path(), &["run", "--", "true"]).await.expect(0);
    // (The run's end reaches the lease a moment after the CLI's exit.)
    let text = eventually(20, "the lease to be ready in the metrics", || async {
        let text = w
            .http
            .get(&w.metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("crabbox_leases{state=\"ready\",provider=\"daytona\"} 1")
            .then_some(text)
    })
    .await;
    let samples = parse_prometheus(&text);
    let value = |prefix: &str| -> f64 {
        samples
            .iter()
            .filter(|(s, _)| s.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        value("crabbox_leases{state=\"ready\",provider=\"daytona\"}"),
        1.0,
        "{text}"
    );
    assert!(value("crabbox_runs_total{ended=\"exit\"}") >= 2.0, "{text}");
    assert!(value("crabbox_run_seconds_count") >= 2.0, "{text}");
    assert!(value("crabbox_sync_files_total") >= 2.0, "{text}");
    assert!(value("crabbox_store_write_seconds_count") >= 1.0, "{text}");
    assert!(
        value(
            "crabbox_provider_requests_total{provider=\"daytona\",route=\"POST /api/sandbox\",status=\"200\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        value("crabbox_provider_retries_total{provider=\"daytona\",why=\"429\"}") >= 1.0,
        "{text}"
    );
    assert!(!text.contains(KEY), "no secret in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_shows_the_daemons_provider_calls_retries_and_waits() {
    let w = world(Duration::from_secs(30)).await;
    let r = repo();
    // Two 429s on the create: the daemon waits and retries, and -v says so.
    w.faults(json!({"rate_limit_count": 2, "retry_after_secs": 0, "rate_limit_path": "POST /api/sandbox"}))
        .await;
    let out = w
        .cb(r.path(), &["-v", "run", "--", "echo", "traced"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "traced\n");
    let err = out.stderr();
    let daemon: Vec<&str> = err.lines().filter(|l| l.contains("] daemon: ")).collect();
    assert!(
        daemon.iter().any(|l| l.contains("daytona call")
            && l.contains("route=POST /api/sandbox")
            && l.contains("status=200")),
        "the create call, with its status:\n{err}"
    );
    assert!(
        daemon
            .iter()
            .any(|l| l.contains("retrying after the wait") && l.contains("status=429")),
        "the 429 waits:\n{err}"
    );
    assert!(
        daemon.iter().any(|l| l.contains("the sandbox is started")),
        "the start:\n{err}"
    );
    assert!(
        daemon
            .iter()
            .any(|l| l.contains("route=") && l.contains("toolbox")),
        "the toolbox calls of the sync and the command:\n{err}"
    );
    // Without -v: none of it.
    let out = w
        .cb(r.path(), &["run", "--", "echo", "quiet"])
        .await
        .expect(0);
    assert!(!out.stderr().contains("daemon: "), "{}", out.stderr());
    // A wait a person notices is said without -v too, while the lease is made.
    w.faults(json!({"rate_limit_count": 1, "retry_after_secs": 1, "rate_limit_path": "POST /api/sandbox"}))
        .await;
    let other = repo();
    let out = w.cb(other.path(), &["warmup"]).await.expect(0);
    assert!(
        out.stderr()
            .contains("crabbox: Daytona's rate limit (429): waiting 1s before trying again"),
        "{}",
        out.stderr()
    );
    assert!(!out.stderr().contains("daytona call"), "{}", out.stderr());
    // On a warm lease, -v tells this run's steps, not those of its warmup and earlier runs.
    let warm = repo();
    w.cb(warm.path(), &["warmup"]).await.expect(0);
    w.cb(warm.path(), &["run", "--", "true"]).await.expect(0);
    let out = w
        .cb(warm.path(), &["-v", "run", "--", "echo", "again"])
        .await
        .expect(0);
    let err = out.stderr();
    assert!(
        !err.contains("route=POST /api/sandbox"),
        "the warmup's create is not this run's:\n{err}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("] daemon: ") && l.contains("running state=running"))
            .count(),
        1,
        "one run's own steps:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_builds_log_lines_are_shown_while_it_builds() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    let cfg = r.path().join("env.yaml");
    std::fs::write(
        &cfg,
        "provider: daytona\nenvironment:\n  image: { dockerfile: \"FROM python:3.12-slim\\n# a comment\\nRUN pip install pytest\\nWORKDIR /work\\n\" }\n",
    )
    .expect("write");
    let out = w
        .daemon
        .cli(r.path())
        .env("CRABBOX_CONFIG", &cfg)
        .args(["warmup"])
        .output()
        .await
        .expect("ran");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    // Not a terminal: plain lines, one per build step, in order, then the outcome.
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("crabbox: image build: "))
        .collect();
    assert_eq!(
        steps,
        [
            "crabbox: image build: Step 1/3 : FROM python:3.12-slim",
            "crabbox: image build: Step 2/3 : RUN pip install pytest",
            "crabbox: image build: Step 3/3 : WORKDIR /work",
        ]
        .into_iter()
        .chain(
            steps
                .last()
                .filter(|l| l.contains("Successfully built"))
                .copied()
        )
        .collect::<Vec<_>>(),
        "{err}"
    );
    assert!(
        err.contains("crabbox: building the environment's image"),
        "{err}"
    );
    // The same through the official route a user's SDK reads: build-logs-url, then follow.
    let snap = w
        .sim
        .snapshots
        .lock()
        .expect("lock")
        .values()
        .find(|s| s.name.starts_with("crabbox-env-"))
        .map(|s| s.id.clone())
        .expect("the snapshot");
    let url: Value = w
        .http
        .get(format!("{}/api/snapshots/{snap}/build-logs-url", w.sim_url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("url")
        .json()
        .await
        .expect("json");
    let text = w
        .http
        .get(url["url"].as_str().expect("url"))
        .query(&[("follow", "true")])
        .bearer_auth(KEY)
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    assert!(
        text.starts_with("Step 1/3 : FROM python:3.12-slim\n"),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with(&format!("Successfully built {}", &snap[..12])),
        "{text}"
    );
    // A run on the built lease builds nothing: no build lines.
    let out = w
        .daemon
        .cli(r.path())
        .env("CRABBOX_CONFIG", &cfg)
        .args(["run", "--", "true"])
        .output()
        .await
        .expect("ran");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("image build"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_copies_both_ways_keeping_modes_times_and_links() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::copy::cp_copies_both_ways_keeping_modes_times_and_links(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_artifacts_come_back_after_it() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::copy::a_runs_artifacts_come_back_after_it(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_with_its_arguments() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    common::copy::a_script_runs_with_its_arguments(&w.daemon, r.path(), &["--provider", "daytona"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_served_in_the_lease_is_reachable() {
    let w = world(Duration::from_secs(60)).await;
    let r = repo();
    w.cb(r.path(), &["warmup"]).await.expect(0);
    common::copy::a_port_served_in_the_lease_is_reachable(
        &w.daemon,
        r.path(),
        &["--provider", "daytona"],
        true,
    )
    .await;
}
