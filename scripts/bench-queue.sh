#!/usr/bin/env bash
# Benchmarks mailgate's queue mode against a Postfix relay, in one run (issue 4; see
# BENCHMARKS.md, "Queue mode vs Postfix"):
#   direct:   smtp-source -> smtp-sink                              (reference)
#   postfix:  smtp-source -> Postfix smtpd 127.0.0.1:2527 -> smtp-sink
#   mailgate: smtp-source -> mailgate (delivery = "queue") -> smtp-sink
# at 1 KB, 20 sessions x 50 messages ("deliver" = until the sink has every message), in
# ROUNDS alternating rounds (direct, Postfix, mailgate, then again), so that a change in
# the machine's load hits all three alike; the ratio is taken per round and its median
# reported. Then 20 sessions each sending one 10 MB message to mailgate while sampling
# its memory.
# Prints the smtp-bench tables and a summary with ratios and pass/fail; exits 1 when a
# target is missed, 2 when the bench cannot run.
#
# Postfix: configured idempotently as ../shared/bench/README.md says (postconf -e of the
# relay settings, one `127.0.0.1:2527 inet ... smtpd` line in master.cf). If Postfix was
# not running it is started and stopped again at the end; if it was, it is reloaded.
# Loopback only; every run and wait is bounded; only processes this script started are
# stopped, by PID (Postfix through `postfix stop`, only when this script started it).
#
# usage: scripts/bench-queue.sh [ROUNDS]  (default 7 alternating 1 KB rounds, 3 runs for 10 MB)
# env:   BENCH_MSGS (messages per session, 50), SMTP_BENCH=path/to/smtp-bench.sh, BENCH_SINK_PORT (2790), BENCH_PORT (2796),
#        MAILGATE_BIN=path (bench that binary instead of building target/release/mailgate)
# needs: root (Postfix configuration), postfix with smtp-source/smtp-sink, cargo
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-7}
MSGS=${BENCH_MSGS:-50}
BIG_RUNS=3
SINK_PORT=${BENCH_SINK_PORT:-2790}
PORT=${BENCH_PORT:-2796}
PF_PORT=2527            # Postfix smtpd for the bench (the bench README's port)

NAME=bench-queue
die() { echo "$NAME: $*" >&2; exit 2; }
for tool in smtp-source smtp-sink postfix postconf postqueue; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install postfix)"
done
[[ $(id -u) == 0 ]] || die "must run as root (configures and starts the system Postfix)"
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

write_config queue 20

# ---- Postfix -------------------------------------------------------------------
PF_STARTED=0
configure_postfix() {
    postconf -e "relayhost = [127.0.0.1]:$SINK_PORT" 'default_transport = smtp' \
        'relay_transport = relay' 'message_size_limit = 52428800' \
        'inet_interfaces = loopback-only' 'mynetworks = 127.0.0.0/8 [::1]/128'
    local cf; cf=$(postconf -h config_directory)/master.cf
    grep -q "^127\.0\.0\.1:$PF_PORT[[:space:]]" "$cf" ||
        printf '%s\n' "127.0.0.1:$PF_PORT inet n - y - - smtpd" >> "$cf"
    # Copies resolv.conf, hosts, ... into the chroot, as the Debian service does.
    [[ -x /usr/lib/postfix/configure-instance.sh ]] && /usr/lib/postfix/configure-instance.sh - >/dev/null
    postfix check
    if postfix status >/dev/null 2>&1; then
        postfix reload >/dev/null 2>&1
    else
        port_open "$PF_PORT" && die "127.0.0.1:$PF_PORT is in use by something other than Postfix"
        postfix start >/dev/null 2>&1 || die "postfix start failed"
        PF_STARTED=1
    fi
    for _ in $(seq 100); do port_open "$PF_PORT" && return 0; sleep 0.1; done
    die "Postfix does not listen on 127.0.0.1:$PF_PORT"
}
postfix_queue_empty() { [[ $(postqueue -j 2>/dev/null | wc -l) == 0 ]]; }

