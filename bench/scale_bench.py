"""One daemon holding many leases: the create rate as the count grows, crabboxd's RSS, `List`
(one page of 500, and all of them) and `Info` latency, and `crabbox list` of all of them,
against the same calls at 1 lease measured in the same run.

Usage: .venv/bin/python bench/scale_bench.py [N] [PARALLEL]   (after `cargo build --release`;
default 10000 leases, 16 in flight; local provider, leases without a repo)
"""
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
PAR = int(sys.argv[2]) if len(sys.argv) > 2 else 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
work = tempfile.mkdtemp(prefix="crabbox-scale-bench-")
sock = f"{work}/run/d.sock"
env = dict(os.environ, CRABBOX_SOCKET=sock, CRABBOX_STATE_DIR=f"{work}/state",
           CRABBOX_CONFIG="/dev/null", CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn")
daemon = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)

out = f"{work}/stubs"
os.makedirs(out)
import grpc_tools  # noqa: E402
include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
assert protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}",
                    f"--grpc_python_out={out}", f"{ROOT}/proto/crabbox/v1/crabbox.proto"]) == 0
sys.path.insert(0, out)
from crabbox.v1 import crabbox_pb2 as pb, crabbox_pb2_grpc as rpc  # noqa: E402


def rss_mib():
    with open(f"/proc/{daemon.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def p99(xs):
    xs = sorted(xs)
    return xs[max(0, int(len(xs) * 0.99) - 1)]


def timed(fn, n=50):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out), p99(out)


try:
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    ch = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.default_authority", "localhost"),
                                                         ("grpc.max_receive_message_length", 1 << 30)])
    leases = rpc.LeaseServiceStub(ch)
    info = rpc.DaemonServiceStub(ch)
    leases.Warmup(pb.WarmupRequest(idle_timeout_secs=86400, ttl_secs=86400), timeout=30)
    time.sleep(0.5)
    base_rss = rss_mib()
    page = lambda: leases.List(pb.ListRequest(page_size=500), timeout=30)
    base_page = timed(page)
    base_info = timed(lambda: info.Info(pb.InfoRequest(), timeout=30))
    base_cli = timed(lambda: subprocess.run([f"{BIN}/crabbox", "list", "--json"], env=env,
                                            capture_output=True, check=True), 10)
    base_table = timed(lambda: subprocess.run([f"{BIN}/crabbox", "list"], env=env,
                                              capture_output=True, check=True), 10)

    def one(i):
        leases.Warmup(pb.WarmupRequest(idle_timeout_secs=86400, ttl_secs=86400,
                                       labels={"batch": str(i // 1000)}), timeout=60)

    made, rates = 1, []
    with concurrent.futures.ThreadPoolExecutor(PAR) as pool:
        while made < N:
            step = min(1000, N - made)
            t = time.perf_counter()
            list(pool.map(one, range(made, made + step)))
            rates.append((made + step, step / (time.perf_counter() - t)))
            made += step
    time.sleep(1.0)
    full_rss = rss_mib()
    print(f"{N} leases, {PAR} creates in flight; creates per second by thousand:")
    print("  " + ", ".join(f"{n}: {r:.0f}/s" for n, r in rates))
    print(f"crabboxd RSS: 1 lease {base_rss:.1f} MiB (baseline), {N} leases {full_rss:.1f} MiB "
          f"(+{(full_rss - base_rss) * 1024 / N:.1f} KiB per lease)")
    for name, base, fn in (
        ("List, one page of 500", base_page, page),
        ("Info", base_info, lambda: info.Info(pb.InfoRequest(), timeout=30)),
        ("List of a label (1,000)", None, lambda: leases.List(pb.ListRequest(labels={"batch": "3"}), timeout=30)),
        ("List, all, one call", None, lambda: leases.List(pb.ListRequest(), timeout=30)),
    ):
        med, tail = timed(fn)
        ratio = f"  ratio {tail / base[1]:.1f}x of 1 lease" if base else ""
        print(f"{name:<26} median {med:7.2f} ms, p99 {tail:7.2f} ms{ratio}")
    for args, base in ((["list"], base_table), (["list", "--json"], base_cli)):
        med, tail = timed(lambda: subprocess.run([f"{BIN}/crabbox", *args], env=env,
                                                 capture_output=True, check=True), 10)
        print(f"crabbox {' '.join(args)} of {N}: median {med:.0f} ms, p99 {tail:.0f} ms "
              f"(1 lease: {base[0]:.0f} ms)")
finally:
    daemon.terminate()
    try:
        daemon.wait(timeout=120)
    except subprocess.TimeoutExpired:
        daemon.kill()
    subprocess.run(["rm", "-rf", work])
