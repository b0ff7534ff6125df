"""Crash-and-fault soak: the real daytona-sim, crabboxd and crabbox (release builds), with the
daytona provider pointed at the sim.

Phase 1, crashes: KILLS times, start a random operation (warmup, a fresh run, a run on a warm
lease, stop) and SIGKILL crabboxd at a random moment under it, then start it again.
Phase 2, faults: RUNS runs under 5% 503s, 5% dropped answers and 429 bursts (Retry-After and
Retry-After-<bucket>), each checked: right output and exit 0, or a crabbox error.
Then every lease is stopped and what is left is counted:
- leaked: sandboxes on the sim that no live lease holds (or any at all after the final stop);
- lost: live leases whose sandbox is gone; stuck: leases still in a passing state
  (pending, creating, syncing, running, releasing) after the daemon settled;
- abandoned: live leases created by a run (not warmed) once every run has ended.
Usage: python3 bench/soak.py [KILLS] [RUNS]   (after `cargo build --release`; default 30 200)
"""
import json, os, random, signal, subprocess, sys, tempfile, time, urllib.request

KILLS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
BIN = os.path.abspath("target/release")
KEY = "dtn_soak_key"
random.seed(int(os.environ.get("SOAK_SEED", "7")))
work = tempfile.mkdtemp(prefix="crabbox-soak-")
sim = subprocess.Popen([f"{BIN}/daytona-sim", "--state-dir", f"{work}/sim", "--api-key", KEY,
                        "--create-delay", "50ms", "--start-delay", "50ms"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = sim.stdout.readline().split()[-1]
env = dict(os.environ, CRABBOX_SOCKET=f"{work}/run/d.sock", CRABBOX_STATE_DIR=f"{work}/state",
           CRABBOX_CONFIG="/dev/null", DAYTONA_API_KEY=KEY, CRABBOX_DAYTONA_API_URL=url + "/api",
           CRABBOX_DAYTONA_SNAPSHOT="default", CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn")
daemon = None


def start_daemon():
    global daemon
    daemon = subprocess.Popen([f"{BIN}/crabboxd", "--sweep-interval", "200ms"], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(f"{work}/daemon.log", "a"))
    for _ in range(400):
        if subprocess.run([f"{BIN}/crabbox", "daemon", "status"], env=env,
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.025)
    raise SystemExit("crabboxd did not come up")


def kill9():
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()


def crabbox(*args, cwd, timeout=120):
    return subprocess.run([f"{BIN}/crabbox", "--provider", "daytona", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def sim_call(method, path, body=None):
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def faults(**f):
    sim_call("POST", "/_sim/faults", f)


def sim_sandboxes():
    page = sim_call("GET", "/api/sandbox?limit=200")
    items = page["items"] if isinstance(page, dict) else page
    return [s for s in items if s.get("state") not in ("destroyed", "destroying")]


def leases(cwd):
    out = crabbox("list", "--all", "--json", cwd=cwd)
    return json.loads(out.stdout) if out.returncode == 0 else []


def repo(i):
    d = f"{work}/repo{i}"
    os.makedirs(d, exist_ok=True)
    if not os.path.exists(f"{d}/.git"):
        subprocess.run(["git", "init", "-q", d], check=True)
    with open(f"{d}/n.txt", "w") as f:
        f.write(str(random.random()))
    return d


def settle(cwd, secs=60):
    """Waits until no lease is in a passing state; answers the leases."""
    passing = {"pending", "creating", "syncing", "running", "releasing"}
    deadline = time.time() + secs
    while True:
        ls = leases(cwd)
        if not any(l["state"] in passing for l in ls) or time.time() > deadline:
            return ls
        time.sleep(0.2)


def account(cwd, fresh_ids):
    ls = settle(cwd)
    live = {l["sandbox_id"] for l in ls if l["state"] in ("ready", "stopped") and l["sandbox_id"]}
    on_sim = {s["id"] for s in sim_sandboxes()}
    return {
        "leaked": len(on_sim - live),
        "lost": len(live - on_sim),
        "stuck": sum(l["state"] in ("pending", "creating", "syncing", "running", "releasing")
                     for l in ls),
        "abandoned": sum(l["id"] in fresh_ids and l["state"] in ("ready", "stopped", "creating")
                         for l in ls),
        "leases": len(ls),
    }


try:
    start_daemon()
    repos = [repo(i) for i in range(3)]
    t0 = time.time()
    # Phase 1: kill -9 under warmup, fresh runs, warm runs, stop.
    fresh_ids, ops = set(), {}
    for k in range(KILLS):
        r = random.choice(repos)
        op = random.choice(["warmup", "fresh-run", "warm-run", "stop"])
        ops[op] = ops.get(op, 0) + 1
        if op == "warmup":
            args = ["warmup"]
        elif op == "fresh-run":
            # A lease of its own: another repo folder with no claim.
            r = repo(100 + k)
            args = ["run", "--", "sh", "-c", "sleep 0.3; cat n.txt"]
        elif op == "warm-run":
            crabbox("warmup", cwd=r)
            args = ["run", "--", "sh", "-c", "sleep 0.3; cat n.txt"]
        else:
            crabbox("warmup", cwd=r)
            lid = next((l["id"] for l in leases(r) if l["repo_root"].endswith(os.path.basename(r))
                        and l["state"] == "ready"), None)
            args = ["stop", lid] if lid else ["list"]
        cli = subprocess.Popen([f"{BIN}/crabbox", "--provider", "daytona", *args], env=env, cwd=r,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.0, 0.4))
        kill9()
        try:
            cli.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cli.kill()
            print(f"kill {k}: the CLI did not notice the daemon was gone ({op})")
        start_daemon()
        if op == "fresh-run":
            for l in leases(r):
                if l["repo_root"] == os.path.realpath(r):
                    fresh_ids.add(l["id"])
    crash = account(repos[0], fresh_ids)
    t1 = time.time()
    print(f"crashes: {KILLS} kill -9 ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}) "
          f"in {t1 - t0:.1f} s: leaked {crash['leaked']}, lost {crash['lost']}, stuck "
          f"{crash['stuck']}, abandoned {crash['abandoned']} ({crash['leases']} leases known)")

    # Phase 2: runs under faults.
    warm = repos[0]
    crabbox("warmup", cwd=warm)
    faults(error_rate=0.05, drop_rate=0.05)
    right = crabbox_errors = wrong = bursts = 0
    for i in range(RUNS):
        if i % 20 == 10:
            bursts += 1
            bucket = "sandbox" if bursts % 2 else ""
            faults(rate_limit_count=15, retry_after_secs=1, retry_after_bucket=bucket)
        r = warm if i % 10 else repo(200 + i)  # every tenth run on a fresh lease
        with open(f"{r}/n.txt", "w") as f:
            f.write(f"run {i}")
        out = crabbox("run", "--", "cat", "n.txt", cwd=r)
        if out.returncode == 0 and out.stdout == f"run {i}":
            right += 1
        elif out.returncode != 0 and "crabbox: error:" in out.stderr:
            crabbox_errors += 1
        else:
            wrong += 1
            print(f"run {i}: WRONG exit {out.returncode}: {out.stdout!r} {out.stderr[-300:]!r}")
    faults(error_rate=0.0, drop_rate=0.0, rate_limit_count=0)
    t2 = time.time()
    after = account(warm, set())
    print(f"faults: {RUNS} runs in {t2 - t1:.1f} s under 5% 503, 5% dropped answers and "
          f"{bursts} bursts of 15 429s: {right} right, {crabbox_errors} failed with a crabbox "
          f"error, {wrong} wrong; then leaked {after['leaked']}, lost {after['lost']}, stuck "
          f"{after['stuck']}")

    # The end: stop everything; nothing may be left on the sim.
    for l in leases(warm):
        if l["state"] not in ("released",):
            crabbox("stop", l["id"], cwd=warm)
    final = settle(warm)
    left = sim_sandboxes()
    print(f"final: {len(final)} leases, {sum(l['state'] != 'released' for l in final)} not "
          f"released, {len(left)} sandboxes left on the sim")
    ok = (crash["leaked"] == crash["lost"] == crash["stuck"] == crash["abandoned"] == 0
          and wrong == 0 and after["leaked"] == after["lost"] == after["stuck"] == 0
          and not left)
    print("soak:", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)
finally:
    if daemon and daemon.poll() is None:
        daemon.terminate()
        daemon.wait(timeout=30)
    sim.terminate()
    sim.wait(timeout=30)
    subprocess.run(["rm", "-rf", work])
