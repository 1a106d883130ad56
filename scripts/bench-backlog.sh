#!/usr/bin/env bash
# A day's backlog (issue 20 goal 2), in one run:
#   1. reference: an empty queue, smtp-source -> mailgate (queue mode) -> smtp-sink,
#      REF messages; delivery rate = messages / (first submit .. last at the sink);
#   2. the backlog: the channel's upstream answers MAIL with `535 5.7.8` (a small Python
#      server on the sink's port), so the channel is broken and BACKLOG messages of 1 KB
#      stay queued (built by the proxy itself, smtp-source in 20 sessions);
#   3. restart: time until the port answers, peak RSS (VmHWM) 5 s later;
#   4. `mailgate queue list`: wall time (output to a file, its lines counted);
#   5. the upstream comes back (smtp-sink on the same port), `queue retry --all`: time
#      until the sink has every backlog message, and meanwhile INTAKE new messages are
#      submitted (their accept time is printed).
# Loopback only; every run and wait is bounded; only processes started here are stopped.
#
# usage: scripts/bench-backlog.sh [BACKLOG] [REF]   (defaults 100000 and 20000)
# env:   BENCH_SINK_PORT (2780), BENCH_PORT (2785), MAILGATE_BIN, SMTP_BENCH
set -euo pipefail
cd "$(dirname "$0")/.."
BACKLOG=${1:-100000}
REF=${2:-20000}
INTAKE=2000
SINK_PORT=${BENCH_SINK_PORT:-2780}
PORT=${BENCH_PORT:-2785}

NAME=bench-backlog
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

BROKEN=""
stop_broken() {
    [[ -n $BROKEN ]] || return 0
    kill "$BROKEN" 2>/dev/null || true
    wait "$BROKEN" 2>/dev/null || true
    BROKEN=""
}
cleanup() {
    stop_mailgate
    stop_broken
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ms_now() { date +%s%3N; }
sink_count() { bash "$BENCH" sink count; }
# wait_sink N SECONDS: until the sink has counted N messages (bounded).
wait_sink() {
    local deadline=$(($(date +%s) + $2))
    while [[ $(sink_count) -lt $1 ]]; do
        [[ $(date +%s) -lt $deadline ]] || { echo "timeout: sink has $(sink_count) of $1" >&2; return 1; }
        sleep 0.05
    done
}
# source_run SESSIONS MSGS: smtp-source into mailgate, 1 KB, connections reused.
source_run() {
    timeout 900 smtp-source -d -s "$1" -l 1000 -m "$2" -f sender@bench.test -t rcpt@sink.test \
        "127.0.0.1:$PORT" >/dev/null 2>>"$WORK/source.err"
}
# An upstream whose every MAIL is refused with 535 5.7.8: the channel is broken (SPEC §7).
start_broken() {
    python3 - "$SINK_PORT" <<'PY' 2>>"$WORK/broken.err" &
import asyncio, sys
async def serve(r, w):
    w.write(b"220 broken ESMTP\r\n")
    try:
        while line := await asyncio.wait_for(r.readline(), 60):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                w.write(b"250-broken\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                w.write(b"535 5.7.8 bench: authentication credentials invalid\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n"); break
            elif verb == b"RSET":
                w.write(b"250 ok\r\n")
            else:
                w.write(b"503 5.5.1 no\r\n")
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY
    BROKEN=$!
    for _ in $(seq 100); do port_open "$SINK_PORT" && return 0; sleep 0.05; done
    die "the broken upstream did not start"
}

echo "## backlog $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg)"
write_config queue 20
sed -i 's/^\[server\]$/[server]\nretry_first = "1s"\nretry_max = "5s"/' "$WORK/bench.toml"

# 1. Reference: an empty queue, the upstream up.
bash "$BENCH" sink start >&2
start_mailgate
t0=$(ms_now)
source_run 20 "$REF"
wait_sink "$REF" 600
t1=$(ms_now)
ref_rate=$(awk -v n="$REF" -v ms=$((t1 - t0)) 'BEGIN { printf "%.1f", n * 1000 / ms }')
echo "reference, empty queue: $REF msgs delivered in $((t1 - t0)) ms = $ref_rate msg/s"
stop_mailgate
bash "$BENCH" sink stop >/dev/null

# 2. The backlog, through a broken channel.
start_broken
start_mailgate
t0=$(ms_now)
source_run 20 "$BACKLOG"
t1=$(ms_now)
queued=$(find "$WORK/spool/queue" -name '*.json' | wc -l)
echo "backlog: $BACKLOG msgs accepted in $((t1 - t0)) ms; $queued state files in queue/"
stop_mailgate

# 3. Restart.
t0=$(ms_now)
MAILGATE_LOG=warn "$BIN" -c "$WORK/bench.toml" run 2>>"$WORK/mailgate.log" &
MG=$!
for _ in $(seq 3000); do port_open "$PORT" && break; kill -0 "$MG" 2>/dev/null || die "mailgate did not start"; sleep 0.01; done
t1=$(ms_now)
sleep 5
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$MG/status")
echo "restart: listening after $((t1 - t0)) ms; peak RSS 5 s later $(awk -v k="$hwm" 'BEGIN { printf "%.1f MiB", k / 1024 }')"

# 4. queue list.
t0=$(ms_now)
"$BIN" -c "$WORK/bench.toml" queue list >"$WORK/list.out"
t1=$(ms_now)
echo "queue list: $((t1 - t0)) ms, $(wc -l <"$WORK/list.out") lines; channel: $(grep -m1 '^sink ' "$WORK/list.out" | tr -s ' ')"

# 5. The upstream is back; retry everything; intake meanwhile.
stop_broken
bash "$BENCH" sink start >&2
t0=$(ms_now)
"$BIN" -c "$WORK/bench.toml" queue retry --all
t1=$(ms_now)
echo "queue retry --all: returned after $((t1 - t0)) ms"
i0=$(ms_now)
source_run 5 "$INTAKE"
i1=$(ms_now)
echo "intake during the drain: $INTAKE msgs accepted in $((i1 - i0)) ms = $(awk -v n=$INTAKE -v ms=$((i1 - i0)) 'BEGIN { printf "%.1f", n * 1000 / ms }') msg/s"
total=$((BACKLOG + INTAKE))
wait_sink "$total" 900
t2=$(ms_now)
drain_rate=$(awk -v n="$total" -v ms=$((t2 - t0)) 'BEGIN { printf "%.1f", n * 1000 / ms }')
echo "drain: $total msgs (backlog + intake) delivered in $((t2 - t0)) ms = $drain_rate msg/s"
awk -v d="$drain_rate" -v r="$ref_rate" 'BEGIN { printf "drain / empty-queue rate: %.2f x (goal 0.8 .. 1.2 x)\n", d / r }'
