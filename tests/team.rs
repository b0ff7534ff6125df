//! Team mode: real crabboxd processes sharing a real PostgreSQL (and one daytona-sim).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::pg::Pg;
use common::{eventually, repo};
use serde_json::Value;
use tempfile::TempDir;

const PASSWORD: &str = "not-a-real-secret-pw";
const KEY: &str = "dtn_team_test_key";

/// `crabboxd` as a child process with its own config.
struct Daemon {
    dir: TempDir,
    socket: PathBuf,
    state: PathBuf,
    config: String,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
}

impl Daemon {
    async fn start(config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon {
            socket: dir.path().join("run/d.sock"),
            state: dir.path().join("state"),
            dir,
            config: config.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let cfg = self.dir.path().join("daemon.yaml");
        std::fs::write(&cfg, &self.config).expect("config");
        let log = std::fs::File::create(self.dir.path().join("crabboxd.log")).expect("log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--sweep-interval", "200ms"])
            .env("CRABBOX_CONFIG", &cfg)
            .env("RUST_LOG", "crabbox=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
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

    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("crabboxd.log")).unwrap_or_default()
    }

    async fn cb(&self, cwd: &Path, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_crabbox"))
                .current_dir(cwd)
                .env("CRABBOX_SOCKET", &self.socket)
                .env("CRABBOX_NO_AUTOSTART", "1")
                .env("CRABBOX_CONFIG", "/dev/null")
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .args(args)
                .output(),
        )
        .await
        .expect("in time")
        .expect("ran");
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        for text in [&o, &e] {
            assert!(
                !text.contains(PASSWORD),
                "the database password leaked: {text}"
            );
        }
        (out.status.code().unwrap_or(-1), o, e)
    }

    async fn json(&self, cwd: &Path, args: &[&str]) -> Value {
        let (code, out, err) = self.cb(cwd, args).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"))
    }
}

