#!/usr/bin/env bash
# Peak memory of mailgate in relay mode (issue 10 item 1; see BENCHMARKS.md): 20 sessions
# each sending one 10 MB message to a freshly started mailgate (delivery = "relay") that
# forwards to smtp-sink, mailgate's memory sampled by smtp-bench (-W), as
# scripts/bench-queue.sh measures queue mode. Prints the smtp-bench table and the peak
# RSS; exits 1 above 100 MB, 2 when the bench cannot run.
#
# usage: scripts/bench-relay-rss.sh [RUNS]    (default 3)
# env:   SMTP_BENCH, BENCH_SINK_PORT (2890), BENCH_PORT (2896),
#        MAILGATE_BIN=path (bench that binary instead of building target/release/mailgate)
# needs: smtp-source/smtp-sink (postfix package), cargo. Loopback only; every wait is
# bounded; only processes this script started are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SINK_PORT=${BENCH_SINK_PORT:-2890}
PORT=${BENCH_PORT:-2896}
NAME=bench-relay-rss
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

write_config relay 20

cleanup() {
    stop_mailgate
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    [[ -s $WORK/mailgate.log ]] && { echo "$NAME: mailgate log:" >&2; tail -20 "$WORK/mailgate.log" >&2; }
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash "$BENCH" sink start >&2
start_mailgate

echo "## mailgate relay mode, peak RSS $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg)"
echo "# $("$BIN" --version 2>/dev/null || echo "mailgate ?") ($BIN)"
echo "### 20 sessions x one 10 MB message (relay), memory sampled"
bash "$BENCH" -x -k "$SINK" -n "$RUNS" -L 10000000 -S 20 -M 1 -R 1 -W "$MG" "127.0.0.1:$PORT" | tee "$WORK/relay_10m.out"
stop_mailgate

hwm=$(sed -n 's/.*tree_max_hwm=\([0-9]*\)kB.*/\1/p' "$WORK/relay_10m.out")
failed=$(grep -q FAILED_RUNS "$WORK/relay_10m.out" && echo 1 || echo 0)
awk -v hwm="${hwm:-0}" -v f="$failed" 'BEGIN {
    mb = hwm / 1024; ok = (hwm > 0 && mb <= 100 && !f)
    printf "\n| peak RSS, 20 sess x one 10 MB msg (relay) | %.1f MB | <= 100 MB | %s |\n", mb, ok ? "pass" : "FAIL"
    exit !ok
}' || { echo "$NAME: peak RSS above target" >&2; exit 1; }
