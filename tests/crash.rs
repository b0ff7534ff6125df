//! Crashes of the real daemon: `crabboxd` as its own process, killed with SIGKILL at chosen
//! points, restarted on the same state; then what leaked is counted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{eventually, repo};
use serde_json::Value;
use tempfile::TempDir;

/// `crabboxd` as a child process on a temp socket and state dir.
struct ProcDaemon {
    dir: TempDir,
    socket: PathBuf,
    state: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Drop for ProcDaemon {
    fn drop(&mut self) {
        // The daemon dies with the test (SIGKILL), holding what it held: its sandboxes'
        // processes and cgroups go too.
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        common::end_sandboxes_under(&self.state.join("sandboxes"));
    }
}

impl ProcDaemon {
    async fn start() -> ProcDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/d.sock");
        let state = dir.path().join("state");
        let mut d = ProcDaemon {
            dir,
            socket,
            state,
            child: None,
        };
        d.spawn().await;
        d
    }

    /// A daemon whose own config is `yaml`.
    async fn start_with_config(yaml: &str) -> ProcDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("daemon.yaml"), yaml).expect("config");
        let socket = dir.path().join("run/d.sock");
        let state = dir.path().join("state");
        let mut d = ProcDaemon {
            dir,
            socket,
            state,
            child: None,
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let own = self.dir.path().join("daemon.yaml");
        let config = if own.exists() {
            own
        } else {
            PathBuf::from("/dev/null")
        };
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--sweep-interval", "100ms"])
            .env("CRABBOX_CONFIG", config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("crabboxd");
        self.child = Some(child);
        let socket = self.socket.clone();
        eventually(20, "crabboxd to answer", || {
            let socket = socket.clone();
            async move {
                // Answering an RPC, not only accepting: a socket can accept for a moment
                // on behalf of a daemon that has just died.
                let mut c = crabbox::cli::client::connect_once(&socket).await.ok()?;
                c.daemon
                    .info(crabbox::pb::InfoRequest {})
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }

    /// SIGTERM: the daemon's own orderly shutdown.
    async fn term(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = c.wait().await;
        }
    }

    /// SIGKILL: no shutdown, no last write.
    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("kill");
            let _ = c.wait().await;
        }
    }

    fn cli(&self, cwd: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabbox"));
        c.current_dir(cwd)
            .env("CRABBOX_SOCKET", &self.socket)
            .env("CRABBOX_STATE_DIR", &self.state)
            .env("CRABBOX_NO_AUTOSTART", "1")
            .env("CRABBOX_CONFIG", self.dir.path().join("none.yaml"))
            .env_remove("CRABBOX_PROVIDER")
            .kill_on_drop(true);
        let _ = std::fs::write(self.dir.path().join("none.yaml"), "{}\n");
        c
    }

    async fn json(&self, cwd: &Path, args: &[&str]) -> Value {
        let out = tokio::time::timeout(Duration::from_secs(60), self.cli(cwd).args(args).output())
            .await
            .expect("in time")
            .expect("ran");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "crabbox {args:?}: not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Warms a lease for `r`, starts `crabbox run -- sleep 30` on it (stderr piped), and
    /// waits until the command runs; answers the lease id and the CLI process.
    async fn sleeping_run(&self, r: &Path) -> (String, tokio::process::Child) {
        let lease = self.json(r, &["warmup", "--json"]).await;
        let id = lease["id"].as_str().expect("id").to_string();
        let run = self
            .cli(r)
            .args(["run", "--", "sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run");
        eventually(20, "the command to start", || async {
            let st = self.json(r, &["status", &id, "--json"]).await;
            (st["state"] == "running").then_some(())
        })
        .await;
        (id, run)
    }

    fn sandboxes(&self) -> Vec<String> {
        std::fs::read_dir(self.state.join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    // The engine's own index (`.names`) is not a sandbox.
                    .filter(|e| {
                        e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_killed_with_the_daemon_releases_its_lease_at_restart() {
    let mut d = ProcDaemon::start().await;
    let r = repo();
    // A fresh run (no warmup): the lease is the run's.
    let run = d
        .cli(r.path())
        .args(["run", "--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let lease = eventually(20, "the run's command to start", || async {
        let list = d.json(r.path(), &["list", "--json"]).await;
        list.as_array()
            .and_then(|a| a.first().cloned())
            .filter(|l| l["state"] == "running")
    })
    .await;
    let id = lease["id"].as_str().expect("id").to_string();
    assert_eq!(d.sandboxes().len(), 1);

    d.kill9().await;
    let out = tokio::time::timeout(Duration::from_secs(20), run.wait_with_output())
        .await
        .expect("the CLI notices the daemon is gone")
        .expect("status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lost the connection to crabboxd during the run")
            && err.contains("released when the daemon comes back"),
        "{err}"
    );

    d.spawn().await;
    let released = eventually(20, "the lost run's lease to be released", || async {
        let all = d.json(r.path(), &["list", "--all", "--json"]).await;
        all.as_array()
            .and_then(|a| a.iter().find(|l| l["id"] == id.as_str()).cloned())
            .filter(|l| l["state"] == "released")
    })
    .await;
    assert!(
        released["reason"]
            .as_str()
            .unwrap_or("")
            .contains("the run that created it was lost"),
        "{released}"
    );
    // Nothing leaked, nothing left claiming the repo.
    assert!(d.sandboxes().is_empty(), "{:?}", d.sandboxes());
    let live = d.json(r.path(), &["list", "--json"]).await;
    assert_eq!(live.as_array().map(Vec::len), Some(0), "{live}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_lease_survives_a_kill_during_its_run() {
    let mut d = ProcDaemon::start().await;
    let r = repo();
    let (id, mut run) = d.sleeping_run(r.path()).await;
    d.kill9().await;
    let _ = tokio::time::timeout(Duration::from_secs(20), run.wait()).await;
    d.spawn().await;
    // A warmed lease is nobody's run: it comes back ready, still claimed, and usable.
    let st = eventually(20, "the lease to be ready again", || async {
        let st = d.json(r.path(), &["status", &id, "--json"]).await;
        (st["state"] == "ready").then_some(st)
    })
    .await;
    assert!(
        st["reason"].as_str().unwrap_or("").contains("restarted"),
        "{st}"
    );
    let out = d
        .cli(r.path())
        .args(["run", "--json", "--", "echo", "again"])
        .output()
        .await
        .expect("ran");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["lease"]["id"], id.as_str());
    assert_eq!(doc["stdout"], "again\n");
}

/// A way to damage the store file.
type Damage = fn(&Path);

/// Leases by id -> state, from `list --all --json`.
async fn states(d: &ProcDaemon, cwd: &Path) -> std::collections::BTreeMap<String, String> {
    d.json(cwd, &["list", "--all", "--json"])
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap_or("").to_string(),
                l["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_damaged_store_is_set_aside_and_its_leases_come_back_from_labels() {
    let mut d = ProcDaemon::start().await;
    let (a, b) = (repo(), repo());
    let one = d.json(a.path(), &["warmup", "--json"]).await;
    let two = d
        .json(
            b.path(),
            &["warmup", "--keep", "--label", "team=infra", "--json"],
        )
        .await;
    let ids = [
        one["id"].as_str().expect("id").to_string(),
        two["id"].as_str().expect("id").to_string(),
    ];
    let db = d.state.join("crabbox.redb");
    let damages: [(&str, Damage); 3] = [
        ("emptied", |p| std::fs::write(p, b"").expect("truncate")),
        ("overwritten", |p| {
            let mut bytes = std::fs::read(p).expect("read");
            for i in (0..bytes.len()).step_by(997) {
                bytes[i] ^= 0xff;
            }
            std::fs::write(p, bytes).expect("write");
        }),
        ("deleted", |p| std::fs::remove_file(p).expect("rm")),
    ];
    for (what, damage) in damages {
        d.kill9().await;
        damage(&db);
        // The daemon starts (it used to start empty, or not at all), and both leases come
        // back from their sandboxes' labels, with the same owner.
        d.spawn().await;
        let back = eventually(20, what, || async {
            let s = states(&d, a.path()).await;
            ids.iter()
                .all(|id| s.get(id).is_some_and(|st| st == "ready"))
                .then_some(s)
        })
        .await;
        assert_eq!(back.len(), 2, "{what}: {back:?}");
        assert_eq!(
            d.sandboxes().len(),
            2,
            "{what}: nothing deleted, nothing new"
        );
    }
    let kept = d.json(b.path(), &["status", &ids[1], "--json"]).await;
    assert_eq!(kept["keep"], true);
    assert_eq!(kept["labels"]["team"], "infra");
    let aside = std::fs::read_dir(&d.state)
        .expect("state dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("crabbox.redb.damaged-")
        })
        .count();
    assert_eq!(
        aside, 2,
        "each damaged store (emptied, overwritten) is kept aside"
    );
    // The rebuilt leases are fully ours: stop deletes their sandboxes.
    for id in &ids {
        let out = d
            .cli(a.path())
            .args(["stop", id])
            .output()
            .await
            .expect("stop");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eventually(20, "the sandboxes to be deleted", || async {
        d.sandboxes().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_under_a_run_says_it_stopped_the_command() {
    let mut d = ProcDaemon::start().await;
    let r = repo();
    let (_, run) = d.sleeping_run(r.path()).await;
    d.term().await;
    let out = tokio::time::timeout(Duration::from_secs(20), run.wait_with_output())
        .await
        .expect("the CLI is told")
        .expect("status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("crabboxd was stopped while the command ran") && !err.contains("killed by"),
        "{err}"
    );
}

/// The pool's lease ids by state, from `pool status --json`.
async fn pool_leases(d: &ProcDaemon, cwd: &Path) -> Vec<(String, String, String)> {
    d.json(cwd, &["pool", "status", "--json"])
        .await
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["leases"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            (
                l["id"].as_str().unwrap_or("").to_string(),
                l["state"].as_str().unwrap_or("").to_string(),
                l["sandbox_name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every sandbox on disk is held by exactly one live lease (no leak, no double handout).
async fn one_lease_per_sandbox(d: &ProcDaemon, cwd: &Path) {
    let all = d.json(cwd, &["list", "--all", "--json"]).await;
    let live: Vec<&Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| !matches!(l["state"].as_str(), Some("released")))
        .collect();
    let mut held: Vec<String> = live
        .iter()
        .map(|l| l["sandbox_name"].as_str().unwrap_or("").to_string())
        .collect();
    held.sort();
    let mut on_disk = d.sandboxes();
    on_disk.sort();
    assert_eq!(on_disk, held, "sandboxes on disk vs live leases: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_pool_fill_leaks_nothing_and_the_pool_fills_after() {
    let r = repo();
    for delay_ms in [0u64, 3, 10, 30] {
        let mut d =
            ProcDaemon::start_with_config("pool:\n  - provider: local\n    size: 3\n").await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill9().await;
        d.spawn().await;
        eventually(30, "the pool to be full again", || async {
            let leases = pool_leases(&d, r.path()).await;
            let ready = leases.iter().filter(|l| l.1 == "pooled").count();
            (ready == 3 && leases.len() == 3).then_some(())
        })
        .await;
        // Released leftovers may take a sweep to go: then one lease per sandbox.
        eventually(30, "no sandbox without its lease", || async {
            let on_disk = d.sandboxes().len();
            (on_disk == 3).then_some(())
        })
        .await;
        one_lease_per_sandbox(&d, r.path()).await;
        d.kill9().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_take_from_the_pool_hands_the_sandbox_out_once() {
    let mut d = ProcDaemon::start_with_config("pool:\n  - provider: local\n    size: 2\n").await;
    let r = repo();
    let pooled = eventually(30, "the pool to fill", || async {
        let leases = pool_leases(&d, r.path()).await;
        (leases.iter().filter(|l| l.1 == "pooled").count() == 2).then_some(leases)
    })
    .await;
    // A warmup takes one; the daemon dies as it answers.
    let warm = d
        .cli(r.path())
        .args(["warmup", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("warmup");
    tokio::time::sleep(Duration::from_millis(15)).await;
    d.kill9().await;
    let _ = warm.wait_with_output().await;
    d.spawn().await;
    // The repo has at most one lease; every sandbox is one lease's; the pool fills again.
    eventually(30, "the pool to be full again", || async {
        let leases = pool_leases(&d, r.path()).await;
        (leases.iter().filter(|l| l.1 == "pooled").count() == 2).then_some(())
    })
    .await;
    let live = d.json(r.path(), &["list", "--json"]).await;
    let mine: Vec<&Value> = live
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["repo_root"].is_string())
        .collect();
    assert!(mine.len() <= 1, "{live}");
    if let Some(l) = mine.first() {
        assert!(
            pooled.iter().any(|p| p.0 == l["id"].as_str().unwrap_or("")),
            "the claimed lease came from the pool: {l}"
        );
        assert_ne!(l["state"], "pooled");
    }
    eventually(30, "no sandbox without its lease", || async {
        let want = 2 + mine.len();
        (d.sandboxes().len() == want).then_some(())
    })
    .await;
    one_lease_per_sandbox(&d, r.path()).await;
    // And a run works on the repo (its lease, or a fresh one from the pool).
    let doc = d
        .json(r.path(), &["run", "--json", "--", "cat", "README"])
        .await;
    assert_eq!(doc["stdout"], "hello\n", "{doc}");
}