fn team_yaml(url: &str, user: &str, extra: &str) -> String {
    format!(
        "team:\n  database_url: \"{url}\"\n  name: platform\n  user: {user}\n  heartbeat: 200ms\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_are_exact_across_daemons() {
    let pg = Pg::start();
    let url = pg.database().await;
    let quota = "  quota:\n    sandboxes: 5\n";
    let mut daemons = Vec::new();
    for user in ["alice", "bob", "carol"] {
        daemons.push(Daemon::start(&team_yaml(&url, user, quota), &[]).await);
    }
    // 20 warmups at once, from 3 daemons, in 20 repos: exactly 5 get a sandbox.
    let repos: Vec<TempDir> = (0..20).map(|_| repo()).collect();
    let runs = repos
        .iter()
        .enumerate()
        .map(|(i, r)| daemons[i % 3].cb(r.path(), &["--json", "warmup"]));
    let outcomes = futures_util::future::join_all(runs).await;
    let ok = outcomes.iter().filter(|o| o.0 == 0).count();
    assert_eq!(ok, 5, "exactly the quota: {outcomes:#?}");
    for (code, _, err) in outcomes.iter().filter(|o| o.0 != 0) {
        assert_eq!(*code, 5, "{err}");
        assert!(
            err.contains("team platform's quota of 5 sandboxes is used"),
            "{err}"
        );
    }
    // Nothing was created for the refused ones: 5 sandboxes on disk in all.
    let on_disk: usize = daemons
        .iter()
        .map(|d| {
            std::fs::read_dir(d.state.join("sandboxes"))
                .map(|it| {
                    it.flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(on_disk, 5);
    // The team view, from any daemon: the 5, with who holds them.
    let listed = daemons[2]
        .json(repos[0].path(), &["--json", "list", "--team"])
        .await;
    let live: Vec<&Value> = listed.as_array().into_iter().flatten().collect();
    assert_eq!(live.len(), 5, "{listed}");
    for l in &live {
        assert!(["alice", "bob", "carol"].contains(&l["user"].as_str().unwrap_or("")));
        assert!(!l["host"].as_str().unwrap_or("").is_empty(), "{l}");
    }
    // Filtered by a user who holds one (which of them won the race for the quota varies).
    let holder = live[0]["user"].as_str().unwrap_or("").to_string();
    let other = ["alice", "bob", "carol"]
        .into_iter()
        .find(|u| *u != holder && !live.iter().any(|l| l["user"] == *u))
        .map(str::to_string);
    let (code, text, _) = daemons[0]
        .cb(repos[0].path(), &["list", "--team", "--user", &holder])
        .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&holder), "{text}");
    for u in ["alice", "bob", "carol"].iter().filter(|u| **u != holder) {
        assert!(!text.contains(&format!(" {u} ")), "only {holder}'s: {text}");
    }
    if let Some(other) = other {
        // One who holds none is told so.
        let (code, text, _) = daemons[0]
            .cb(repos[0].path(), &["list", "--team", "--user", &other])
            .await;
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("no leases"), "{text}");
    }
    // Releasing one frees a slot.
    let first = live[0]["id"].as_str().unwrap_or("").to_string();
    let owner = daemons
        .iter()
        .find(|d| d.state.join("sandboxes").exists() && d.log().contains(&first))
        .expect("its daemon");
    let (code, _, err) = owner.cb(repos[0].path(), &["stop", &first]).await;
    assert_eq!(code, 0, "{err}");
    // Each lease's life is in its daemon's log at info: made, ready, released.
    eventually(10, "the lease's life in the log", || async {
        let log = owner.log();
        (log.contains("lease created")
            && log.contains("lease ready")
            && log.contains("lease released"))
        .then_some(())
    })
    .await;
    let extra = repo();
    eventually(20, "the freed slot to be usable", || async {
        let (code, _, _) = daemons[1].cb(extra.path(), &["warmup"]).await;
        (code == 0).then_some(())
    })
    .await;
    for d in &daemons {
        assert!(
            !d.log().contains(PASSWORD),
            "the password reached a daemon log"
        );
        assert!(
            !d.log().contains('\u{1b}'),
            "the daemon's log file holds no colour escapes"
        );
        assert!(d.log().contains(" INFO "), "it is a log: {}", d.log());
    }
}

/// An in-process daytona-sim on loopback; answers (the sim, its base URL, its stopper).
async fn sim() -> (
    std::sync::Arc<crabbox::sim::Sim>,
    String,
    tokio_util::sync::CancellationToken,
    TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crabbox::sim::SimConfig::new(dir.path().to_path_buf());
    config.api_keys = vec![KEY.into()];
    config.create_delay = Duration::from_millis(20);
    config.start_delay = Duration::from_millis(20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stop = tokio_util::sync::CancellationToken::new();
    let (sim, addr, _) = crabbox::sim::start(config, listener, stop.clone())
        .await
        .expect("sim");
    (sim, format!("http://{addr}"), stop, dir)
}

fn sandbox_states(sim: &crabbox::sim::Sim) -> std::collections::BTreeMap<String, String> {
    sim.sandboxes
        .lock()
        .map(|m| {
            m.values()
                .map(|s| (s.id.clone(), s.state.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_releases_a_dead_daemons_expired_leases_and_nothing_else() {
    let pg = Pg::start();
    let url = pg.database().await;
    let (sim, sim_url, _stop, _sim_dir) = sim().await;
    let api = format!("{sim_url}/api");
    let env = [
        ("CRABBOX_PROVIDER", "daytona"),
        ("DAYTONA_API_URL", api.as_str()),
        ("DAYTONA_API_KEY", KEY),
    ];
    let mut alice = Daemon::start(&team_yaml(&url, "alice", ""), &env).await;
    let bob = Daemon::start(&team_yaml(&url, "bob", ""), &env).await;

    // Alice holds 3 short leases; Bob one long one.
    let repos: Vec<TempDir> = (0..3).map(|_| repo()).collect();
    let mut alices = Vec::new();
    for r in &repos {
        let l = alice
            .json(r.path(), &["--json", "warmup", "--ttl", "4s"])
            .await;
        alices.push(l["id"].as_str().unwrap_or("").to_string());
    }
    let bobs_repo = repo();
    let bobs = bob.json(bobs_repo.path(), &["--json", "warmup"]).await;
    eventually(20, "the 4 leases to be ready", || async {
        let l = bob
            .json(bobs_repo.path(), &["--json", "list", "--team"])
            .await;
        let ready = l
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["state"] == "ready")
            .count();
        (ready == 4).then_some(())
    })
    .await;
    // A stranger's sandbox: not in the team registry, not this team's labels.
    let stranger: Value = reqwest::Client::new()
        .post(format!("{api}/sandbox"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"name": "not-crabbox", "labels": {"crabbox": "true", "owner": "someone"}}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let stranger_id = stranger["id"].as_str().unwrap_or("").to_string();
    let team_row = |id: &str, l: &Value| {
        l.as_array()
            .into_iter()
            .flatten()
            .find(|x| x["id"] == id)
            .cloned()
    };
    let sandbox_of = |id: &str, l: &Value| {
        team_row(id, l)
            .and_then(|x| x["sandbox_id"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let before = bob
        .json(bobs_repo.path(), &["--json", "list", "--team"])
        .await;
    let alice_sandboxes: Vec<String> = alices.iter().map(|id| sandbox_of(id, &before)).collect();
    let bob_sandbox = sandbox_of(bobs["id"].as_str().unwrap_or(""), &before);

    // Alice's machine dies; her leases expire while it is away.
    alice.kill9().await;
    let killed = std::time::Instant::now();
    eventually(30, "the reaper to delete alice's 3 sandboxes", || async {
        let states = sandbox_states(&sim);
        alice_sandboxes
            .iter()
            .all(|s| states.get(s).is_none_or(|st| st == "destroyed"))
            .then_some(())
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(4 + 10),
        "reaped within 10 s of expiry"
    );
    let states = sandbox_states(&sim);
    assert_eq!(
        states.get(&bob_sandbox).map(String::as_str),
        Some("started")
    );
    assert!(
        states.contains_key(&stranger_id),
        "a stranger's sandbox is never touched"
    );
    assert_ne!(
        states.get(&stranger_id).map(String::as_str),
        Some("destroyed")
    );
    let after = bob
        .json(bobs_repo.path(), &["--json", "list", "--team", "--all"])
        .await;
    for id in &alices {
        let row = team_row(id, &after).expect("row");
        assert_eq!(row["state"], "released", "{row}");
        assert!(
            row["reason"]
                .as_str()
                .unwrap_or("")
                .contains("released by the team reaper on"),
            "{row}"
        );
    }

    // Alice comes back: her leases are released, and say why.
    alice.spawn().await;
    eventually(30, "alice's leases to be released locally", || async {
        let all = alice
            .json(repos[0].path(), &["--json", "list", "--all"])
            .await;
        let done = alices.iter().all(|id| {
            team_row(id, &all).is_some_and(|l| {
                l["state"] == "released"
                    && l["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("released by the team reaper")
            })
        });
        done.then_some(())
    })
    .await;
    // Bob's lease is still his and usable.
    let (code, out, err) = bob
        .cb(bobs_repo.path(), &["run", "--", "echo", "still here"])
        .await;
    assert_eq!((code, out.as_str()), (0, "still here\n"), "{err}");
    for d in [&alice, &bob] {
        assert!(
            !d.log().contains(PASSWORD),
            "the password reached a daemon log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_lease_is_seen_and_stopped_only_with_force() {
    let pg = Pg::start();
    let url = pg.database().await;
    let (sim, sim_url, _stop, _sim_dir) = sim().await;
    let api = format!("{sim_url}/api");
    let env = [
        ("CRABBOX_PROVIDER", "daytona"),
        ("DAYTONA_API_URL", api.as_str()),
        ("DAYTONA_API_KEY", KEY),
    ];
    let alice = Daemon::start(&team_yaml(&url, "alice", ""), &env).await;
    let bob = Daemon::start(&team_yaml(&url, "bob", ""), &env).await;
    let r = repo();
    let lease = alice.json(r.path(), &["--json", "warmup"]).await;
    let id = lease["id"].as_str().unwrap_or("").to_string();
    let slug = lease["slug"].as_str().unwrap_or("").to_string();
    // Bob sees it by id or slug, with whose it is.
    let elsewhere = repo();
    let seen = eventually(20, "the lease to be mirrored ready", || async {
        let (code, out, _) = bob.cb(elsewhere.path(), &["--json", "status", &slug]).await;
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        (code == 0 && v["state"] == "ready").then_some(v)
    })
    .await;
    assert_eq!(
        (seen["id"].as_str(), seen["user"].as_str()),
        (Some(id.as_str()), Some("alice"))
    );
    // Not without --force.
    let (code, _, err) = bob.cb(elsewhere.path(), &["stop", &id]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("is alice's") && err.contains("--force"),
        "{err}"
    );
    // With it: the sandbox goes, the stop is recorded, and alice's daemon follows.
    let sandbox = seen["sandbox_id"].as_str().unwrap_or("").to_string();
    let done = bob
        .json(elsewhere.path(), &["--json", "stop", &id, "--force"])
        .await;
    assert_eq!(done["state"], "released", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap_or("")
            .contains("stopped by bob"),
        "{done}"
    );
    assert_eq!(
        done["stopped_by"], "bob",
        "who stopped it is recorded: {done}"
    );
    assert!(done["stopped_at"].is_string(), "and when: {done}");
    eventually(10, "the sandbox to be deleted", || async {
        sandbox_states(&sim)
            .get(&sandbox)
            .is_none_or(|s| s == "destroyed")
            .then_some(())
    })
    .await;
    eventually(20, "alice's daemon to release it", || async {
        let l = alice.json(r.path(), &["--json", "status", &id]).await;
        (l["state"] == "released"
            && l["reason"]
                .as_str()
                .unwrap_or("")
                .contains("stopped by bob"))
        .then_some(())
    })
    .await;
    // An unknown name is still "not found".
    let (code, _, err) = bob.cb(elsewhere.path(), &["status", "no-such-lease"]).await;
    assert_eq!(code, 4, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_degrades_and_everything_converges_after() {
    let mut pg = Pg::start();
    let url = pg.database().await;
    let quota = "  quota:\n    sandboxes: 10\n";
    let alice = Daemon::start(&team_yaml(&url, "alice", quota), &[]).await;
    let lenient = format!("{quota}  required: false\n");
    let bob = Daemon::start(&team_yaml(&url, "bob", &lenient), &[]).await;
    let r = repo();
    let lease = alice.json(r.path(), &["--json", "warmup"]).await;
    let id = lease["id"].as_str().unwrap_or("").to_string();
    eventually(20, "the lease mirrored", || async {
        let l = alice.json(r.path(), &["--json", "list", "--team"]).await;
        (l[0]["state"] == "ready").then_some(())
    })
    .await;

    pg.stop();
    // Existing leases keep working.
    let (code, out, err) = alice
        .cb(r.path(), &["run", "--", "echo", "still working"])
        .await;
    assert_eq!((code, out.as_str()), (0, "still working\n"), "{err}");
    let other = repo();
    let mine = alice.json(other.path(), &["--json", "list"]).await;
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    // A new lease under a quota is refused, clearly, after a bounded wait.
    let started = std::time::Instant::now();
    let (code, _, err) = alice.cb(other.path(), &["warmup"]).await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("team registry") && err.contains("cannot be made until it answers"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // With team.required: false it is made anyway, and mirrored later.
    let bobs_repo = repo();
    let bobs = bob.json(bobs_repo.path(), &["--json", "warmup"]).await;
    let bobs_id = bobs["id"].as_str().unwrap_or("").to_string();
    // A release while it is down.
    let (code, _, err) = alice.cb(r.path(), &["stop", &id]).await;
    assert_eq!(code, 0, "{err}");

    pg.restart();
    // The team view catches up: the released lease says so, nothing is duplicated.
    eventually(30, "the registry to catch up", || async {
        let (code, out, _) = alice
            .cb(r.path(), &["--json", "list", "--team", "--all"])
            .await;
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let rows: Vec<&Value> = v.as_array().into_iter().flatten().collect();
        let state = |id: &str| {
            rows.iter()
                .find(|r| r["id"] == id)
                .map(|r| r["state"].clone())
        };
        (code == 0
            && rows.len() == 2
            && state(&id) == Some("released".into())
            && state(&bobs_id).is_some_and(|s| s != "released"))
        .then_some(())
    })
    .await;
    let (code, _, err) = alice.cb(other.path(), &["warmup"]).await;
    assert_eq!(code, 0, "new leases again once it answers: {err}");
}

/// Does this daemon say it leads the team's reaper?
async fn leads(d: &Daemon, cwd: &Path) -> bool {
    let (_, out, _) = d.cb(cwd, &["doctor"]).await;
    out.contains("this daemon leads it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_daemon_leads_the_reaper_within_seconds_of_the_leaders_death() {
    let pg = Pg::start();
    let url = pg.database().await;
    let mut a = Daemon::start(&team_yaml(&url, "alice", ""), &[]).await;
    let mut b = Daemon::start(&team_yaml(&url, "bob", ""), &[]).await;
    let r = repo();
    eventually(20, "one leader", || async {
        let (la, lb) = (leads(&a, r.path()).await, leads(&b, r.path()).await);
        (la != lb).then_some(())
    })
    .await;
    let (leader, other) = if leads(&a, r.path()).await {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let (_, doctor, _) = other.cb(r.path(), &["doctor"]).await;
    assert!(doctor.contains("another daemon leads it"), "{doctor}");
    assert!(
        doctor.contains("team schema") && doctor.contains("team clock"),
        "{doctor}"
    );
    leader.kill9().await;
    let died = std::time::Instant::now();
    eventually(20, "the other daemon to lead", || async {
        leads(other, r.path()).await.then_some(())
    })
    .await;
    assert!(
        died.elapsed() < Duration::from_secs(10),
        "{:?}",
        died.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_slot_is_first_come_first_served_across_machines() {
    let pg = Pg::start();
    let url = pg.database().await;
    let quota = "  quota:\n    sandboxes: 1\n";
    let alice = Daemon::start(&team_yaml(&url, "alice", quota), &[]).await;
    let bob = Daemon::start(&team_yaml(&url, "bob", quota), &[]).await;
    let carol = Daemon::start(&team_yaml(&url, "carol", quota), &[]).await;
    let (ra, rb, rc, rd) = (repo(), repo(), repo(), repo());
    let held = alice.json(ra.path(), &["--json", "warmup"]).await;
    // Bob queues first, then Carol.
    let bob_wait = bob.cb(rb.path(), &["--json", "warmup", "--wait-for-slot", "40s"]);
    let carol_wait = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        carol
            .cb(rc.path(), &["--json", "warmup", "--wait-for-slot", "40s"])
            .await
    };
    let releaser = async {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        // A newcomer that does not wait is refused while others wait.
        let (code, _, err) = alice.cb(rd.path(), &["warmup"]).await;
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("wait for a slot before this one"), "{err}");
        // The slot frees: Bob, first in the queue, gets it.
        let (code, _, err) = alice
            .cb(ra.path(), &["stop", held["id"].as_str().unwrap_or("")])
            .await;
        assert_eq!(code, 0, "{err}");
    };
    let (b, c, ()) = tokio::join!(
        async {
            let out = bob_wait.await;
            // Bob's turn: hold it a moment, then free it for Carol.
            let v: Value = serde_json::from_str(&out.1).unwrap_or(Value::Null);
            let got = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let (code, _, err) = bob
                .cb(rb.path(), &["stop", v["id"].as_str().unwrap_or("")])
                .await;
            assert_eq!(code, 0, "{err}");
            (out, got)
        },
        async {
            let out = carol_wait.await;
            (out, std::time::Instant::now())
        },
        releaser
    );
    assert_eq!(b.0.0, 0, "bob: {}", b.0.2);
    assert_eq!(c.0.0, 0, "carol: {}", c.0.2);
    assert!(b.1 < c.1, "bob, first in line, got his slot before carol");
    assert!(b.0.2.contains("waiting up to 40s"), "{}", b.0.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_teams_warm_pool_serves_every_daemon_and_hands_a_sandbox_out_once() {
    let pg = Pg::start();
    let url = pg.database().await;
    let (sim, sim_url, _stop, _sim_dir) = sim().await;
    let api = format!("{sim_url}/api");
    let env = [
        ("CRABBOX_PROVIDER", "daytona"),
        ("DAYTONA_API_URL", api.as_str()),
        ("DAYTONA_API_KEY", KEY),
    ];
    let pool = "pool:\n  - provider: daytona\n    size: 1\n";
    let alice = Daemon::start(&format!("{}{pool}", team_yaml(&url, "alice", "")), &env).await;
    let bob = Daemon::start(&format!("{}{pool}", team_yaml(&url, "bob", "")), &env).await;
    let r = repo();
    // One pooled sandbox for the whole team (the leader's).
    let pooled = |rows: &Value| -> Vec<Value> {
        rows.as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["state"] == "pooled")
            .cloned()
            .collect()
    };
    let first = eventually(30, "the team's pool to hold one", || async {
        let rows = alice.json(r.path(), &["--json", "list", "--team"]).await;
        let p = pooled(&rows);
        (p.len() == 1).then(|| p[0].clone())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rows = alice.json(r.path(), &["--json", "list", "--team"]).await;
    assert_eq!(
        pooled(&rows).len(),
        1,
        "one leader fills it, not both: {rows}"
    );
    let maker_user = first["user"].as_str().unwrap_or("").to_string();
    let sandbox = first["sandbox_id"].as_str().unwrap_or("").to_string();
    // The other daemon takes it: a lease of its own on that very sandbox.
    let taker = if maker_user == "alice" { &bob } else { &alice };
    let mine = taker.json(r.path(), &["--json", "warmup"]).await;
    assert_eq!(mine["sandbox_id"], sandbox.as_str(), "{mine}");
    assert_ne!(mine["id"], first["id"]);
    let (code, out, err) = taker.cb(r.path(), &["run", "--", "cat", "README"]).await;
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    // The maker lets its pooled lease go without deleting the sandbox, now the taker's.
    let maker = if maker_user == "alice" { &alice } else { &bob };
    let first_id = first["id"].as_str().unwrap_or("").to_string();
    eventually(20, "the maker to let it go", || async {
        let l = maker.json(r.path(), &["--json", "status", &first_id]).await;
        (l["state"] == "released"
            && l["reason"]
                .as_str()
                .unwrap_or("")
                .contains("taken from the team's pool"))
        .then_some(())
    })
    .await;
    let sb = sim
        .sandboxes
        .lock()
        .ok()
        .and_then(|m| m.get(&sandbox).cloned())
        .expect("still there");
    assert_eq!(sb.state, "started");
    assert_eq!(
        sb.labels.get("lease"),
        mine["id"].as_str().map(str::to_string).as_ref()
    );

    // The pool refills; two daemons race for its one sandbox: one gets it.
    let second = eventually(30, "the pool to refill", || async {
        let rows = alice.json(r.path(), &["--json", "list", "--team"]).await;
        let p = pooled(&rows);
        (p.len() == 1 && p[0]["id"] != first_id.as_str()).then(|| p[0].clone())
    })
    .await;
    let sandbox2 = second["sandbox_id"].as_str().unwrap_or("").to_string();
    let (ra, rb) = (repo(), repo());
    let (a, b) = tokio::join!(
        alice.json(ra.path(), &["--json", "warmup"]),
        bob.json(rb.path(), &["--json", "warmup"])
    );
    let holders = [&a, &b]
        .iter()
        .filter(|l| l["sandbox_id"] == sandbox2.as_str())
        .count();
    assert_eq!(
        holders, 1,
        "exactly one gets the last pooled sandbox: {a}\n{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_reached_over_verified_tls() {
    let pg = Pg::start_tls();
    let url = pg.database().await;
    let ca = pg.ca.clone().expect("ca");
    let trusted = format!("  ca_file: \"{}\"\n", ca.display());
    let alice = Daemon::start(&team_yaml(&url, "alice", &trusted), &[]).await;
    let r = repo();
    alice.json(r.path(), &["--json", "warmup"]).await;
    eventually(20, "the lease in the team view", || async {
        let rows = alice.json(r.path(), &["--json", "list", "--team"]).await;
        (rows.as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let (_, doctor, _) = alice.cb(r.path(), &["doctor"]).await;
    assert!(
        doctor.contains("team platform at postgres://crabbox:***@localhost"),
        "{doctor}"
    );
    // A daemon that does not trust the server's certificate never talks to it.
    let bob = Daemon::start(&team_yaml(&url, "bob", ""), &[]).await;
    let (code, _, err) = bob.cb(r.path(), &["list", "--team"]).await;
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A CA file that is not one is named.
    let junk = r.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("w");
    let carol = Daemon::start(
        &team_yaml(
            &url,
            "carol",
            &format!("  ca_file: \"{}\"\n", junk.display()),
        ),
        &[],
    )
    .await;
    let (code, _, err) = carol.cb(r.path(), &["list", "--team"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("team.ca_file") && err.contains("junk.pem"),
        "{err}"
    );
}
