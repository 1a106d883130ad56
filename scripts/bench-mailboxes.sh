#!/usr/bin/env bash
# Ten thousand mailboxes (issue 20 goal 3): a config with one address-scoped SMTP channel
# per mailbox, against the same test with 20 channels, in one run.
#   - `mailgate check` and start-up time, idle RSS after start;
#   - relay throughput: 20 smtp-source processes at once, each sending as its own mailbox
#     (a spread of senders), 1 KB, MSGS messages each over one connection;
#   - a SIGHUP reload that changes one channel: time from the signal to the "reloaded"
#     log line.
# Loopback only; every run and wait is bounded; only processes started here are stopped.
#
# usage: scripts/bench-mailboxes.sh [MSGS]     (default 100 messages per sender)
# env:   BENCH_SINK_PORT (2790), BENCH_PORT (2795), MAILGATE_BIN, SMTP_BENCH
set -euo pipefail
cd "$(dirname "$0")/.."
MSGS=${1:-100}
SINK_PORT=${BENCH_SINK_PORT:-2790}
PORT=${BENCH_PORT:-2795}
SENDERS=20

NAME=bench-mailboxes
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

cleanup() {
    stop_mailgate
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mailbox_config N: $WORK/bench.toml with N channels box00000.. for user0@bench.test..
mailbox_config() {
    python3 - "$1" "$WORK/bench.toml" "$PORT" "$SINK_PORT" "$WORK/spool" <<'PY'
import sys
n, path, port, sink, spool = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
out = [f'''[server]
listen = ["127.0.0.1:{port}"]
delivery = "relay"
spool_dir = "{spool}"
max_connections = 2000
check_header_from = false
''']
for i in range(n):
    out.append(f'''[channels.box{i:05}]
host = "127.0.0.1"
port = {sink}
tls = "none"
scope = "address"
senders = ["user{i}@bench.test"]
connections = 4
''')
open(path, "w").write("\n".join(out))
PY
}

# The SENDERS mailboxes a run sends as, spread over the N channels.
senders_of() { local n=$1; for i in $(seq 0 $((SENDERS - 1))); do echo "user$((i * n / SENDERS))@bench.test"; done; }

ms_now() { date +%s%3N; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# run N: one line of results for a config of N mailbox channels.
run() {
    local n=$1 t0 t1 check_ms start_ms rss send_ms reload_ms
    mailbox_config "$n"
    t0=$(ms_now); "$BIN" -c "$WORK/bench.toml" check >/dev/null; t1=$(ms_now)
    check_ms=$((t1 - t0))
    : > "$WORK/mailgate.log"
    # The reload's log line is at info; per-message lines stay off (they cost throughput).
    t0=$(ms_now)
    MAILGATE_LOG=warn,mailgate::reload=info "$BIN" -c "$WORK/bench.toml" run 2>>"$WORK/mailgate.log" &
    MG=$!
    for _ in $(seq 300); do port_open "$PORT" && break; kill -0 "$MG" 2>/dev/null || die "mailgate did not start"; sleep 0.01; done
    t1=$(ms_now)
    start_ms=$((t1 - t0))
    sleep 1
    rss=$(rss_kb "$MG")
    local pids=()
    t0=$(ms_now)
    for s in $(senders_of "$n"); do
        timeout 300 smtp-source -c -d -s 1 -l 1000 -m "$MSGS" -f "$s" -t rcpt@sink.test "127.0.0.1:$PORT" \
            >/dev/null 2>>"$WORK/source.err" &
        pids+=($!)
    done
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
    t1=$(ms_now)
    send_ms=$((t1 - t0))
    # Reload: one channel's limit changes.
    sed -i '0,/^connections = 4$/s//connections = 3/' "$WORK/bench.toml"
    local before
    before=$(grep -c "config reloaded" "$WORK/mailgate.log" || true)
    t0=$(ms_now)
    kill -HUP "$MG"
    for _ in $(seq 600); do
        [[ $(grep -c "config reloaded" "$WORK/mailgate.log" || true) -gt $before ]] && break
        sleep 0.01
    done
    t1=$(ms_now)
    reload_ms=$((t1 - t0))
    stop_mailgate
    local total=$((SENDERS * MSGS))
    awk -v n="$n" -v c="$check_ms" -v s="$start_ms" -v r="$rss" -v ms="$send_ms" -v tot="$total" \
        -v f="$failed" -v rl="$reload_ms" 'BEGIN {
        printf "| %d | %d ms | %d ms | %.1f MiB | %d msgs in %d ms = %.1f msg/s%s | %d ms |\n",
            n, c, s, r / 1024, tot, ms, tot * 1000 / ms, (f ? " (" f " senders FAILED)" : ""), rl
    }' | tee -a "$WORK/table"
}

bash "$BENCH" sink start >&2
echo "## mailbox channels $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg)"
echo "| channels | check | start | idle RSS | relay, $SENDERS senders x $MSGS msgs | reload (1 channel changed) |"
echo "|---|---|---|---|---|---|"
run 20
run 10000
run 20
run 10000
awk -F'|' '{ split($6, a, "= "); split(a[2], b, " "); rate[$2+0] += b[1]; k[$2+0]++ }
    END { r = (rate[20] > 0) ? (rate[10000] / k[10000]) / (rate[20] / k[20]) : 0
          printf "\nrelay throughput, 10000 channels / 20 channels: %.2f x (goal >= 0.9 x)\n", r }' "$WORK/table"
