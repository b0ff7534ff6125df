"""A change in a large file (issue 13, item 6), on a warm daytona lease (daytona-sim on
loopback) and on a warm local lease, in one run:

- the baseline: the whole file rewritten with new content (nothing to reuse: it all goes);
- a 1-byte change in the middle, an 8-byte insertion near the start (which shifts the rest),
  and 1 MiB appended;

each with the bytes on the wire (request bodies as the sim counts them) and the run's wall
time, as ratios against the baseline. The file is random, so gzip cannot hide a whole send.

Usage: python3 bench/delta_bench.py [MiB] [RUNS]   (after `cargo build --release`)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 200
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEY = "dtn_bench_key"
work = tempfile.mkdtemp(prefix="crabbox-delta-bench-")
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


try:
    sim = subprocess.Popen([f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir",
                            f"{work}/sim", "--api-key", KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(sim)
    url = sim.stdout.readline().strip().split(" ", 2)[2]

    def requests():
        return json.loads(urllib.request.urlopen(f"{url}/_sim/requests").read())

    repo = f"{work}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    big = f"{repo}/big.bin"
    data = bytearray(os.urandom(MIB << 20))

    def write():
        with open(big, "wb") as f:
            f.write(data)

    write()
    envs = {
        "daytona": daemon("daytona", {"CRABBOX_PROVIDER": "daytona",
                                      "DAYTONA_API_URL": url + "/api", "DAYTONA_API_KEY": KEY}),
        "local": daemon("local", {}),
    }
    for env in envs.values():
        subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=repo, env=env, capture_output=True,
                       check=True)
        subprocess.run([f"{BIN}/crabbox", "run", "--", "true"], cwd=repo, env=env,
                       capture_output=True, check=True)

    def run(env):
        before = len(requests())
        t = time.perf_counter()
        out = subprocess.run([f"{BIN}/crabbox", "--json", "run", "--", "true"], cwd=repo,
                             env=env, capture_output=True, text=True, check=True)
        ms = (time.perf_counter() - t) * 1000
        lines = [l for l in requests()[before:] if "/_sim/" not in l]
        wire = sum(int(l.split()[2]) for l in lines if len(l.split()) > 2)
        return ms, json.loads(out.stdout)["sync"]["bytes_uploaded"], wire

    def rewrite():
        data[:] = os.urandom(len(data))

    def flip():
        data[len(data) // 2] ^= 0xFF

    def insert():
        data[4096:4096] = b"inserted"

    def append():
        data.extend(os.urandom(1 << 20))

    edits = [("whole file rewritten (baseline)", rewrite), ("1 byte changed", flip),
             ("8 bytes inserted near the start", insert), ("1 MiB appended", append)]
    print(f"a {MIB} MiB random file; medians of {RUNS} runs; bytes = the archive "
          f"(daytona: every request body of the run)")
    for name, env in envs.items():
        base = None
        for what, edit in edits:
            results = []
            for _ in range(RUNS):
                edit()
                write()
                results.append(run(env))
            ms = statistics.median(r[0] for r in results)
            sent = statistics.median(r[1] for r in results)
            wire = statistics.median(r[2] for r in results) if name == "daytona" else sent
            if base is None:
                base = (ms, wire)
            print(f"{name:8s} {what:32s} {wire / 1e6:9.3f} MB ({wire / base[1]:.5f}x)  "
                  f"{ms:8.0f} ms ({ms / base[0]:.2f}x)")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
