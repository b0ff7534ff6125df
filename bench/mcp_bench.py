"""MCP stdio round trips and stdin throughput through `crabbox run`, on a warm local lease and
on a warm daytona lease (daytona-sim on loopback), against the same thing run directly, in
the same run.

- Round trips: the test MCP server (tests/fixtures/mcp_echo_server.py) answers N
  `tools/call` requests, each sent once the previous answer arrived; p50/p99 per round trip.
- Throughput: MIB MiB of random bytes through `sha256sum`, best of 3 (the digest checked).

Usage: python3 bench/mcp_bench.py [N] [MIB]   (after `cargo build --release`; default 1000 64)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
MIB = int(sys.argv[2]) if len(sys.argv) > 2 else 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
SERVER = os.path.join(ROOT, "tests", "fixtures", "mcp_echo_server.py")
KEY = "dtn_bench_key"

work = tempfile.mkdtemp(prefix="crabbox-mcp-bench-")
procs = []


def start_sim():
    sim = subprocess.Popen([f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir",
                            f"{work}/sim", "--api-key", KEY],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(sim)
    url = sim.stdout.readline().strip().split(" ", 2)[2]
    for line in iter(sim.stdout.readline, ""):
        if line.strip() == "ready":
            break
    return url


def start_daemon(name, extra_env):
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/run/d.sock",
               CRABBOX_STATE_DIR=f"{work}/{name}/state", CRABBOX_CONFIG="/dev/null",
               CRABBOX_NO_AUTOSTART="1", **extra_env)
    d = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
    procs.append(d)
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/{name}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    with open(f"{repo}/mcp_echo_server.py", "w") as f:
        f.write(open(SERVER).read())
    subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=repo, env=env, capture_output=True, check=True)
    # The first run syncs the server; the measured runs find it there.
    subprocess.run([f"{BIN}/crabbox", "run", "--", "true"], cwd=repo, env=env, capture_output=True,
                   check=True)
    return env, repo


def round_trips(cmd, cwd, env):
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)

    def ask(msg):
        p.stdin.write(json.dumps(msg).encode() + b"\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    ask({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}})
    times = []
    for i in range(1, N + 1):
        text = f"call {i}: ü ✓"
        t = time.perf_counter()
        answer = ask({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": text}}})
        times.append(time.perf_counter() - t)
        assert answer["result"]["content"][0]["text"] == text, answer
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99) - 1] * 1000


def throughput(cmd, cwd, env, data):
    best, digest = None, None
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run(cmd, input=data, cwd=cwd, env=env, capture_output=True, check=True)
        took = time.perf_counter() - t
        best = took if best is None else min(best, took)
        digest = out.stdout.split()[0]
    return best, digest


try:
    sim_url = start_sim()
    local_env, local_repo = start_daemon("local", {})
    day_env, day_repo = start_daemon("daytona", {"CRABBOX_PROVIDER": "daytona",
                                                 "DAYTONA_API_URL": sim_url + "/api",
                                                 "DAYTONA_API_KEY": KEY})
    crabbox = [f"{BIN}/crabbox", "run", "--no-sync", "--"]
    print(f"MCP stdio, {N} round trips (tools/call echo), p50 / p99 per round trip:")
    base50, base99 = round_trips(["python3", SERVER], local_repo, local_env)
    print(f"  server run directly (baseline): {base50:7.3f} / {base99:7.3f} ms")
    for name, env, repo in (("local", local_env, local_repo), ("daytona-sim", day_env, day_repo)):
        p50, p99 = round_trips(crabbox + ["python3", "mcp_echo_server.py"], repo, env)
        print(f"  crabbox run, {name:<11} warm lease: {p50:7.3f} / {p99:7.3f} ms"
              f"   ratio {p50 / base50:6.1f}x / {p99 / base99:6.1f}x")

    data = os.urandom(1024 * 1024) * MIB
    print(f"stdin, {MIB} MiB through sha256sum (best of 3):")
    direct, want = throughput(["sha256sum"], local_repo, local_env, data)
    print(f"  direct pipe (baseline):         {MIB / direct:7.1f} MiB/s")
    for name, env, repo in (("local", local_env, local_repo), ("daytona-sim", day_env, day_repo)):
        took, got = throughput(crabbox + ["sha256sum"], repo, env, data)
        assert got == want, f"{name}: the bytes arrived changed"
        print(f"  crabbox run, {name:<11} warm lease: {MIB / took:7.1f} MiB/s   ratio {direct / took:5.2f}x"
              f" the pipe's speed")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
