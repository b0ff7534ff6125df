//! The local provider's jail, for real: a command in a local lease cannot see host
//! processes, read the user's home or the daemon's folders, write outside its sandbox,
//! or (in `block` mode) reach this machine's network; its whole tree dies with it.

mod common;

use std::path::Path;

use common::{Daemon, eventually, repo};

/// A crabboxd process with its socket (`d.sock`) and state in `dir`, reading `cfg`.
fn crabboxd(dir: &Path, cfg: &Path, stderr: std::process::Stdio) -> tokio::process::Child {
    crabboxd_command(dir, cfg, stderr)
        .spawn()
        .expect("crabboxd")
}

/// [`crabboxd`]'s command, not started yet.
fn crabboxd_command(
    dir: &Path,
    cfg: &Path,
    stderr: std::process::Stdio,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"));
    c.arg("--socket")
        .arg(dir.join("d.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("CRABBOX_CONFIG", cfg)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    c
}

/// The daemon for a test of the jail; none (the test has nothing to check) when the jail
/// is off for this run (`CRABBOX_LOCAL_ISOLATION=none`), said with `why`.
async fn jailed_daemon(why: &str) -> Option<Daemon> {
    if std::env::var("CRABBOX_LOCAL_ISOLATION").as_deref() == Ok("none") {
        eprintln!("CRABBOX_LOCAL_ISOLATION=none: {why}");
        return None;
    }
    Some(Daemon::start().await)
}

fn host_has(cmdline: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_command_is_jailed() {
    let Some(d) = jailed_daemon("the jail is off, nothing to test").await else {
        return;
    };
    let r = repo();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let run = |script: &str| {
        let script = script.to_string();
        let d = &d;
        let r = r.path().to_path_buf();
        let home = home.clone();
        async move {
            let state = d.state.display().to_string();
            d.run(
                &r,
                &[
                    "run",
                    "--env",
                    &format!("REAL_HOME={home}"),
                    "--env",
                    &format!("STATE={state}"),
                    "--env",
                    &format!("DAEMON_PID={}", std::process::id()),
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
            )
            .await
        }
    };
    d.run(r.path(), &["warmup"]).await.expect(0);
    // Processes: a PID namespace of its own; the daemon (this test process) is not there.
    let out = run("ls /proc | grep -c '^[0-9]'; kill -0 $DAEMON_PID 2>/dev/null && echo SEES-DAEMON; ps -e 2>/dev/null | wc -l")
        .await
        .expect(0);
    let text = out.stdout();
    let lines: Vec<&str> = text.lines().collect();
    let procs: usize = lines[0].trim().parse().expect("a count");
    assert!(procs <= 6, "only its own processes: {procs}");
    assert!(!out.stdout().contains("SEES-DAEMON"), "{}", out.stdout());
    // The user's home and the daemon's state dir are empty inside; the daemon's store is
    // not readable.
    std::fs::write(d.state.join("planted-secret.txt"), "secret").expect("plant");
    let out =
        run("ls -A \"$REAL_HOME\" | wc -l; cat \"$STATE/planted-secret.txt\" 2>&1 || echo NO-READ")
            .await
            .expect(0);
    assert!(
        out.stdout().starts_with("0\n"),
        "home hidden: {}",
        out.stdout()
    );
    assert!(
        out.stdout().contains("NO-READ") && !out.stdout().contains("secret\n"),
        "{}",
        out.stdout()
    );
    // Writes: the system is read-only; a write to the hidden home never reaches it.
    let escape = format!("crabbox-escape-{}", std::process::id());
    let out = run(&format!(
        "touch /usr/{escape} 2>/dev/null && echo WROTE-USR; touch \"$REAL_HOME/{escape}\"; \
         echo x > /tmp/mine && cat /tmp/mine && echo ok > here.txt"
    ))
    .await
    .expect(0);
    assert!(!out.stdout().contains("WROTE-USR"));
    assert!(!Path::new("/usr").join(&escape).exists());
    assert!(
        !Path::new(&home).join(&escape).exists(),
        "the real home is untouched"
    );
    assert_eq!(out.stdout(), "x\n");
    // Its own folder is where its files go (the same path here).
    let l = d
        .run(r.path(), &["status", "--json"])
        .await
        .expect(0)
        .json();
    let name = std::fs::canonicalize(r.path()).expect("canonical");
    let checkout = Path::new(l["work_root"].as_str().expect("root"))
        .join(l["id"].as_str().expect("id"))
        .join(name.file_name().expect("name"));
    assert_eq!(
        std::fs::read_to_string(checkout.join("here.txt")).expect("r"),
        "ok\n"
    );
    // A timeout kills the whole tree, background children included.
    let secs = format!("{}", 70_000 + std::process::id() % 10_000);
    let out = d
        .run(
            r.path(),
            &[
                "run",
                "--timeout",
                "1s",
                "--",
                "sh",
                "-c",
                &format!("sleep {secs} & sleep {secs}"),
            ],
        )
        .await;
    assert_eq!(out.code(), 124);
    let cmdline = format!("sleep\0{secs}\0");
    eventually(10, "no sleep left on this machine", || async {
        (!host_has(&cmdline)).then_some(())
    })
    .await;
    // A stop of the lease under a running command kills its whole tree too.
    let secs = format!("{}", 80_000 + std::process::id() % 10_000);
    let mut running = d
        .cli(r.path())
        .args([
            "run",
            "--",
            "sh",
            "-c",
            &format!("sleep {secs} & sleep {secs}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    let cmdline = format!("sleep\0{secs}\0");
    eventually(10, "the command's two sleeps running", || async {
        (std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline.as_bytes())
            })
            .count()
            == 2)
            .then_some(())
    })
    .await;
    d.run(r.path(), &["stop"]).await.expect(0);
    eventually(10, "no sleep left after the stop", || async {
        (!host_has(&cmdline)).then_some(())
    })
    .await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), running.wait())
        .await
        .expect("the run ends with its lease")
        .expect("exit");
    assert!(
        !ended.success(),
        "a stopped run does not claim success: {ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_has_only_loopback_and_an_allow_list_is_refused_locally() {
    let Some(d) = jailed_daemon("the jail is off, nothing to test").await else {
        return;
    };
    // A server of this machine, on loopback.
    let host = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = host.local_addr().expect("addr").port();
    let reach = format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\" \
         && echo REACHED || echo BLOCKED; python3 -c \"import socket; s=socket.socket(); \
         s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname(), timeout=2); \
         print('LOOPBACK')\""
    );
    let (open, shut) = (repo(), repo());
    let cfg = shut.path().join("net.yaml");
    std::fs::write(&cfg, "environment:\n  network: { mode: block }\n").expect("w");
    let out = d
        .run(open.path(), &["run", "--", "sh", "-c", &reach])
        .await
        .expect(0);
    assert_eq!(
        out.stdout(),
        "REACHED\nLOOPBACK\n",
        "allow_all reaches this machine"
    );
    let out = d
        .run_env(
            shut.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "sh", "-c", &reach],
        )
        .await
        .expect(0);
    assert_eq!(
        out.stdout(),
        "BLOCKED\nLOOPBACK\n",
        "block: only its own loopback"
    );
    std::fs::write(
        &cfg,
        "environment:\n  network: { mode: cidr_allow_list, allow: [\"10.0.0.0/8\"] }\n",
    )
    .expect("w");
    let out = d
        .run_env(
            shut.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "true"],
        )
        .await;
    assert_eq!(out.code(), 125, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("cidr_allow_list is not available on the local"),
        "{}",
        out.stderr()
    );
    drop(host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bubblewrap_local_commands_are_refused_unless_isolation_is_off() {
    // A PATH with git but no bwrap.
    let bin = tempfile::tempdir().expect("tempdir");
    for tool in ["git", "sh", "bash", "tar", "cat", "ls", "setsid", "sleep"] {
        for dir in ["/usr/bin", "/bin"] {
            let p = Path::new(dir).join(tool);
            if p.exists() {
                let _ = std::os::unix::fs::symlink(&p, bin.path().join(tool));
                break;
            }
        }
    }
    let r = repo();
    // A value it does not know: the daemon refuses to start, saying why.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
        .arg("--socket")
        .arg(dir.path().join("d.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("CRABBOX_CONFIG", "/dev/null")
        .env("CRABBOX_LOCAL_ISOLATION", "sometimes")
        .output()
        .await
        .expect("crabboxd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("CRABBOX_LOCAL_ISOLATION=sometimes is not jail or none"),
        "{err}"
    );
    for (isolation, code, says) in [
        ("", 125, "apt-get install bubblewrap"),
        ("none", 0, "not isolated"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("d.sock");
        let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_crabboxd"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("PATH", bin.path())
            .env("CRABBOX_CONFIG", "/dev/null")
            .env("CRABBOX_LOCAL_ISOLATION", isolation)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("crabboxd");
        if let Ok(Ok(Some(status))) =
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    if socket.exists() {
                        return Ok::<_, std::io::Error>(None);
                    }
                    if let Some(s) = daemon.try_wait()? {
                        return Ok(Some(s));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
            .await
        {
            // A daemon that refuses its setup says why.
            let out = daemon.wait_with_output().await.expect("out");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !status.success() && err.contains(says),
                "{isolation}: {err}"
            );
            continue;
        }
        // (Unjailed, a job that leaves its command's session lives on until the sandbox's
        // release, which ends everything in the sandbox's cgroup.)
        let secs = format!("{}", 60_000 + std::process::id() % 10_000);
        let escapee = format!("setsid sleep {secs} >/dev/null 2>&1 </dev/null & echo ran");
        let out = common::cli_at(&socket, r.path())
            .args(["run", "--", "sh", "-c", &escapee])
            .output()
            .await
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{isolation:?}: {err}");
        assert!(err.contains(says), "{isolation:?}: {err}");
        if code == 0 && crabbox::sandbox::cgroup::available() {
            let cmdline = format!("sleep\0{secs}\0");
            eventually(
                10,
                "the escaped job ended with the released sandbox",
                || async { (!host_has(&cmdline)).then_some(()) },
            )
            .await;
        }
        let _ = daemon.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_local_shows_mounts_and_can_turn_the_jail_off() {
    if std::env::var("CRABBOX_LOCAL_ISOLATION").is_ok() {
        eprintln!("CRABBOX_LOCAL_ISOLATION is set: it overrides the config this test checks");
        return;
    }
    let shared = tempfile::tempdir().expect("tempdir");
    std::fs::write(shared.path().join("data.txt"), "shared data\n").expect("w");
    let writable = tempfile::tempdir().expect("tempdir");
    let r = repo();
    let start = |yaml: String| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, yaml).expect("w");
        let socket = dir.path().join("d.sock");
        let daemon = crabboxd(dir.path(), &cfg, std::process::Stdio::piped());
        (dir, socket, daemon)
    };
    let run = |socket: std::path::PathBuf, script: String| {
        let r = r.path().to_path_buf();
        async move {
            eventually(10, "the daemon", || async { socket.exists().then_some(()) }).await;
            let out = common::cli_at(&socket, &r)
                .args(["run", "--", "sh", "-c", &script])
                .output()
                .await
                .expect("run");
            common::Out(out)
        }
    };
    let (s, w) = (
        shared.path().display().to_string(),
        writable.path().display().to_string(),
    );
    // Mounts: read-only by default, writable with :rw; other host folders stay hidden.
    let (_d, socket, mut daemon) =
        start(format!("local:\n  mounts: [\"{s}\", \"{w}:rw\"]\n")).await;
    let out = run(
        socket,
        format!(
            "cat {s}/data.txt; touch {s}/x 2>/dev/null && echo WROTE-RO; echo made > {w}/out.txt"
        ),
    )
    .await
    .expect(0);
    assert_eq!(out.stdout(), "shared data\n");
    assert!(!shared.path().join("x").exists());
    assert_eq!(
        std::fs::read_to_string(writable.path().join("out.txt")).expect("r"),
        "made\n"
    );
    let _ = daemon.start_kill();
    // local.isolation: none runs unjailed, and every run says so.
    let (_d, socket, mut daemon) = start("local:\n  isolation: none\n".into()).await;
    let out = run(socket, format!("cat {s}/data.txt")).await.expect(0);
    assert_eq!(out.stdout(), "shared data\n");
    assert!(out.stderr().contains("not isolated"), "{}", out.stderr());
    let _ = daemon.start_kill();
    // Bad values stop the daemon with what to write.
    for (yaml, says) in [
        (
            "local:\n  isolation: sometimes\n",
            "config local.isolation=sometimes is not jail or none",
        ),
        (
            "local:\n  mounts: [\"relative/path\"]\n",
            "must be an absolute path",
        ),
        (
            "local:\n  isolation: none\n  mounts: [\"/usr\"]\n",
            "needs the jail",
        ),
        ("local:\n  jail: yes\n", "unknown field"),
    ] {
        let (_d, _socket, daemon) = start(yaml.into()).await;
        let out = daemon.wait_with_output().await.expect("out");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{yaml}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_hits_the_process_limit_and_dies_with_its_timeout() {
    if !crabbox::sandbox::cgroup::available() {
        eprintln!(
            "skipped: this machine lets the daemon make no cgroup (no v2 delegation, no \
             writable v1 pids hierarchy), so local process limits are not enforced here"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "local:\n  max_processes: 32\n").expect("w");
    let socket = dir.path().join("d.sock");
    let start = || crabboxd(dir.path(), &cfg, std::process::Stdio::null());
    let mut daemon = start();
    eventually(10, "the daemon", || async { socket.exists().then_some(()) }).await;
    let r = repo();
    let cli = |args: &[&str]| {
        let mut c = common::cli_at(&socket, r.path());
        c.args(args);
        c
    };
    // The limit is there, in a cgroup of the command's own.
    let out = common::Out(
        cli(&["run", "--", "sh", "-c", "cat /proc/self/cgroup"])
            .output()
            .await
            .expect("run"),
    );
    assert!(out.stdout().contains("crabbox-"), "{}", out.stdout());
    // A fork bomb: refused forks past 32 processes, killed whole by its timeout. The
    // shell forks only before the bomb goes off (its sleep, then one subshell the bomb
    // grows in) and waits with a builtin: a shell that had to fork once the bomb filled
    // the limit would end on its own (dash: exit 2) before the timeout this checks.
    let out = common::Out(
        cli(&[
            "run",
            "--timeout",
            "3s",
            "--",
            "sh",
            "-c",
            "sleep 60 & s=$!; (b() { b | b & }; b) & wait $s",
        ])
        .output()
        .await
        .expect("run"),
    );
    assert_eq!(out.code(), 124, "{}", out.stderr());
    let err = out.stderr().to_lowercase();
    assert!(
        err.contains("fork") || err.contains("resource temporarily unavailable"),
        "{err}"
    );
    // This machine still makes processes, and no cgroup of the command is left.
    let ok = tokio::process::Command::new("true")
        .status()
        .await
        .expect("true");
    assert!(ok.success());
    let all = common::Out(
        cli(&["list", "--all", "--json"])
            .output()
            .await
            .expect("list"),
    )
    .json();
    let names: Vec<String> = all
        .as_array()
        .expect("leases")
        .iter()
        .filter_map(|l| l["sandbox_name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names.len(), 2, "{all}");
    eventually(10, "the commands' cgroups removed", || async {
        (!names.iter().any(|n| cgroup_left(n))).then_some(())
    })
    .await;
    // A daemon killed with a warm lease leaves that lease's cgroup; the next daemon takes
    // it over and removes it when the lease goes.
    let out = common::Out(
        cli(&["run", "--keep", "--", "true"])
            .output()
            .await
            .expect("run"),
    );
    assert_eq!(out.code(), 0, "{}", out.stderr());
    let lease = common::Out(cli(&["status", "--json"]).output().await.expect("status")).json();
    let name = lease["sandbox_name"].as_str().expect("name").to_string();
    assert!(cgroup_left(&name), "the warm lease has its cgroup");
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
    let mut daemon = start();
    eventually(10, "the daemon again", || async {
        cli(&["list"])
            .output()
            .await
            .ok()?
            .status
            .success()
            .then_some(())
    })
    .await;
    let out = common::Out(cli(&["stop"]).output().await.expect("stop"));
    assert_eq!(out.code(), 0, "{}", out.stderr());
    eventually(
        10,
        "the earlier daemon's cgroup removed at release",
        || async { (!cgroup_left(&name)).then_some(()) },
    )
    .await;
    let _ = daemon.start_kill();
}

/// Is sandbox `name`'s cgroup still there (v1 pids hierarchy or v2, at the top, where
/// this test machine's daemons make them)?
fn cgroup_left(name: &str) -> bool {
    let leaf = format!("crabbox-{name}");
    ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .any(|root| Path::new(root).join(&leaf).is_dir())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_stopped_at_environment_resources_memory() {
    if !crabbox::sandbox::cgroup::available() {
        eprintln!(
            "skipped: no cgroup this daemon may make, so local memory limits are not enforced here"
        );
        return;
    }
    let d = Daemon::start().await;
    let r = repo();
    let cfg = r.path().join("mem.yaml");
    std::fs::write(&cfg, "environment:\n  resources: { memory: 1GB }\n").expect("w");
    let hog = "python3 -c \"b = bytearray(2 * 1024**3); b[::4096] = b'x' * len(b[::4096]); print('ALLOCATED')\"";
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "sh", "-c", hog],
        )
        .await;
    assert_ne!(out.code(), 0, "{}", out.stderr());
    assert!(
        !out.stdout().contains("ALLOCATED"),
        "2 GiB under a 1 GB limit: {}",
        out.stdout()
    );
    // Within the limit it runs.
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &[
                "run",
                "--",
                "python3",
                "-c",
                "b = bytearray(64 * 1024**2); print('fine')",
            ],
        )
        .await
        .expect(0);
    assert_eq!(out.stdout(), "fine\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_is_held_to_environment_resources_cpu() {
    let probe = crabbox::sandbox::cgroup::Cgroup::create(
        "cpu-probe",
        crabbox::sandbox::cgroup::Limits {
            cpus: Some(1),
            ..Default::default()
        },
    );
    if probe.is_none() {
        eprintln!("skipped: no cgroup with a CPU quota this daemon may make here");
        return;
    }
    drop(probe);
    let d = Daemon::start().await;
    let r = repo();
    let cfg = r.path().join("cpu.yaml");
    std::fs::write(&cfg, "environment:\n  resources: { cpu: 1 }\n").expect("w");
    // Two processes spin for 1.5 s of wall time; under a quota of one CPU they get at most
    // about 1.5 s of CPU time together (3 s on two free cores without it).
    let spin = r#"import multiprocessing, os, time
def spin():
    end = time.time() + 1.5
    while time.time() < end: pass
ps = [multiprocessing.Process(target=spin) for _ in range(2)]
[p.start() for p in ps]; [p.join() for p in ps]
t = os.times(); print(round(t.children_user + t.children_system, 2))
quota = "none"
for line in open("/proc/self/cgroup"):
    _, names, path = line.strip().split(":", 2)
    if "crabbox-" not in path:
        continue
    if "cpu" in names.split(","):
        f = "/sys/fs/cgroup/cpu" + path + "/cpu.cfs_quota_us"
    elif names == "":
        f = "/sys/fs/cgroup" + path + "/cpu.max"
    else:
        continue
    if os.path.exists(f):
        quota = open(f).read().split()[0]
print(quota)
"#;
    let out = d
        .run_env(
            r.path(),
            &[("CRABBOX_CONFIG", cfg.as_ref())],
            &["run", "--", "python3", "-c", spin],
        )
        .await
        .expect(0);
    let text = out.stdout();
    let mut lines = text.lines();
    let used: f64 = lines.next().unwrap_or("").parse().expect("seconds");
    assert_eq!(
        lines.next(),
        Some("100000"),
        "the command's cgroup holds one CPU's quota per 100 ms period: {text}"
    );
    assert!(
        used < 1.5 * 1.25,
        "two spinners under a 1-CPU quota used {used} s of CPU in 1.5 s"
    );
    assert!(!out.stderr().contains("resources.cpu"), "{}", out.stderr());
}

/// A local run writes the command's stdout straight into the CLI's own stdout (handed to
/// the daemon): the command's fd 1 is the very file the CLI's stdout was sent to; its
/// stderr comes after crabbox's lines in the CLI's stderr; with `--output ndjson`, a stall watchdog
/// or a terminal the output goes through the daemon as before; a run that fails before
/// its command starts lets go of them (the reader sees its end at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_output_goes_straight_to_the_clients_stdout() {
    let Some(d) = jailed_daemon("output goes through the daemon unjailed").await else {
        return;
    };
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("out.txt"), dir.path().join("err.txt"));
    let status = d
        .cli(r.path())
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "readlink /proc/self/fd/1; echo to-err >&2; exit 3",
        ])
        .stdout(std::fs::File::create(&out_path).expect("out"))
        .stderr(std::fs::File::create(&err_path).expect("err"))
        .status()
        .await
        .expect("run");
    assert_eq!(status.code(), Some(3));
    let out = std::fs::read_to_string(&out_path).expect("read");
    assert_eq!(
        out.trim_end(),
        out_path.display().to_string(),
        "the command wrote into the file itself"
    );
    let err = std::fs::read_to_string(&err_path).expect("read");
    assert!(
        err.contains("crabbox: syncing") && err.ends_with("to-err\n"),
        "crabbox's lines, then the command's, in one file: {err}"
    );
    // Through the daemon when the CLI must see the output.
    for extra in [&["--output", "ndjson"][..], &["--stall-timeout", "1m"][..]] {
        let o = d
            .run(
                r.path(),
                &[
                    &["run"][..],
                    extra,
                    &["--", "readlink", "/proc/self/fd/1"][..],
                ]
                .concat(),
            )
            .await
            .expect(0);
        assert!(o.stdout().contains("pipe:["), "{extra:?}: {}", o.stdout());
    }
    // A run refused before its command starts: the pipe ends with the CLI.
    let o = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        d.run(r.path(), &["run", "--id", "no-such-lease", "--", "true"]),
    )
    .await
    .expect("the CLI's output ends with it");
    assert_ne!(o.code(), 0);
    // A background job of a command that wrote straight to the client ends with the
    // command: holding the client's stdout, it would keep its reader (here the test's
    // pipe) waiting for an end until it exits itself. Several times: the agent kills the
    // group when the leader ends, before it tells the daemon of the exit.
    for i in 0..5 {
        let secs = format!("{}", 90_000 + i * 1_000 + std::process::id() % 1_000);
        let o = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            d.run(
                r.path(),
                &[
                    "run",
                    "--",
                    "sh",
                    "-c",
                    &format!("sleep {secs} & echo started"),
                ],
            ),
        )
        .await
        .expect("the client's stdout ends with the command, not with its background job")
        .expect(0);
        assert_eq!(o.stdout(), "started\n");
        let cmdline = format!("sleep\0{secs}\0");
        eventually(10, "no sleep left on this machine", || async {
            (!host_has(&cmdline)).then_some(())
        })
        .await;
    }
}

/// A local sandbox's commands are started by its agent, inside its jail: one agent for all
/// of them; an agent that dies fails the command it was running with a clear error and is
/// replaced at the next command; `stop` ends it with the sandbox.
/// A script that prints the sandbox's agent as the sandbox sees it: its pid and start time
/// (a new one in a new PID namespace may get the same pid).
const AGENT: &str = r#"for p in /proc/[0-9]*; do case "$(tr '\0' ' ' < $p/cmdline)" in /proc/self/fd/*--sandbox-agent*) echo "${p#/proc/} $(cut -d' ' -f22 $p/stat)";; esac; done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxs_commands_are_started_by_its_agent() {
    let Some(d) = jailed_daemon("the jail is off, nothing to test").await else {
        return;
    };
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    let agent = AGENT;
    let first = d
        .run(r.path(), &["run", "--", "sh", "-c", agent])
        .await
        .expect(0)
        .stdout();
    assert_eq!(first.lines().count(), 1, "one agent: {first}");
    let again = d
        .run(r.path(), &["run", "--", "sh", "-c", agent])
        .await
        .expect(0)
        .stdout();
    assert_eq!(first, again, "the same agent for every command");
    let sandbox = d
        .run(r.path(), &["run", "--", "pwd"])
        .await
        .expect(0)
        .stdout();
    let sandbox = sandbox
        .split("/sandboxes/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the sandbox folder in the working folder")
        .to_string();
    // Killed under a command: that command fails saying so (the exit code of crabbox's own
    // failure), and the next one gets a new agent.
    let pid = first.split_whitespace().next().expect("pid").to_string();
    let killed = d
        .run(
            r.path(),
            &["run", "--", "sh", "-c", &format!("kill -9 {pid}; sleep 5")],
        )
        .await;
    assert_eq!(killed.code(), 125, "{}", killed.stderr());
    assert!(
        killed.stderr().contains("agent has ended"),
        "{}",
        killed.stderr()
    );
    let replaced = d
        .run(r.path(), &["run", "--", "sh", "-c", agent])
        .await
        .expect(0)
        .stdout();
    assert_eq!(replaced.lines().count(), 1, "one agent: {replaced}");
    assert_ne!(replaced, first, "a new agent");
    // Stopped: nothing of the sandbox is left on this machine.
    d.run(r.path(), &["stop"]).await.expect(0);
    let left = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("--sandbox-agent") && c.contains(&sandbox)
                })
            })
    };
    eventually(10, "the sandbox's agent is gone after stop", || async {
        (!left()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_first_ends_what_a_gone_jail_left_in_the_sandboxs_cgroup() {
    let Some(d) = jailed_daemon("the jail is off, nothing to test").await else {
        return;
    };
    let r = repo();
    d.run(r.path(), &["warmup"]).await.expect(0);
    // The sandbox's cgroup, as its command sees it (v1 pids, or v2).
    let seen = d
        .run(r.path(), &["run", "--", "cat", "/proc/self/cgroup"])
        .await
        .expect(0)
        .stdout();
    let dir = seen.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        let base = match names {
            "" => "/sys/fs/cgroup".to_string(),
            n if n.split(',').any(|n| n == "pids") => "/sys/fs/cgroup/pids".to_string(),
            _ => return None,
        };
        path.contains("/crabbox-")
            .then(|| std::path::PathBuf::from(format!("{base}{path}")))
    });
    let Some(dir) = dir else {
        eprintln!("no cgroup for the sandbox here: nothing to test ({seen})");
        return;
    };
    // What a gone jail leaves (as bubblewrap's pid-1 child of a jail whose bubblewrap was
    // killed as it started): a process in the sandbox's cgroup, outside any agent.
    let mut left = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("sleep");
    std::fs::write(dir.join("cgroup.procs"), left.id().to_string()).expect("into the cgroup");
    // The agent dies (killed from inside, under a command).
    let kill_agent = format!("kill -9 $({AGENT} | cut -d' ' -f1); sleep 5");
    let killed = d
        .run(r.path(), &["run", "--", "sh", "-c", &kill_agent])
        .await;
    assert_eq!(killed.code(), 125, "{}", killed.stderr());
    assert!(
        left.try_wait().expect("wait").is_none(),
        "left alone until a new agent starts"
    );
    // The next command's new agent ends it first.
    d.run(r.path(), &["run", "--", "true"]).await.expect(0);
    let ended = eventually(10, "the leftover to be ended", || {
        let status = left.try_wait().expect("wait");
        async move { status }
    })
    .await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&ended),
        Some(9),
        "killed"
    );
    // And the sandbox goes on.
    let out = d
        .run(r.path(), &["run", "--", "echo", "fine"])
        .await
        .expect(0);
    assert_eq!(out.stdout(), "fine\n");
}

