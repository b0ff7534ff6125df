"""Stdout throughput through `crabbox run` on a warm lease (local, and daytona-sim on
loopback) against the same bytes through one pipe (`head | cat`), best of 3, in one run.

Usage: python3 bench/stream_bench.py [MB]   (after `cargo build --release`; default 500)
"""
import os
import subprocess
import sys
import tempfile
import time

MB = int(sys.argv[1]) if len(sys.argv) > 1 else 500
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEY = "dtn_bench_key"
work = tempfile.mkdtemp(prefix="crabbox-stream-bench-")
procs = []


def daemon(name, extra):
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/run/d.sock",
               CRABBOX_STATE_DIR=f"{work}/{name}/state", CRABBOX_CONFIG="/dev/null",
               CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn", **extra)
    procs.append(subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL))
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/{name}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=repo, env=env, capture_output=True, check=True)
    return env, repo


def best(cmd, cwd=None, env=None):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return min(times)


try:
    sim = subprocess.Popen([f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir",
                            f"{work}/sim", "--api-key", KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(sim)
    url = sim.stdout.readline().strip().split(" ", 2)[2]
    n = MB * 1_000_000
    pipe = best(["sh", "-c", f"head -c {n} /dev/zero | cat"])
    print(f"{MB} MB of stdout, best of 3:")
    print(f"  one pipe, head | cat (baseline): {MB / pipe:7.0f} MB/s")
    for name, extra in (("local", {}), ("daytona-sim", {"CRABBOX_PROVIDER": "daytona",
                                                         "DAYTONA_API_URL": url + "/api",
                                                         "DAYTONA_API_KEY": KEY})):
        env, repo = daemon(name, extra)
        took = best([f"{BIN}/crabbox", "run", "-q", "--no-sync", "--", "head", "-c", str(n), "/dev/zero"],
                    cwd=repo, env=env)
        print(f"  crabbox run, {name:<11} warm:   {MB / took:7.0f} MB/s  ({pipe / took:.2f}x the pipe)")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
