#!/usr/bin/env bash
# Prints crabbox's figures against baselines measured in the same run:
#  - wall time of `crabbox run -- true` on a warm local lease vs `sh -c true` run directly;
#  - crabboxd's RSS idle vs holding 100 warm local leases.
# Usage: bench/run.sh [RUNS]   (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 bench/bench.py "${1:-50}"
