//! scripts/live-smoke.sh, the guarded smoke test against the real Daytona: CI runs only
//! its guard (no provider call without CRABBOX_LIVE=1, credentials and a snapshot); here
//! its whole path also runs against a real daytona-sim process standing in for Daytona.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const KEY: &str = "dtn_live_smoke_5e4d3c2b1a";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/live-smoke.sh")
}

/// The script with a clean environment: nothing of this machine's Daytona setup.
fn smoke(home: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("bash");
    c.arg(script())
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir().display()),
        )
        .env("HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_crabbox"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_opt_in_credentials_or_a_snapshot_no_daytona_call_is_made() {
    let home = tempfile::tempdir().expect("home");
    // A stand-in for Daytona that counts connections: none may come.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/api", listener.local_addr().expect("addr"));
    let out = smoke(home.path()).output().await.expect("ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("skipped: set CRABBOX_LIVE=1"), "{err}");
    for (env, says) in [
        (
            vec![("CRABBOX_LIVE", "1")],
            vec!["DAYTONA_API_KEY", "CRABBOX_DAYTONA_SNAPSHOT"],
        ),
        (
            vec![("CRABBOX_LIVE", "1"), ("DAYTONA_API_KEY", KEY)],
            vec!["CRABBOX_DAYTONA_SNAPSHOT"],
        ),
        (
            vec![
                ("CRABBOX_LIVE", "1"),
                ("DAYTONA_JWT_TOKEN", "eyJ.x.y"),
                ("CRABBOX_DAYTONA_SNAPSHOT", "s"),
            ],
            vec!["DAYTONA_ORGANIZATION_ID"],
        ),
        (
            vec![
                ("CRABBOX_LIVE", "1"),
                ("DAYTONA_API_KEY", KEY),
                ("CRABBOX_DAYTONA_SNAPSHOT", "s"),
                ("CRABBOX_BIN", "/no/crabbox"),
            ],
            vec!["the binary /no/crabbox"],
        ),
    ] {
        let mut c = smoke(home.path());
        c.env("DAYTONA_API_URL", &url);
        for (k, v) in &env {
            c.env(k, v);
        }
        let out = c.output().await.expect("ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{env:?} should name {s}: {err}");
        }
        assert!(err.contains("no Daytona call was made"), "{err}");
        assert!(!err.contains(KEY), "{err}");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the guard made a call to Daytona");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_smoke_passes_against_daytona_sim_and_leaves_nothing() {
    let home = tempfile::tempdir().expect("home");
    let sim_dir = tempfile::tempdir().expect("sim dir");
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_daytona-sim"))
        .arg("--state-dir")
        .arg(sim_dir.path())
        .args([
            "--api-key",
            KEY,
            "--snapshot",
            "smoke-snap",
            "--create-delay",
            "20ms",
            "--start-delay",
            "20ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("daytona-sim");
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(sim.stdout.take().expect("stdout")).lines();
    let mut url = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(u) = line.strip_prefix("listening on ") {
            url = format!("{u}/api");
        }
        if line == "ready" {
            break;
        }
    }
    assert!(!url.is_empty(), "the sim said where it listens");
    let out = smoke(home.path())
        .env("CRABBOX_LIVE", "1")
        .env("DAYTONA_API_KEY", KEY)
        .env("DAYTONA_API_URL", &url)
        .env("CRABBOX_DAYTONA_SNAPSHOT", "smoke-snap")
        .output()
        .await
        .expect("ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for step in [
        "ok    warmup",
        "ok    run exit code passes through",
        "ok    run synced the checkout",
        "ok    run kept stderr apart",
        "ok    ssh --print redacts the token",
        "ok    stop",
        "ok    no output holds the credentials",
        "passed",
    ] {
        assert!(err.contains(step), "{step}: {err}");
    }
    assert!(!err.contains(KEY), "{err}");
    // Nothing left on the "Daytona" side.
    let left: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/sandbox"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let all = left
        .as_array()
        .or_else(|| left["items"].as_array())
        .unwrap_or_else(|| panic!("a list of sandboxes: {left}"));
    let live: Vec<&serde_json::Value> = all
        .iter()
        .filter(|s| !matches!(s["state"].as_str(), Some("destroyed" | "destroying")))
        .collect();
    assert!(live.is_empty(), "left behind: {live:?}");
    let _ = sim.start_kill();
}
