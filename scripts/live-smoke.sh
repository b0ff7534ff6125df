#!/usr/bin/env bash
# A live smoke test against the real Daytona: warmup -> run (sync, streamed output, exit
# code) -> ssh --print -> stop, on a daemon of its own, deleting everything it made.
#
# Runs only when asked and set up; otherwise it exits before any provider call and says
# what is missing:
#   CRABBOX_LIVE=1                 the opt-in (without it: skipped, exit 0)
#   DAYTONA_API_KEY                or CRABBOX_DAYTONA_API_KEY, or DAYTONA_JWT_TOKEN with
#                                  DAYTONA_ORGANIZATION_ID
#   CRABBOX_DAYTONA_SNAPSHOT       the snapshot to make the sandbox from (or DAYTONA_SNAPSHOT)
#   DAYTONA_API_URL                optional (default https://app.daytona.io/api)
#   CRABBOX_BIN                    optional: the crabbox binary (default: crabbox on PATH;
#                                  it starts the crabboxd installed beside it)
# Exit: 0 passed or skipped, 2 asked for but not set up, 1 a check failed.
set -uo pipefail

say() { printf 'live-smoke: %s\n' "$*" >&2; }

if [[ "${CRABBOX_LIVE:-}" != "1" ]]; then
    say "skipped: set CRABBOX_LIVE=1 (with Daytona credentials and a snapshot) to run it against the real Daytona"
    exit 0
fi
missing=()
key="${CRABBOX_DAYTONA_API_KEY:-${DAYTONA_API_KEY:-}}"
jwt="${CRABBOX_DAYTONA_JWT_TOKEN:-${DAYTONA_JWT_TOKEN:-}}"
org="${CRABBOX_DAYTONA_ORGANIZATION_ID:-${DAYTONA_ORGANIZATION_ID:-}}"
if [[ -z "$key" && ( -z "$jwt" || -z "$org" ) ]]; then
    missing+=("credentials: DAYTONA_API_KEY (or DAYTONA_JWT_TOKEN with DAYTONA_ORGANIZATION_ID)")
fi
snapshot="${CRABBOX_DAYTONA_SNAPSHOT:-${DAYTONA_SNAPSHOT:-}}"
if [[ -z "$snapshot" ]]; then
    missing+=("a snapshot: CRABBOX_DAYTONA_SNAPSHOT=<name> (one your organization has, e.g. from \`daytona snapshot list\`)")
fi
crabbox="${CRABBOX_BIN:-crabbox}"
if ! command -v "$crabbox" >/dev/null 2>&1; then
    missing+=("the binary $crabbox (cargo install --locked --path . , or set CRABBOX_BIN)")
fi
command -v git >/dev/null 2>&1 || missing+=("git")
if (( ${#missing[@]} )); then
    say "not run: CRABBOX_LIVE=1 but missing:"
    for m in "${missing[@]}"; do say "  - $m"; done
    say "no Daytona call was made"
    exit 2
fi

work="$(mktemp -d)"
export CRABBOX_SOCKET="$work/crabboxd.sock" CRABBOX_STATE_DIR="$work/state" CRABBOX_CONFIG=/dev/null
export CRABBOX_PROVIDER=daytona CRABBOX_DAYTONA_SNAPSHOT="$snapshot"
failed=0
check() { # check NAME CONDITION-RESULT DETAIL
    if [[ "$2" == 0 ]]; then say "ok    $1"; else say "FAIL  $1: $3"; failed=1; fi
}
cleanup() {
    say "cleaning up: every lease this smoke made"
    for id in $("$crabbox" list --all -o json 2>/dev/null | grep -o '"id": *"cbx_[0-9a-f]*"' | grep -o 'cbx_[0-9a-f]*'); do
        "$crabbox" stop -q "$id" >/dev/null 2>&1 && say "  released $id"
    done
    "$crabbox" list --all 2>/dev/null | sed 's/^/live-smoke:   /' >&2
    "$crabbox" daemon stop >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

repo="$work/repo"
mkdir -p "$repo" && git -C "$repo" init -q && echo "live-$$" > "$repo/marker.txt"
cd "$repo" || exit 1

say "warmup on Daytona (snapshot $snapshot)"
started=$(date +%s)
lease_json="$("$crabbox" warmup --slug "live-smoke-$$" -o json)"
check "warmup" $? "$lease_json"
say "  took $(( $(date +%s) - started )) s"

out="$work/out" err="$work/err"
"$crabbox" run -- sh -c 'cat marker.txt; echo to-stderr >&2; exit 7' >"$out" 2>"$err"
code=$?
check "run exit code passes through" "$([[ $code == 7 ]]; echo $?)" "exit $code, stderr: $(tail -3 "$err")"
check "run synced the checkout (stdout)" "$(grep -qx "live-$$" "$out"; echo $?)" "$(cat "$out")"
check "run kept stderr apart" "$(grep -qx to-stderr "$err"; echo $?)" "$(tail -3 "$err")"

printed="$("$crabbox" ssh --print 2>&1)"
check "ssh --print" $? "$printed"
check "ssh --print redacts the token" "$([[ "$printed" == *"<redacted>"* || "$printed" == *"***"* ]]; echo $?)" "no redaction in: $printed"

stopped="$("$crabbox" stop 2>&1)"
check "stop" $? "$stopped"

# Nothing printed the credentials.
secret="${key:-$jwt}"
if grep -rqF -- "$secret" "$work/out" "$work/err" <(printf '%s\n%s\n%s\n' "$lease_json" "$printed" "$stopped"); then
    check "no output holds the credentials" 1 "the API key or token was printed"
else
    check "no output holds the credentials" 0 ""
fi

if (( failed )); then say "FAILED"; exit 1; fi
say "passed"
