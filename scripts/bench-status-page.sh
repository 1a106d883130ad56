#!/usr/bin/env bash
# Does serving the status page slow delivery? (issue 19; see BENCHMARKS.md, "Status
# page".) Queue mode, one `file` channel with a rate and a daily quota far above what is
# sent (so every transaction is counted in the events log), N messages of 1 KB from
# Postfix's smtp-source (8 sessions); the time from the first connection until every
# message is in the channel's folder. Runs alternate: without a client of the metrics
# listener, with one loading / and /status.json ten times a second (a browser left open
# asks once per 10 s), and, as the control for what any HTTP client costs on the same
# cores, with one loading /metrics as often. Prints each run and the medians.
#
# usage: scripts/bench-status-page.sh [N] [ROUNDS]   (defaults 1000 messages, 6 rounds of three runs)
# env:   MAILGATE_BIN (default target/release/mailgate, built if missing)
# needs: postfix (smtp-source), curl, python3
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
ROUNDS=${2:-6}
BIN=${MAILGATE_BIN:-target/release/mailgate}
[ -x "$BIN" ] || cargo build --release --locked
SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
WORK=$(mktemp -d)
MG=
POLLER=
cleanup() {
    [ -n "$POLLER" ] && kill "$POLLER" 2>/dev/null
    [ -n "$MG" ] && kill "$MG" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

one_run() { # $1 = 0 (no client), 1 (status page client) or 2 (/metrics client)
    local d port mport start end
    d=$(mktemp -d "$WORK/run.XXXX")
    port=$((20000 + RANDOM % 20000))
    mport=$((port + 1))
    cat >"$d/proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
spool_dir = "$d/spool"
[channels.out]
kind = "file"
dir = "$d/out"
senders = ["*"]
rate = "100000/min"
recipients_per_day = 10000000
[metrics]
listen = "127.0.0.1:$mport"
EOF
    mkdir -p "$d/out"
    "$BIN" -c "$d/proxy.toml" run >"$d/log" 2>&1 &
    MG=$!
    for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$mport/metrics" && break; sleep 0.1; done
    if [ "$1" != 0 ]; then
        local paths="('/', '/status.json')"
        [ "$1" = 2 ] && paths="('/metrics', '/metrics')"
        python3 -c "
import time, urllib.request
while True:
    for p in $paths:
        urllib.request.urlopen('http://127.0.0.1:$mport' + p, timeout=5).read()
    time.sleep(0.2)
" &
        POLLER=$!
    fi
    start=$(date +%s.%N)
    timeout 300 "$SOURCE" -c -l 1024 -m "$N" -s 8 -f a@example.com -t b@example.org "127.0.0.1:$port" >/dev/null
    for _ in $(seq 6000); do
        [ "$(find "$d/out" -type f | wc -l)" -ge "$N" ] && break
        sleep 0.05
    done
    end=$(date +%s.%N)
    if [ -n "$POLLER" ]; then kill "$POLLER"; wait "$POLLER" 2>/dev/null || true; POLLER=; fi
    kill "$MG"; wait "$MG" 2>/dev/null || true; MG=
    echo "$1 $(echo "$end - $start" | bc)" >>"$WORK/results"
}

echo "mailgate status page bench $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $N messages per run"
for _ in $(seq "$ROUNDS"); do
    one_run 0; echo "no client:             $(tail -1 "$WORK/results" | cut -d' ' -f2) s"
    one_run 1; echo "status page client:    $(tail -1 "$WORK/results" | cut -d' ' -f2) s"
    one_run 2; echo "/metrics client:       $(tail -1 "$WORK/results" | cut -d' ' -f2) s"
done
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
without=$(awk '$1==0 {print $2}' "$WORK/results" | median)
with=$(awk '$1==1 {print $2}' "$WORK/results" | median)
control=$(awk '$1==2 {print $2}' "$WORK/results" | median)
echo "median: no client $without s, status page client $with s, /metrics client $control s"
echo "ratio status page / no client: $(echo "scale=2; $with / $without" | bc), status page / metrics: $(echo "scale=2; $with / $control" | bc)"
echo "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
