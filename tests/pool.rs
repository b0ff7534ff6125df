//! Warm pools on the local provider: the real daemon, the real `crabbox` binary.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Daemon, eventually, repo};
use crabbox::config::PoolSettings;

fn local_pool(size: u32, max: u32) -> PoolSettings {
    PoolSettings {
        name: "local".into(),
        provider: "local".into(),
        size,
        max,
        idle_ttl: Duration::from_secs(600),
        options: Default::default(),
        repos: Vec::new(),
    }
}

async fn with_pool(size: u32, max: u32) -> Daemon {
    Daemon::start_with(
        |state| crabbox::daemon::default_providers(state).expect("providers"),
        |c| c.pools = vec![local_pool(size, max)],
    )
    .await
}

async fn status(d: &Daemon, cwd: &std::path::Path) -> serde_json::Value {
    d.run(cwd, &["--json", "pool", "status"])
        .await
        .expect(0)
        .json()[0]
        .clone()
}

/// The ids of the pool's ready sandboxes, once it holds `n`.
async fn ready(d: &Daemon, cwd: &std::path::Path, n: u64) -> BTreeSet<String> {
    eventually(30, "the pool to hold its ready sandboxes", || async {
        let s = status(d, cwd).await;
        (s["ready"] == n && s["filling"] == 0).then(|| {
            s["leases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["state"] == "pooled")
                .filter_map(|l| l["id"].as_str().map(str::to_string))
                .collect::<BTreeSet<_>>()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_takes_a_pooled_sandbox_and_the_pool_refills() {
    let d = with_pool(2, 2).await;
    let r = repo();
    let pooled = ready(&d, r.path(), 2).await;
    assert_eq!(pooled.len(), 2);
    // Pooled sandboxes are nobody's lease: not in `list`, in `list --all` and --state pooled.
    let live = d.run(r.path(), &["--json", "list"]).await.expect(0).json();
    assert_eq!(live.as_array().map(Vec::len), Some(0), "{live}");
    let shown = d
        .run(r.path(), &["--json", "list", "--state", "pooled"])
        .await
        .expect(0)
        .json();
    assert_eq!(shown.as_array().map(Vec::len), Some(2), "{shown}");
    for l in shown.as_array().into_iter().flatten() {
        assert_eq!(l["crabbox_labels"]["pool"], "local");
        assert_eq!(l["state"], "pooled");
        assert_eq!(l["repo_root"], serde_json::Value::Null);
    }

    // A fresh run takes one (the oldest), runs in it, and releases it at the end.
    let doc = d
        .run(
            r.path(),
            &["run", "--json", "--", "sh", "-c", "cat README; pwd"],
        )
        .await
        .expect(0)
        .json();
    let id = doc["lease"]["id"].as_str().unwrap_or_default().to_string();
    assert!(pooled.contains(&id), "{id} is one of {pooled:?}");
    assert!(
        doc["stdout"].as_str().unwrap_or("").starts_with("hello\n"),
        "{doc}"
    );
    assert_eq!(
        doc["lease"]["crabbox_labels"].get("pool"),
        None,
        "out of the pool: {doc}"
    );
    assert!(doc["lease"]["repo_root"].is_string());
    let taken = d
        .run(r.path(), &["--json", "status", &id])
        .await
        .expect(0)
        .json();
    assert_eq!(
        taken["state"], "released",
        "a fresh run's lease goes: {taken}"
    );

    // The pool refills to its size, with a new sandbox.
    let again = ready(&d, r.path(), 2).await;
    assert!(!again.contains(&id));
    assert_eq!(status(&d, r.path()).await["taken"], 1);

    // A warmup takes one too, and keeps it as the repo's lease.
    let lease = d
        .run(r.path(), &["--json", "warmup"])
        .await
        .expect(0)
        .json();
    let wid = lease["id"].as_str().unwrap_or_default().to_string();
    assert!(again.contains(&wid), "{wid} from {again:?}");
    assert_eq!(lease["state"], "ready");
    let run = d
        .run(r.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_eq!(
        run["lease"]["id"],
        wid.as_str(),
        "the repo's lease is reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_warmups_never_share_a_pooled_sandbox() {
    let d = with_pool(2, 2).await;
    let repos: Vec<_> = (0..5).map(|_| repo()).collect();
    let pooled = ready(&d, repos[0].path(), 2).await;
    let runs = repos.iter().map(|r| d.run(r.path(), &["--json", "warmup"]));
    let docs = futures_util::future::join_all(runs).await;
    let ids: Vec<String> = docs
        .into_iter()
        .map(|o| {
            o.expect(0).json()["id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 5, "{ids:?}");
    let from_pool = ids.iter().filter(|i| pooled.contains(*i)).count();
    assert_eq!(
        from_pool, 2,
        "both pooled sandboxes handed out once: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_empties_the_pool_until_fill_and_a_restart_keeps_it() {
    let d = with_pool(1, 1).await;
    let r = repo();
    let first = ready(&d, r.path(), 1).await;
    // A plain restart keeps the pooled sandbox (same lease, still pooled).
    let (dir, socket, state) = d.shutdown().await;
    let d = Daemon::start_in(
        dir,
        socket,
        state,
        |state| crabbox::daemon::default_providers(state).expect("providers"),
        |c| c.pools = vec![local_pool(1, 1)],
    )
    .await;
    assert_eq!(ready(&d, r.path(), 1).await, first, "kept across a restart");

    let out = d
        .run(r.path(), &["--json", "pool", "drain"])
        .await
        .expect(0)
        .json();
    assert_eq!(out["released"], 1);
    eventually(30, "the pool to be empty", || async {
        let s = status(&d, r.path()).await;
        (s["ready"] == 0 && s["leases"].as_array().is_some_and(Vec::is_empty)).then_some(())
    })
    .await;
    // Drained means drained: the sweep (every 100 ms here) does not refill it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = status(&d, r.path()).await;
    assert_eq!(
        (s["ready"].clone(), s["drained"].clone()),
        (0.into(), true.into()),
        "{s}"
    );
    // Released, so the sandbox is gone.
    let gone = d
        .run(
            r.path(),
            &["--json", "status", first.iter().next().expect("id")],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(gone["state"], "released");

    d.run(r.path(), &["pool", "fill"]).await.expect(0);
    ready(&d, r.path(), 1).await;
    // An unknown pool is named in the error.
    let bad = d.run(r.path(), &["pool", "drain", "nope"]).await;
    assert_ne!(bad.code(), 0);
    assert!(
        bad.stderr().contains("no pool is named \"nope\""),
        "{}",
        bad.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_sandbox_gone_behind_the_daemons_back_is_skipped() {
    let d = with_pool(1, 1).await;
    let r = repo();
    let pooled = ready(&d, r.path(), 1).await;
    let id = pooled.iter().next().expect("id").clone();
    let lease = d
        .run(r.path(), &["--json", "status", &id])
        .await
        .expect(0)
        .json();
    let sandbox = lease["sandbox_id"].as_str().unwrap_or_default().to_string();
    // Deleted outside crabbox.
    let dir = d.state.join("sandboxes").join(&sandbox);
    assert!(dir.is_dir(), "{}", dir.display());
    std::fs::remove_dir_all(&dir).expect("rm");
    let doc = d
        .run(r.path(), &["run", "--json", "--", "cat", "README"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "hello\n");
    assert_ne!(
        doc["lease"]["id"],
        id.as_str(),
        "the gone one was not handed out"
    );
    let old = d
        .run(r.path(), &["--json", "status", &id])
        .await
        .expect(0)
        .json();
    assert_eq!(old["state"], "released", "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_entries_in_a_repos_config_are_said_to_be_unused() {
    let d = Daemon::start().await;
    let r = repo();
    std::fs::write(
        r.path().join("crabbox.yaml"),
        "pool:\n  - size: 1\ndaytona:\n  apiUrl: http://127.0.0.1:9\n",
    )
    .expect("write");
    let home = tempfile::tempdir().expect("home");
    let out = d
        .cli(r.path())
        .env_remove("CRABBOX_CONFIG")
        .env("XDG_CONFIG_HOME", home.path())
        .args(["run", "--", "true"])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crabbox.yaml has pool: entries, which are not used"),
        "{err}"
    );
    assert!(
        err.contains("crabbox.yaml sets daytona.apiUrl, which only the daemon reads"),
        "{err}"
    );
    // No pool was made from it.
    let s = d
        .run(r.path(), &["--json", "pool", "status"])
        .await
        .expect(0)
        .json();
    assert_eq!(s, serde_json::json!([]));
}

async fn with_seeded_pool(repo: &std::path::Path) -> Daemon {
    let mut pool = local_pool(1, 1);
    pool.repos = vec![repo.to_path_buf()];
    Daemon::start_with(
        |state| crabbox::daemon::default_providers(state).expect("providers"),
        |c| c.pools = vec![pool],
    )
    .await
}

/// A repo of `n` files, committed.
fn big_repo(n: usize) -> tempfile::TempDir {
    let r = repo();
    for i in 0..n {
        std::fs::write(
            r.path().join(format!("src/f{i}.txt")),
            format!("file {i}\n"),
        )
        .expect("w");
    }
    common::git(r.path(), &["add", "."]);
    r
}

async fn seeded(d: &Daemon, cwd: &std::path::Path, repo: &std::path::Path) -> String {
    let want = std::fs::canonicalize(repo).expect("canonical");
    eventually(30, "a pooled sandbox seeded with the repo", || async {
        let s = status(d, cwd).await;
        s["seeded"].as_object().and_then(|m| {
            m.iter()
                .find(|(_, v)| v.as_str() == want.to_str())
                .map(|(k, _)| k.clone())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_on_a_seeded_sandbox_sends_only_what_changed() {
    let r = big_repo(200);
    let d = with_seeded_pool(r.path()).await;
    let id = seeded(&d, r.path(), r.path()).await;
    std::fs::write(r.path().join("src/f7.txt"), "changed since the seed\n").expect("w");
    std::fs::remove_file(r.path().join("src/f8.txt")).expect("rm");
    let doc = d
        .run(
            r.path(),
            &[
                "run",
                "--json",
                "--",
                "sh",
                "-c",
                "cat src/f7.txt; ls src | wc -l",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["lease"]["id"], id.as_str(), "{doc}");
    assert_eq!(doc["stdout"], "changed since the seed\n200\n", "{doc}");
    assert_eq!(doc["sync"]["files_uploaded"], 1, "only the change: {doc}");
    assert_eq!(doc["sync"]["files_deleted"], 1, "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_repo_taking_a_seeded_sandbox_gets_its_own_tree_whole() {
    let seededrepo = big_repo(50);
    let d = with_seeded_pool(seededrepo.path()).await;
    let id = seeded(&d, seededrepo.path(), seededrepo.path()).await;
    let other = repo();
    std::fs::write(other.path().join("README"), "the other repo\n").expect("w");
    let doc = d
        .run(
            other.path(),
            &["run", "--json", "--", "sh", "-c", "cat README; ls src"],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["lease"]["id"], id.as_str(), "{doc}");
    assert_eq!(doc["stdout"], "the other repo\nlib.txt\n", "{doc}");
    assert_eq!(doc["sync"]["files_uploaded"], 2, "its whole tree: {doc}");
}
