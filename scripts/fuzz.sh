#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/README.md) for SECONDS each, one after another,
# then prints one line per target: seconds, executions, result.
# usage: scripts/fuzz.sh [SECONDS]      (default 60; rustup's nightly toolchain, or the
#        default toolchain with RUSTC_BOOTSTRAP=1, chosen by setting it or when no
#        nightly is installed: cargo-fuzz needs -Z flags)
# New corpus entries go to fuzz/corpus/<target> (not committed); crashes to
# fuzz/artifacts/<target>; each run's libFuzzer output to fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
TARGETS=(command data headers header_capture address_headers config)

if [ "${RUSTC_BOOTSTRAP:-}" != 1 ] && cargo +nightly --version >/dev/null 2>&1; then
    CARGO=(cargo +nightly)
else
    # cargo-fuzz passes -Zsanitizer and friends; a stable compiler takes them only
    # with RUSTC_BOOTSTRAP=1.
    echo "fuzz.sh: default toolchain with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
    CARGO=(cargo)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version '^0.13' --locked
fi

"${CARGO[@]}" fuzz build
mkdir -p fuzz/logs
status=0
summary=()
for target in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log=fuzz/logs/$target.log
    echo "== $target: ${SECONDS_EACH}s (log: $log)"
    # -timeout: an input taking over 10 s counts as a finding (a hang), not a wait.
    if "${CARGO[@]}" fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see $log and fuzz/artifacts/$target)"
        status=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || true)
    summary+=("$(printf '%-8s %6ss %12s execs  %s' "$target" "${took:-?}" "${runs:-?}" "$result")")
    echo "${summary[-1]}"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
