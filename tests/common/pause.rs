//! Pause and resume, shared by every provider's tests.

use std::path::Path;
use std::process::Stdio;

use super::{Daemon, eventually};

/// A paused lease shows `stopped`, keeps its files, refuses nothing but a pause during a
/// run, and the next run starts it again (saying so).
pub async fn a_paused_lease_keeps_its_disk_and_the_next_run_resumes_it(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
) {
    let cmd = |args: &[&str]| -> Vec<String> {
        prefix.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let lease = run(d, repo, &cmd(&["--json", "warmup"]))
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().unwrap_or_default().to_string();
    run(
        d,
        repo,
        &cmd(&["run", "--", "sh", "-c", "echo kept > ../note.txt"]),
    )
    .await
    .expect(0);

    // A pause during a run is refused, and says what to do.
    let mut running = d
        .cli(repo)
        .args(cmd(&["run", "--no-sync", "--", "sleep", "30"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    eventually(20, "the command to run", || async {
        let s = run(d, repo, &cmd(&["--json", "status", &id])).await.json();
        (s["state"] == "running").then_some(())
    })
    .await;
    let busy = run(d, repo, &cmd(&["pause"])).await;
    assert_ne!(busy.code(), 0);
    assert!(
        busy.stderr().contains("a run is using it"),
        "{}",
        busy.stderr()
    );
    let _ = running.start_kill();
    let _ = running.wait().await;
    eventually(20, "the run to end", || async {
        let s = run(d, repo, &cmd(&["--json", "status", &id])).await.json();
        (s["state"] == "ready").then_some(())
    })
    .await;

    // Paused: the repo's lease by default; twice is fine.
    let paused = run(d, repo, &cmd(&["--json", "pause"]))
        .await
        .expect(0)
        .json();
    assert_eq!(paused["id"], id.as_str());
    assert_eq!(paused["state"], "stopped", "{paused}");
    assert!(
        paused["reason"].as_str().unwrap_or("").contains("paused"),
        "{paused}"
    );
    run(d, repo, &cmd(&["pause", &id])).await.expect(0);
    let listed = run(d, repo, &cmd(&["--json", "list"])).await.json();
    assert_eq!(listed[0]["state"], "stopped", "still listed, as stopped");

    // The next run starts it again, says so, and finds its disk as it was.
    let out = run(
        d,
        repo,
        &cmd(&["run", "--no-sync", "--", "cat", "../note.txt"]),
    )
    .await
    .expect(0);
    assert_eq!(out.stdout(), "kept\n");
    assert!(
        out.stderr().contains("starting stopped sandbox"),
        "{}",
        out.stderr()
    );
    // (The run's end reaches the lease a moment after the CLI's exit.)
    eventually(20, "the lease to be ready again", || async {
        let s = run(d, repo, &cmd(&["--json", "status", &id])).await.json();
        (s["state"] == "ready").then_some(())
    })
    .await;

    // An explicit resume too.
    run(d, repo, &cmd(&["pause"])).await.expect(0);
    let resumed = run(d, repo, &cmd(&["--json", "resume"]))
        .await
        .expect(0)
        .json();
    assert_eq!(resumed["state"], "ready", "{resumed}");

    // A released lease has nothing to pause.
    run(d, repo, &cmd(&["stop", &id])).await.expect(0);
    let gone = run(d, repo, &cmd(&["pause", &id])).await;
    assert_ne!(gone.code(), 0);
    assert!(
        gone.stderr().contains("nothing to pause"),
        "{}",
        gone.stderr()
    );
    // Nothing claimed: pause says what to name.
    let none = run(d, repo, &cmd(&["pause"])).await;
    assert_ne!(none.code(), 0);
    assert!(
        none.stderr().contains("no lease is claimed by"),
        "{}",
        none.stderr()
    );
}

async fn run(d: &Daemon, repo: &Path, args: &[String]) -> super::Out {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.run(repo, &args).await
}
