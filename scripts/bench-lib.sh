# Sourced by scripts/bench.sh and scripts/bench-queue.sh: the set-up they share.
# Expects NAME (for messages), SINK_PORT and PORT; sets BENCH (smtp-bench.sh), SINK,
# WORK (a new temp dir), BIN (the mailgate binary) and the SMTP_BENCH_* variables;
# defines die and port_open.

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
