"""Files in and out of a lease, against floors measured in the same run:

- `crabbox cp` of one large file (random bytes) and of a folder of many small files, out
  of and into the lease, on local (floor: `cp` / `cp -r` of the same files on this disk)
  and on daytona-sim (floor: `curl` of the same bytes through the toolbox's
  files/download and files/upload-v2; for the folder: curl asking the sandbox to tar it
  (process/execute), curl downloading the tar, and `tar x` here);
- a run's artifacts, 500 small files, as one archive (`run --artifact-glob`) against 500
  single curl downloads through the toolbox;
- peak memory of the CLI and the daemon while the large file moves (constant memory:
  neither grows with the file).

Usage: .venv/bin/python bench/cp_bench.py [MIB] [FILES]   (after `cargo build --release`;
default 1024 MiB and 10000 files)
"""
import json, os, shutil, subprocess, sys, tempfile, time

MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
FILES = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
BIN = os.path.abspath("target/release")
KEY = "dtn_bench_key"
work = tempfile.mkdtemp(prefix="cp-bench-")
sim = subprocess.Popen([f"{BIN}/daytona-sim", "--state-dir", f"{work}/sim", "--api-key", KEY],
                       stdout=subprocess.PIPE, text=True)
url = sim.stdout.readline().split()[-1]
env = dict(os.environ, CRABBOX_SOCKET=f"{work}/run/d.sock", CRABBOX_STATE_DIR=f"{work}/state",
           CRABBOX_CONFIG="/dev/null", DAYTONA_API_KEY=KEY, CRABBOX_DAYTONA_API_URL=url + "/api",
           CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn")
daemon = subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL)


def crabbox(provider, *args, cwd, timed_rss=False):
    cmd = [f"{BIN}/crabbox", "--provider", provider, *args]
    if timed_rss:
        cmd = ["/usr/bin/time", "-f", "%M", *cmd]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=True)


def secs(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best(fn, n=3):
    return min(secs(fn) for _ in range(n))


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


try:
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    repo = f"{work}/repo"
    os.makedirs(repo)
    subprocess.run(["git", "init", "-q", repo], check=True)
    out = f"{work}/out"
    make = (f"head -c {MIB}M /dev/urandom > big.bin && mkdir -p many arts && "
            f"for i in $(seq 1 {FILES}); do echo \"file $i\" > many/f$i.txt; done && "
            "for i in $(seq 1 500); do echo \"artifact $i\" > arts/a$i.txt; done")
    print(f"{MIB} MiB file (random bytes), {FILES} small files, 500 artifacts; best of 3 "
          f"(the large file: best of 2)")
    for provider in ("local", "daytona"):
        crabbox(provider, "warmup", "--keep", cwd=repo)
        crabbox(provider, "run", "--", "sh", "-c", make, cwd=repo)
        lease = json.loads(crabbox(provider, "status", "--json", cwd=repo).stdout)
        checkout = f"{lease['work_root']}/{lease['id']}/repo"
        if provider == "local":
            big_floor = best(lambda: (fresh(out), shutil.copyfile(f"{checkout}/big.bin", f"{out}/big.bin")), 2)
            many_floor = best(lambda: (shutil.rmtree(out, ignore_errors=True),
                                       subprocess.run(["cp", "-r", f"{checkout}/many", out], check=True)))
            up_floor = big_floor
        else:
            tb = f"{url}/toolbox/{lease['sandbox_id']}"
            auth = ["-H", f"Authorization: Bearer {KEY}"]

            def curl_down(path, to):
                subprocess.run(["curl", "-sf", "-o", to, *auth, "--get", "--data-urlencode", f"path={path}",
                                f"{tb}/files/download"], check=True)
            big_floor = best(lambda: (fresh(out), curl_down(f"{checkout}/big.bin", f"{out}/big.bin")), 2)
            up_floor = best(lambda: subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", *auth, "-X", "POST", "-T", f"{out}/big.bin",
                 f"{tb}/files/upload-v2?path={checkout}/raw-up.bin"], check=True), 2)
            tar_cmd = json.dumps({"command": f"tar cf {lease['work_root']}/{lease['id']}/many.tar -C {checkout} many",
                                  "timeout": 600})

            def tar_then_download():
                fresh(out)
                subprocess.run(["curl", "-sf", "-o", "/dev/null", *auth, "-H", "Content-Type: application/json",
                                "-d", tar_cmd, f"{tb}/process/execute"], check=True)
                curl_down(f"{lease['work_root']}/{lease['id']}/many.tar", f"{out}/many.tar")
                subprocess.run(["tar", "xf", f"{out}/many.tar", "-C", out], check=True)
            many_floor = best(tar_then_download)
            arts_floor = best(lambda: [curl_down(f"{checkout}/arts/a{i}.txt", f"{out}/a.txt")
                                       for i in range(1, 501)], 1)
        before = hwm_kib(daemon.pid)
        rss = []
        big = best(lambda: (fresh(out), rss.append(int(crabbox(provider, "cp", ":big.bin", f"{out}/",
                                                                cwd=repo, timed_rss=True).stderr.split()[-1]))), 2)
        daemon_growth = (hwm_kib(daemon.pid) - before) / 1024
        up = best(lambda: crabbox(provider, "cp", f"{out}/big.bin", ":up.bin", cwd=repo), 2)
        many = best(lambda: (shutil.rmtree(f"{out}/many", ignore_errors=True),
                             crabbox(provider, "cp", ":many", f"{out}/many", cwd=repo)))
        arts = best(lambda: crabbox(provider, "run", "--artifacts-dir", f"{out}/arts", "--artifact-glob",
                                    "arts/*.txt", "--", "true", cwd=repo))
        floor_name = "cp" if provider == "local" else "curl"
        print(f"{provider}:")
        print(f"  cp out {MIB} MiB:      {big:6.2f} s  {MIB / big:7.0f} MiB/s  floor ({floor_name}) {big_floor:6.2f} s  ratio {big / big_floor:5.2f}x")
        print(f"  cp in {MIB} MiB:       {up:6.2f} s  {MIB / up:7.0f} MiB/s  floor ({floor_name}) {up_floor:6.2f} s  ratio {up / up_floor:5.2f}x")
        print(f"  cp out {FILES} files: {many:6.2f} s               floor ({'cp -r' if provider == 'local' else 'curl tar+download+untar'}) {many_floor:6.2f} s  ratio {many / many_floor:5.2f}x")
        if provider == "daytona":
            print(f"  500 artifacts, one archive (a whole run): {arts:6.2f} s   500 curl downloads {arts_floor:6.2f} s  ratio {arts / arts_floor:5.2f}x")
        else:
            print(f"  500 artifacts, one archive (a whole run): {arts:6.2f} s")
        print(f"  peak RSS while {MIB} MiB moved out: CLI {max(rss) / 1024:.1f} MiB, daemon grew {daemon_growth:.1f} MiB")
        crabbox(provider, "stop", cwd=repo)
finally:
    daemon.terminate()
    sim.terminate()
    daemon.wait(timeout=60)
    sim.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