# ---- mailgate ------------------------------------------------------------------
cleanup() {
    stop_mailgate
    bash "$BENCH" sink stop >/dev/null 2>&1 || true
    if (( PF_STARTED )); then postfix stop >/dev/null 2>&1 || true; fi
    [[ -s $WORK/mailgate.log ]] && { echo "bench-queue: mailgate log:" >&2; tail -20 "$WORK/mailgate.log" >&2; }
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one smtp-bench matrix line; the table goes to stdout and to $WORK/$1.out.
bench() {
    local name=$1; shift
    bash "$BENCH" -x -k "$SINK" "$@" | tee "$WORK/$name.out"
}
# One message through TARGET must reach the sink (run1 waits for it, bounded).
check_delivers() {
    bash "$BENCH" run1 -T 60 -l 1000 -s 1 -m 1 -r 1 "$2" >&2 ||
        die "$1 did not deliver a test message to the sink at $SINK"
}

bash "$BENCH" sink start >&2
configure_postfix
postfix_queue_empty || die "the Postfix queue is not empty (postqueue -p); its mail would count at the sink"
start_mailgate
check_delivers Postfix "127.0.0.1:$PF_PORT"
check_delivers mailgate "127.0.0.1:$PORT"

echo "## mailgate queue mode vs Postfix $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d" " -f1-3 /proc/loadavg), $ROUNDS alternating rounds"
echo "# Postfix $(postconf -h mail_version), $("$BIN" --version 2>/dev/null || echo "mailgate ?")"
echo "### 1 KB, 20 sessions x $MSGS messages: direct, Postfix, mailgate (queue), one run each per round"
for round in $(seq "$ROUNDS"); do
    echo "#### round $round, load average $(cut -d" " -f1-3 /proc/loadavg)"
    # The first round warms each target up once; later rounds measure straight away.
    warm=0; (( round == 1 )) && warm=1
    bench "direct_$round" -n 1 -w "$warm" -L 1000 -S 20 -M "$MSGS" -R 1 "$SINK"
    bench "postfix_$round" -n 1 -w "$warm" -L 1000 -S 20 -M "$MSGS" -R 1 "127.0.0.1:$PF_PORT"
    bench "queue_$round" -n 1 -w "$warm" -L 1000 -S 20 -M "$MSGS" -R 1 "127.0.0.1:$PORT"
done
stop_mailgate

echo "### 20 sessions x one 10 MB message to a freshly started mailgate (queue), memory sampled"
start_mailgate
bench queue_10m -n "$BIG_RUNS" -L 10000000 -S 20 -M 1 -R 1 -W "$MG" "127.0.0.1:$PORT"
stop_mailgate

# ---- summary -------------------------------------------------------------------
# column 1 of the matrix line's 4th |-field is msg/s (smtp-bench README).
rate() { awk -F'|' '/^  / {split($4, a, " "); print a[1]}' "$WORK/$1.out"; }
failed() { grep -q FAILED_RUNS "$WORK/$1.out" && echo 1 || echo 0; }
rows=""; f1=0
for round in $(seq "$ROUNDS"); do
    rows+="$(rate "direct_$round") $(rate "postfix_$round") $(rate "queue_$round")"$'\n'
    f1=$(( f1 + $(failed "direct_$round") + $(failed "postfix_$round") + $(failed "queue_$round") ))
done
hwm=$(sed -n 's/.*tree_max_hwm=\([0-9]*\)kB.*/\1/p' "$WORK/queue_10m.out")
printf '%s' "$rows" | awk -v f1="$f1" -v f2="$(failed queue_10m)" -v hwm="${hwm:-0}" -v msgs="$MSGS" '
function median(v, n,    i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j-1] > v[j]; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
    return (n % 2) ? v[(n+1)/2] : (v[n/2] + v[n/2+1]) / 2
}
NF == 3 { n++; d[n] = $1; p[n] = $2; q[n] = $3; rp[n] = ($2 > 0) ? $3 / $2 : 0; rd[n] = ($1 > 0) ? $3 / $1 : 0
          rs = rs sprintf("%s%.2f", (n > 1) ? " " : "", rp[n]) }
END {
    miss = 0
    printf "\n### summary (medians over %d rounds)\n", n
    printf "| target | direct | Postfix | mailgate (queue) | measured | required | result |\n"
    printf "|---|---|---|---|---|---|---|\n"
    r = median(rp, n); ok = (r >= 5 && !f1); miss += !ok
    printf "| 1 KB, 20 sess x %d msgs, delivered | %.1f msg/s | %.1f msg/s | %.1f msg/s | %.2f x Postfix (%.2f x direct); per round: %s | >= 5 x Postfix | %s |\n", msgs, median(d, n), median(p, n), median(q, n), r, median(rd, n), rs, ok ? "pass" : "FAIL"
    mb = hwm / 1024; ok = (hwm > 0 && mb <= 100 && !f2); miss += !ok
    printf "| peak RSS, 20 sess x one 10 MB msg | | | %.1f MB | %.1f MB | <= 100 MB | %s |\n", mb, mb, ok ? "pass" : "FAIL"
    exit (miss > 0)
}' || { echo "bench-queue: a target was missed" >&2; exit 1; }
