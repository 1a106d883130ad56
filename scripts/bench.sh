#!/usr/bin/env bash
# Benchmarks mailgate against the machine's limit, in one run (see BENCHMARKS.md).
#   direct:   smtp-source -> smtp-sink                      (the limit of this tool pair)
#   mailgate: smtp-source -> mailgate (relay) -> smtp-sink
# plus peak RSS with 1,000 idle connections. Loopback only; every run is bounded.
# usage: scripts/bench.sh [RUNS]        (needs postfix's smtp-source/smtp-sink, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
BENCH=${SMTP_BENCH:-../shared/bench/smtp-bench.sh}
export SMTP_BENCH_STATE=${SMTP_BENCH_STATE:-/tmp/mailgate-bench}
export SMTP_BENCH_FROM=sender@bench.test
SINK=127.0.0.1:2600
PORT=2625
WORK=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
cargo build --release --quiet
BIN=$PWD/target/release/mailgate

cat > "$WORK/bench.toml" <<TOML
[server]
listen = ["127.0.0.1:$PORT"]
delivery = "relay"
max_message_size = "50MB"
max_connections = 2000
check_header_from = false

[channels.sink]
host = "127.0.0.1"
port = 2600
tls = "none"
senders = ["*"]
connections = 64
TOML

MG=""
cleanup() {
    [[ -n $MG ]] && kill "$MG" 2>/dev/null && wait "$MG" 2>/dev/null
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

bash "$BENCH" sink start -k "$SINK" >&2
MAILGATE_LOG=warn "$BIN" -c "$WORK/bench.toml" run 2> "$WORK/mailgate.log" &
MG=$!
sleep 0.5
kill -0 "$MG" || { cat "$WORK/mailgate.log"; exit 1; }

echo "## $(date -u +%FT%TZ) $(nproc) cores, runs=$RUNS"
echo '### 1 KB, 20 sessions x 10 messages'
bash "$BENCH" -x -k "$SINK" -L 1000 -S 20 -M 10 -R 1 -n "$RUNS" "$SINK"
bash "$BENCH" -x -k "$SINK" -L 1000 -S 20 -M 10 -R 1 -n "$RUNS" -W "$MG" "127.0.0.1:$PORT"
echo '### one 10 MB message'
bash "$BENCH" -x -k "$SINK" -L 10000000 -S 1 -M 1 -R 1 -n "$RUNS" "$SINK"
bash "$BENCH" -x -k "$SINK" -L 10000000 -S 1 -M 1 -R 1 -n "$RUNS" -W "$MG" "127.0.0.1:$PORT"
echo '### 1,000 idle connections'
python3 bench/idle_conns.py 127.0.0.1 "$PORT" 1000 3 "$MG"
