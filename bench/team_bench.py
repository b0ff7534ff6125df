"""Team mode on a real PostgreSQL (started here: initdb + postgres in a temp dir, as the
`postgres` user when run as root), in one run:

- `crabbox warmup` latency (local provider, a fresh lease each time) with team mode and a
  quota (the reservation transaction) against the same daemon build without team mode;
- a registry of 100 simulated daemons x 100 leases: `crabbox list --team` p50/p99, and the
  reaper's scan query against `SELECT 1` over the same psql connection setup.

Usage: python3 bench/team_bench.py [RUNS]   (after `cargo build --release`)
"""
import glob
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
work = tempfile.mkdtemp(prefix="crabbox-team-bench-")
procs = []
med = statistics.median


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def pg_program(name):
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    return found if isinstance(found, str) else found[0]


def as_postgres():
    if os.getuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)


def daemon(name, config):
    os.makedirs(f"{work}/{name}", exist_ok=True)
    cfg = f"{work}/{name}/config.yaml"
    with open(cfg, "w") as f:
        f.write(config)
    env = dict(os.environ, CRABBOX_SOCKET=f"{work}/{name}/run/d.sock",
               CRABBOX_STATE_DIR=f"{work}/{name}/state", CRABBOX_CONFIG=cfg,
               CRABBOX_NO_AUTOSTART="1", RUST_LOG="warn")
    procs.append(subprocess.Popen([f"{BIN}/crabboxd"], env=env, stderr=subprocess.DEVNULL))
    for _ in range(200):
        if os.path.exists(env["CRABBOX_SOCKET"]):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    return dict(env, CRABBOX_CONFIG="/dev/null")


def timed(cmd, cwd, env):
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=True)
    return (time.perf_counter() - t) * 1000


try:
    pgdir = f"{work}/pg"
    os.makedirs(pgdir)
    if os.getuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(work, pw.pw_uid, pw.pw_gid)
        os.chown(pgdir, pw.pw_uid, pw.pw_gid)
    subprocess.run([pg_program("initdb"), "-D", f"{pgdir}/data", "-U", "crabbox", "--auth=trust",
                    "--no-sync"], check=True, capture_output=True, preexec_fn=as_postgres)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs.append(subprocess.Popen([pg_program("postgres"), "-D", f"{pgdir}/data", "-p", str(port),
                                   "-k", pgdir, "-c", "listen_addresses=127.0.0.1", "-c",
                                   "fsync=off"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, preexec_fn=as_postgres))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    psql = ["psql", "-q", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "crabbox", "-d", "postgres"]
    url = f"postgres://crabbox@127.0.0.1:{port}/postgres?sslmode=disable"

    plain = daemon("plain", "{}\n")
    team = daemon("team", f"team:\n  database_url: \"{url}\"\n  name: bench\n  user: me\n"
                          f"  quota:\n    sandboxes: 100000\n    per_user: 100000\n")
    repos = []
    for i in range(RUNS * 2 + 2):
        r = f"{work}/r{i}"
        os.makedirs(r)
        subprocess.run(["git", "init", "-q", r], check=True)
        repos.append(r)
    # One warmup each first (connections, schema), then alternate.
    timed([f"{BIN}/crabbox", "warmup"], repos[-1], plain)
    timed([f"{BIN}/crabbox", "warmup"], repos[-2], team)
    a, b = [], []
    for i in range(RUNS):
        a.append(timed([f"{BIN}/crabbox", "warmup"], repos[2 * i], plain))
        b.append(timed([f"{BIN}/crabbox", "warmup"], repos[2 * i + 1], team))
    print(f"warmup, local provider, medians of {RUNS}: without team mode {med(a):.1f} ms "
          f"(baseline); with team mode and quotas {med(b):.1f} ms ({med(b) / med(a):.2f}x)")

    # 100 daemons x 100 leases, straight into the registry.
    sql = """
INSERT INTO crabbox_daemons (id, team, "user", host, version, started_at, heartbeat_at)
  SELECT 'cbxd_sim' || d, 'bench', 'user' || (d % 20), 'host' || d, '0', now(),
         now() - (CASE WHEN d % 10 = 0 THEN interval '1 hour' ELSE interval '0' END)
  FROM generate_series(1, 100) d;
INSERT INTO crabbox_leases (id, team, daemon_id, "user", slug, repo_name, provider, sandbox_id,
    sandbox_name, state, created_at, expires_at)
  SELECT 'cbx_' || lpad(to_hex(d * 1000 + l), 12, '0'), 'bench', 'cbxd_sim' || d,
         'user' || (d % 20), 'slug-' || d || '-' || l, 'repo' || l, 'daytona', 'sb-' || d || '-' || l,
         'crabbox-slug-' || d || '-' || l, 'ready', now(), now() + interval '30 minutes'
  FROM generate_series(1, 100) d, generate_series(1, 100) l;
"""
    subprocess.run(psql + ["-c", sql], check=True, capture_output=True)
    lists = [timed([f"{BIN}/crabbox", "--json", "list", "--team"], repos[0], team)
             for _ in range(RUNS)]
    mine = [timed([f"{BIN}/crabbox", "--json", "list", "--team", "--user", "user3"], repos[0], team)
            for _ in range(RUNS)]
    print(f"list --team of 10,000 leases (100 daemons x 100): p50 {med(lists):.1f} ms, "
          f"p99 {pct(lists, 99):.1f} ms; --user (500 leases): p50 {med(mine):.1f} ms, "
          f"p99 {pct(mine, 99):.1f} ms")
    scan = """SELECT count(*) FROM crabbox_leases l JOIN crabbox_daemons d ON d.id = l.daemon_id
  WHERE l.team = 'bench' AND l.state NOT IN ('released') AND l.released_by = ''
    AND l.provider <> 'local' AND l.daemon_id <> 'x'
    AND d.heartbeat_at < now() - make_interval(secs => 15)
    AND (l.expires_at < now() OR d.heartbeat_at < now() - make_interval(secs => 1800));"""
    base = [timed(psql + ["-c", "SELECT 1"], repos[0], dict(os.environ)) for _ in range(RUNS)]
    reap = [timed(psql + ["-c", scan], repos[0], dict(os.environ)) for _ in range(RUNS)]
    print(f"reaper scan over 10,000 leases (1,000 of silent daemons): {med(reap):.1f} ms vs "
          f"psql SELECT 1 {med(base):.1f} ms (baseline): {med(reap) / med(base):.2f}x")
finally:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    subprocess.run(["rm", "-rf", work])
