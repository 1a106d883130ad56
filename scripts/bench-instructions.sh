#!/usr/bin/env bash
# Instructions per message through mailgate, counted by valgrind's callgrind: a figure that
# does not move with the load of a shared machine (timing benches do), for comparing two
# builds. For each build and each mode (relay, queue) it runs mailgate under callgrind
# twice, once with 0 and once with N 1 KB messages from smtp-source (20 sessions) into
# smtp-sink, and prints (I_N - I_0) / N: start-up and shutdown cancel out.
# Loopback only; every wait is bounded; only processes this script started are stopped.
#
# usage: scripts/bench-instructions.sh [N] BIN [BIN...]     (N defaults to 400)
# env:   BENCH_SINK_PORT (2890), BENCH_PORT (2895)
# needs: valgrind, postfix's smtp-source/smtp-sink
set -euo pipefail
cd "$(dirname "$0")/.."
N=400
[[ ${1:-} =~ ^[0-9]+$ ]] && { N=$1; shift; }
(( $# > 0 )) || { echo "usage: $0 [N] BIN [BIN...]" >&2; exit 2; }
SINK_PORT=${BENCH_SINK_PORT:-2890}
PORT=${BENCH_PORT:-2895}
NAME=bench-instructions
MAILGATE_BIN=$1   # bench-lib.sh wants one; each build is set in BIN below
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
command -v valgrind >/dev/null || die "valgrind not installed"

SINKPID=""
cleanup() {
    stop_mailgate
    [[ -n $SINKPID ]] && kill "$SINKPID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
smtp-sink -c -u nobody "$SINK" 1024 >/dev/null 2>&1 &
SINKPID=$!
for _ in $(seq 50); do port_open "$SINK_PORT" && break; sleep 0.1; done

# instructions MODE MESSAGES: total instructions of one mailgate run.
instructions() {
    write_config "$1" 20
    rm -rf "$WORK/spool" "$WORK"/cg.*
    local real=$BIN
    BIN=$WORK/under-valgrind
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/cg.%%p %s "$@"\n' \
        "$WORK" "$real" > "$BIN"
    chmod +x "$BIN"
    start_mailgate
    BIN=$real
    if (( $2 > 0 )); then
        timeout 300 smtp-source -s 20 -m "$2" -l 1000 -f sender@bench.test -t rcpt@bench.test \
            "127.0.0.1:$PORT" || die "smtp-source failed"
    fi
    if [[ $1 == queue ]]; then  # wait (bounded) until the spool is empty: every message delivered
        for _ in $(seq 600); do
            [[ -z $(find "$WORK/spool" -name '*.eml' -not -path '*/failed/*' 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    stop_mailgate
    sleep 0.5
    awk '/^summary:|^totals:/ {print $2; exit}' "$WORK"/cg.*
}

printf '%-40s %-6s %14s %14s %16s\n' build mode "I(0)" "I($N)" "instructions/msg"
for build in "$@"; do
    BIN=$(readlink -f "$build")
    for mode in relay queue; do
        i0=$(instructions "$mode" 0)
        iN=$(instructions "$mode" "$N")
        printf '%-40s %-6s %14s %14s %16s\n' "$build" "$mode" "$i0" "$iN" $(( (iN - i0) / N ))
    done
done
