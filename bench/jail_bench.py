"""The local jail's cost: a warm `crabbox run -- true` on a jailed local lease (bubblewrap,
the default) against the same on an unjailed one (CRABBOX_LOCAL_ISOLATION=none), and
`sh -c true` as the floor, all in one run.

Usage: python3 bench/jail_bench.py [RUNS]   (after `cargo build --release`)
"""
import os, shutil, statistics, subprocess, sys, tempfile, time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
BIN = os.path.abspath("target/release")
work = tempfile.mkdtemp(prefix="jail-bench-")
daemons = []


def daemon(name, extra):
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/d.sock", CRABBOX_STATE_DIR=f"{work}/{name}/state",
               CRABBOX_CONFIG="/dev/null", CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn", **extra)
    daemons.append(subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL))
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/{name}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run([f"{BIN}/crabbox", "run", "-q", "--keep", "--", "true"], env=env, cwd=repo, check=True)
    return env, repo


def median_ms(cmd, env=None, cwd=None):
    xs = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        xs.append((time.perf_counter() - t) * 1000)
    return statistics.median(xs)


try:
    jailed = daemon("jailed", {})
    open_ = daemon("open", {"CRABBOX_LOCAL_ISOLATION": "none"})
    floor = median_ms(["sh", "-c", "true"])
    off = median_ms([f"{BIN}/crabbox", "run", "--", "true"], *open_)
    on = median_ms([f"{BIN}/crabbox", "run", "--", "true"], *jailed)
    print(f"runs per figure: {RUNS}")
    print(f"sh -c true (floor):                          median {floor:6.2f} ms")
    print(f"crabbox run -- true, unjailed (baseline):    median {off:6.2f} ms")
    print(f"crabbox run -- true, jailed (bubblewrap):    median {on:6.2f} ms  ratio {on / off:4.2f}x  (+{on - off:.2f} ms)")
finally:
    for d in daemons:
        d.terminate()
        d.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
