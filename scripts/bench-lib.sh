# Sourced by scripts/bench.sh, bench-queue.sh and bench-relay-rss.sh: the set-up they
# share. Expects NAME (for messages), SINK_PORT and PORT; sets BENCH (smtp-bench.sh),
# SINK, WORK (a new temp dir), BIN (the mailgate binary) and the SMTP_BENCH_* variables;
# defines die, port_open, write_config, and start_mailgate / stop_mailgate (on
# $WORK/bench.toml, PID in MG).

die() { echo "$NAME: $*" >&2; exit 2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

BENCH=${SMTP_BENCH:-}
if [[ -z $BENCH ]]; then
    for candidate in ../shared/bench/smtp-bench.sh ../../shared/bench/smtp-bench.sh /work/shared/bench/smtp-bench.sh; do
        [[ -f $candidate ]] && { BENCH=$candidate; break; }
    done
fi
[[ -n $BENCH && -f $BENCH ]] || die "smtp-bench.sh not found; set SMTP_BENCH"
command -v smtp-source >/dev/null || die "smtp-source not installed (apt-get install postfix)"

for p in "$SINK_PORT" "$PORT"; do
    port_open "$p" && die "127.0.0.1:$p is already in use; set BENCH_SINK_PORT / BENCH_PORT"
done

SINK=127.0.0.1:$SINK_PORT
WORK=$(mktemp -d "/tmp/mailgate-$NAME.XXXXXX")
export SMTP_BENCH_STATE=$WORK/state SMTP_BENCH_SINK=$SINK SMTP_BENCH_FROM=sender@bench.test

if [[ -n ${MAILGATE_BIN:-} ]]; then
    BIN=$(readlink -f "$MAILGATE_BIN")        # compare another build
else
    cargo build --release --quiet
    BIN=$PWD/target/release/mailgate
fi

# write_config DELIVERY CONNECTIONS: $WORK/bench.toml, one smtp channel to the sink for
# every sender, the spool in $WORK.
write_config() {
    cat > "$WORK/bench.toml" <<TOML
[server]
listen = ["127.0.0.1:$PORT"]
delivery = "$1"
spool_dir = "$WORK/spool"
max_message_size = "50MB"
max_connections = 2000
check_header_from = false

[channels.sink]
host = "127.0.0.1"
port = $SINK_PORT
tls = "none"
senders = ["*"]
connections = $2
TOML
}

MG=""
stop_mailgate() {  # SIGTERM by PID, bounded wait, then SIGKILL
    [[ -n $MG ]] || return 0
    kill "$MG" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$MG" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$MG" 2>/dev/null || true
    wait "$MG" 2>/dev/null || true
    MG=""
}
start_mailgate() {  # sets MG; waits (bounded) until the port answers
    MAILGATE_LOG=warn "$BIN" -c "$WORK/bench.toml" run 2>> "$WORK/mailgate.log" &
    MG=$!
    for _ in $(seq 100); do port_open "$PORT" && return 0; kill -0 "$MG" 2>/dev/null || break; sleep 0.1; done
    cat "$WORK/mailgate.log" >&2; die "mailgate did not start"
}
