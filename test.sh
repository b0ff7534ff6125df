#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then checks
# formatting and lints, and runs every test (unit tests beside the code, whole flows in
# tests/ against the real daemon and the real CLI binary).
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v git >/dev/null || need_apt+=(git)
command -v cc >/dev/null || need_apt+=(gcc)
command -v bwrap >/dev/null || need_apt+=(bubblewrap)          # the local provider and daytona-sim jail sandbox commands
command -v ssh >/dev/null || need_apt+=(openssh-client)        # the SSH gateway is tested with OpenSSH
command -v tmux >/dev/null || need_apt+=(tmux)                  # a real terminal and shell for `run -t`
command -v setsid >/dev/null || need_apt+=(util-linux)         # daytona-sim gives a jailed command its terminal
command -v python3 >/dev/null || need_apt+=(python3)           # the MCP test server; the sim's stdin decoder
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# team mode is tested against a real PostgreSQL the tests start themselves (initdb +
# postgres in a temp dir, as the package's `postgres` user when run as root)
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || need_apt+=(postgresql)
command -v openssl >/dev/null || need_apt+=(openssl)          # a CA and a certificate for its TLS test
# socket activation and the units in deploy/systemd are tested with systemd's own tools
command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}";
  else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (https://rustup.rs) and rerun" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
# The official Daytona SDK, pinned, as an independent client of daytona-sim.
# grpcio runs the README's Python gRPC example against crabboxd.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import daytona, pytest, grpc, grpc_tools' 2>/dev/null; then
  echo "== python venv with daytona==0.226.1, pytest, grpcio"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check daytona==0.226.1 pytest==8.3.4 \
    grpcio==1.76.0 grpcio-tools==1.76.0
fi
# The TypeScript SDK's generated clients, pinned: only their route tables are read (by
# tests/conformance/test_routes.py), so the package tarballs are unpacked, nothing is run.
TS_SDK=0.218.0
if [ ! -f ".sdk-ts/$TS_SDK/toolbox-api-client/package.json" ]; then
  echo "== the TypeScript SDK's @daytona/api-client and toolbox-api-client $TS_SDK"
  python3 - "$TS_SDK" <<'PY'
import io, os, sys, tarfile, urllib.request
version = sys.argv[1]
for pkg in ("api-client", "toolbox-api-client"):
    url = f"https://registry.npmjs.org/@daytona/{pkg}/-/{pkg}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        for m in t.getmembers():
            rel = m.name[len("package/"):]
            if not m.isfile() or not m.name.startswith("package/") or ".." in rel.split("/"):
                continue
            dest = os.path.join(".sdk-ts", version, pkg, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(t.extractfile(m).read())
PY
fi
export DAYTONA_TS_SDK_DIR="$PWD/.sdk-ts/$TS_SDK"

echo "== cargo test"
cargo test --all-targets 2>&1 | tee /tmp/crabbox-test-$$.log
echo "== daytona SDK conformance and the Python gRPC example (pytest)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/conformance 2>&1 | tee -a /tmp/crabbox-test-$$.log
# A plain closing line for CI readers.
passed=$(grep -Eo '[0-9]+ passed' /tmp/crabbox-test-$$.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/crabbox-test-$$.log | awk '{s+=$1} END {print s+0}')
rm -f /tmp/crabbox-test-$$.log
echo "${passed} passed, ${failed} failed"