/// A sandbox command gets its stdin, stdout and stderr and no other descriptor: not one the
/// daemon was started with (here a pipe, as a shell or a CI runner may leave open; held by
/// a command, its reader would never see the end), nor the agent's control socket (with
/// which a command could speak for the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_holds_no_descriptor_of_the_daemon_or_its_agent() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("d.sock");
    let (_read, write) = nix::unistd::pipe().expect("pipe");
    let stray = write.as_raw_fd();
    let mut c = crabboxd_command(
        dir.path(),
        Path::new("/dev/null"),
        std::process::Stdio::null(),
    );
    // SAFETY: fcntl is async-signal-safe; the daemon inherits the pipe as a shell's child
    // inherits what the shell left open.
    unsafe {
        c.pre_exec(move || {
            if nix::libc::fcntl(stray, nix::libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = c.spawn().expect("crabboxd");
    drop(write);
    eventually(10, "the daemon's socket", || async {
        socket.exists().then_some(())
    })
    .await;
    let r = repo();
    // `; true`: the shell forks ls (rather than becoming it), so ls lists the shell's.
    let out = common::cli_at(&socket, r.path())
        .args(["run", "-q", "--", "sh", "-c", "ls /proc/$$/fd; true"])
        .output()
        .await
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n1\n2\n", "{err}");
    if let Some(pid) = daemon.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), daemon.wait()).await;
}
