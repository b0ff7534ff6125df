"""crabbox figures, each against a baseline measured in the same run (see run.sh)."""
import json, os, statistics, subprocess, sys, tempfile, time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
BIN = os.path.abspath("target/release")
work = tempfile.mkdtemp(prefix="crabbox-bench-")
env = dict(os.environ,
           CRABBOX_SOCKET=os.path.join(work, "run/d.sock"),
           CRABBOX_STATE_DIR=os.path.join(work, "state"),
           CRABBOX_CONFIG="/dev/null",
           CRABBOX_NO_AUTOSTART="1")
daemon = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)


def crabbox(*args, cwd=None):
    return subprocess.run([f"{BIN}/crabbox", *args], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def timed(cmd, cwd=None):
    samples = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


try:
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = os.path.join(work, "repo")
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    for i in range(20):
        with open(os.path.join(repo, f"f{i}.txt"), "w") as f:
            f.write("x" * 1000)
    subprocess.run(["git", "-C", repo, "add", "."], check=True)
    crabbox("warmup", cwd=repo)
    crabbox("run", "--", "true", cwd=repo)  # first sync
    idle_rss = rss_kib(daemon.pid)

    base = timed(["sh", "-c", "true"])
    run = timed([f"{BIN}/crabbox", "run", "--", "true"], cwd=repo)
    nosync = timed([f"{BIN}/crabbox", "run", "--no-sync", "--", "true"], cwd=repo)
    med = statistics.median
    print(f"runs per figure: {RUNS}")
    print(f"sh -c true (baseline):            median {med(base):7.2f} ms")
    print(f"crabbox run -- true (warm lease): median {med(run):7.2f} ms  ratio {med(run) / med(base):6.1f}x")
    print(f"crabbox run --no-sync -- true:    median {med(nosync):7.2f} ms  ratio {med(nosync) / med(base):6.1f}x")

    for i in range(100):
        d = os.path.join(work, f"leases/{i}")
        os.makedirs(d)
        crabbox("warmup", "--keep", cwd=d)
    leases = json.loads(crabbox("list", "--json", cwd=repo).stdout)
    full_rss = rss_kib(daemon.pid)
    print(f"crabboxd RSS with 1 lease (baseline): {idle_rss / 1024:6.1f} MiB")
    print(f"crabboxd RSS with {len(leases)} warm leases:     {full_rss / 1024:6.1f} MiB  ratio {full_rss / idle_rss:4.2f}x"
          f"  (+{(full_rss - idle_rss) / max(len(leases) - 1, 1):.0f} KiB per lease)")
finally:
    daemon.terminate()
    daemon.wait(timeout=30)
    subprocess.run(["rm", "-rf", work])
