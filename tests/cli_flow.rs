//! Whole flows through the real `crabbox` binary against a real daemon on the `local`
//! provider.

mod common;

use common::{Daemon, eventually, repo};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_run_list_stop() {
    let d = Daemon::start().await;
    let r = repo();
    let repo_root = std::fs::canonicalize(r.path()).expect("canonical");

    // warmup prints the leased line, then ready.
    let out = d.run(r.path(), &["warmup"]).await.expect(0);
    let text = out.stdout();
    assert!(text.starts_with("leased cbx_"), "{text}");
    assert!(text.contains(" provider=local sandbox=crabbox-"), "{text}");
    assert!(text.trim_end().ends_with("ready"), "{text}");

    // A second warmup in the same repo reuses its claimed lease.
    let lease = d
        .run(r.path(), &["warmup", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(lease["state"], "ready");
    assert_eq!(lease["repo_root"], repo_root.to_str().expect("utf8"));
    let id = lease["id"].as_str().expect("id").to_string();
    let slug = lease["slug"].as_str().expect("slug").to_string();
    assert!(text.contains(&id), "same lease reused");
    for key in [
        "id",
        "slug",
        "provider",
        "state",
        "sandbox_id",
        "repo_root",
        "created_at",
        "expires_at",
        "keep",
        "labels",
    ] {
        assert!(lease.get(key).is_some(), "--json lease has {key}");
    }
    // crabbox's bookkeeping labels apart from the user's, and no copy of the state.
    assert_eq!(lease["crabbox_labels"]["lease"], id.as_str());
    assert_eq!(lease["crabbox_labels"]["crabbox"], "true");
    assert!(lease["crabbox_labels"].get("state").is_none(), "{lease}");
    assert!(lease["labels"].get("lease").is_none(), "{lease}");

    // stdout and stderr stay separate; the exit code passes through.
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--",
                "sh",
                "-c",
                "echo to-out; echo to-err >&2; cat README",
            ],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout(), "to-out\nhello\n");
    assert!(out.stderr().contains("to-err\n"), "{}", out.stderr());
    assert!(!out.stdout().contains("to-err"));
    d.run(r.path(), &["run", "--", "sh", "-c", "exit 3"])
        .await
        .expect(3);

    // --env forwards a variable by name, or sets one.
    let out = d
        .run_env(
            r.path(),
            &[("CBX_FORWARDED", "from the laptop".as_ref())],
            &[
                "run",
                "--env",
                "CBX_FORWARDED",
                "--env",
                "CBX_SET=x y",
                "--",
                "sh",
                "-c",
                "echo \"$CBX_FORWARDED|$CBX_SET\"",
            ],
        )
        .await
        .0;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from the laptop|x y\n"
    );
    d.run(r.path(), &["run", "--env", "CBX_UNSET_VAR", "--", "true"])
        .await
        .crabbox_failed("usage");

    // Words are quoted, not re-split by a shell; --shell joins them into one line.
    let out = d
        .run(r.path(), &["run", "--", "echo", "a  b", "$HOME"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "a  b $HOME\n");
    let out = d
        .run(
            r.path(),
            &["run", "--shell", "--", "echo", "one", "&&", "echo", "two"],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout(), "one\ntwo\n");

    // run --json: one document with the output and the exit code.
    let doc = d
        .run(
            r.path(),
            &["run", "--json", "--", "sh", "-c", "echo hi; exit 4"],
        )
        .await
        .expect(4)
        .json();
    assert_eq!(doc["exit_code"], 4);
    assert_eq!(doc["stdout"], "hi\n");
    assert_eq!(doc["lease"]["id"], id.as_str());

    // list / status / touch / claims.
    let list = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "ready");
    let table = d.run(r.path(), &["list"]).await.expect(0).stdout();
    assert!(table.starts_with("ID") && table.contains(&slug), "{table}");
    let st = d
        .run(r.path(), &["status", &slug, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(st["id"], id.as_str());
    let touched = d
        .run(r.path(), &["touch", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert!(
        touched["expires_at"].as_str().expect("time") >= st["expires_at"].as_str().expect("time")
    );
    d.run(r.path(), &["heartbeat", &slug]).await.expect(0);
    let claims = d
        .run(r.path(), &["claims", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(claims[0]["repo_root"], repo_root.to_str().expect("utf8"));

    // ssh is not something local sandboxes have: a clear error, exit 7 (no command of
    // the user's runs: SPEC's codes).
    let out = d.run(r.path(), &["ssh", "--print"]).await.expect(7);
    assert!(
        out.stderr().contains("not supported by the local provider"),
        "{}",
        out.stderr()
    );

    // stop releases it; the sandbox folder is gone.
    let sandbox_dir = d
        .state
        .join("sandboxes")
        .join(lease["sandbox_name"].as_str().expect("name"));
    assert!(sandbox_dir.is_dir());
    let stopped = d
        .run(r.path(), &["stop", &slug, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(stopped["state"], "released");
    assert!(!sandbox_dir.exists(), "sandbox deleted");
    let list = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(list.as_array().expect("array").len(), 0);
    let all = d
        .run(r.path(), &["list", "--all", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(all[0]["state"], "released");
    // Stopping again is fine; touching a released lease is not.
    d.run(r.path(), &["release", &id]).await.expect(0);
    let out = d.run(r.path(), &["touch", &id]).await;
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("released"), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_releases_its_lease_unless_kept() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["run", "--", "true"]).await.expect(0);
    let all = d
        .run(r.path(), &["list", "--all", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(all.as_array().expect("array").len(), 1);
    assert_eq!(all[0]["state"], "released");

    // --keep-on-failure keeps it only when the command fails.
    d.run(r.path(), &["run", "--keep-on-failure", "--", "true"])
        .await
        .expect(0);
    d.run(r.path(), &["run", "--keep-on-failure", "--", "false"])
        .await
        .expect(1);
    let live = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(
        live.as_array().expect("array").len(),
        1,
        "the failed run's lease is kept"
    );
    // The next run in the repo uses the kept lease and leaves it alone.
    let doc = d
        .run(r.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["lease"]["id"], live[0]["id"]);
    let again = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(again[0]["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_sync_sends_only_changes() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let sync = |doc: serde_json::Value| doc["sync"].clone();
    let first = sync(
        d.run(r.path(), &["run", "--json", "--sync-only"])
            .await
            .expect(0)
            .json(),
    );
    assert_eq!(first["files_total"], 2);
    assert_eq!(first["files_uploaded"], 2);
    let second = sync(
        d.run(r.path(), &["run", "--json", "--sync-only"])
            .await
            .expect(0)
            .json(),
    );
    assert_eq!(
        second["files_uploaded"], 0,
        "an unchanged tree sends nothing"
    );
    assert_eq!(second["bytes_uploaded"], 0);

    std::fs::write(r.path().join("README"), "changed\n").expect("write");
    std::fs::remove_file(r.path().join("src/lib.txt")).expect("rm");
    std::fs::write(r.path().join("new.txt"), "new\n").expect("write");
    std::os::unix::fs::symlink("README", r.path().join("link")).expect("ln");
    let third = d
        .run(
            r.path(),
            &[
                "run",
                "--json",
                "--",
                "sh",
                "-c",
                "cat README new.txt; readlink link; test -e src/lib.txt || echo gone",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(third["sync"]["files_uploaded"], 3);
    assert_eq!(third["sync"]["files_deleted"], 1);
    assert_eq!(third["stdout"], "changed\nnew\nREADME\ngone\n");

    let full = sync(
        d.run(r.path(), &["run", "--json", "--sync-only", "--full-resync"])
            .await
            .expect(0)
            .json(),
    );
    assert_eq!(full["files_uploaded"], 3, "README, new.txt, link");
    // --no-sync runs in the workdir as it is.
    let out = d
        .run(r.path(), &["run", "--no-sync", "--", "cat", "new.txt"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "new\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_exit_codes() {
    let d = Daemon::start().await;
    let r = repo();
    let out = d
        .run(r.path(), &["stop", "cbx_000000000000"])
        .await
        .expect(4);
    assert!(out.stderr().contains("no lease named"), "{}", out.stderr());
    let out = d.run(r.path(), &["status", "nope"]).await.expect(4);
    assert!(out.stderr().contains("crabbox list"), "{}", out.stderr());

    // An ambiguous name lists the matches.
    let other = repo();
    d.run(r.path(), &["warmup", "--slug", "dup-one"])
        .await
        .expect(0);
    d.run(other.path(), &["warmup", "--slug", "dup-two"])
        .await
        .expect(0);
    let out = d.run(r.path(), &["stop", "dup"]).await.expect(4);
    let err = out.stderr();
    assert!(
        err.contains("matches 2 leases") && err.contains("dup-one") && err.contains("dup-two"),
        "{err}"
    );
    // A taken or malformed slug is a usage error.
    let third = repo();
    let out = d
        .run(third.path(), &["warmup", "--slug", "dup-one"])
        .await
        .expect(2);
    assert!(out.stderr().contains("taken"), "{}", out.stderr());
    d.run(third.path(), &["warmup", "--slug", "Bad_Slug"])
        .await
        .expect(2);
    // A slug is unique among live leases only: once released it may be taken again, and
    // the name then means the newest lease that had it (a prefix of both stays ambiguous).
    let mut ids = Vec::new();
    for _ in 0..2 {
        let lease = d
            .run(third.path(), &["warmup", "--slug", "reused-name", "--json"])
            .await
            .expect(0)
            .json();
        ids.push(lease["id"].as_str().expect("id").to_string());
        d.run(third.path(), &["stop", "reused-name"])
            .await
            .expect(0);
    }
    assert_ne!(ids[0], ids[1]);
    let st = d
        .run(third.path(), &["status", "reused-name", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(st["id"], ids[1].as_str(), "{st}");
    assert_eq!(st["state"], "released", "{st}");
    let out = d
        .run(third.path(), &["status", "reused-na"])
        .await
        .expect(4);
    assert!(
        out.stderr().contains("matches 2 leases"),
        "{}",
        out.stderr()
    );

    // Durations, labels, commands, providers, machine classes.
    let out = d
        .run(r.path(), &["warmup", "--ttl", "soon"])
        .await
        .expect(2);
    assert!(
        out.stderr().contains("90s, 30m, 2h or 1h30m"),
        "{}",
        out.stderr()
    );
    d.run(r.path(), &["run", "--timeout", "0s", "--", "true"])
        .await
        .crabbox_failed("usage");
    d.run(r.path(), &["warmup", "--label", "novalue"])
        .await
        .expect(2);
    let out = d.run(r.path(), &["run"]).await.crabbox_failed("usage");
    assert!(
        out.stderr().contains("crabbox run -- cargo test"),
        "{}",
        out.stderr()
    );
    let out = d
        .run(
            r.path(),
            &["--provider", "daytona", "warmup", "--class", "beefy"],
        )
        .await
        .expect(2);
    assert!(out.stderr().contains("snapshot"), "{}", out.stderr());
    d.run(r.path(), &["--provider", "gcp", "list"])
        .await
        .expect(2);
    let out = d
        .run(r.path(), &["--type", "m5.large", "run", "--", "true"])
        .await
        .crabbox_failed("usage");
    assert!(
        out.stderr().contains("--type is not supported"),
        "{}",
        out.stderr()
    );

    // A bad config file is a usage error naming the file, for the commands that use it
    // (`list` and the others that do not need it go on with a warning: see
    // a_broken_config_and_odd_environments_get_clear_answers).
    let cfg = r.path().join("bad.yaml");
    std::fs::write(&cfg, "provder: local\n").expect("write");
    let out = d
        .run_env(r.path(), &[("CRABBOX_CONFIG", cfg.as_ref())], &["warmup"])
        .await
        .0;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml"));

    // An unreadable repo: the current folder was deleted under the CLI.
    let gone = tempfile::tempdir().expect("tempdir");
    let gone_path = gone.path().to_path_buf();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && rmdir \"$PWD\" && exec \"$0\" run -- true",
            gone_path.display()
        ))
        .arg(env!("CARGO_BIN_EXE_crabbox"))
        .env("CRABBOX_SOCKET", &d.socket)
        .env("CRABBOX_NO_AUTOSTART", "1")
        .output()
        .await
        .expect("ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("error [sync]") && err.contains("cannot read the current folder"),
        "{err}"
    );

    // No daemon on the socket, autostart off: a clear error.
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_SOCKET", r.path().join("none.sock").as_ref())],
            &["list"],
        )
        .await
        .0;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crabbox daemon start"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_claimed_by_another_repo_needs_reclaim() {
    let d = Daemon::start().await;
    let a = repo();
    let b = repo();
    let lease = d
        .run(a.path(), &["warmup", "--json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id");
    let out = d
        .run(b.path(), &["run", "--id", id, "--", "true"])
        .await
        .crabbox_failed("not_found");
    let err = out.stderr();
    assert!(
        err.contains("claimed by") && err.contains("--reclaim"),
        "{err}"
    );
    let doc = d
        .run(
            b.path(),
            &[
                "run",
                "--id",
                id,
                "--reclaim",
                "--json",
                "--",
                "cat",
                "README",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "hello\n");
    let b_root = std::fs::canonicalize(b.path()).expect("canonical");
    assert_eq!(doc["lease"]["repo_root"], b_root.to_str().expect("utf8"));
    // Now repo a has no lease: its next run gets a fresh one.
    let doc = d
        .run(a.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_ne!(doc["lease"]["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_command_and_releases_a_fresh_lease() {
    let d = Daemon::start().await;
    let r = repo();
    // The command runs jailed (its own PID namespace): it is found on this machine by
    // its unusual command line.
    let secs = format!("{}", 60_000 + std::process::id() % 10_000);
    let mut child = d
        .cli(r.path())
        .args(["run", "--", "sleep", &secs])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let find = |secs: &str| {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                (cmd == format!("sleep\0{secs}\0").into_bytes())
                    .then(|| e.file_name().to_string_lossy().parse::<i32>().ok())
                    .flatten()
            })
    };
    let pid: i32 = eventually(30, "the command to start", || async { find(&secs) }).await;
    let cli_pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(cli_pid, nix::sys::signal::Signal::SIGINT).expect("sigint");
    let status = child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(130));
    // The remote command is gone and the fresh lease released.
    common::process_ends(20, "the command to be killed", pid).await;
    eventually(20, "the lease to be released", || async {
        let all = d.run(r.path(), &["list", "--all", "--json"]).await.json();
        (all[0]["state"] == "released").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_expiry() {
    let d = Daemon::start().await;
    let r = repo();
    let doc = d
        .run(
            r.path(),
            &["run", "--json", "--timeout", "1s", "--", "sleep", "30"],
        )
        .await
        .expect(124)
        .json();
    assert_eq!(doc["timed_out"], true);

    // Idle expiry releases a lease; a running command is use and keeps it.
    let lease = d
        .run(r.path(), &["warmup", "--idle-timeout", "4s", "--json"])
        .await
        .expect(0)
        .json();
    let slug = lease["slug"].as_str().expect("slug").to_string();
    d.run(r.path(), &["run", "--", "sleep", "6"])
        .await
        .expect(0);
    eventually(30, "idle expiry", || async {
        let st = d.run(r.path(), &["status", &slug, "--json"]).await.json();
        (st["state"] == "released").then_some(())
    })
    .await;
    let st = d.run(r.path(), &["status", &slug, "--json"]).await.json();
    assert!(
        st["reason"].as_str().expect("reason").contains("idle"),
        "{st}"
    );

    // The ttl caps a lease however used.
    let lease = d
        .run(r.path(), &["warmup", "--ttl", "1s", "--json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id").to_string();
    eventually(30, "ttl expiry", || async {
        let st = d.run(r.path(), &["status", &id, "--json"]).await.json();
        (st["state"] == "released").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_doctor() {
    let d = Daemon::start().await;
    let r = repo();
    let out = d.run(r.path(), &["completions", "bash"]).await.expect(0);
    assert!(
        out.stdout().contains("COMPLETE=\"bash\""),
        "{}",
        out.stdout()
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        d.run(r.path(), &["completions", shell]).await.expect(0);
    }
    // The shell's hook asks `COMPLETE=<shell> crabbox -- <words>`: lease names come live
    // from the daemon, with their id, state and repo as help.
    let lease = d
        .run(r.path(), &["warmup", "--slug", "complete-me", "--json"])
        .await
        .expect(0)
        .json();
    let complete = |words: &[&str]| {
        let mut c = d.cli(r.path());
        c.env("COMPLETE", "fish")
            .arg("--")
            .arg("crabbox")
            .args(words);
        c
    };
    for words in [
        &["stop", ""][..],
        &["status", "comp"],
        &["run", "--id", ""],
        &["ssh", "--id", ""],
    ] {
        let out = complete(words).output().await.expect("complete");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("complete-me\t"))
            .unwrap_or_else(|| panic!("{words:?}: {text}"));
        assert!(
            line.contains(lease["id"].as_str().expect("id")) && line.contains("ready"),
            "{line}"
        );
    }
    // Flags still complete; and with no daemon, completion answers at once and starts none.
    let out = complete(&["stop", "--f"]).output().await.expect("complete");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--force"));
    let gone = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let out = complete(&["stop", ""])
        .env("CRABBOX_SOCKET", gone.path().join("none.sock"))
        .env_remove("CRABBOX_NO_AUTOSTART")
        .output()
        .await
        .expect("complete");
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("complete-me"));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(
        !gone.path().join("none.sock").exists(),
        "no daemon started for a completion"
    );
    let doc = d
        .run(r.path(), &["doctor", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(doc["ok"], true);
    let text = d.run(r.path(), &["doctor"]).await.expect(0).stdout();
    assert!(text.contains("ok   daemon: crabboxd"), "{text}");
    let st = d
        .run(r.path(), &["daemon", "status", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(st["running"], true);
    assert_eq!(st["pid"], std::process::id());
}

#[allow(dead_code)]
fn _unused(_: &Path) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_and_odd_environments_get_clear_answers() {
    use std::os::unix::ffi::OsStrExt;
    let d = Daemon::start().await;
    let r = repo();
    let bad = d.dir.path().join("bad.yaml");
    std::fs::write(&bad, "sync: [1, 2]\n").expect("write");
    let with_bad = |args: &[&str]| {
        let mut c = d.cli(r.path());
        c.env("CRABBOX_CONFIG", &bad).args(args);
        c
    };
    // Commands that do not need the config go on, with a warning naming the file.
    for args in [&["list"][..], &["daemon", "status"], &["claims"]] {
        let out = with_bad(args).output().await.expect("ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains("warning") && err.contains("bad.yaml"), "{err}");
    }
    // doctor reports it; run refuses.
    let out = with_bad(&["doctor"]).output().await.expect("ran");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL config") && text.contains("bad.yaml"),
        "{text}"
    );
    let out = with_bad(&["run", "--", "true"])
        .output()
        .await
        .expect("ran");
    // crabbox's own failure under `run`: 125, the kind in the error line.
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("crabbox: error [usage]: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // idle_timeout in one layer and its alias idleTimeout in another are one key.
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(home.path().join("crabbox")).expect("mkdir");
    std::fs::write(
        home.path().join("crabbox/config.yaml"),
        "idle_timeout: 10m\n",
    )
    .expect("user config");
    std::fs::write(r.path().join("crabbox.yaml"), "idleTimeout: 7m\n").expect("repo config");
    let out = d
        .cli(r.path())
        .env_remove("CRABBOX_CONFIG")
        .env("XDG_CONFIG_HOME", home.path())
        .args(["warmup", "--json"])
        .output()
        .await
        .expect("ran");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lease: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        lease["crabbox_labels"]["idle_timeout_secs"], "420",
        "the repo's layer wins"
    );

    // An environment is checked on the local provider too, and says what applies.
    let env_cfg = d.dir.path().join("env.yaml");
    std::fs::write(
        &env_cfg,
        "environment:\n  network: { mode: cidr_allow_list, allow: [\"10.0.0.0/33\"] }\n",
    )
    .expect("write");
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", env_cfg.as_ref())],
            &["warmup"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("10.0.0.0/33"), "{err}");
    std::fs::write(&env_cfg, "environment:\n  network: { mode: block }\n").expect("write");
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", env_cfg.as_ref())],
            &["warmup"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // The repo's lease exists already and was made without it: said, not dropped.
    assert!(
        err.contains("keeps the sandbox it was made with")
            && err.contains("network_block_all=true"),
        "{err}"
    );
    // A new lease gets it, and the local jail takes the network mode itself: nothing to say.
    d.run(r.path(), &["stop"]).await.expect(0);
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", env_cfg.as_ref())],
            &["warmup"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("note:"), "{err}");

    // --env NAME whose value is not UTF-8 says so.
    let out = d
        .run_env(
            r.path(),
            &[("ODD", std::ffi::OsStr::from_bytes(b"\xff\xfe"))],
            &["run", "--env", "ODD", "--", "true"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("error [usage]") && err.contains("not UTF-8"),
        "{err}"
    );
}

/// The CLI has its own C main (no std start-up): started with stdin and stdout closed, the
/// descriptors it opens (its runtime's, the daemon's socket) must not take their places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_started_with_its_stdio_closed_still_runs_as_with_dev_null() {
    let d = Daemon::start().await;
    let r = repo();
    // What `d.cli` sets (the daemon's socket, no config, no autostart), for a `sh` that
    // starts crabbox with some of its descriptors closed.
    let cli = d.cli(r.path());
    let env: Vec<_> = cli
        .as_std()
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    for (closed, wanted_out) in [("<&-", "out\n"), (">&-", ""), ("<&- >&-", "")] {
        let script = format!(
            "exec \"$0\" run -- sh -c 'echo out; e=$?; cat; echo \"echo=$e cat=$?\" >&2; exit 3' \
             {closed}"
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_crabbox")])
            .envs(env.iter().cloned())
            .current_dir(r.path())
            .output()
            .expect("ran");
        let err = String::from_utf8_lossy(&out.stderr);
        // echo wrote, cat read an empty stdin (both /dev/null when closed); the exit code
        // is the command's own.
        assert_eq!(out.status.code(), Some(3), "{closed}: {err}");
        assert!(err.contains("echo=0 cat=0"), "{closed}: {err}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            wanted_out,
            "{closed}: {err}"
        );
    }
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "exec \"$0\" --version >&-",
            env!("CARGO_BIN_EXE_crabbox"),
        ])
        .output()
        .expect("ran");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_start_where_you_are_and_never_sync_too_much() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    // From a subfolder of the repo, the command runs in that subfolder of the checkout.
    let out = d
        .run(&r.path().join("src"), &["run", "--", "sh", "-c", "pwd; ls"])
        .await
        .expect(0);
    let text = out.stdout();
    assert!(
        text.lines().next().unwrap_or("").ends_with("/src"),
        "{text}"
    );
    assert!(text.contains("lib.txt"), "{text}");
    // --workdir overrides: relative to the checkout, or absolute in the sandbox.
    let out = d
        .run(
            &r.path().join("src"),
            &["run", "--workdir", ".", "--", "ls"],
        )
        .await
        .expect(0);
    assert!(out.stdout().contains("README"), "{}", out.stdout());
    let out = d
        .run(r.path(), &["run", "--workdir", "../up", "--", "true"])
        .await
        .crabbox_failed("usage");
    assert!(out.stderr().contains("workdir"), "{}", out.stderr());
    // A file where the folder would be: the caller's mistake, said so.
    let out = d
        .run(r.path(), &["run", "--workdir", "README", "--", "true"])
        .await
        .crabbox_failed("usage");
    assert!(
        out.stderr().contains("is not a folder in the sandbox")
            && out.stderr().contains("--workdir"),
        "{}",
        out.stderr()
    );

    // Outside git, the daemon's own state dir and socket folder are never synced.
    let out = d
        .run(d.dir.path(), &["run", "--", "sh", "-c", "ls -a"])
        .await
        .expect(0);
    let names: Vec<&str> = out.stdout().leak().lines().collect();
    assert!(names.contains(&"no-config.yaml"), "{names:?}");
    assert!(
        !names.contains(&"state") && !names.contains(&"run"),
        "{names:?}"
    );

    // A home folder is not synced whole unless named.
    let home = tempfile::tempdir().expect("home");
    std::fs::write(home.path().join("notes.txt"), "n").expect("write");
    let out = d
        .run_env(
            home.path(),
            &[("HOME", home.path().as_ref())],
            &["run", "--", "true"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("error [usage]")
            && err.contains("your home folder")
            && err.contains("--sync-root"),
        "{err}"
    );
    let out = d
        .run_env(
            home.path(),
            &[("HOME", home.path().as_ref())],
            &["run", "--sync-root", ".", "--", "cat", "notes.txt"],
        )
        .await
        .0;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_for_a_reused_lease_apply_to_it_and_are_said() {
    let d = Daemon::start().await;
    let r = repo();
    let lease = d
        .run(r.path(), &["warmup", "--json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id").to_string();
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_IDLE_TIMEOUT", "7m".as_ref())],
            &["run", "--keep", "--label", "env=dev", "--", "true"],
        )
        .await
        .0;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("now has: idle timeout 7m (was 30m); kept; labels env=dev"),
        "{err}"
    );
    let st = d
        .run(r.path(), &["status", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(st["keep"], true);
    assert_eq!(st["labels"]["env"], "dev");
    assert_eq!(st["crabbox_labels"]["idle_timeout_secs"], "420");
    // The same again: nothing changes, nothing is said.
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_IDLE_TIMEOUT", "7m".as_ref())],
            &["run", "--keep", "--label", "env=dev", "--", "true"],
        )
        .await
        .0;
    assert!(!String::from_utf8_lossy(&out.stderr).contains("now has"));
    // warmup in the repo applies its settings to the claimed lease too.
    let again = d
        .run(r.path(), &["warmup", "--label", "tier=2", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["labels"]["tier"], "2");
    // ... and says so, as a run does.
    let out = d.run(r.path(), &["warmup", "--ttl", "2h"]).await.expect(0);
    assert!(
        out.stderr().contains("now has: ttl 2h (was 1h30m)"),
        "{}",
        out.stderr()
    );
    // What cannot apply to a lease that exists is said, not dropped.
    let out = d
        .run(r.path(), &["warmup", "--slug", "other-name"])
        .await
        .expect(0);
    assert!(
        out.stderr()
            .contains("keeps its name; --slug other-name applies to new leases"),
        "{}",
        out.stderr()
    );
    // A reused lease gets no more than a new one may have: refused, and the lease keeps
    // its ttl.
    let out = d.run(r.path(), &["warmup", "--ttl", "31d"]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("longer than the 30d"),
        "{}",
        out.stderr()
    );
    let st = d
        .run(r.path(), &["status", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(st["crabbox_labels"]["ttl_secs"], "7200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_command_is_stopped_and_output_keeps_it_alive() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    // Quiet for longer than the stall timeout: stopped, exit 124, said why.
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--stall-timeout",
                "1s",
                "--",
                "sh",
                "-c",
                "echo start; sleep 30",
            ],
        )
        .await
        .expect(124);
    assert_eq!(out.stdout(), "start\n");
    assert!(
        out.stderr().contains("printed nothing for 1s") && out.stderr().contains("--stall-timeout"),
        "{}",
        out.stderr()
    );
    // Output resets it: longer than the timeout in all, never quiet that long.
    let doc = d
        .run(
            r.path(),
            &[
                "run",
                "--json",
                "--stall-timeout",
                "1s",
                "--",
                "sh",
                "-c",
                "for i in 1 2 3 4; do echo $i; sleep 0.5; done",
            ],
        )
        .await
        .expect(0)
        .json();
    assert_eq!(doc["stdout"], "1\n2\n3\n4\n");
    assert_eq!(doc["stalled"], false);
    // From config, too.
    let cfg = d.dir.path().join("stall.yaml");
    std::fs::write(&cfg, "run: { stall_timeout: 1s }\n").expect("write");
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "sleep", "30"],
        )
        .await
        .0;
    assert_eq!(out.status.code(), Some(124));

    // Input resets it too: a command that prints nothing but is being fed is not hung.
    use tokio::io::AsyncWriteExt;
    let mut child = d
        .cli(r.path())
        .args([
            "run",
            "--stall-timeout",
            "2s",
            "--",
            "sh",
            "-c",
            "n=0; while read x; do n=$((n+1)); done; echo read $n",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    for _ in 0..10 {
        stdin.write_all(b"line\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    drop(stdin);
    let out = child.wait_with_output().await.expect("out");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "read 10\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_output_ndjson_is_a_live_lossless_event_stream() {
    use tokio::io::AsyncBufReadExt;
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let mut child = d
        .cli(r.path())
        .args([
            "run",
            "--output",
            "ndjson",
            "--",
            "sh",
            "-c",
            "echo out; printf '\\377' >&2; sleep 1; exit 3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut events: Vec<(serde_json::Value, std::time::Instant)> = Vec::new();
    while let Some(line) = lines.next_line().await.expect("line") {
        let v: serde_json::Value = serde_json::from_str(&line).expect("each line is JSON");
        events.push((v, std::time::Instant::now()));
    }
    assert_eq!(child.wait().await.expect("exit").code(), Some(3));
    let kinds: Vec<&str> = events
        .iter()
        .map(|(v, _)| v["event"].as_str().expect("event"))
        .collect();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k} in {kinds:?}"))
    };
    assert!(
        pos("lease") < pos("sync") && pos("sync") < pos("started"),
        "{kinds:?}"
    );
    assert!(
        pos("started") < pos("stdout") && pos("stdout") < pos("exit"),
        "{kinds:?}"
    );
    assert_eq!(*kinds.last().expect("last"), "exit");
    let (out, at_out) = &events[pos("stdout")];
    assert_eq!(out["text"], "out\n");
    let (err, _) = &events[pos("stderr")];
    assert_eq!(
        err["base64"], "/w==",
        "bytes that are not UTF-8 arrive exactly"
    );
    let (exit, at_exit) = &events[pos("exit")];
    assert_eq!(exit["exit_code"], 3);
    assert!(exit["command_ms"].as_u64().expect("ms") >= 1000);
    assert!(
        at_exit.duration_since(*at_out) >= std::time::Duration::from_millis(700),
        "the output line came while the command ran, not at its end"
    );
    // A failure ends the stream with an error event.
    let out = d
        .run(
            r.path(),
            &["run", "--output", "ndjson", "--id", "nope", "--", "true"],
        )
        .await;
    assert_eq!(out.code(), 125);
    let last: serde_json::Value =
        serde_json::from_str(out.stdout().lines().last().expect("a line")).expect("json");
    assert_eq!(last["kind"], "not_found", "{last}");
    assert_eq!(
        (last["event"].as_str(), last["exit_code"].as_i64()),
        (Some("error"), Some(125))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_forwarded_byte_exact_with_eof_unless_n() {
    let d = Daemon::start().await;
    let r = repo();
    common::stdio::stdin_is_forwarded_byte_exact_with_eof_unless_n(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_run_behaves_like_a_terminal() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    common::tty::tty_run_behaves_like_a_terminal(&d, r.path(), &[]).await;
}

/// tmux on a private socket, for a real terminal with a real shell in it.
struct Tmux(PathBuf);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)")
    }
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_killed_in_raw_mode_leaves_a_sane_prompt() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let tmux = Tmux(d.dir.path().join("tmux.sock"));
    let config = d.dir.path().join("no-config.yaml");
    let env = [
        format!("PATH={}", std::env::var("PATH").unwrap_or_default()),
        format!("HOME={}", d.dir.path().display()),
        "TERM=xterm".to_string(),
        format!("CRABBOX_SOCKET={}", d.socket.display()),
        format!("CRABBOX_STATE_DIR={}", d.state.display()),
        "CRABBOX_NO_AUTOSTART=1".to_string(),
        format!("CRABBOX_CONFIG={}", config.display()),
    ];
    let mut args = vec!["new-session", "-d", "-x", "100", "-y", "30", "env", "-i"];
    args.extend(env.iter().map(String::as_str));
    args.extend(["bash", "--norc", "--noprofile"]);
    assert!(tmux.cmd(&args).status.success(), "tmux new-session");
    let tty = String::from_utf8_lossy(&tmux.cmd(&["display", "-p", "#{pane_tty}"]).stdout)
        .trim()
        .to_string();
    let stty = || {
        let f = std::fs::File::open(&tty).expect("open the pane's tty");
        String::from_utf8_lossy(
            &std::process::Command::new("stty")
                .arg("-a")
                .stdin(f)
                .output()
                .expect("stty")
                .stdout,
        )
        .into_owned()
    };
    let line = format!(
        "cd {} && {} run -q -t -- sh -c 'echo rea''dy; sleep 60'",
        r.path().display(),
        env!("CARGO_BIN_EXE_crabbox")
    );
    tmux.cmd(&["send-keys", &line, "Enter"]);
    eventually(30, "the command runs", || async {
        tmux.screen().contains("ready").then_some(())
    })
    .await;
    assert!(stty().contains("-icanon"), "raw while it runs:\n{}", stty());

    // kill -9: crabbox cannot put anything back; the shell it was started from does.
    let ps = std::process::Command::new("ps")
        .args(["-t", &tty, "-o", "pid=,comm="])
        .output()
        .expect("ps");
    let pid = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .find(|l| l.contains("crabbox"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .expect("crabbox on the pane's tty");
    std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .expect("kill");
    let out = d.dir.path().join("after.txt");
    let check = format!("stty -a > {}; echo checked", out.display());
    eventually(30, "the prompt is back", || async {
        tmux.cmd(&["send-keys", &check, "Enter"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::read_to_string(&out)
            .is_ok_and(|s| s.contains("icanon"))
            .then_some(())
    })
    .await;
    let after = std::fs::read_to_string(&out).expect("stty output");
    let words: Vec<&str> = after.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "the next prompt has a sane terminal:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_server_in_the_sandbox_is_a_stdio_transport() {
    let d = Daemon::start().await;
    let r = repo();
    common::stdio::mcp_round_trips_through_a_fresh_run(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fed_forever_ends_cleanly_when_its_lease_is_stopped() {
    let d = Daemon::start().await;
    let r = repo();
    common::stdio::a_run_fed_forever_ends_cleanly_when_its_lease_is_stopped(&d, r.path(), &[])
        .await;
}

/// What the sandbox's checkout holds and what git says the repo holds (every file's path
/// and digest) must be the same.
async fn assert_synced(d: &Daemon, r: &Path, when: &str) {
    let remote_list =
        "find . -type f ! -name .crabbox-manifest.digest | LC_ALL=C sort | xargs -r sha256sum";
    let remote = d
        .run(r, &["run", "--", "sh", "-c", remote_list])
        .await
        .expect(0)
        .stdout();
    let local_list = "git ls-files -z --cached --others --exclude-standard | xargs -0 -r -n1 sh -c 'test -f \"$0\" && echo \"./$0\"' | LC_ALL=C sort -u | xargs -r sha256sum";
    let local = std::process::Command::new("sh")
        .args(["-c", local_list])
        .current_dir(r)
        .output()
        .expect("sh");
    assert_eq!(
        remote,
        String::from_utf8_lossy(&local.stdout),
        "the sandbox holds the repo {when}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_checkout_syncs_exactly_what_changed_without_a_scan() {
    let d = Daemon::start().await;
    let r = repo();
    let p = r.path();
    common::git(
        p,
        &[
            "-c",
            "user.email=t@t",
            "-c",
            "user.name=t",
            "commit",
            "-qm",
            "one",
        ],
    );
    d.run(p, &["warmup"]).await.expect(0);
    assert_synced(&d, p, "after the first sync").await;
    // Saved just before the run: never missed.
    std::fs::write(p.join("README"), "edited\n").expect("write");
    assert_synced(&d, p, "after an edit").await;
    std::fs::create_dir_all(p.join("new/deep")).expect("mkdir");
    std::fs::write(p.join("new/deep/f.txt"), "f\n").expect("write");
    assert_synced(&d, p, "after a new folder").await;
    std::fs::rename(p.join("new"), p.join("moved")).expect("mv");
    assert_synced(&d, p, "after a folder was renamed").await;
    std::fs::remove_file(p.join("src/lib.txt")).expect("rm");
    assert_synced(&d, p, "after a deletion").await;
    // An ignore rule changes what goes.
    std::fs::write(p.join(".gitignore"), "moved/\n").expect("write");
    assert_synced(&d, p, "with moved/ ignored").await;
    // Another branch.
    let g = |args: &[&str]| common::git(p, args);
    g(&["add", "-A"]);
    g(&[
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-qm",
        "two",
    ]);
    g(&["checkout", "-q", "-b", "other", "HEAD~1"]);
    assert_synced(&d, p, "after a checkout of another branch").await;
    // A file replaced by a folder of the same name.
    std::fs::remove_file(p.join("README")).expect("rm");
    std::fs::create_dir(p.join("README")).expect("mkdir");
    std::fs::write(p.join("README/inside"), "i\n").expect("write");
    assert_synced(&d, p, "after a file became a folder").await;
    // And across a daemon restart (the watch starts over with a scan).
    let (dir, socket, state) = d.shutdown().await;
    std::fs::write(p.join("late.txt"), "written while the daemon was down\n").expect("write");
    let d = Daemon::start_in(
        dir,
        socket,
        state,
        |s| crabbox::daemon::default_providers(s).expect("p"),
        |_| {},
    )
    .await;
    assert_synced(&d, p, "after a restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_deletes_most_of_the_lease_is_refused_unless_forced() {
    let d = Daemon::start().await;
    let r = repo();
    let p = r.path();
    for i in 0..30 {
        std::fs::write(p.join(format!("f{i:02}.txt")), format!("{i}\n")).expect("write");
    }
    common::git(p, &["add", "."]);
    d.run(p, &["run", "--keep", "--", "true"]).await.expect(0);
    // 20 of 32 files gone: a wrong branch, most likely.
    for i in 0..20 {
        std::fs::remove_file(p.join(format!("f{i:02}.txt"))).expect("rm");
    }
    let out = d.run(p, &["run", "--", "ls"]).await.crabbox_failed("sync");
    assert!(
        out.stderr().contains("would delete 20 of the 32 files")
            && out.stderr().contains("--force-sync-delete"),
        "{}",
        out.stderr()
    );
    // Nothing was deleted in the lease.
    let listed = d
        .run(
            p,
            &["run", "--no-sync", "--", "sh", "-c", "ls f*.txt | wc -l"],
        )
        .await
        .expect(0)
        .stdout();
    assert_eq!(listed.trim(), "30");
    // A guard set higher lets it through; so does the flag.
    let cfg = d.dir.path().join("guard.yaml");
    std::fs::write(&cfg, "sync: {delete_guard: 70}\n").expect("write");
    let out = d
        .run_env(
            p,
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "sh", "-c", "ls f*.txt | wc -l"],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout().trim(), "10");
    std::fs::write(&cfg, "sync: {delete_guard: 0}\n").expect("write");
    let out = d
        .run_env(
            p,
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "true"],
        )
        .await
        .crabbox_failed("usage");
    assert!(out.stderr().contains("delete_guard"), "{}", out.stderr());
    for i in 20..28 {
        std::fs::remove_file(p.join(format!("f{i:02}.txt"))).expect("rm");
    }
    let out = d
        .run(
            p,
            &[
                "run",
                "--force-sync-delete",
                "--",
                "sh",
                "-c",
                "ls f*.txt | wc -l",
            ],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout().trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_plan_says_what_a_run_would_send_without_leasing() {
    let d = Daemon::start().await;
    let r = repo();
    let p = r.path();
    std::fs::write(p.join("big.bin"), vec![7u8; 300_000]).expect("write");
    common::git(p, &["add", "."]);
    let plan = d.run(p, &["--json", "sync-plan"]).await.expect(0).json();
    assert_eq!(plan["lease"], serde_json::Value::Null);
    assert_eq!(plan["full"], true);
    assert_eq!(plan["files_to_send"], 3);
    assert_eq!(plan["largest_files"][0]["path"], "big.bin");
    assert_eq!(plan["largest_folders"][0]["path"], "src/");
    let listed = d.run(p, &["list", "--json"]).await.expect(0).json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(0),
        "a plan leases nothing"
    );
    d.run(p, &["run", "--keep", "--", "true"]).await.expect(0);
    std::fs::write(p.join("README"), "changed\n").expect("write");
    std::fs::write(p.join("new.txt"), "new\n").expect("write");
    std::fs::remove_file(p.join("src/lib.txt")).expect("rm");
    let plan = d.run(p, &["--json", "sync-plan"]).await.expect(0).json();
    assert_eq!(plan["full"], false);
    assert_eq!(
        (
            plan["files_to_send"].as_u64(),
            plan["files_to_delete"].as_u64()
        ),
        (Some(2), Some(1))
    );
    let kinds: Vec<(String, String)> = plan["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap_or("").into(),
                c["kind"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("README".to_string(), "modified".to_string()),
            ("new.txt".into(), "added".into()),
            ("src/lib.txt".into(), "deleted".into())
        ]
    );
    let text = d.run(p, &["sync-plan"]).await.expect(0).stdout();
    assert!(
        text.contains("2 files to send")
            && text.contains("M README")
            && text.contains("D src/lib.txt"),
        "{text}"
    );
    // The run that follows sends exactly that.
    let run = d
        .run(p, &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    assert_eq!(run["sync"]["files_uploaded"], 2);
    assert_eq!(run["sync"]["files_deleted"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_trees_sync_exactly_or_are_refused_by_name() {
    let d = Daemon::start().await;
    let r = repo();
    let p = r.path();
    // A symlink loop travels as links (never followed); a path with a newline and one
    // with spaces and quotes sync exactly.
    std::os::unix::fs::symlink("b", p.join("a")).expect("symlink");
    std::os::unix::fs::symlink("a", p.join("b")).expect("symlink");
    std::fs::create_dir(p.join("loop")).expect("mkdir");
    std::os::unix::fs::symlink("..", p.join("loop/up")).expect("symlink");
    std::fs::write(p.join("new\nline.txt"), "nl\n").expect("write");
    std::fs::write(p.join("it's \"q\" .txt"), "q\n").expect("write");
    // A sparse file goes with its full length (read as zeros; 64 MiB here to keep the
    // suite fast: a 4 GiB one was checked by hand, 132 s in a debug build).
    let sparse = std::fs::File::create(p.join("sparse.img")).expect("create");
    sparse.set_len(64 << 20).expect("set_len");
    drop(sparse);
    common::git(p, &["add", "-A"]);
    let out = d
        .run(
            p,
            &[
                "run",
                "--",
                "sh",
                "-c",
                "readlink a; readlink b; readlink loop/up; cat 'new\nline.txt' \"it's \\\"q\\\" .txt\"; stat -c %s sparse.img",
            ],
        )
        .await
        .expect(0);
    assert_eq!(
        out.stdout(),
        "b\na\n..\nnl\nq\n67108864\n",
        "{}",
        out.stderr()
    );
    // A file that is too large for the limit is refused before anything is created.
    // (Untracked, as git would take minutes to hash it; it is listed all the same.)
    let big = std::fs::File::create(p.join("huge.img")).expect("create");
    big.set_len(21 << 30).expect("set_len");
    drop(big);
    let out = d.run(p, &["run", "--", "true"]).await;
    assert_ne!(out.code(), 0);
    assert!(
        out.stderr().contains("refusing to sync") && out.stderr().contains("--force-sync-large"),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_git_brings_the_repository_for_builds_that_run_git() {
    let d = Daemon::start().await;
    let r = repo();
    let p = r.path();
    let commit = |m: &str| {
        common::git(
            p,
            &[
                "-c",
                "user.email=t@t",
                "-c",
                "user.name=t",
                "commit",
                "-qm",
                m,
            ],
        )
    };
    commit("one");
    common::git(p, &["tag", "v1.0"]);
    // Without sync.git the sandbox has no repository.
    let out = d
        .run(
            p,
            &[
                "run",
                "--keep",
                "--",
                "sh",
                "-c",
                "test -e .git || echo none",
            ],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout(), "none\n");
    let cfg = d.dir.path().join("git.yaml");
    std::fs::write(&cfg, "sync: {git: true}\n").expect("write");
    let run = |args: &'static [&'static str]| {
        let cfg = cfg.clone();
        let d = &d;
        async move {
            d.run_env(p, &[("CRABBOX_CONFIG", cfg.as_ref())], args)
                .await
        }
    };
    let out = run(&["run", "--", "git", "describe", "--tags"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "v1.0\n", "{}", out.stderr());
    // Incremental: a new commit travels (its objects and refs), and describe sees it.
    std::fs::write(p.join("README"), "two\n").expect("write");
    common::git(p, &["add", "."]);
    commit("two");
    let out = run(&["run", "--", "git", "describe", "--tags"])
        .await
        .expect(0);
    assert!(out.stdout().starts_with("v1.0-1-g"), "{}", out.stdout());
    let out = run(&["run", "--", "git", "log", "--oneline"])
        .await
        .expect(0);
    assert_eq!(out.stdout().lines().count(), 2, "{}", out.stdout());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_change_sends_about_the_chunks_it_touched() {
    let d = Daemon::start().await;
    let r = repo();
    common::sync::a_large_file_change_sends_about_the_chunks_it_touched(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_told_as_it_goes() {
    let d = Daemon::start().await;
    let r = repo();
    common::sync::an_upload_is_told_as_it_goes(&d, r.path(), &[], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_lease_keeps_its_disk_and_the_next_run_resumes_it() {
    let d = Daemon::start().await;
    let r = repo();
    common::pause::a_paused_lease_keeps_its_disk_and_the_next_run_resumes_it(&d, r.path(), &[])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_follow_docker_for_run_and_spec_elsewhere() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    // The command's own codes pass through, every one of them (5 included: it is not
    // "provisioning failed" when the command says it).
    for code in [0, 1, 2, 3, 5, 6, 7, 42, 125] {
        d.run(
            r.path(),
            &["run", "--", "sh", "-c", &format!("exit {code}")],
        )
        .await
        .expect(code);
    }
    // The sandbox's shell: 126 cannot execute, 127 not found.
    std::fs::write(r.path().join("noexec.sh"), "#!/bin/sh\necho hi\n").expect("w");
    d.run(r.path(), &["run", "--", "./noexec.sh"])
        .await
        .expect(126);
    d.run(r.path(), &["run", "--", "no-such-command-xyz"])
        .await
        .expect(127);
    // --timeout: 124.
    d.run(r.path(), &["run", "--timeout", "1s", "--", "sleep", "30"])
        .await
        .expect(124);
    // crabbox's own failures under run and ssh: 125, with the kind.
    d.run(r.path(), &["run", "--id", "nope", "--", "true"])
        .await
        .crabbox_failed("not_found");
    d.run(r.path(), &["ssh", "--", "true"])
        .await
        .crabbox_failed("ssh");
    // ssh without a command runs nothing of the user's: SPEC's code.
    d.run(r.path(), &["ssh", "--print"]).await.expect(7);
    // ... and under --json, a JSON document on stderr.
    let out = d
        .run(r.path(), &["--json", "run", "--id", "nope", "--", "true"])
        .await
        .expect(125);
    let doc: serde_json::Value = serde_json::from_str(out.stderr().trim()).expect("json");
    assert_eq!(doc["error"]["kind"], "not_found", "{doc}");
    assert_eq!(doc["error"]["exit_code"], 125);
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nope")
    );
    // Forgot `--`: clap's error, and where the command goes.
    let out = d
        .run(r.path(), &["run", "ls", "-la"])
        .await
        .crabbox_failed("usage");
    assert!(
        out.stderr()
            .contains("hint: put the command after `--`: crabbox run -- ls -la"),
        "{}",
        out.stderr()
    );
    // Commands that run nothing of the user's keep SPEC's codes.
    d.run(r.path(), &["status", "nope"]).await.expect(4);
    d.run(r.path(), &["warmup", "--ttl", "soon"])
        .await
        .expect(2);
    let out = d
        .run(r.path(), &["--json", "status", "nope"])
        .await
        .expect(4);
    let doc: serde_json::Value = serde_json::from_str(out.stderr().trim()).expect("json");
    assert_eq!(doc["error"]["kind"], "not_found", "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_side_daytona_flags_are_refused_with_where_to_set_them() {
    let d = Daemon::start().await;
    let r = repo();
    for (args, says) in [
        (
            &["--daytona-api-url", "http://x", "list"][..],
            "DAYTONA_API_URL",
        ),
        (
            &["--daytona-work-root", "/w", "warmup"][..],
            "CRABBOX_DAYTONA_WORK_ROOT",
        ),
        (
            &["--daytona-ssh-gateway-host", "h", "status", "x"][..],
            "daytona.sshGatewayHost",
        ),
        (
            &["--daytona-ssh-access-minutes", "5", "ssh"][..],
            "crabbox ssh --ttl",
        ),
    ] {
        let out = d.run(r.path(), args).await.expect(2);
        assert!(out.stderr().contains(says), "{args:?}: {}", out.stderr());
    }
    // Under run: crabbox's own usage failure (125).
    let out = d
        .run(
            r.path(),
            &["--daytona-api-url", "http://x", "run", "--", "true"],
        )
        .await
        .crabbox_failed("usage");
    assert!(out.stderr().contains("restart it"), "{}", out.stderr());
    // The per-lease ones have help; the daemon-side ones are not offered.
    let help = d.run(r.path(), &["run", "--help"]).await.expect(0).stdout();
    assert!(
        help.contains("--daytona-snapshot") && help.contains("The snapshot"),
        "{help}"
    );
    assert!(!help.contains("--daytona-api-url"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_touch_and_stop_default_to_the_repos_lease() {
    let d = Daemon::start().await;
    let r = repo();
    let lease = d
        .run(r.path(), &["--json", "warmup"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id");
    // From a folder inside the repo, too.
    let inner = r.path().join("src");
    let st = d.run(&inner, &["--json", "status"]).await.expect(0).json();
    assert_eq!(st["id"], id);
    let touched = d.run(&inner, &["--json", "touch"]).await.expect(0).json();
    assert_eq!(touched["id"], id);
    let stopped = d.run(&inner, &["--json", "stop"]).await.expect(0).json();
    assert_eq!(
        (stopped["id"].as_str(), stopped["state"].as_str()),
        (Some(id), Some("released"))
    );
    let out = d.run(&inner, &["status"]).await.expect(4);
    assert!(
        out.stderr().contains("no lease is claimed by"),
        "{}",
        out.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_says_where_its_time_went() {
    let d = Daemon::start().await;
    let r = repo();
    // A fresh lease: every phase, in order, the release last.
    let doc = d
        .run(r.path(), &["run", "--json", "--", "sleep", "0.2"])
        .await
        .expect(0)
        .json();
    let phases: Vec<&str> = doc["timings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["phase"].as_str())
        .collect();
    assert_eq!(
        phases,
        [
            "manifest", "resolve", "archive", "upload", "exec", "release", "total"
        ],
        "{doc}"
    );
    let ms = |p: &str| {
        doc["timings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["phase"] == p)
            .and_then(|t| t["ms"].as_u64())
            .unwrap_or(0)
    };
    assert!(ms("exec") >= 200, "{doc}");
    assert!(ms("total") >= ms("exec") + ms("resolve"), "{doc}");
    // --timings on a terminal-less run: one line on stderr; a warm lease has no release.
    d.run(r.path(), &["warmup"]).await.expect(0);
    let out = d
        .run(r.path(), &["run", "--timings", "--", "true"])
        .await
        .expect(0);
    let line = out
        .stderr()
        .lines()
        .find(|l| l.starts_with("crabbox: timings: "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("resolve ") && line.contains("exec "),
        "{}",
        out.stderr()
    );
    assert!(!line.contains("release"), "{line}");
}

/// Forty-odd wrong invocations: each gets its exit code and a line that says what to do,
/// with no panic and the daemon still answering after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_wrong_invocations_get_helpful_answers() {
    let d = Daemon::start().await;
    let r = repo();
    let long_slug = "x".repeat(60);
    let cases: &[(&[&str], i32, &str)] = &[
        (&["run", "ls"], 125, "put the command after `--`"),
        (&["run"], 125, "no command to run"),
        (
            &["run", "--timeout", "0s", "--", "true"],
            125,
            "longer than zero",
        ),
        (
            &["run", "--timeout", "30", "--", "true"],
            125,
            "write 30s for seconds",
        ),
        (
            &["run", "--timeout", "soon", "--", "true"],
            125,
            "like 90s, 30m",
        ),
        (
            &["run", "--stall-timeout", "x", "--", "true"],
            125,
            "invalid duration",
        ),
        (&["run", "--ttl", "400d", "--", "true"], 125, "at most"),
        (
            &["run", "--idle-timeout", "-1m", "--", "true"],
            125,
            "to pass \'-1\' as a value",
        ),
        (
            &["run", "--label", "novalue", "--", "true"],
            125,
            "KEY=VALUE",
        ),
        (
            &["run", "--label", "bad key=v", "--", "true"],
            125,
            "invalid label",
        ),
        (&["run", "--slug", "Bad_Slug", "--", "true"], 125, "slug"),
        (&["run", "--env", "1BAD=x", "--", "true"], 125, "1BAD"),
        (
            &["run", "--env", "CBX_UNSET_VARIABLE", "--", "true"],
            125,
            "CBX_UNSET_VARIABLE",
        ),
        (
            &["run", "--workdir", "../up", "--", "true"],
            125,
            "below the checkout",
        ),
        (&["run", "--id", "nope", "--", "true"], 125, "nope"),
        (
            &["run", "--output", "xml", "--", "true"],
            125,
            "possible values",
        ),
        (
            &["run", "--no-sync", "--sync-only", "--", "true"],
            125,
            "cannot be used with",
        ),
        (
            &["run", "-n", "-t", "--", "true"],
            125,
            "cannot be used with",
        ),
        (
            &["run", "--sync-root", "/no/such/dir", "--", "true"],
            125,
            "--sync-root",
        ),
        (&["--provider", "gcp", "run", "--", "true"], 125, "gcp"),
        (&["--type", "m5.large", "run", "--", "true"], 125, "--type"),
        (&["--class", "big", "warmup"], 2, "--class"),
        (
            &["--daytona-api-url", "http://x", "list"],
            2,
            "DAYTONA_API_URL",
        ),
        (&["warmup", "--ttl", "soon"], 2, "like 90s"),
        (&["warmup", "--ttl", "0s"], 2, "longer than zero"),
        (&["warmup", "--slug", long_slug.as_str()], 2, "slug"),
        (&["warmup", "--label", "=v"], 2, "invalid label"),
        (&["warmup", "--wait-for-slot", "x"], 2, "invalid duration"),
        (&["status", "nope"], 4, "nope"),
        (&["status", "cbx_"], 4, "cbx_"),
        (&["stop", "cbx_000000000000"], 4, "cbx_000000000000"),
        (&["touch", "nope"], 4, "nope"),
        (&["pause", "nope"], 4, "nope"),
        (&["resume", "nope"], 4, "nope"),
        (&["list", "--state", "sleepy"], 2, "unknown lease state"),
        (&["list", "--label", "team"], 2, "KEY=VALUE"),
        (
            &["--daytona-snapshot", "s", "warmup"],
            2,
            "add --provider daytona",
        ),
        (
            &["run", "--no-sync", "--force-sync-delete", "--", "true"],
            125,
            "cannot be used with",
        ),
        (&["list", "--limit", "lots"], 2, "at least 1, like 20"),
        (&["list", "--limit", "0"], 2, "0 would show nothing"),
        (&["list", "--limit", "-1"], 2, "at least 1, like 20"),
        (&["runs", "--limit", "0"], 2, "0 would show nothing"),
        (&["list", "--user", "bob"], 2, "--team"),
        (&["list", "--team"], 2, "team mode is off"),
        (&["pool", "drain", "nope"], 4, "no pool is named"),
        (&["pool", "sideways"], 2, "unrecognized subcommand"),
        (&["daemon", "logs", "--since", "x"], 2, "invalid duration"),
        (&["sync-plan", "--id", "nope"], 4, "nope"),
        (&["ssh", "--ttl", "5"], 2, "write 5s for seconds"),
        (&["completions", "tcsh"], 2, "invalid value"),
        (&["frobnicate"], 2, "unrecognized subcommand"),
        (&["list", "-o", "ndjson"], 2, "-o json"),
        (&["status", "-o", "wide"], 2, "crabbox list"),
        (&["--json", "-o", "yaml", "list"], 2, "cannot be used with"),
        (&["list", "-o", "csv"], 2, "possible values"),
    ];
    assert!(cases.len() >= 40, "{}", cases.len());
    let mut wrong = Vec::new();
    for (args, code, says) in cases {
        let out = d.run(r.path(), args).await;
        let err = out.stderr();
        if out.code() != *code || !err.contains(says) || err.contains("panicked") {
            wrong.push(format!(
                "{args:?}: exit {} (want {code}), should say {says:?}:\n{err}",
                out.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n---\n"));
    // A word that is not UTF-8: refused, naming it (clap alone says not which).
    let out = d
        .cli(r.path())
        .args(["run", "--", "echo"])
        .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9"))
        .output()
        .await
        .expect("crabbox");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("argument 4 (\"caf\u{fffd}\") is not UTF-8"),
        "{err}"
    );
    // The daemon answered all of them and still does.
    d.run(r.path(), &["list"]).await.expect(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_formats_table_wide_json_yaml_and_json_errors() {
    let d = Daemon::start().await;
    let r = repo();
    let lease = d
        .run(r.path(), &["warmup", "--label", "team=core", "-o", "json"])
        .await
        .expect(0)
        .json();
    let id = lease["id"].as_str().expect("id").to_string();

    // yaml: the same document as json.
    let yaml = d
        .run(r.path(), &["list", "-o", "yaml"])
        .await
        .expect(0)
        .stdout();
    let from_yaml: serde_json::Value =
        serde_yaml_ng::from_str(&yaml).expect("list -o yaml is YAML");
    let from_json = d.run(r.path(), &["list", "--json"]).await.expect(0).json();
    assert_eq!(from_yaml, from_json);
    assert_eq!(from_yaml[0]["id"], id.as_str());
    assert_eq!(from_yaml[0]["labels"]["team"], "core");
    let one: serde_json::Value = serde_yaml_ng::from_str(
        &d.run(r.path(), &["status", "-o", "yaml"])
            .await
            .expect(0)
            .stdout(),
    )
    .expect("status -o yaml is YAML");
    assert_eq!(one["id"], id.as_str());

    // table and wide: wide has more columns, with the user's labels.
    let table = d.run(r.path(), &["list"]).await.expect(0).stdout();
    let same = d
        .run(r.path(), &["list", "-o", "table"])
        .await
        .expect(0)
        .stdout();
    assert_eq!(table, same);
    assert!(!table.contains("LABELS"), "{table}");
    let wide = d
        .run(r.path(), &["list", "-o", "wide"])
        .await
        .expect(0)
        .stdout();
    let header = wide.lines().next().expect("a header");
    for col in [
        "ID",
        "CREATED",
        "LAST USED",
        "IDLE",
        "KEEP",
        "LABELS",
        "WORK ROOT",
        "REPO",
    ] {
        assert!(header.contains(col), "{wide}");
    }
    assert!(wide.contains("team=core"), "{wide}");
    // CRABBOX_OUTPUT sets it too.
    let out = d
        .cli(r.path())
        .env("CRABBOX_OUTPUT", "json")
        .args(["status"])
        .output()
        .await
        .expect("ran");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json by env");
    assert_eq!(v["id"], id.as_str());

    // An error under -o json / yaml: one JSON document on stderr with kind, message, hint.
    for fmt in ["json", "yaml"] {
        let out = d.run(r.path(), &["status", "nope", "-o", fmt]).await;
        assert_eq!(out.code(), 4);
        let e: serde_json::Value = serde_json::from_str(out.stderr().trim()).expect("stderr JSON");
        assert_eq!(e["error"]["kind"], "not_found", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .expect("message")
                .contains("nope")
        );
        assert!(
            e["error"]["hint"]
                .as_str()
                .expect("hint")
                .contains("crabbox list"),
            "{e}"
        );
        assert!(out.stdout().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_says_when_each_step_happened_and_where_the_time_went() {
    let d = Daemon::start().await;
    let r = repo();
    let out = d
        .run(r.path(), &["-v", "run", "--", "true"])
        .await
        .expect(0);
    let err = out.stderr();
    assert!(err.contains("crabbox: [  0.0"), "timestamped steps: {err}");
    assert!(
        err.contains("config: ") && err.contains("daemon socket"),
        "{err}"
    );
    assert!(err.contains("crabbox: timings: "), "{err}");
    // Without it, neither.
    let quiet = d
        .run(r.path(), &["run", "--", "true"])
        .await
        .expect(0)
        .stderr();
    assert!(
        !quiet.contains("crabbox: [") && !quiet.contains("timings"),
        "{quiet}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_shows_each_value_and_where_it_came_from() {
    let d = Daemon::start().await;
    let r = repo();
    let cfg = r.path().join("mine.yaml");
    std::fs::write(
        &cfg,
        "ttl: 2h\nsync: {git: true}\ndaytona: {snapshot: from-file, apiKey: dtn_secret_in_file}\n",
    )
    .expect("w");
    let out = d
        .run_env(
            r.path(),
            &[
                ("CRABBOX_CONFIG", cfg.as_ref()),
                ("CRABBOX_IDLE_TIMEOUT", "7m".as_ref()),
            ],
            &["--json", "--daytona-target", "eu", "config"],
        )
        .await
        .expect(0);
    assert!(
        !out.stdout().contains("dtn_secret_in_file"),
        "secrets redacted"
    );
    let rows = out.json();
    let row = |k: &str| {
        rows.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["key"] == k)
            .cloned()
            .unwrap_or_default()
    };
    let file = format!("file {}", cfg.display());
    assert_eq!(
        (row("ttl")["value"].clone(), row("ttl")["origin"].clone()),
        ("2h".into(), file.clone().into())
    );
    assert_eq!(row("idle_timeout")["origin"], "env CRABBOX_IDLE_TIMEOUT");
    assert_eq!(row("idle_timeout")["value"], "7m");
    assert_eq!(row("daytona.target")["origin"], "flag --daytona-target");
    assert_eq!(row("daytona.snapshot")["origin"], file.as_str());
    assert_eq!(row("daytona.apiKey")["value"], "*** (set)");
    assert_eq!(row("sync.git")["value"], "true");
    assert_eq!(row("provider")["origin"], "default");
    // Unset values that have a default show the value a lease gets.
    assert_eq!(row("sync.delete_guard")["value"], "50%");
    assert_eq!(row("sync.delete_guard")["origin"], "default");
    assert_eq!(row("run.stall_timeout")["value"], "none");
    let defaults = d
        .run(r.path(), &["--json", "config"])
        .await
        .expect(0)
        .json();
    let default_of = |k: &str| {
        defaults
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["key"] == k)
            .map(|r| (r["value"].clone(), r["origin"].clone()))
    };
    assert_eq!(default_of("ttl"), Some(("1h30m".into(), "default".into())));
    assert_eq!(
        default_of("idle_timeout"),
        Some(("30m".into(), "default".into()))
    );
    let text = d
        .run_env(r.path(), &[("CRABBOX_CONFIG", cfg.as_ref())], &["config"])
        .await
        .expect(0)
        .stdout();
    assert!(
        text.contains("ttl") && text.contains("2h") && text.contains("mine.yaml"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_preserve_keeps_a_fresh_runs_lease_and_says_how_to_stop_it() {
    let d = Daemon::start().await;
    let r = repo();
    let cfg = r.path().join("keep.yaml");
    std::fs::write(&cfg, "environment:\n  lifecycle:\n    preserve: true\n").expect("w");
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--json", "--", "true"],
        )
        .await
        .expect(0);
    let id = out.json()["lease"]["id"].as_str().unwrap_or("").to_string();
    assert!(out.stderr().contains("crabbox stop"), "{}", out.stderr());
    let st = d
        .run(r.path(), &["--json", "status", &id])
        .await
        .expect(0)
        .json();
    assert_eq!(st["state"], "ready", "kept: {st}");
    // Without it, a fresh run's lease goes.
    let other = repo();
    let doc = d
        .run(other.path(), &["run", "--json", "--", "true"])
        .await
        .expect(0)
        .json();
    let gone = doc["lease"]["id"].as_str().unwrap_or("").to_string();
    let st = d
        .run(other.path(), &["--json", "status", &gone])
        .await
        .expect(0)
        .json();
    assert_eq!(st["state"], "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn man_pages_are_written_for_every_command() {
    let d = Daemon::start().await;
    let r = repo();
    let dir = tempfile::tempdir().expect("dir");
    let man = dir.path().join("man1");
    let out = d
        .run(r.path(), &["man", man.to_str().expect("utf8")])
        .await
        .expect(0);
    assert!(out.stdout().contains("man pages"), "{}", out.stdout());
    let run = std::fs::read_to_string(man.join("crabbox-run.1")).expect("crabbox-run.1");
    assert!(run.starts_with(".ie") || run.contains(".TH"), "roff: {run}");
    assert!(run.contains("Sync this checkout"), "{run}");
    for page in [
        "crabbox.1",
        "crabbox-warmup.1",
        "crabbox-pool.1",
        "crabbox-config.1",
    ] {
        assert!(man.join(page).is_file(), "{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_a_spinner_on_a_terminal_and_plain_lines_elsewhere() {
    let d = Daemon::start().await;
    let r = repo();
    for i in 0..200 {
        std::fs::write(r.path().join(format!("f{i}")), format!("{i}\n")).expect("write");
    }
    // On a terminal: the step is redrawn in place (\r, erase line), each finished step
    // stays as a plain line, and the spinner is gone before the command's output.
    let mut t = common::tty::Term::spawn(
        &d,
        r.path(),
        &[],
        &["run", "--", "echo", "the-output"],
        (24, 100),
    );
    assert_eq!(t.exit_code().await, 0);
    let screen = t.screen();
    assert!(
        screen.contains("\r\u{1b}[2K"),
        "redrawn in place: {screen:?}"
    );
    assert!(screen.contains("crabbox: syncing"), "{screen:?}");
    let after = screen.split("the-output").nth(1).expect("the output");
    assert!(
        !after.contains("\u{1b}[2K"),
        "no spinner after the command's output: {after:?}"
    );
    // NO_COLOR: no colour escapes, still a spinner. (A run, whose steps always show: a
    // warmup on this fast provider can be ready before its watch begins, and then has no
    // step to draw.)
    let mut cli = d.cli(r.path());
    cli.env("NO_COLOR", "1");
    let mut t =
        common::tty::Term::spawn_command(cli, &["run", "--", "echo", "colourless"], (24, 100));
    assert_eq!(t.exit_code().await, 0);
    t.wait_for("colourless").await;
    let screen = t.screen();
    assert!(
        screen.contains("colourless") && screen.contains("\u{1b}[2K"),
        "{screen:?}"
    );
    assert!(
        !screen.contains("\u{1b}[36m"),
        "no colour with NO_COLOR: {screen:?}"
    );
    // -q on a terminal: no progress at all.
    let mut t = common::tty::Term::spawn(
        &d,
        r.path(),
        &["-q"],
        &["run", "--", "echo", "q"],
        (24, 100),
    );
    assert_eq!(t.exit_code().await, 0);
    let screen = t.screen();
    assert!(
        !screen.contains("crabbox:") && !screen.contains("\u{1b}[2K"),
        "{screen:?}"
    );
    // Not a terminal: plain lines, no escape codes.
    let out = d
        .run(r.path(), &["run", "--", "echo", "piped"])
        .await
        .expect(0);
    assert!(out.stderr().contains("crabbox: lease "), "{}", out.stderr());
    assert!(!out.stderr().contains('\u{1b}'), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_copies_both_ways_keeping_modes_times_and_links() {
    let d = Daemon::start().await;
    let r = repo();
    common::copy::cp_copies_both_ways_keeping_modes_times_and_links(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_artifacts_come_back_after_it() {
    let d = Daemon::start().await;
    let r = repo();
    common::copy::a_runs_artifacts_come_back_after_it(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_with_its_arguments() {
    let d = Daemon::start().await;
    let r = repo();
    common::copy::a_script_runs_with_its_arguments(&d, r.path(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_output_goes_to_files_and_a_failure_keeps_its_report() {
    let d = Daemon::start().await;
    let r = repo();
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, e, fails) = (
        dir.path().join("o.log"),
        dir.path().join("e.log"),
        dir.path().join("fails"),
    );
    let (os, es, fs) = (
        o.to_str().expect("utf8"),
        e.to_str().expect("utf8"),
        fails.to_str().expect("utf8"),
    );
    // As well as the terminal...
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--capture-stdout",
                os,
                "--capture-stderr",
                es,
                "--capture-on-fail",
                fs,
                "--env",
                "CBX_CAPTURE_SECRET=hunter2",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; head -c 5000000 /dev/zero | tr '\\0' x; exit 3",
            ],
        )
        .await;
    assert_eq!(out.code(), 3);
    assert!(out.stdout().starts_with("out\n"));
    assert_eq!(
        std::fs::read(&o).expect("o").len(),
        out.stdout().len(),
        "the whole stream"
    );
    assert_eq!(std::fs::read_to_string(&e).expect("e"), "err\n");
    // The failure's report: the last 4 MiB of each stream, the command, env names only.
    let reports: Vec<_> = std::fs::read_dir(&fails)
        .expect("fails")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(reports.len(), 1);
    let report = reports[0].path();
    assert!(
        report
            .file_name()
            .expect("name")
            .to_string_lossy()
            .ends_with("-exit3")
    );
    assert_eq!(
        std::fs::metadata(report.join("stdout.log"))
            .expect("s")
            .len(),
        4 * 1024 * 1024
    );
    assert_eq!(
        std::fs::read_to_string(report.join("stderr.log")).expect("e"),
        "err\n"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("run.json")).expect("j")).expect("json");
    assert_eq!(doc["exit_code"], 3);
    assert_eq!(doc["env_names"], serde_json::json!(["CBX_CAPTURE_SECRET"]));
    assert!(
        !std::fs::read_to_string(report.join("run.json"))
            .expect("j")
            .contains("hunter2")
    );
    assert!(doc["stdout_bytes_dropped"].as_u64().expect("n") > 0);
    assert!(
        out.stderr().contains(&report.display().to_string()),
        "{}",
        out.stderr()
    );
    // ...or instead of it, with -q; a success writes no report.
    let out = d
        .run(
            r.path(),
            &[
                "-q",
                "run",
                "--capture-stdout",
                os,
                "--capture-on-fail",
                fs,
                "--",
                "echo",
                "only-in-file",
            ],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout(), "");
    assert_eq!(std::fs::read_to_string(&o).expect("o"), "only-in-file\n");
    assert_eq!(std::fs::read_dir(&fails).expect("fails").count(), 1);
    // Bad input is refused before anything runs.
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--capture-stdout",
                "/no/such/dir/o.log",
                "--",
                "true",
            ],
        )
        .await;
    assert_eq!(out.code(), 125);
    assert!(out.stderr().contains("/no/such/dir"), "{}", out.stderr());
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--capture-stdout",
                os,
                "--capture-stderr",
                os,
                "--",
                "true",
            ],
        )
        .await;
    assert_eq!(out.code(), 125);
    assert!(out.stderr().contains("same file"), "{}", out.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_served_in_the_lease_is_reachable() {
    let d = Daemon::start().await;
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    common::copy::a_port_served_in_the_lease_is_reachable(&d, r.path(), &[], false).await;
}

/// Whether the ELF executable at `path` asks for a dynamic loader (has a PT_INTERP
/// program header).
fn asks_for_a_loader(path: &str) -> bool {
    let elf = std::fs::read(path).expect("reading the binary");
    assert_eq!(&elf[..4], b"\x7fELF", "{path} is not an ELF file");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == 3 // PT_INTERP
    })
}

/// The CLI starts for every command, so it is linked statically (scripts/rustc-wrapper)
/// wherever the machine has a static libc; the daemon is linked as usual.
#[test]
fn the_cli_is_linked_statically_where_the_machine_can() {
    let libc = std::process::Command::new("cc")
        .arg("-print-file-name=libc.a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cli = env!("CARGO_BIN_EXE_crabbox");
    let can = cfg!(target_os = "linux")
        && std::env::var_os("RUSTC_WRAPPER").is_none()
        && libc.starts_with('/')
        && Path::new(&libc).is_file();
    assert_eq!(
        asks_for_a_loader(cli),
        !can,
        "crabbox static: expected {can} (libc.a: {libc:?})"
    );
    assert!(asks_for_a_loader(env!("CARGO_BIN_EXE_crabboxd")));
    let out = std::process::Command::new(cli)
        .arg("--version")
        .output()
        .expect("crabbox --version");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("crabbox "));
}
