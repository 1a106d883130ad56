#!/usr/bin/env bash
# Relay mode against its floor (issue 20 goal 4; see BENCHMARKS.md, "Relay mode near its
# floor"): 1 KB messages, 20 sessions x 100 and 20 sessions x 10 messages per connection,
#   direct:   smtp-source -> smtp-sink                          (the reference)
#   relay:    smtp-source -> mailgate (delivery = "relay") -> smtp-sink
# in alternating rounds of one run (direct, relay, direct, relay, ...), so a change in the
# machine's load hits both. With BEFORE_BIN set, a second mailgate (that build) runs beside
# the first on its own port and takes its turn in every round too: before/after in one run.
# Prints every run's line, then per shape the median rates and relay/direct ratios (of the
# medians, and the range of the per-round ratios); exits 1 when a target is missed.
# Loopback only; every run and wait is bounded; only processes this script started are
# stopped, by PID.
#
# usage: scripts/bench-relay-floor.sh [ROUNDS]     (default 7 rounds, after one warm-up round)
# env:   SMTP_BENCH=path/to/smtp-bench.sh, BENCH_SINK_PORT (2990), BENCH_PORT (2995),
#        BENCH_BEFORE_PORT (2996), MAILGATE_BIN=path (instead of building
#        target/release/mailgate), BEFORE_BIN=path (a build to compare, optional)
# needs: postfix's smtp-source/smtp-sink, cargo
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-7}
SINK_PORT=${BENCH_SINK_PORT:-2990}
PORT=${BENCH_PORT:-2995}
BEFORE_PORT=${BENCH_BEFORE_PORT:-2996}
SHAPES=("20 100" "20 10")        # sessions, messages per session
TARGET_RATIO=("0.65" "0.9")     # issue 20 goal 4, per shape

NAME=bench-relay-floor
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

write_config relay 64
MG_BEFORE=""
cleanup() {
    stop_mailgate
    if [[ -n $MG_BEFORE ]]; then MG=$MG_BEFORE; stop_mailgate; fi
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    [[ -s $WORK/mailgate.log ]] && { echo "$NAME: mailgate log:" >&2; tail -20 "$WORK/mailgate.log" >&2; }
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash "$BENCH" sink start >&2
TARGETS=(direct relay)
declare -A ADDR=([direct]=$SINK [relay]=127.0.0.1:$PORT)
if [[ -n ${BEFORE_BIN:-} ]]; then
    port_open "$BEFORE_PORT" && die "127.0.0.1:$BEFORE_PORT is already in use; set BENCH_BEFORE_PORT"
    # The same config on another port, the other build: both share the sink.
    sed "s/127.0.0.1:$PORT/127.0.0.1:$BEFORE_PORT/" "$WORK/bench.toml" > "$WORK/before.toml"
    AFTER=$BIN CONF=$WORK/bench.toml
    BIN=$(readlink -f "$BEFORE_BIN"); cp "$WORK/before.toml" "$WORK/bench.toml"
    PORT_SAVE=$PORT; PORT=$BEFORE_PORT
    start_mailgate; MG_BEFORE=$MG; MG=""
    PORT=$PORT_SAVE; BIN=$AFTER
    sed "s/127.0.0.1:$BEFORE_PORT/127.0.0.1:$PORT/" "$WORK/before.toml" > "$CONF"
    TARGETS=(direct before relay)
    ADDR[before]=127.0.0.1:$BEFORE_PORT
fi
start_mailgate

# run TARGET SESSIONS MESSAGES: one smtp-source run; prints its msg/s (0 when it failed).
run() {
    local line
    line=$(bash "$BENCH" run1 -T 120 -l 1000 -s "$2" -m "$3" -r 1 "${ADDR[$1]}") || true
    echo "$1 $2x$3 $line" >> "$WORK/runs"
    awk -v want=$(( $2 * $3 )) '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        print (v["rc"] == 0 && v["got"] == want && v["deliver_s"] > 0) ? want / v["deliver_s"] : 0
    }' <<< "$line"
}

echo "## relay floor $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg), $ROUNDS rounds (+1 warm-up)"
echo "# $("$BIN" --version 2>/dev/null || echo "mailgate ?") $BIN${BEFORE_BIN:+, before: $BEFORE_BIN}"
for round in $(seq 0 "$ROUNDS"); do
    for shape in "${SHAPES[@]}"; do
        read -r s m <<< "$shape"
        for t in "${TARGETS[@]}"; do
            rate=$(run "$t" "$s" "$m")
            (( round > 0 )) && echo "$round $t ${s}x$m $rate" >> "$WORK/rates"
            printf 'round %d %-6s %sx%-3s %8.1f msg/s  load %s\n' "$round" "$t" "$s" "$m" "$rate" \
                "$(cut -d" " -f1 /proc/loadavg)"
        done
    done
done
echo "# raw run1 lines"
sed 's/^/#   /' "$WORK/runs"

# ---- summary -------------------------------------------------------------------
echo
echo "### summary (median msg/s over $ROUNDS rounds; ratio = median / direct median, [min-max of per-round ratios])"
miss=0
for i in "${!SHAPES[@]}"; do
    read -r s m <<< "${SHAPES[$i]}"
    awk -v shape="${s}x$m" -v want="${TARGET_RATIO[$i]}" -v targets="${TARGETS[*]}" '
    function median(arr, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && arr[j-1] > arr[j]; j--) { t = arr[j]; arr[j] = arr[j-1]; arr[j-1] = t }
        return (n % 2) ? arr[(n+1)/2] : (arr[n/2] + arr[n/2+1]) / 2
    }
    $3 == shape { rate[$2, $1] = $4; if ($4 == 0) failed = 1; rounds[$1] = 1 }
    END {
        n = split(targets, ts, " "); miss = 0
        for (k = 1; k <= n; k++) {
            c = 0; for (r in rounds) v[++c] = rate[ts[k], r]
            med[ts[k]] = median(v, c)
        }
        d = med["direct"]
        for (k = 1; k <= n; k++) {
            t = ts[k]; line = sprintf("| %s | %-6s | %8.1f msg/s |", shape, t, med[t])
            if (t != "direct") {
                lo = 1e9; hi = 0
                for (r in rounds) if (rate["direct", r] > 0) { q = rate[t, r] / rate["direct", r]; if (q < lo) lo = q; if (q > hi) hi = q }
                q = (d > 0) ? med[t] / d : 0
                ok = (q >= want && !failed)
                if (t == "relay") miss += !ok
                line = line sprintf(" %.3f x direct [%.3f-%.3f] | target >= %s | %s |", q, lo, hi, want, (t == "relay") ? (ok ? "pass" : "FAIL") : "(before)")
            } else line = line " | | |"
            print line
        }
        exit (miss > 0)
    }' "$WORK/rates" || miss=1
done
echo "# load average at the end: $(cut -d" " -f1-3 /proc/loadavg)"
(( miss == 0 )) || { echo "$NAME: a target was missed" >&2; exit 1; }
