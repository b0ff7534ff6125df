"""Readiness lag: from a sandbox reaching `started` on daytona-sim to the lease being
`ready` in crabboxd, at several start delays, with the sim's events channel (Daytona's
Socket.IO push) and without it (`--no-events`: crabbox polls), in the same run.

The lag runs from the sim's `lastActivityAt`, which the sim stamps when it moves the
sandbox to `started`, to the moment `crabbox warmup` (which waits for `ready`) has printed
the lease: it includes the CLI's own exit, a few ms. Both clocks are this machine's.

Usage: python3 bench/readiness_bench.py [N]   (after `cargo build --release`; default 20)
"""
import calendar
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
KEY = "dtn_bench_key"


def rfc3339(t):
    t = t.rstrip("Z")
    whole, frac = (t.split(".") + ["0"])[:2]
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)


def measure(delay, events):
    work = tempfile.mkdtemp(prefix="crabbox-ready-bench-")
    procs = []
    try:
        args = [f"{BIN}/daytona-sim", "--listen", "127.0.0.1:0", "--state-dir", f"{work}/sim",
                "--api-key", KEY, "--create-delay", "10ms", "--start-delay", delay]
        if not events:
            args.append("--no-events")
        sim = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(sim)
        url = sim.stdout.readline().strip().split(" ", 2)[2]
        env = dict(os.environ, CRABBOX_SOCKET=f"{work}/run/d.sock", CRABBOX_STATE_DIR=f"{work}/state",
                   CRABBOX_CONFIG="/dev/null", CRABBOX_NO_AUTOSTART="1", CRABBOX_PROVIDER="daytona",
                   DAYTONA_API_URL=url + "/api", DAYTONA_API_KEY=KEY, RUST_LOG="warn")
        d = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
        procs.append(d)
        for _ in range(200):
            if os.path.exists(env["CRABBOX_SOCKET"]):
                break
            time.sleep(0.05)
        lags = []
        for i in range(N):
            repo = f"{work}/r{i}"
            os.makedirs(repo)
            out = subprocess.run([f"{BIN}/crabbox", "warmup", "--json"], cwd=repo, env=env,
                                 capture_output=True, text=True, check=True).stdout
            ready = time.time()
            lease = json.loads(out)
            req = urllib.request.Request(f"{url}/api/sandbox/{lease['sandbox_id']}",
                                         headers={"Authorization": f"Bearer {KEY}"})
            sb = json.loads(urllib.request.urlopen(req).read())
            started = rfc3339(sb["lastActivityAt"])
            lags.append((ready - started) * 1000)
        lags.sort()
        return statistics.median(lags), lags[max(0, int(len(lags) * 0.99) - 1)], lags[-1]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
        subprocess.run(["rm", "-rf", work])


print(f"sandbox `started` (sim) -> lease `ready` (crabboxd), {N} leases per row, ms:")
print(f"{'start delay':>12} {'events p50':>11} {'p99':>7} {'max':>7}   {'polling p50':>12} {'p99':>7} {'max':>7}")
for delay in ["0ms", "500ms", "1200ms", "3s", "5s"]:
    e50, e99, emax = measure(delay, True)
    p50, p99, pmax = measure(delay, False)
    print(f"{delay:>12} {e50:11.1f} {e99:7.1f} {emax:7.1f}   {p50:12.1f} {p99:7.1f} {pmax:7.1f}")
