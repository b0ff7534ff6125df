"""Stdout throughput through `crabbox run` on a warm lease (local, and daytona-sim on
loopback) against the same bytes through one pipe (`head | cat`), best of 3, in one run;
on daytona-sim also against a raw WebSocket reader of the same log stream, in turns.

Usage: .venv/bin/python bench/stream_bench.py [MB]   (after `cargo build --release`;
default 500; the raw WebSocket baseline needs aiohttp, which the SDK's venv has)
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

MB = int(sys.argv[1]) if len(sys.argv) > 1 else 500
ROUNDS = 5
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


def raw_reader(url, n):
    """Seconds for a raw WebSocket reader (aiohttp) to read a session command's log stream
    of `n` bytes from daytona-sim: the floor for crabbox's Daytona path."""
    import asyncio
    import json
    import urllib.request
    import aiohttp

    def call(method, path, body=None):
        req = urllib.request.Request(url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read() or b"null")

    sb = call("POST", "/api/sandbox", {"snapshot": "default"})
    for _ in range(200):
        if call("GET", f"/api/sandbox/{sb['id']}")["state"] == "started":
            break
        time.sleep(0.02)
    tb = f"/toolbox/{sb['id']}/process/session"
    call("POST", tb, {"sessionId": "raw"})

    async def once():
        cmd = call("POST", f"{tb}/raw/exec", {"command": f"head -c {n} /dev/zero", "runAsync": True})
        t = time.perf_counter()
        got = 0
        async with aiohttp.ClientSession() as s:
            ws_url = url.replace("http://", "ws://") + f"{tb}/raw/command/{cmd['cmdId']}/logs?follow=true"
            async with s.ws_connect(ws_url, headers={"Authorization": f"Bearer {KEY}"}, max_msg_size=0) as ws:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        got += len(msg.data) - 3
                    else:
                        break
        assert got == n, (got, n)
        return time.perf_counter() - t

    took = min(asyncio.run(once()) for _ in range(3))
    call("DELETE", f"/api/sandbox/{sb['id']}")
    return took


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
        run = [f"{BIN}/crabbox", "run", "-q", "--no-sync", "--", "head", "-c", str(n), "/dev/zero"]
        if name != "daytona-sim":
            took = best(run, cwd=repo, env=env)
            print(f"  crabbox run, {name:<11} warm:   {MB / took:7.0f} MB/s  ({pipe / took:.2f}x the pipe)")
            continue
        # Against the raw reader: both read the same sim, whose own speed moves from one
        # moment to the next on a shared machine; so they take turns, ROUNDS times, and
        # the ratio is the median of each round's ratio.
        ratios, ours, raws = [], [], []
        for _ in range(ROUNDS):
            took = best(run, cwd=repo, env=env)
            raw = raw_reader(url, n)
            ours.append(took)
            raws.append(raw)
            ratios.append(raw / took)
        took, raw = statistics.median(ours), statistics.median(raws)
        print(f"  crabbox run, {name:<11} warm:   {MB / took:7.0f} MB/s  ({pipe / took:.2f}x the pipe)"
              f"  (medians of {ROUNDS} rounds, best of 3 each)")
        print(f"  raw WebSocket reader of the sim's log stream: {MB / raw:7.0f} MB/s")
        print(f"  crabbox run / raw reader, median of the rounds' ratios: {statistics.median(ratios):.2f}x"
              f"  (each: {', '.join(f'{r:.2f}' for r in ratios)})")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
