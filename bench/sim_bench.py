"""daytona-sim figures, each against a baseline measured in the same run.

- create -> started: the official SDK (its own waiting) vs a raw client polling every 10 ms;
- process/execute requests per second (4 client threads, keep-alive) vs the HTTP floor (a GET
  of the sandbox on the same connections) and vs spawning the same jailed `true` directly.
Usage: .venv/bin/python bench/sim_bench.py [SECONDS]   (after `cargo build --release`)
"""
import http.client, json, os, statistics, subprocess, sys, tempfile, threading, time

SECS = float(sys.argv[1]) if len(sys.argv) > 1 else 5
BIN = os.path.abspath("target/release/daytona-sim")
KEY = "dtn_bench"
state = tempfile.mkdtemp(prefix="sim-bench-")
sim = subprocess.Popen([BIN, "--state-dir", state, "--api-key", KEY], stdout=subprocess.PIPE, text=True)
url = sim.stdout.readline().split()[-1]
host, port = url.removeprefix("http://").split(":")
from daytona import Daytona, DaytonaConfig, CreateSandboxFromSnapshotParams  # noqa: E402


def conn():
    return http.client.HTTPConnection(host, int(port), timeout=30)


def call(c, method, path, body=None):
    c.request(method, path, body=None if body is None else json.dumps(body),
              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"null")


try:
    d = Daytona(DaytonaConfig(api_key=KEY, api_url=url + "/api", target="us"))
    sdk, raw = [], []
    for _ in range(5):
        t = time.perf_counter()
        sb = d.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
        sdk.append(time.perf_counter() - t)
        d.delete(sb)
        c = conn()
        t = time.perf_counter()
        _, s = call(c, "POST", "/api/sandbox", {})
        while call(c, "GET", f"/api/sandbox/{s['id']}")[1]["state"] != "started":
            time.sleep(0.01)
        raw.append(time.perf_counter() - t)
        call(c, "DELETE", f"/api/sandbox/{s['id']}")
    med = statistics.median
    print(f"create -> started, raw client polling every 10 ms (baseline): median {med(raw) * 1000:7.1f} ms")
    print(f"create -> started, official SDK:                              median {med(sdk) * 1000:7.1f} ms"
          f"  ratio {med(sdk) / med(raw):5.1f}x")

    c = conn()
    _, s = call(c, "POST", "/api/sandbox", {})
    sid = s["id"]
    while call(c, "GET", f"/api/sandbox/{sid}")[1]["state"] != "started":
        time.sleep(0.01)

    def rate(method, path, body):
        count = [0]
        stop = time.perf_counter() + SECS

        def worker():
            c = conn()
            n = 0
            while time.perf_counter() < stop:
                st, _ = call(c, method, path, body)
                assert st == 200, st
                n += 1
            count[0] += n
        threads = [threading.Thread(target=worker) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return count[0] / SECS

    floor = rate("GET", f"/api/sandbox/{sid}", None)
    execute = rate("POST", f"/toolbox/{sid}/process/execute", {"command": "true", "timeout": 10})
    fs = os.path.join(state, "sandboxes", sid, "fs")
    n, stop = 0, time.perf_counter() + SECS
    while time.perf_counter() < stop:
        subprocess.run(["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", f"{fs}/home", "/home",
                        "--bind", f"{fs}/tmp", "/tmp", "--die-with-parent", "/bin/sh", "-c", "true"], check=True)
        n += 1
    spawn = n / SECS
    print(f"GET sandbox (HTTP floor, 4 threads):        {floor:8.0f} req/s")
    print(f"jailed `sh -c true` spawned directly (1 thread): {spawn:8.0f} /s")
    print(f"process/execute `true` (4 threads):          {execute:8.0f} req/s  ({execute / floor:.3f}x the HTTP floor,"
          f" {execute / spawn:.2f}x a direct jailed spawn)")
finally:
    sim.terminate()
    sim.wait(timeout=30)
    subprocess.run(["rm", "-rf", state])
