"""stdin throughput through `crabbox run` on a warm local lease, against the same command fed
by a direct pipe, in the same run.

Usage: python3 bench/stdin_bench.py [MIB]   (after `cargo build --release`; default 256)
"""
import os, subprocess, sys, tempfile, time

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 256
BIN = os.path.abspath("target/release")
work = tempfile.mkdtemp(prefix="crabbox-stdin-bench-")
env = dict(os.environ, CRABBOX_SOCKET=f"{work}/run/d.sock", CRABBOX_STATE_DIR=f"{work}/state",
           CRABBOX_CONFIG="/dev/null", CRABBOX_NO_AUTOSTART="1")
daemon = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)
data = os.urandom(1024 * 1024) * MIB  # MIB MiB, built once


def timed(cmd, cwd=None):
    t = time.perf_counter()
    out = subprocess.run(cmd, input=data, cwd=cwd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t, out.stdout.split()[0]


try:
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run([f"{BIN}/crabbox", "warmup"], cwd=repo, env=env, capture_output=True, check=True)
    runs = []
    for _ in range(3):
        direct, d_sum = timed(["sha256sum"])
        through, c_sum = timed([f"{BIN}/crabbox", "run", "--no-sync", "--", "sha256sum"], cwd=repo)
        assert d_sum == c_sum, "the bytes arrived changed"
        runs.append((direct, through))
    direct = min(r[0] for r in runs)
    through = min(r[1] for r in runs)
    print(f"stdin, {MIB} MiB through sha256sum (best of 3):")
    print(f"  direct pipe (baseline):  {MIB / direct:7.1f} MiB/s")
    print(f"  crabbox run (warm lease): {MIB / through:7.1f} MiB/s  ratio {direct / through:5.2f}x of the pipe")
finally:
    daemon.terminate()
    daemon.wait(timeout=30)
    subprocess.run(["rm", "-rf", work])
