#!/usr/bin/env bash
# Runs every test of mailgate: the one command for developers and CI.
#
# On a fresh Debian machine (as root) it first installs what the tests need, idempotently:
# swaks, Postfix (for smtp-sink), curl, systemd (for systemd-analyze), python3-venv (apt), and the Python peers pinned in
# tests/interop/requirements.txt (pip, into target/interop-venv). Then, stopping at the
# first failing stage: cargo fmt --check, cargo clippy -D warnings, cargo build, cargo test,
# the black-box interop suite (pytest).
#
# Usage: scripts/test.sh [extra pytest args, e.g. -k smuggling]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=$TARGET_DIR/interop-venv
REQS=$ROOT/tests/interop/requirements.txt

LOGS=$TARGET_DIR/test-logs
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log
SUMMARY=()
START_ALL=$SECONDS

# Test counts from the runners' own closing lines (cargo: "N passed; M failed",
# pytest: "N passed, M failed").
count() {
    local what=$1
    local n=0
    if [ -f "$LOGS/cargo-test.log" ]; then
        n=$((n + $(grep -Eo "[0-9]+ $what;" "$LOGS/cargo-test.log" | awk '{s += $1} END {print s + 0}')))
    fi
    if [ -f "$LOGS/interop.log" ]; then
        local pat=$what
        [ "$what" = failed ] && pat="(failed|errors?)" # a pytest error is a failed test too
        n=$((n + $(tail -n 1 "$LOGS/interop.log" | grep -Eo "[0-9]+ $pat" | awk '{s += $1} END {print s + 0}')))
    fi
    echo "$n"
}

summary() {
    echo
    echo "==================== test summary ===================="
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    echo "  time: $((SECONDS - START_ALL))s"
    echo "======================================================"
    echo "tests: $(count passed) passed, $(count failed) failed"
}

# stage NAME COMMAND...: runs one stage, records it, stops everything on failure.
stage() {
    local name=$1
    shift
    echo
    echo "---- [$name] $*"
    local t0=$SECONDS
    "$@"
    local rc=$?
    local dt=$((SECONDS - t0))
    if [ "$rc" -ne 0 ]; then
        SUMMARY+=("FAIL  $name (exit $rc, ${dt}s)")
        echo "FAILED at stage '$name'"
        summary
        exit "$rc"
    fi
    SUMMARY+=("ok    $name (${dt}s)")
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_system_deps() {
    local missing=()
    command -v swaks >/dev/null || missing+=(swaks)
    command -v curl >/dev/null || missing+=(curl)
    command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
    command -v python3 >/dev/null || missing+=(python3)
    # The shared-state tests start their own redis-server (the service need not run).
    command -v redis-server >/dev/null || missing+=(redis-server)
    # The outbound-proxy tests run their own tinyproxy (the service need not run).
    command -v tinyproxy >/dev/null || [ -x /usr/bin/tinyproxy ] || missing+=(tinyproxy)
    # ... and their own microsocks, a SOCKS5 proxy (tests/interop/test_proxy.py).
    command -v microsocks >/dev/null || missing+=(microsocks)
    # systemd-analyze checks the shipped unit (verify, security score); systemd need not run.
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    # The status page is loaded in a real browser, headless (tests/interop/test_status_page.py).
    command -v chromium >/dev/null || missing+=(chromium)
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then missing+=(python3-venv); fi
    if [ ${#missing[@]} -eq 0 ]; then
        echo "system packages present"
        return 0
    fi
    echo "installing: ${missing[*]}"
    # Postfix asks what kind of mail system this is; a local-only one that never
    # listens off-host is what the tests need (smtp-sink runs without the daemon).
    echo "postfix postfix/main_mailer_type select Local only" | as_root debconf-set-selections
    as_root apt-get update -q &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" || return 1
    if command -v postconf >/dev/null; then
        as_root postconf -e 'inet_interfaces = loopback-only' || return 1
    fi
}

install_python_deps() {
    local stamp=$VENV/.requirements.sha256
    local want
    want=$(sha256sum "$REQS" | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "python venv up to date ($VENV)"
        return 0
    fi
    python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS" &&
        echo "$want" >"$stamp"
}

run_cargo_test() {
    cargo test --locked 2>&1 | tee "$LOGS/cargo-test.log"
    return "${PIPESTATUS[0]}"
}

run_interop() {
    local rc
    MAILGATE_BIN=$TARGET_DIR/debug/mailgate "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        tests/interop "$@" 2>&1 | tee "$LOGS/interop.log"
    rc=${PIPESTATUS[0]}
    # pytest exit 5 = no test collected: that is a failure here, not a pass.
    [ "$rc" -eq 5 ] && echo "pytest collected no tests" >&2
    return "$rc"
}

stage "system packages" install_system_deps
stage "python packages" install_python_deps
stage "cargo fmt" cargo fmt --check
stage "cargo clippy" cargo clippy --locked --all-targets -- -D warnings
stage "cargo build" cargo build --locked
stage "cargo test" run_cargo_test
stage "interop tests" run_interop "$@"
echo "ALL STAGES PASSED"
summary
