"""What a run sends and what it costs, on a warm daytona lease (daytona-sim on loopback) with
a 10,000-file, ~50 MB repo, in one run:

- bytes on the wire per sync (request bodies as the sim counts them) and requests, for an
  unchanged tree, a 1-file change (against that file gzipped alone) and a deletion;
- the wall time of an unchanged run against a `--no-sync` run of the same lease (the scan;
  taken in turns);
- locally: a warm `crabbox run -- true` and `crabbox --version` against `sh -c true` (taken
  in turns, one of each per round), and
  the floor of any client/daemon design on this machine (bench/floor: a dependency-free
  client asking a server to run `sh -c true`) against the same baseline.

Usage: python3 bench/sync_bench.py [FILES] [RUNS]   (after `cargo build --release`)
"""
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

FILES = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 15
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEY = "dtn_bench_key"
med = statistics.median
work = tempfile.mkdtemp(prefix="crabbox-sync-bench-")
procs = []


def daemon(name, extra):
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/run/d.sock",
               CRABBOX_STATE_DIR=f"{work}/{name}/state", CRABBOX_CONFIG="/dev/null",
               CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn", **extra)
    p = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
    procs.append(p)
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    return env


def timed(cmds, cwd, env, runs=RUNS):
    """Medians of `cmds` taken in turns, one of each per round: a drift of the machine (the
    page cache writing back a large first sync, another process) weighs on all alike."""
    out = [[] for _ in cmds]
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=True)
            out[i].append((time.perf_counter() - t) * 1000)
    return [med(o) for o in out]


try:
    sim = subprocess.Popen([f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir",
                            f"{work}/sim", "--api-key", KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(sim)
    url = sim.stdout.readline().strip().split(" ", 2)[2]

    def requests():
        return json.loads(urllib.request.urlopen(f"{url}/_sim/requests").read())

    def sent(cmd, cwd, env):
        before = len(requests())
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)
        lines = [l for l in requests()[before:] if "/_sim/" not in l]
        body = sum(int(l.split()[2]) for l in lines if len(l.split()) > 2)
        sync = [l for l in lines if "/files/" in l or "/process/execute" in l]
        sync_bytes = sum(int(l.split()[2]) for l in sync if len(l.split()) > 2)
        return json.loads(out.stdout), len(lines), body, sync_bytes

    repo = f"{work}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    for i in range(FILES):
        d = f"{repo}/d{i % 100:02d}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{i:05d}.txt", "w") as f:
            f.write(os.urandom(1900).hex()[:3800] + "\n" + ("line of text %d\n" % i) * 60)
    subprocess.run(["git", "-C", repo, "add", "."], check=True)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(repo) if ".git" not in dp for f in fs)

    env = daemon("daytona", {"CRABBOX_PROVIDER": "daytona", "DAYTONA_API_URL": url + "/api",
                             "DAYTONA_API_KEY": KEY})
    cb = [f"{BIN}/crabbox", "--json", "run"]
    subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=repo, env=env, capture_output=True, check=True)
    t = time.perf_counter()
    doc, n, body, sync_bytes = sent(cb + ["--", "true"], repo, env)
    first = (time.perf_counter() - t) * 1000
    print(f"repo: {FILES} files, {size / 1e6:.1f} MB; first sync {first:.0f} ms, "
          f"{sync_bytes / 1e6:.2f} MB sent in {n} requests")

    doc, n, body, sync_bytes = sent(cb + ["--", "true"], repo, env)
    print(f"unchanged tree:  {sync_bytes:8d} B of sync, {n} requests in all "
          f"(files sent {doc['sync']['files_uploaded']})")

    victim = f"{repo}/d07/f00007.txt"
    with open(victim, "a") as f:
        f.write("one more line\n")
    alone = len(gzip.compress(open(victim, "rb").read()))
    doc, n, body, sync_bytes = sent(cb + ["--", "true"], repo, env)
    print(f"1-file change:   {sync_bytes:8d} B of sync, {n} requests in all; the file gzipped alone "
          f"{alone} B (+{sync_bytes - alone} B)")

    os.remove(f"{repo}/d08/f00008.txt")
    doc, n, body, sync_bytes = sent(cb + ["--", "true"], repo, env)
    print(f"1-file deletion: {sync_bytes:8d} B of sync, {n} requests in all")

    synced, nosync = timed([[f"{BIN}/crabbox", "run", "--", "true"],
                            [f"{BIN}/crabbox", "run", "--no-sync", "--", "true"]], repo, env,
                           RUNS * 2)
    print(f"unchanged run {synced:.1f} ms vs --no-sync run {nosync:.1f} ms (baseline), in "
          f"turns, medians of {RUNS * 2}: ratio {synced / nosync:.2f}x")

    local = daemon("local", {})
    small = f"{work}/small"
    os.makedirs(small)
    subprocess.run(["git", "init", "-q", small], check=True)
    with open(f"{small}/a.txt", "w") as f:
        f.write("a\n")
    subprocess.run(["git", "-C", small, "add", "."], check=True)
    subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=small, env=local, capture_output=True, check=True)
    subprocess.run([f"{BIN}/crabbox", "run", "--", "true"], cwd=small, env=local, capture_output=True, check=True)
    # The floor of any client/daemon design on this machine: a dependency-free client asks a
    # server to run `sh -c true` and exits with its code (two process starts, one round trip,
    # nothing else). What crabbox costs above it is its own.
    floor = f"{ROOT}/target/floor/release"
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                    f"{ROOT}/bench/floor/Cargo.toml", "--target-dir", f"{ROOT}/target/floor"],
                   check=True)
    procs.append(subprocess.Popen([f"{floor}/floor-server", f"{work}/floor.sock"]))
    for _ in range(200):
        if os.path.exists(f"{work}/floor.sock"):
            break
        time.sleep(0.01)
    # Interleaved, one of each per round: a machine's drift (another process, frequency,
    # a noisy neighbour) then weighs on the baseline as on everything measured against it.
    local_cmds = {
        "sh": ["sh", "-c", "true"],
        "run": [f"{BIN}/crabbox", "run", "--", "true"],
        "run_ns": [f"{BIN}/crabbox", "run", "--no-sync", "--", "true"],
        "ver": [f"{BIN}/crabbox", "--version"],
        "floor": [f"{floor}/floor-client", f"{work}/floor.sock", "true"],
    }
    # Many rounds (each a few ms): on a VM the baseline itself moves by 10-15% from one
    # minute to the next, and a median of 90 moved with it by up to 0.2x.
    rounds = RUNS * 20
    samples = {k: [] for k in local_cmds}
    for _ in range(rounds):
        for k, cmd in local_cmds.items():
            t = time.perf_counter()
            subprocess.run(cmd, cwd=small, env=local, capture_output=True, check=True)
            samples[k].append((time.perf_counter() - t) * 1000)
    sh, run, run_ns, ver, hello = (med(samples[k]) for k in local_cmds)
    print(f"local (interleaved, medians of {rounds}): sh -c true {sh:.2f} ms (baseline); "
          f"crabbox run -- true {run:.2f} ms ({run / sh:.2f}x); --no-sync {run_ns:.2f} ms "
          f"({run_ns / sh:.2f}x); crabbox --version {ver:.2f} ms ({ver / sh:.2f}x)")
    print(f"local floor: a minimal client asking a server to run sh -c true {hello:.2f} ms "
          f"({hello / sh:.2f}x); crabbox run above that floor {run - hello:.2f} ms "
          f"({(run - hello) / sh:.2f}x sh -c true)")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
