//! `crabbox cp`, shared by every provider's tests: both directions, files and folders,
//! globs, modes, mtimes and symlinks, the destination rules of `cp -r`, and bad input.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Daemon;

pub async fn cp_copies_both_ways_keeping_modes_times_and_links(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
) {
    let run = |args: &[&str]| {
        let all: Vec<String> = prefix.iter().chain(args).map(|s| s.to_string()).collect();
        let repo = repo.to_path_buf();
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            d.run(&repo, &all).await
        }
    };
    run(&["warmup"]).await.expect(0);
    // Made in the sandbox: a tree with a script, a link, a file with an odd name, and
    // reports under several folders.
    run(&[
        "run",
        "--",
        "sh",
        "-c",
        "mkdir -p out/sub target/a target/b/c && printf 'hi\\n' > out/sub/f.txt && \
         printf '#!/bin/sh\\n' > out/run.sh && chmod 750 out/run.sh && \
         ln -s sub/f.txt out/link && printf 'x' > 'out/odd name' && \
         touch -d '2001-02-03 04:05:06' out/sub/f.txt && \
         echo 1 > target/a/r.xml && echo 2 > target/b/c/r.xml && echo no > target/skip.txt",
    ])
    .await
    .expect(0);
    let here = tempfile::tempdir().expect("tempdir");
    let dst = here.path();

    // A folder, whole, into a new name.
    run(&["cp", ":out", dst.join("got").to_str().expect("utf8")])
        .await
        .expect(0);
    let got = dst.join("got");
    assert_eq!(
        std::fs::read_to_string(got.join("sub/f.txt")).expect("f"),
        "hi\n"
    );
    let mode = std::fs::metadata(got.join("run.sh"))
        .expect("m")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750, "the mode is kept");
    let link = std::fs::read_link(got.join("link")).expect("a symlink");
    assert_eq!(link, Path::new("sub/f.txt"));
    let mtime = std::fs::metadata(got.join("sub/f.txt"))
        .expect("m")
        .modified()
        .expect("mtime");
    let secs = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        (981_000_000..982_000_000).contains(&secs),
        "the mtime is kept: {secs}"
    );
    assert!(got.join("odd name").exists());
    // Into an existing folder: under its own name.
    run(&["cp", ":out/sub/f.txt", dst.to_str().expect("utf8")])
        .await
        .expect(0);
    assert_eq!(
        std::fs::read_to_string(dst.join("f.txt")).expect("f"),
        "hi\n"
    );
    // A glob: the matches keep their paths, in a folder made for them.
    run(&[
        "cp",
        ":target/**/*.xml",
        dst.join("reports").to_str().expect("utf8"),
    ])
    .await
    .expect(0);
    assert_eq!(
        std::fs::read_to_string(dst.join("reports/target/a/r.xml")).expect("r"),
        "1\n"
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("reports/target/b/c/r.xml")).expect("r"),
        "2\n"
    );
    assert!(!dst.join("reports/target/skip.txt").exists());
    // Nothing half-written is left beside the destination.
    let stray: Vec<_> = std::fs::read_dir(dst)
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".crabbox-cp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // Up: a folder and a file (renamed), then checked from inside.
    let up = dst.join("up");
    std::fs::create_dir_all(up.join("deep")).expect("mkdir");
    std::fs::write(up.join("deep/data.txt"), "payload\n").expect("w");
    std::fs::set_permissions(
        up.join("deep/data.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("deep/data.txt", up.join("ln")).expect("symlink");
    run(&["cp", up.to_str().expect("utf8"), ":incoming"])
        .await
        .expect(0);
    run(&[
        "cp",
        dst.join("f.txt").to_str().expect("utf8"),
        ":incoming/renamed.txt",
    ])
    .await
    .expect(0);
    let out = run(&[
        "run",
        "--",
        "sh",
        "-c",
        "cat incoming/deep/data.txt incoming/renamed.txt && stat -c %a incoming/deep/data.txt \
         && readlink incoming/ln",
    ])
    .await
    .expect(0);
    assert_eq!(out.stdout(), "payload\nhi\n640\ndeep/data.txt\n");

    // Bad input: what failed and what to do; nothing half-done.
    let out = run(&["cp", ":no/such", dst.to_str().expect("utf8")]).await;
    assert_eq!(out.code(), 4, "{}", out.stderr());
    assert!(out.stderr().contains("no/such"), "{}", out.stderr());
    let out = run(&["cp", ":/etc/hostname", dst.to_str().expect("utf8")]).await;
    assert_eq!(out.code(), 2);
    assert!(out.stderr().contains("--any-path"), "{}", out.stderr());
    let out = run(&["cp", ":../../../../..", dst.to_str().expect("utf8")]).await;
    assert_eq!(out.code(), 2, "{}", out.stderr());
    let out = run(&["cp", "a", "b"]).await;
    assert_eq!(out.code(), 2);
    assert!(out.stderr().contains("LEASE:PATH"), "{}", out.stderr());
    let out = run(&["cp", "/no/such/local", ":x"]).await;
    assert_eq!(out.code(), 4, "{}", out.stderr());
    let out = run(&["cp", ":out/sub", dst.join("f.txt").to_str().expect("utf8")]).await;
    assert_ne!(out.code(), 0, "a folder does not replace a file");
    assert_eq!(
        std::fs::read_to_string(dst.join("f.txt")).expect("f"),
        "hi\n"
    );
    let out = run(&["cp", "--json", ":target/*.xml", dst.to_str().expect("utf8")]).await;
    assert_eq!(out.code(), 4);
    assert!(out.stderr().contains("target/*.xml"), "{}", out.stderr());
}

/// `run --download/--artifact-glob/--require-artifact`: one archive back after the
/// command, whatever its exit, and the exit codes that go with it.
pub async fn a_runs_artifacts_come_back_after_it(d: &Daemon, repo: &Path, prefix: &[&str]) {
    let here = tempfile::tempdir().expect("tempdir");
    // Run from another folder (where the artifacts land), syncing the repo.
    let root = repo.to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        let mut all: Vec<String> = prefix.iter().chain(args).map(|s| s.to_string()).collect();
        if args.first() == Some(&"run") {
            let at = prefix.len() + 1;
            all.splice(at..at, ["--sync-root".to_string(), root.clone()]);
        }
        let repo = repo.to_path_buf();
        let here = here.path().to_path_buf();
        async move {
            let mut c = d.cli(&repo);
            c.current_dir(&here).args(&all);
            let out = c.output().await.expect("ran");
            super::Out(out)
        }
    };
    let make = "mkdir -p target/a target/b out/docs && echo 1 > target/a/r.xml && \
                echo 2 > target/b/r.xml && echo bin > out/app && echo d > out/docs/i.md";
    let out = run(&[
        "run",
        "--keep",
        "--json",
        "--artifact-glob",
        "target/**/*.xml",
        "--download",
        "out/app:app.bin",
        "--download",
        "out/docs",
        "--",
        "sh",
        "-c",
        &format!("{make} && exit 3"),
    ])
    .await;
    assert_eq!(
        out.code(),
        3,
        "the command's code, artifacts fetched anyway: {}",
        out.stderr()
    );
    let doc = out.json();
    let id = doc["lease"]["id"].as_str().expect("id").to_string();
    let folder = here.path().join("crabbox-artifacts").join(&id);
    assert_eq!(
        std::fs::read_to_string(folder.join("target/a/r.xml")).expect("r"),
        "1\n"
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("target/b/r.xml")).expect("r"),
        "2\n"
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("docs/i.md")).expect("r"),
        "d\n"
    );
    assert_eq!(
        std::fs::read_to_string(here.path().join("app.bin")).expect("r"),
        "bin\n"
    );
    assert_eq!(
        doc["artifacts"]["files"].as_array().map(Vec::len),
        Some(4),
        "{doc}"
    );
    // A required one missing: 122 when the command succeeded, its own code when not.
    let out = run(&[
        "run",
        "--id",
        &id,
        "--require-artifact",
        "no/such.txt",
        "--",
        "true",
    ])
    .await;
    assert_eq!(out.code(), 122, "{}", out.stderr());
    assert!(
        out.stderr().contains("error [artifact]") && out.stderr().contains("no/such.txt"),
        "{}",
        out.stderr()
    );
    let out = run(&[
        "run",
        "--id",
        &id,
        "--require-artifact",
        "no/such.txt",
        "--",
        "false",
    ])
    .await;
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("required artifact missing: no/such.txt"),
        "{}",
        out.stderr()
    );
    // One not required: a warning, and the run's code.
    let out = run(&[
        "run",
        "--id",
        &id,
        "--artifact-glob",
        "*.none",
        "--",
        "true",
    ])
    .await;
    assert_eq!(out.code(), 0);
    assert!(
        out.stderr().contains("warning: no artifact *.none"),
        "{}",
        out.stderr()
    );
    // Outside the work root: refused by name, the run still told.
    let out = run(&[
        "run",
        "--id",
        &id,
        "--download",
        "/etc/hostname",
        "--",
        "true",
    ])
    .await;
    assert_eq!(out.code(), 0);
    assert!(
        out.stderr().contains("--any-path") || out.stderr().contains("outside"),
        "{}",
        out.stderr()
    );
    let out = run(&["run", "--id", &id, "--download", ":x", "--", "true"]).await;
    assert_eq!(out.code(), 125, "{}", out.stderr());
    // The history keeps each run's exit code and what it brought back, newest first.
    let runs = run(&["runs", &id, "--json"]).await.expect(0).json();
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert_eq!(runs[0]["exit_code"], 0);
    let first = &runs[4];
    assert_eq!(first["exit_code"], 3);
    let got: Vec<&str> = first["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(
        got,
        ["app", "docs", "target/a/r.xml", "target/b/r.xml"],
        "{first}"
    );
    assert_eq!(runs[1]["missing_artifacts"][0], "*.none", "{runs:?}");
    let table = run(&["runs", &id]).await.expect(0).stdout();
    assert!(
        table.starts_with("STARTED") && table.contains("docs"),
        "{table}"
    );
    let _ = run(&["stop", &id]).await;
}

