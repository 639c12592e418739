#!/usr/bin/env bash
# ClawTerm benchmark: builds release, runs loadgen scenarios against clawtermd (io_uring and
# epoll backends, one shard on CPU 0) and against a raw TCP echo server (the no-protocol
# baseline), appends one JSON line to bench/history.jsonl and regenerates bench/dashboard.html.
#
#   bash bench/run.sh [--profile smoke|full] [--io "uring epoll"] [--no-build] [--keep]
#
# Exit status: non-zero only when a scenario fails functionally (a loadgen run reports errors
# or sessions not established, or a server does not start) — never because a figure is low.
# See docs/BENCHMARKS.md.
set -uo pipefail

PROFILE=smoke
IOS="uring epoll"
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --io) IOS="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

case "$PROFILE" in
  smoke) IDLE_N=500;   ECHO_N=500;   ECHO_RATE=5000;  CLOSED_N=500;  RESUME_N=500;   DUR=3;  CONN_INFLIGHT=64 ;;
  full)  IDLE_N=19000; ECHO_N=10000; ECHO_RATE=20000; CLOSED_N=10000; RESUME_N=10000; DUR=15; CONN_INFLIGHT=64 ;;
  *) echo "bench/run.sh: --profile must be smoke or full" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
T_START=$(date +%s)

if [ "$BUILD" = 1 ]; then
  echo "[bench] cargo build --release (clawtermd, claw-agent, loadgen)" >&2
  if ! cargo build --release -p clawterm -p loadgen --bins >&2; then
    echo "[bench] build FAILED" >&2
    exit 1
  fi
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
for b in clawtermd claw-agent loadgen; do
  [ -x "$BIN/$b" ] || { echo "[bench] $BIN/$b missing (build first)" >&2; exit 1; }
done

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/clawterm-bench.XXXXXX")"
cat /proc/loadavg >"$RUN_DIR/loadavg.start" 2>/dev/null
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then
  SRV_CPU=0; LG_PIN=(taskset -c 1); SRV_PIN=(taskset -c 0)
else
  SRV_CPU=0; LG_PIN=(); SRV_PIN=()
fi
command -v taskset >/dev/null 2>&1 || { LG_PIN=(); SRV_PIN=(); }
echo "[bench] profile $PROFILE; $NCPU CPUs; server shard on CPU $SRV_CPU, loadgen ${LG_PIN[*]:-unpinned}; work dir $RUN_DIR" >&2

FAILED=()
SRV_PID=""; AGENT_PID=""; SRV_ADDR=""

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

# start_server NAME IO [SHARDS]: a fresh clawtermd + echo agent pod; sets SRV_PID, SRV_ADDR.
start_server() {
  local name="$1" io="$2" shards="${3:-1}"
  local d="$RUN_DIR/$name"
  mkdir -p "$d/sock"
  "$BIN/clawtermd" --shards "$shards" --cpus "$SRV_CPU" --io "$io" --insecure-plaintext \
    --insecure-no-auth --admin off --no-quic --socket-dir "$d/sock" --bind 127.0.0.1 --port 0 \
    >"$d/clawtermd.log" 2>&1 &
  SRV_PID=$!
  SRV_ADDR=""
  for _ in $(seq 1 200); do
    SRV_ADDR=$(sed -n 's/.*listening on tcp \([0-9.]*:[0-9]*\).*/\1/p' "$d/clawtermd.log" | head -1)
    [ -n "$SRV_ADDR" ] && break
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$SRV_ADDR" ]; then
    echo "[bench] $name: clawtermd --io $io did not start:" >&2
    tail -5 "$d/clawtermd.log" >&2
    return 1
  fi
  "$BIN/claw-agent" -s "$d/sock" --tenant 1 --agent 1 echo >"$d/claw-agent.log" 2>&1 &
  AGENT_PID=$!
  for _ in $(seq 1 200); do
    [ -S "$d/sock/1_1" ] && return 0
    sleep 0.05
  done
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
scenario() {
  local name="$1" io="$2"; shift 2
  if ! start_server "$name" "$io"; then
    FAILED+=("$name (server did not start)")
    stop_server
    return 0
  fi
  lg "$name" "$@" --target "$SRV_ADDR" --server-pid "$SRV_PID"
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
  scenario "$io.connect" "$io" connect --duration "$DUR" --inflight "$CONN_INFLIGHT"
  scenario "$io.echo" "$io" echo --sessions "$ECHO_N" --rate "$ECHO_RATE" --duration "$DUR" --warmup 1
  scenario "$io.echo_closed" "$io" echo --sessions "$CLOSED_N" --rate 0 --duration "$DUR" --warmup 1
  scenario "$io.resume" "$io" resume --sessions "$RESUME_N"
done

# Cross-shard resume: two shards (both on the server CPU), same-port vs new-port reconnects.
first_io="${IOS%% *}"
if start_server "resume_cross" "$first_io" 2; then
  lg "resume_cross" resume-cross --sessions "$RESUME_N" --shards-hint 2 --target "$SRV_ADDR" --server-pid "$SRV_PID"
else
  FAILED+=("resume_cross (server did not start)")
fi
stop_server

# Raw TCP echo baseline: same client, same session count and rate, no protocol, one core.
mkdir -p "$RUN_DIR/raw"
"${SRV_PIN[@]}" "$BIN/loadgen" raw-echo-server --bind 127.0.0.1:0 >"$RUN_DIR/raw/server.out" 2>&1 &
SRV_PID=$!
RAW_ADDR=""
for _ in $(seq 1 100); do
  RAW_ADDR=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$RUN_DIR/raw/server.out" | head -1)
  [ -n "$RAW_ADDR" ] && break
  sleep 0.05
done
if [ -n "$RAW_ADDR" ]; then
  lg "raw.echo" raw-echo --target "$RAW_ADDR" --server-pid "$SRV_PID" --sessions "$ECHO_N" --rate "$ECHO_RATE" --duration "$DUR" --warmup 1
  lg "raw.echo_closed" raw-echo --target "$RAW_ADDR" --server-pid "$SRV_PID" --sessions "$CLOSED_N" --rate 0 --duration "$DUR" --warmup 1
else
  FAILED+=("raw (raw-echo-server did not start)")
fi
stop_server

T_END=$(date +%s)
FAILED_JSON=$(printf '%s\n' "${FAILED[@]+"${FAILED[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))')
python3 "$ROOT/bench/render.py" record "$RUN_DIR" --profile "$PROFILE" --history "$ROOT/bench/history.jsonl" \
  --failed "$FAILED_JSON" --seconds $((T_END - T_START)) --ios "$IOS" || FAILED+=("record (render.py)")
python3 "$ROOT/bench/render.py" render --history "$ROOT/bench/history.jsonl" --out "$ROOT/bench/dashboard.html" \
  || echo "[bench] dashboard rendering failed" >&2

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
echo "[bench] ok in $((T_END - T_START)) s; dashboard: bench/dashboard.html" >&2
