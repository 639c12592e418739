#!/usr/bin/env bash
# ClawTerm benchmark: builds release, runs loadgen scenarios against clawtermd (io_uring and
# epoll backends, one shard on CPU 0, the echo agent pod pinned to CPU 0 too, loadgen on CPU 1)
# and against a raw TCP echo server (the no-protocol baseline), plus TLS and QUIC idle (and
# QUIC echo) scenarios and the state dir / live upgrade figures (bench/src/bin/state_figures.rs:
# upgrades under busy and idle load, SIGKILL + restart, the state dir's cost); appends one JSON
# line to bench/history.jsonl (with each goal next to its measured figure) and regenerates
# bench/dashboard.html.
#
#   bash bench/run.sh [--profile smoke|full|quick] [--io "uring epoll"] [--no-build] [--keep]
#                     [--history FILE] [--dashboard FILE] [--note TEXT]
#
# --profile quick: only the two quick figures per backend, RSS per idle session (10,000 idle
# sessions) and closed-loop echo round trips per second through one shard (1,000 sessions),
# printed as a table; recorded in the work directory's own history unless --history is given.
#
# Exit status: non-zero only when a scenario fails functionally (a loadgen run reports errors
# or sessions not established, or a server does not start) — never because a figure is low.
# See docs/BENCHMARKS.md.
set -uo pipefail

PROFILE=smoke
IOS="uring epoll"
BUILD=1
KEEP=0
HISTORY=""
DASHBOARD=""
NOTE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --io) IOS="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --history) HISTORY="$2"; shift 2 ;;
    --dashboard) DASHBOARD="$2"; shift 2 ;;
    --note) NOTE="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# ACK_DELAY (ms): open-loop echo clients piggyback their cumulative ACK on the session's next
# DATA (a standalone ACK only after this long). With one ACK per echo, as the clawterm client
# sends, loadgen alone saturates CPU 1 near 50,000 echoes/s against clawtermd (each ACK is one
# more write and one more segment to process), and the open-loop latency would measure the
# client. The closed loop always piggybacks.
ACK_DELAY=1000
# RESUME_RATE: the paced resume rounds (new resumes per second); the burst rounds start
# --inflight (256) at a time. TLS_N / QUIC_N: idle sessions over TLS / QUIC; QUIC_ECHO_*: the
# open-loop echo over QUIC. STATE_ARGS: the sizes of state_figures (the issue's in full: 10,000
# idle sessions and 2,000 busy ones across 3 upgrades, 10,000 across SIGKILL; its closed-loop
# cost reps use CLOSED_N sessions for DUR seconds).
case "$PROFILE" in
  smoke) IDLE_N=500;   ECHO_N=500;   ECHO_RATE=5000;  CLOSED_N=500;  RESUME_N=500;   DUR=3;  CONN_INFLIGHT=64
         RESUME_RATE=2000; TLS_N=200;   QUIC_N=200;  QUIC_ECHO_N=100;  QUIC_ECHO_RATE=1000; TQ_DUR=2
         CLOSED_REPS=2; BULK_PROBES=4
         STATE_ARGS=(--idle 2000 --busy 500 --kill 2000 --upgrades 2 --reps 3) ;;
  full)  IDLE_N=19000; ECHO_N=10000; ECHO_RATE=50000; CLOSED_N=10000; RESUME_N=10000; DUR=15; CONN_INFLIGHT=64
         RESUME_RATE=2000; TLS_N=10000; QUIC_N=5000; QUIC_ECHO_N=1000; QUIC_ECHO_RATE=5000; TQ_DUR=10
         CLOSED_REPS=3; BULK_PROBES=8
         STATE_ARGS=(--idle 10000 --busy 2000 --kill 10000 --upgrades 3 --reps 3) ;;
  quick) IDLE_N=10000; CLOSED_N=1000; DUR=5; CONN_INFLIGHT=64; CLOSED_REPS=1
         ECHO_N=0; ECHO_RATE=0; RESUME_N=0; RESUME_RATE=0; TLS_N=0; QUIC_N=0; QUIC_ECHO_N=0
         QUIC_ECHO_RATE=0; TQ_DUR=0; BULK_PROBES=0; STATE_ARGS=() ;;
  *) echo "bench/run.sh: --profile must be smoke, full or quick" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
cd "$ROOT" || exit 2
T_START=$(date +%s)

