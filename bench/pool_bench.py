"""Warm pools, pre-seeded pools and pause/resume (issue 14), against daytona-sim on loopback
started with --create-delay 300ms --start-delay 700ms, in one run (medians):

- baseline: a warm `crabbox run -- true` on a claimed lease;
- a fresh `crabbox run -- true` (a lease made for the run, released at its end) taken from a
  pool, and the same with no pool, for contrast;
- a 10,000-file repo with a 1-file change: a fresh run on a sandbox pre-seeded with the repo
  against a warm run with the same change;
- warm runs while the pool refills (after a take) against warm runs with the pool idle;
- `crabbox pause` and the resume of the next run.

Usage: python3 bench/pool_bench.py [RUNS] [FILES]   (after `cargo build --release`)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
FILES = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEY = "dtn_bench_key"
med = statistics.median
work = tempfile.mkdtemp(prefix="crabbox-pool-bench-")
procs = []


def git_repo(path, files):
    os.makedirs(path)
    subprocess.run(["git", "init", "-q", path], check=True)
    for i in range(files):
        d = f"{path}/d{i % 100:02d}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{i:05d}.txt", "w") as f:
            f.write(("line of text %d\n" % i) * 40)
    subprocess.run(["git", "-C", path, "add", "."], check=True)


def daemon(name, url, pool_yaml):
    os.makedirs(f"{work}/{name}", exist_ok=True)
    cfg = f"{work}/{name}/config.yaml"
    with open(cfg, "w") as f:
        f.write(pool_yaml or "{}\n")
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/run/d.sock",
               CRABBOX_STATE_DIR=f"{work}/{name}/state", CRABBOX_CONFIG=cfg,
               CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn", CRABBOX_PROVIDER="daytona",
               DAYTONA_API_URL=url + "/api", DAYTONA_API_KEY=KEY)
    p = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
    procs.append(p)
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    # The CLI reads no pool config of its own.
    return dict(env, CRABBOX_CONFIG="/dev/null")


def cb(env, cwd, *args, check=True):
    t = time.perf_counter()
    out = subprocess.run([f"{BIN}/crabbox", *args], cwd=cwd, env=env, capture_output=True,
                         text=True)
    ms = (time.perf_counter() - t) * 1000
    if check and out.returncode != 0:
        raise SystemExit(f"crabbox {' '.join(args)} failed: {out.stderr}")
    return ms, out


def pool_ready(env, cwd, want, seeded=None):
    for _ in range(600):
        _, out = cb(env, cwd, "--json", "pool", "status")
        p = json.loads(out.stdout)[0]
        ok = p["ready"] >= want and p["filling"] == 0
        if seeded is not None:
            ok = ok and sum(1 for v in p["seeded"].values() if v == seeded) >= want
        if ok:
            return
        time.sleep(0.05)
    raise SystemExit("the pool did not fill")


try:
    sim = subprocess.Popen([f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir",
                            f"{work}/sim", "--api-key", KEY, "--create-delay", "300ms",
                            "--start-delay", "700ms"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(sim)
    url = sim.stdout.readline().strip().split(" ", 2)[2]

    small = f"{work}/small"
    git_repo(small, 3)
    small_real = os.path.realpath(small)
    big = f"{work}/big"
    git_repo(big, FILES)
    big_real = os.path.realpath(big)

    plain = daemon("plain", url, None)
    pooled = daemon("pooled", url, f"pool:\n  - provider: daytona\n    size: 2\n    max: 2\n"
                                   f"    repos: [{small_real}]\n")
    seeded = daemon("seeded", url,
                    f"pool:\n  - provider: daytona\n    size: 1\n    repos: [{big_real}]\n")

    # Baseline: a warm run on a claimed lease (small repo).
    cb(plain, small, "warmup")
    cb(plain, small, "run", "--", "true")
    warm = med(cb(plain, small, "run", "--", "true")[0] for _ in range(RUNS))
    # Fresh runs without a pool (each creates, starts, syncs, releases).
    other = f"{work}/small2"
    git_repo(other, 3)
    fresh_plain = med(cb(plain, other, "run", "--", "true")[0] for _ in range(max(3, RUNS // 2)))
    # Fresh runs from the pool (waiting for it to be full, and seeded, before each): of the
    # repo the pool seeds, and of a repo it does not (whose first sync is then sent whole).
    fresh_pool = []
    for _ in range(RUNS):
        pool_ready(pooled, small, 2, seeded=small_real)
        fresh_pool.append(cb(pooled, small, "run", "--", "true")[0])
    fresh_pool = med(fresh_pool)
    third = f"{work}/small3"
    git_repo(third, 3)
    fresh_unseeded = []
    for _ in range(RUNS):
        pool_ready(pooled, small, 2, seeded=small_real)
        fresh_unseeded.append(cb(pooled, third, "run", "--", "true")[0])
    fresh_unseeded = med(fresh_unseeded)
    print(f"warm run on a claimed lease (baseline): {warm:7.1f} ms")
    print(f"fresh run from a pool seeded with the repo: {fresh_pool:7.1f} ms ({fresh_pool / warm:.2f}x)")
    print(f"fresh run from a pool, another repo (first sync of its 3 files): {fresh_unseeded:7.1f} ms "
          f"({fresh_unseeded / warm:.2f}x)")
    print(f"fresh run without a pool:               {fresh_plain:7.1f} ms ({fresh_plain / warm:.2f}x)")

    # Warm runs while the pool refills vs while it is idle.
    cb(pooled, other, "warmup")
    cb(pooled, other, "run", "--", "true")
    pool_ready(pooled, other, 2)
    idle = med(cb(pooled, other, "run", "--", "true")[0] for _ in range(RUNS * 2))
    during = []
    for _ in range(RUNS):
        pool_ready(pooled, other, 2)
        cb(pooled, small, "run", "--", "true")  # a take: the pool refills now
        during.append(cb(pooled, other, "run", "--", "true")[0])
    during = med(during)
    print(f"warm run, pool idle (baseline):         {idle:7.1f} ms")
    print(f"warm run while the pool refills:        {during:7.1f} ms ({during / idle:.2f}x)")

    # A 10,000-file repo with a 1-file change: seeded fresh run vs warm run.
    victim = f"{big}/d05/f00005.txt"
    n = 0

    def change():
        global n
        n += 1
        with open(victim, "a") as f:
            f.write(f"change {n}\n")

    cb(plain, big, "warmup")
    cb(plain, big, "run", "--", "true")
    warm_big = []
    for _ in range(RUNS):
        change()
        warm_big.append(cb(plain, big, "run", "--", "true")[0])
    warm_big = med(warm_big)
    seeded_runs = []
    sent = []
    for _ in range(RUNS):
        pool_ready(seeded, big, 1, seeded=big_real)
        change()
        ms, out = cb(seeded, big, "--json", "run", "--", "true")
        seeded_runs.append(ms)
        sent.append(json.loads(out.stdout)["sync"]["files_uploaded"])
    seeded_ms = med(seeded_runs)
    print(f"{FILES}-file repo, 1-file change, warm run (baseline): {warm_big:7.1f} ms")
    print(f"{FILES}-file repo, 1-file change, fresh run on a seeded sandbox: {seeded_ms:7.1f} ms "
          f"({seeded_ms / warm_big:.2f}x; files sent {sorted(sent)})")

    # Pause, and the next run's resume.
    pauses, resumes = [], []
    for _ in range(max(3, RUNS // 2)):
        pauses.append(cb(plain, small, "pause")[0])
        resumes.append(cb(plain, small, "run", "--no-sync", "--", "true")[0])
    print(f"pause: {med(pauses):7.1f} ms; the next run (resume + run): {med(resumes):7.1f} ms "
          f"({med(resumes) / warm:.2f}x a warm run; the sim starts in 700 ms)")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
