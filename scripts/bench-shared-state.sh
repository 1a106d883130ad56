#!/usr/bin/env bash
# Benchmarks what the shared state costs queue mode (issue 12; see BENCHMARKS.md, "Shared
# state in Redis"): mailgate in queue mode at 1 KB, 20 sessions x 50 messages, delivered to
# smtp-sink, with `[state] backend = "local"` and then `"redis"`, alternating in one run.
# The channel has a rate and a recipients/day quota far above what the bench sends, so
# every transaction is reserved (local: the events log; redis: the Lua script, one call
# for the transactions a channel starts together) but none waits. Prints both smtp-bench tables and the ratio; exits 1 when
# redis throughput is below 80 % of local, 2 when the bench cannot run.
#
# A redis-server is started on 127.0.0.1:$BENCH_REDIS_PORT without persistence and stopped
# by PID at the end; the sink likewise. Loopback only; every run is bounded.
#
# usage: scripts/bench-shared-state.sh [RUNS]   (default 5 measured runs per backend)
# env:   SMTP_BENCH, BENCH_SINK_PORT (2790), BENCH_PORT (2796), BENCH_REDIS_PORT (2798),
#        MAILGATE_BIN
# needs: postfix (smtp-source/smtp-sink), redis-server, cargo
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SINK_PORT=${BENCH_SINK_PORT:-2790}
PORT=${BENCH_PORT:-2796}
REDIS_PORT=${BENCH_REDIS_PORT:-2798}

NAME=bench-shared-state
command -v redis-server >/dev/null || { echo "$NAME: redis-server not installed (apt-get install redis-server)" >&2; exit 2; }
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
port_open "$REDIS_PORT" && die "127.0.0.1:$REDIS_PORT is already in use; set BENCH_REDIS_PORT"

REDIS_PID=""
round=0
cleanup() {
    stop_mailgate
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    if [[ -n $REDIS_PID ]]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
    [[ -s $WORK/mailgate.log ]] && { echo "$NAME: mailgate log:" >&2; tail -20 "$WORK/mailgate.log" >&2; }
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --loglevel warning >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do port_open "$REDIS_PORT" && break; sleep 0.1; done
port_open "$REDIS_PORT" || die "redis-server did not start"

# config BACKEND: queue mode, 20 upstream connections, limits that never bind.
config() {
    write_config queue 20
    cat >> "$WORK/bench.toml" <<TOML
rate = "1000000/min"
recipients_per_day = 100000000
TOML
    if [[ $1 == redis ]]; then
        printf '\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s/0"\nkey_prefix = "bench:"\n' \
            "$REDIS_PORT" >> "$WORK/bench.toml"
    fi
    rm -rf "$WORK/spool"
}

bench() {
    local name=$1; shift
    bash "$BENCH" -x -k "$SINK" "$@" | tee "$WORK/$name.out"
}

bash "$BENCH" sink start >&2
echo "## mailgate queue mode, state local vs redis $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg), $RUNS runs per line"
echo "# $("$BIN" --version 2>/dev/null || echo "mailgate ?"), $(redis-server --version | cut -d' ' -f1-3)"
for backend in local redis local redis; do
    config "$backend"
    start_mailgate
    bash "$BENCH" run1 -T 60 -l 1000 -s 1 -m 1 -r 1 "127.0.0.1:$PORT" >&2 ||
        die "mailgate ($backend) did not deliver a test message to the sink"
    echo "### 1 KB, 20 sessions x 50 messages, state $backend"
    bench "${backend}_$((++round))" -n "$RUNS" -L 1000 -S 20 -M 50 -R 1 "127.0.0.1:$PORT"
    stop_mailgate
    if [[ $backend == redis ]]; then
        # Proof that the reservations went through Redis: script calls and the messages
        # they reserved (the rate window's key holds every send of the last minute).
        echo "# redis: $(redis-cli -p "$REDIS_PORT" INFO commandstats | grep -E '^cmdstat_(evalsha|eval):' | tr -d '\r' | tr '\n' ' ')sends in the rate window: $(redis-cli -p "$REDIS_PORT" ZCARD bench:rate:sink)"
        redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    fi
done

rate() { awk -F'|' '/^  / {split($4, a, " "); print a[1]}' "$WORK/$1.out"; }
failed() { grep -q FAILED_RUNS "$WORK/$1.out" && echo 1 || echo 0; }
awk -v l1="$(rate local_1)" -v r1="$(rate redis_2)" -v l2="$(rate local_3)" -v r2="$(rate redis_4)" \
    -v f="$(( $(failed local_1) + $(failed redis_2) + $(failed local_3) + $(failed redis_4) ))" 'BEGIN {
    l = (l1 + l2) / 2; r = (r1 + r2) / 2
    ratio = (l > 0) ? r / l : 0; ok = (ratio >= 0.8 && !f)
    printf "\n### summary\n"
    printf "| 1 KB, 20 sess x 50 msgs, delivered | local | redis | redis / local | required | result |\n"
    printf "|---|---|---|---|---|---|\n"
    printf "| rounds 1+2 | %.1f msg/s | %.1f msg/s | %.2f | | |\n", l1, r1, (l1 > 0) ? r1 / l1 : 0
    printf "| rounds 3+4 | %.1f msg/s | %.1f msg/s | %.2f | | |\n", l2, r2, (l2 > 0) ? r2 / l2 : 0
    printf "| mean | %.1f msg/s | %.1f msg/s | %.2f | >= 0.80 | %s |\n", l, r, ratio, ok ? "pass" : "FAIL"
    exit !ok
}' || { echo "$NAME: redis costs more than 20 % of queue throughput" >&2; exit 1; }