/// `run --script FILE` / `--script-stdin`: a multi-line script runs by its `#!` line
/// (else sh) with the words after `--` as its arguments, its exit code told.
pub async fn a_script_runs_with_its_arguments(d: &Daemon, repo: &Path, prefix: &[&str]) {
    let script = repo.join("build.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nset -e\necho \"args: $# [$1] [$2]\"\nfor i in 1 2; do\n  echo \"step $i\"\ndone\necho \"it's done\" >&2\nexit 4\n",
    )
    .expect("w");
    let all = |args: &[&str]| -> Vec<String> {
        prefix.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        d.run(repo, &a).await
    };
    let out = run(all(&["run", "--script", "build.sh", "--", "a b", "$HOME"])).await;
    assert_eq!(out.code(), 4, "{}", out.stderr());
    assert_eq!(out.stdout(), "args: 2 [a b] [$HOME]\nstep 1\nstep 2\n");
    assert!(out.stderr().contains("it's done"), "{}", out.stderr());
    // From stdin, without a #! line: sh runs it; the command gets no stdin of its own.
    let mut c = d.cli(repo);
    c.args(all(&["run", "--script-stdin", "--", "x"]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"echo \"from stdin $1\"\nread line || echo \"no input\"\n")
            .await
            .expect("write");
    }
    let out = super::Out(child.wait_with_output().await.expect("ran"));
    assert_eq!(out.code(), 0, "{}", out.stderr());
    assert_eq!(out.stdout(), "from stdin x\nno input\n");
    // Nothing is left behind in the checkout.
    let out = run(all(&[
        "run",
        "--",
        "sh",
        "-c",
        "ls -A ../.crabbox-scripts 2>/dev/null | wc -l",
    ]))
    .await;
    assert_eq!(out.stdout().trim(), "0");
    // Bad input.
    let out = run(all(&["run", "--script", "no-such.sh"])).await;
    assert_eq!(out.code(), 125);
    assert!(out.stderr().contains("no-such.sh"), "{}", out.stderr());
    std::fs::write(repo.join("empty.sh"), "").expect("w");
    let out = run(all(&["run", "--script", "empty.sh"])).await;
    assert_eq!(out.code(), 125);
    assert!(out.stderr().contains("empty"), "{}", out.stderr());
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `crabbox port`: a URL that reaches a server in the lease (with its token where one is
/// needed, or signed), and `--forward` to reach it from a local port.
pub async fn a_port_served_in_the_lease_is_reachable(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
    token_needed: bool,
) {
    let all = |args: &[&str]| -> Vec<String> {
        prefix.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let cli = |args: Vec<String>| {
        let mut c = d.cli(repo);
        c.args(args);
        c
    };
    std::fs::write(repo.join("hello.txt"), "hello from the lease\n").expect("w");
    let port = free_port();
    let mut server = cli(all(&[
        "run",
        "--",
        "python3",
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ]))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .expect("server");
    let http = reqwest::Client::new();
    // The plain URL, and its token where the provider needs one.
    let url_of = |args: Vec<String>| {
        let c = cli(args);
        async move {
            let mut c = c;
            let out = super::Out(c.output().await.expect("ran"));
            out.expect(0).json()
        }
    };
    let p = url_of(all(&["port", &port.to_string(), "--json", "--show-secret"])).await;
    let url = p["url"]
        .as_str()
        .expect("url")
        .trim_end_matches('/')
        .to_string();
    let get = |u: String, token: Option<(String, String)>| {
        let http = http.clone();
        async move {
            let mut r = http.get(u);
            if let Some((h, t)) = token {
                r = r.header(h, t);
            }
            match r.send().await {
                Ok(a) => (a.status().as_u16(), a.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        }
    };
    let token = p["token"].as_str().map(|t| {
        (
            p["header"].as_str().expect("header").to_string(),
            t.to_string(),
        )
    });
    assert_eq!(token.is_some(), token_needed, "{p}");
    super::eventually(30, "the server in the lease", || {
        let (u, t) = (format!("{url}/hello.txt"), token.clone());
        let get = &get;
        async move { (get(u, t).await.0 == 200).then_some(()) }
    })
    .await;
    assert_eq!(
        get(format!("{url}/hello.txt"), token.clone()).await,
        (200, "hello from the lease\n".into())
    );
    if token_needed {
        assert_eq!(
            get(format!("{url}/hello.txt"), None).await.0,
            401,
            "no token, no answer"
        );
        // Redacted unless asked.
        let out = super::Out(
            cli(all(&["port", &port.to_string()]))
                .output()
                .await
                .expect("ran"),
        );
        let secret = &token.as_ref().expect("token").1;
        assert!(
            !out.stdout().contains(secret.as_str()) && out.stdout().contains("<redacted>"),
            "{}",
            out.stdout()
        );
        // Signed: the URL alone works.
        let s = url_of(all(&[
            "port",
            &port.to_string(),
            "--signed",
            "--ttl",
            "5m",
            "--json",
            "--show-secret",
        ]))
        .await;
        let signed = s["url"]
            .as_str()
            .expect("url")
            .trim_end_matches('/')
            .to_string();
        assert!(s["expires_at"].is_string(), "{s}");
        assert_eq!(get(format!("{signed}/hello.txt"), None).await.0, 200);
        let s = url_of(all(&["port", &port.to_string(), "--signed", "--json"])).await;
        assert!(
            s["url"].as_str().expect("url").contains("<redacted>"),
            "{s}"
        );
    }
    // --forward: a local port that reaches it, no token needed here.
    let local = free_port();
    let mut fwd = cli(all(&["port", "--forward", &format!("{local}:{port}")]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("forward");
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(fwd.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("a line");
        assert!(
            first.starts_with(&format!("forwarding http://127.0.0.1:{local}")),
            "{first}"
        );
        if let Some(t) = &token {
            assert!(!first.contains(t.1.as_str()), "{first}");
        }
    }
    assert_eq!(
        get(format!("http://127.0.0.1:{local}/hello.txt"), None).await,
        (200, "hello from the lease\n".into())
    );
    let _ = fwd.start_kill();
    // Bad input.
    for (args, says) in [
        (vec!["port", "0"], "not a port"),
        (vec!["port", "70000"], "not a port"),
        (vec!["port", "--forward", "8080"], "LOCAL:REMOTE"),
        (vec!["port"], "PORT"),
        (vec!["port", "--ttl", "5m", "80"], "--signed"),
        (vec!["port", "80", "--signed", "--ttl", "48h"], "24h"),
    ] {
        let out = super::Out(cli(all(&args)).output().await.expect("ran"));
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr());
        assert!(out.stderr().contains(says), "{args:?}: {}", out.stderr());
    }
    let _ = server.start_kill();
    let _ = server.wait().await;
}