if [ "$BUILD" = 1 ]; then
  echo "[bench] cargo build --release (clawtermd, claw-agent, loadgen, state_figures)" >&2
  if ! cargo build --release -p clawterm -p loadgen --bins >&2 \
     || ! cargo build --release -p clawterm-bench --bin state_figures >&2; then
    echo "[bench] build FAILED" >&2
    exit 1
  fi
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
NEED=(clawtermd claw-agent loadgen)
[ ${#STATE_ARGS[@]} -gt 0 ] && NEED+=(state_figures)
for b in "${NEED[@]}"; do
  [ -x "$BIN/$b" ] || { echo "[bench] $BIN/$b missing (build first)" >&2; exit 1; }
done

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/clawterm-bench.XXXXXX")"
# The quick profile keeps its record out of the project's history unless told otherwise.
if [ "$PROFILE" = quick ]; then
  HISTORY="${HISTORY:-$RUN_DIR/history.jsonl}"
  DASHBOARD="${DASHBOARD:-$RUN_DIR/dashboard.html}"
fi
HISTORY="${HISTORY:-$ROOT/bench/history.jsonl}"
DASHBOARD="${DASHBOARD:-$ROOT/bench/dashboard.html}"
cat /proc/loadavg >"$RUN_DIR/loadavg.start" 2>/dev/null
NCPU=$(nproc)
# CPU placement: the server side is one core. clawtermd's shard AND the echo agent pod run on
# CPU 0 (the pod does as much work per message as the daemon, so giving it a core of its own
# would make "one core" two); loadgen runs on CPU 1.
if [ "$NCPU" -ge 2 ]; then
  SRV_CPU=0; LG_CPU=1; LG_PIN=(taskset -c 1); SRV_PIN=(taskset -c 0)
else
  SRV_CPU=0; LG_CPU=""; LG_PIN=(); SRV_PIN=()
fi
command -v taskset >/dev/null 2>&1 || { LG_PIN=(); SRV_PIN=(); LG_CPU=""; }
# The per-core figures (how busy the server's CPU was) only mean something when pinned.
CORE_ARGS=()
if [ ${#SRV_PIN[@]} -gt 0 ]; then CORE_ARGS=(--server-cpu "$SRV_CPU"); fi
if [ -n "$LG_CPU" ]; then CORE_ARGS+=(--loadgen-cpu "$LG_CPU"); fi
AGENT_PIN=("${SRV_PIN[@]}")
echo "[bench] profile $PROFILE; $NCPU CPUs; server shard and echo pod on CPU $SRV_CPU, loadgen ${LG_PIN[*]:-unpinned}; work dir $RUN_DIR" >&2
PLACEMENT="clawtermd shard and claw-agent echo on CPU $SRV_CPU (${SRV_PIN[*]:-unpinned}), loadgen ${LG_PIN[*]:-unpinned}"

# A throw-away certificate for the TLS and QUIC scenarios.
CERT_DIR="$RUN_DIR/cert"
mkdir -p "$CERT_DIR"
if ! "$BIN/loadgen" self-signed-cert "$CERT_DIR" >/dev/null; then
  echo "[bench] cannot make a TLS certificate" >&2
  exit 1
fi
CA="$CERT_DIR/tls-cert.pem"

FAILED=()
SRV_PID=""; AGENT_PID=""; SRV_ADDR=""; QUIC_ADDR=""

stop_server() {
  for p in $SRV_PID $AGENT_PID; do
    kill -TERM "$p" 2>/dev/null
  done
  for p in $SRV_PID $AGENT_PID; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  SRV_PID=""; AGENT_PID=""
}
trap 'stop_server' EXIT

# start_server NAME IO [SHARDS] [plain|tls]: a fresh clawtermd + echo agent pod (pinned to the
# server's CPU); sets SRV_PID, SRV_ADDR (and QUIC_ADDR with tls: TLS on TCP, QUIC on UDP).
start_server() {
  local name="$1" io="$2" shards="${3:-1}" sec="${4:-plain}"
  local d="$RUN_DIR/$name"
  mkdir -p "$d/sock"
  local secargs=(--insecure-plaintext --no-quic)
  if [ "$sec" = tls ]; then
    secargs=(--tls-cert "$CERT_DIR/tls-cert.pem" --tls-key "$CERT_DIR/tls-key.pem" --quic-port 0)
  fi
  # The whole process on the server CPU (SRV_PIN), as the DaemonSet's cpuset confines it.
  # (Before 2026-11-30 20:00, `--shards 2 --cpus 0` left both shards unpinned, so without this
  # they floated onto loadgen's CPU: a paced cross-shard resume cost +60-77 µs, not +13-21.)
  # SRV_EXTRA (environment): more clawtermd options for this server (e.g. --max-send-payload).
  # shellcheck disable=SC2086
  start_clawtermd "$d/clawtermd.log" "[bench] $name (--io $io)" \
    "${SRV_PIN[@]}" "$BIN/clawtermd" --shards "$shards" --cpus "$SRV_CPU" --io "$io" "${secargs[@]}" ${SRV_EXTRA:-} \
    --insecure-no-auth --admin off --socket-dir "$d/sock" --bind 127.0.0.1 --port 0 || return 1
  QUIC_ADDR=$(sed -n 's/.* quic \([0-9.]*:[0-9]*\).*/\1/p' "$d/clawtermd.log" | head -1)
  "${AGENT_PIN[@]}" "$BIN/claw-agent" -s "$d/sock" --tenant 1 --agent 1 echo >"$d/claw-agent.log" 2>&1 &
  AGENT_PID=$!
  wait_socket "$d/sock/1_1" && return 0
  echo "[bench] $name: the echo agent socket did not appear" >&2
  return 1
}

# lg NAME ARGS...: runs loadgen pinned to CPU 1; its JSON goes to RUN_DIR/NAME.json.
lg() {
  local name="$1"; shift
  echo "[bench] --- $name: loadgen $*" >&2
  "${LG_PIN[@]}" "$BIN/loadgen" "$@" --json "$RUN_DIR/$name.json" >/dev/null
  local rc=$?
  if [ $rc -ne 0 ]; then
    FAILED+=("$name (loadgen exit $rc)")
    echo "[bench] $name FAILED (loadgen exit $rc)" >&2
  fi
  return 0
}

# scenario NAME IO LOADGEN-ARGS...: fresh server, one loadgen run, server stopped.
# SEC=tls|quic in the environment: a TLS (+QUIC) server, loadgen over that transport.
scenario() {
  local name="$1" io="$2"; shift 2
  local sec="${SEC:-tcp}"
  if ! start_server "$name" "$io" 1 "$([ "$sec" = tcp ] && echo plain || echo tls)"; then
    FAILED+=("$name (server did not start)")
    stop_server
    return 0
  fi
  local target="$SRV_ADDR" tr=()
  if [ "$sec" != tcp ]; then
    tr=(--transport "$sec" --ca "$CA")
    if [ "$sec" = quic ]; then
      if [ -z "$QUIC_ADDR" ]; then
        FAILED+=("$name (server has no QUIC address)")
        stop_server
        return 0
      fi
      target="$QUIC_ADDR"
    fi
  fi
  lg "$name" "$@" "${tr[@]}" --target "$target" --server-pid "$SRV_PID"
  if ! kill -0 "$SRV_PID" 2>/dev/null; then
    FAILED+=("$name (clawtermd died)")
  fi
  if grep -q "panicked" "$RUN_DIR/$name/clawtermd.log"; then
    FAILED+=("$name (clawtermd panicked)")
  fi
  stop_server
}

for io in $IOS; do
  scenario "$io.idle" "$io" idle --sessions "$IDLE_N" --duration "$DUR"
  [ "$PROFILE" = quick ] && continue
  scenario "$io.echo" "$io" echo --sessions "$ECHO_N" --rate "$ECHO_RATE" --duration "$DUR" --warmup 1 --ack-delay "$ACK_DELAY"
  scenario "$io.resume" "$io" resume --sessions "$RESUME_N"
  scenario "$io.resume_paced" "$io" resume --sessions "$RESUME_N" --resume-rate "$RESUME_RATE"
done

# Closed-loop echo: the backends take turns, CLOSED_REPS times each (uring, epoll, uring,
# epoll, ...). On this VM the same binary's closed-loop rate moves by up to ±20 % from one
# minute to the next, more than the backends differ, so each rep is compared with its
# neighbour and the history keeps the median rep and the median of the per-rep ratios.
for rep in $(seq 1 "$CLOSED_REPS"); do
  for io in $IOS; do
    scenario "$io.echo_closed.$rep" "$io" echo --sessions "$CLOSED_N" --rate 0 --duration "$DUR" --warmup 1
  done
done

first_io="${IOS%% *}"
if [ "$PROFILE" != quick ]; then
# Cross-shard resume: two shards (both on the server CPU), same-shard vs cross-shard reconnects
# (by construction, see docs/BENCHMARKS.md), as a burst and paced.
for mode in burst paced; do
  name="resume_cross"; extra=()
  if [ "$mode" = paced ]; then name="resume_cross_paced"; extra=(--resume-rate "$RESUME_RATE"); fi
  if start_server "$name" "$first_io" 2; then
    lg "$name" resume-cross --sessions "$RESUME_N" --shards-hint 2 "${extra[@]}" --target "$SRV_ADDR" --server-pid "$SRV_PID"
  else
    FAILED+=("$name (server did not start)")
  fi
  stop_server
done

# TLS and QUIC (first backend): memory per idle session; echo over QUIC.
SEC=tls scenario "tls.idle" "$first_io" idle --sessions "$TLS_N" --duration "$TQ_DUR"
SEC=quic scenario "quic.idle" "$first_io" idle --sessions "$QUIC_N" --duration "$TQ_DUR"
SEC=quic scenario "quic.echo" "$first_io" echo --sessions "$QUIC_ECHO_N" --rate "$QUIC_ECHO_RATE" --duration "$TQ_DUR" --warmup 1 --ack-delay "$ACK_DELAY"

# Frame size (PROTOCOL.md 7.17): keystroke echoes of BULK_PROBES sessions next to 2 sessions of
# bulk output (60,000-byte echoes, 4 in flight each), with outgoing DATA cut at 16 KiB (the
# default) and at 65,535 bytes; the two take turns, CLOSED_REPS times each.
for rep in $(seq 1 "$CLOSED_REPS"); do
  for fs in 16384 65535; do
    SRV_EXTRA="--max-send-payload $fs" scenario "bulk.$fs.$rep" "$first_io" bulk --sessions "$BULK_PROBES" --bulk 2 --duration "$TQ_DUR" --warmup 1
  done
done

# Raw TCP echo baseline: same client, same session count and rate, no protocol, one core.
mkdir -p "$RUN_DIR/raw"
"${SRV_PIN[@]}" "$BIN/loadgen" raw-echo-server --bind 127.0.0.1:0 >"$RUN_DIR/raw/server.out" 2>&1 &
SRV_PID=$!
RAW_ADDR=$(wait_addr "$RUN_DIR/raw/server.out" "listening on" "$SRV_PID" 100)
if [ -n "$RAW_ADDR" ]; then
  lg "raw.echo" raw-echo --target "$RAW_ADDR" --server-pid "$SRV_PID" --sessions "$ECHO_N" --rate "$ECHO_RATE" --duration "$DUR" --warmup 1 --ack-delay "$ACK_DELAY"
  lg "raw.echo_closed" raw-echo --target "$RAW_ADDR" --server-pid "$SRV_PID" --sessions "$CLOSED_N" --rate 0 --duration "$DUR" --warmup 1
else
  FAILED+=("raw (raw-echo-server did not start)")
fi
stop_server

# Sessions across restarts and live upgrades (issue 14): state_figures starts its own daemons
# (state dirs in /dev/shm), pods and loadgen runs, placed like the rest (server and pod on
# SRV_CPU, clients on LG_CPU; the upgraded and restarted daemons have 2 shards, the cost reps 1).
STATE_PIN=(--no-pin)
if [ ${#SRV_PIN[@]} -gt 0 ] && [ -n "$LG_CPU" ]; then STATE_PIN=(--server-cpu "$SRV_CPU" --client-cpu "$LG_CPU"); fi
echo "[bench] --- state_figures ${STATE_ARGS[*]} --closed-sessions $CLOSED_N --cost-seconds $DUR --io $first_io" >&2
"$BIN/state_figures" "${STATE_ARGS[@]}" --closed-sessions "$CLOSED_N" --cost-seconds "$DUR" \
  --io "$first_io" "${STATE_PIN[@]}" --json "$RUN_DIR/state_figures.json" >/dev/null
rc=$?
if [ $rc -ne 0 ]; then
  FAILED+=("state_figures (exit $rc)")
  echo "[bench] state_figures FAILED (exit $rc)" >&2
fi

# Connect last: each connect run leaves ~100,000 sockets in TIME_WAIT for 60 s, which slows
# every later scenario's socket lookups (the open-loop echo tail and the cross-shard resume
# figures both moved with it).
for io in $IOS; do
  scenario "$io.connect" "$io" connect --duration "$DUR" --inflight "$CONN_INFLIGHT"
done
fi # not quick

T_END=$(date +%s)
FAILED_JSON=$(printf '%s\n' "${FAILED[@]+"${FAILED[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))')
python3 "$ROOT/bench/render.py" record "$RUN_DIR" --profile "$PROFILE" --history "$HISTORY" \
  --failed "$FAILED_JSON" --seconds $((T_END - T_START)) --ios "$IOS" --placement "$PLACEMENT" \
  --note "$NOTE" "${CORE_ARGS[@]+"${CORE_ARGS[@]}"}" >"$RUN_DIR/record.json" || FAILED+=("record (render.py)")
if [ "$PROFILE" = quick ]; then
  python3 "$ROOT/bench/render.py" quick "$RUN_DIR/record.json" || FAILED+=("quick table (render.py)")
else
  python3 "$ROOT/bench/render.py" goals "$RUN_DIR/record.json" >&2 || true
fi
python3 "$ROOT/bench/render.py" render --history "$HISTORY" --out "$DASHBOARD" \
  || FAILED+=("dashboard (render.py render)")

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "[bench] FAILED scenarios: ${FAILED[*]}" >&2
  echo "[bench] logs and JSON kept in $RUN_DIR" >&2
  exit 1
fi
if [ "$KEEP" = 1 ]; then
  echo "[bench] logs and JSON kept in $RUN_DIR" >&2
else
  rm -rf "$RUN_DIR"
fi
echo "[bench] ok in $((T_END - T_START)) s; dashboard: $DASHBOARD" >&2
