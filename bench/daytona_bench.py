"""Figures for the daytona provider against daytona-sim, each against baselines from the same
run and the same sim:

- warm `crabbox --provider daytona run -- true` vs the official Python SDK doing the same
  upload + exec, vs the raw floor: the same two HTTP calls (upload-v2, process/execute)
  made with curl;
- time from a sandbox reaching `started` on the sim to the lease being `ready`.
Usage: .venv/bin/python bench/daytona_bench.py [RUNS]   (after `cargo build --release`)
"""
import calendar, json, os, statistics, subprocess, sys, tempfile, time, urllib.request

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BIN = os.path.abspath("target/release")
KEY = "dtn_bench_key"
work = tempfile.mkdtemp(prefix="daytona-bench-")
sim = subprocess.Popen([f"{BIN}/daytona-sim", "--state-dir", f"{work}/sim", "--api-key", KEY],
                       stdout=subprocess.PIPE, text=True)
url = sim.stdout.readline().split()[-1]
env = dict(os.environ, CRABBOX_SOCKET=f"{work}/run/d.sock", CRABBOX_STATE_DIR=f"{work}/state",
           CRABBOX_CONFIG="/dev/null", DAYTONA_API_KEY=KEY, CRABBOX_DAYTONA_API_URL=url + "/api",
           CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn")
daemon = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
from daytona import Daytona, DaytonaConfig  # noqa: E402

med = statistics.median


def crabbox(*args, cwd):
    return subprocess.run([f"{BIN}/crabbox", "--provider", "daytona", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=True)


def timed(fn):
    out = []
    for _ in range(RUNS):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


try:
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    with open(f"{repo}/a.txt", "w") as f:
        f.write("x" * 1000)
    subprocess.run(["git", "-C", repo, "add", "."], check=True)
    crabbox("warmup", cwd=repo)
    crabbox("run", "--", "true", cwd=repo)
    cb = timed(lambda: crabbox("run", "--", "true", cwd=repo))

    d = Daytona(DaytonaConfig(api_key=KEY, api_url=url + "/api", target="us"))
    sb = d.create(timeout=60)
    payload = b"x" * 1000
    sdk = timed(lambda: (sb.fs.upload_file(payload, "bench/a.txt"), sb.process.exec("true")))

    src = f"{work}/payload"
    with open(src, "wb") as f:
        f.write(payload)
    tb = f"{url}/toolbox/{sb.id}"
    auth = ["-H", f"Authorization: Bearer {KEY}"]

    def raw():
        subprocess.run(["curl", "-sf", "-o", "/dev/null", *auth, "--data-binary", f"@{src}",
                        f"{tb}/files/upload-v2?path=bench/raw.txt"], check=True)
        subprocess.run(["curl", "-sf", "-o", "/dev/null", *auth, "-H", "Content-Type: application/json",
                        "-d", '{"command":"true","timeout":10}', f"{tb}/process/execute"], check=True)
    floor = timed(raw)
    print(f"runs per figure: {RUNS}")
    print(f"raw floor: curl upload-v2 + curl process/execute (baseline): median {med(floor):7.1f} ms")
    print(f"official Python SDK: upload_file + process.exec:           median {med(sdk):7.1f} ms  ratio {med(sdk) / med(floor):4.2f}x")
    print(f"crabbox --provider daytona run -- true (warm lease):       median {med(cb):7.1f} ms  ratio {med(cb) / med(floor):4.2f}x")

    lags = []
    for i in range(5):
        d_ = f"{work}/lag{i}"
        os.makedirs(d_)
        p = subprocess.Popen([f"{BIN}/crabbox", "--provider", "daytona", "warmup", "--json"], env=env, cwd=d_,
                             stdout=subprocess.PIPE, text=True)
        out = p.communicate(timeout=60)[0]
        ready_at = time.time()
        lease = json.loads(out)
        req = urllib.request.Request(f"{url}/api/sandbox/{lease['sandbox_id']}", headers={"Authorization": f"Bearer {KEY}"})
        s = json.loads(urllib.request.urlopen(req).read())
        # lastActivityAt is stamped when the sim moves the sandbox to started (nothing else
        # touches it before this read).
        t = s["lastActivityAt"].rstrip("Z")
        whole, frac = t.split(".")
        started_at = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)
        lags.append((ready_at - started_at) * 1000)
    print(f"sim `started` -> lease `ready` (seen by the CLI's warmup): median {med(lags):6.1f} ms  "
          f"(min {min(lags):.1f}, max {max(lags):.1f}; includes the CLI's exit)")
finally:
    daemon.terminate()
    daemon.wait(timeout=30)
    sim.terminate()
    sim.wait(timeout=30)
    subprocess.run(["rm", "-rf", work])
