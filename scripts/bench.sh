#!/usr/bin/env bash
# Benchmarks mailgate against the machine's limit, in one run (see BENCHMARKS.md).
#   direct:   smtp-source -> smtp-sink                      (the limit of this tool pair)
#   mailgate: smtp-source -> mailgate (relay) -> smtp-sink
# then starts a FRESH mailgate and measures its peak RSS while it holds 1,000 idle
# connections (the throughput runs' message buffers must not count there).
# Prints the smtp-bench tables and a summary with each target's ratio and pass/fail;
# exits 1 when a target is missed. Loopback only; every run and wait is bounded;
# only the processes this script started are stopped, by PID.
#
# usage: scripts/bench.sh [RUNS]     (default 5 measured runs per configuration)
# env:   SMTP_BENCH=path/to/smtp-bench.sh, BENCH_SINK_PORT (2690), BENCH_PORT (2695),
#        MAILGATE_BIN=path (bench that binary instead of building target/release/mailgate)
# needs: postfix's smtp-source/smtp-sink, python3, cargo
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SINK_PORT=${BENCH_SINK_PORT:-2690}
PORT=${BENCH_PORT:-2695}
IDLE_CONNS=1000

NAME=bench
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

write_config relay 64

hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
cleanup() {
    stop_mailgate
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one smtp-bench matrix line; the table goes to stdout and to $WORK/$1.out.
bench() {
    local name=$1; shift
    bash "$BENCH" -x -k "$SINK" -n "$RUNS" "$@" | tee "$WORK/$name.out"
}

bash "$BENCH" sink start >&2
start_mailgate

echo "## mailgate bench $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg), $RUNS runs per line"
echo "### 1 KB, 20 sessions x 10 messages: direct, then through mailgate"
bench direct_1k -L 1000 -S 20 -M 10 -R 1 "$SINK"
bench relay_1k -L 1000 -S 20 -M 10 -R 1 "127.0.0.1:$PORT"
echo "### one 10 MB message: direct, then through mailgate"
bench direct_10m -L 10000000 -S 1 -M 1 -R 1 "$SINK"
bench relay_10m -L 10000000 -S 1 -M 1 -R 1 "127.0.0.1:$PORT"
echo "# mailgate peak RSS after the throughput runs: $(hwm_kb "$MG") kB (not a target)"
stop_mailgate

echo "### $IDLE_CONNS idle connections to a freshly started mailgate"
start_mailgate
python3 bench/idle_conns.py 127.0.0.1 "$PORT" "$IDLE_CONNS" 3 "$MG" | tee "$WORK/idle.out"
stop_mailgate

# ---- summary -------------------------------------------------------------------
# column $2 of the matrix line's 4th |-field is msg/s, $3 MB/s (smtp-bench README).
rate() { awk -F'|' -v col="$2" '/^  / {split($4, a, " "); print a[col]}' "$WORK/$1.out"; }
failed() { grep -q FAILED_RUNS "$WORK/$1.out" && echo 1 || echo 0; }
peak=$(sed -n 's/.*peak_rss_kb=\([0-9]*\).*/\1/p' "$WORK/idle.out")
conns=$(sed -n 's/.*idle_connections=\([0-9]*\).*/\1/p' "$WORK/idle.out")
awk -v d1="$(rate direct_1k 1)" -v r1="$(rate relay_1k 1)" \
    -v d2="$(rate direct_10m 2)" -v r2="$(rate relay_10m 2)" \
    -v f1="$(( $(failed direct_1k) + $(failed relay_1k) ))" \
    -v f2="$(( $(failed direct_10m) + $(failed relay_10m) ))" \
    -v peak="${peak:-0}" -v conns="${conns:-0}" -v want="$IDLE_CONNS" 'BEGIN {
    miss = 0
    printf "\n### summary\n"
    printf "| target | direct | mailgate | measured | required | result |\n"
    printf "|---|---|---|---|---|---|\n"
    q1 = (d1 > 0) ? r1 / d1 : 0; ok = (q1 >= 0.8 && !f1); miss += !ok
    printf "| 1 KB, 20 sess x 10 msgs, relay | %.1f msg/s | %.1f msg/s | %.2f x direct | >= 0.8 x | %s |\n", d1, r1, q1, ok ? "pass" : "FAIL"
    q2 = (d2 > 0) ? r2 / d2 : 0; ok = (q2 >= 0.7 && !f2); miss += !ok
    printf "| one 10 MB message, relay | %.2f MB/s | %.2f MB/s | %.2f x direct | >= 0.7 x | %s |\n", d2, r2, q2, ok ? "pass" : "FAIL"
    mb = peak / 1024; ok = (peak > 0 && mb <= 64 && conns == want); miss += !ok
    printf "| peak RSS, %d idle connections | | %d held | %.1f MB | <= 64 MB | %s |\n", want, conns, mb, ok ? "pass" : "FAIL"
    exit (miss > 0)
}' || { echo "bench: a target was missed" >&2; exit 1; }
