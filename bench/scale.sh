#!/usr/bin/env bash
# How clawtermd scales across cores: the same load against 1, 2, 4, 8 … shards, each shard
# pinned to its own CPU, with the echo pod and loadgen on CPUs of their own. Needs a machine
# with enough CPUs (shards + agent CPUs + loadgen CPUs); on a 2-core box it says so and stops.
#
#   bash bench/scale.sh [--shards "1 2 4 8"] [--agent-cpus N] [--loadgen-cpus N]
#                       [--sessions N] [--secs S] [--bin DIR] [--out FILE] [--overcommit]
#
# For each shard count it runs, against a fresh server:
#   echo     closed loop: --sessions sessions, one DATA outstanding each (round trips/s)
#   connect  new sessions per second (pod OPEN included)
# and prints one JSON line per run (to --out too): shards, CPUs, rates, latency percentiles and
# the CPU the server, the echo pod and loadgen used (a side at ~100% per CPU is the bottleneck).
# --overcommit runs on fewer CPUs than that (every process may use every CPU): a functional
# check of the script, not a measurement.
# Exit status: non-zero only when a run fails functionally. See docs/BENCHMARKS.md.
set -uo pipefail

SHARDS="1 2 4 8"
AGENT_CPUS=4
LG_CPUS=4
SESSIONS=8000
SECS=6
BIN=""
OUT=""
OVERCOMMIT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) SHARDS="$2"; shift 2 ;;
    --agent-cpus) AGENT_CPUS="$2"; shift 2 ;;
    --loadgen-cpus) LG_CPUS="$2"; shift 2 ;;
    --sessions) SESSIONS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --overcommit) OVERCOMMIT=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench/scale.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
if [ -z "$BIN" ]; then
  (cd "$ROOT" && cargo build --release -p clawterm -p loadgen --bins >&2) || exit 1
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
for b in clawtermd claw-agent loadgen; do
  [ -x "$BIN/$b" ] || { echo "bench/scale.sh: $BIN/$b missing" >&2; exit 1; }
done
NCPU=$(nproc)
MAXS=0
for s in $SHARDS; do [ "$s" -gt "$MAXS" ] && MAXS=$s; done
NEED=$((MAXS + AGENT_CPUS + LG_CPUS))
if [ "$NCPU" -lt "$NEED" ] && [ "$OVERCOMMIT" = 0 ]; then
  echo "bench/scale.sh: needs $NEED CPUs (up to $MAXS shards + $AGENT_CPUS for the echo pod + $LG_CPUS for loadgen), this machine has $NCPU" >&2
  exit 2
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clawterm-scale.XXXXXX")"
AGENT_SET="$MAXS-$((MAXS + AGENT_CPUS - 1))"
LG_SET="$((MAXS + AGENT_CPUS))-$((MAXS + AGENT_CPUS + LG_CPUS - 1))"
SRV_CPUS() { echo "0-$(($1 - 1))"; }
if [ "$NCPU" -lt "$NEED" ]; then
  AGENT_SET="0-$((NCPU - 1))"; LG_SET="0-$((NCPU - 1))"
  SRV_CPUS() { echo "0-$((NCPU - 1))"; }
  echo "[scale] --overcommit: $NCPU CPUs shared by everything; figures are not a measurement" >&2
fi
echo "[scale] $NCPU CPUs; shards on 0..; echo pod on CPUs $AGENT_SET; loadgen on $LG_SET; $SESSIONS sessions, ${SECS}s per run; $(uname -r)" >&2
FAILED=0
SRV=""; AG=""
cleanup() {
  for p in $SRV $AG; do kill -TERM "$p" 2>/dev/null; done
  for p in $SRV $AG; do wait "$p" 2>/dev/null; done
  SRV=""; AG=""
}
trap 'cleanup; rm -rf "$WORK"' EXIT

cpu_s() { # CPU seconds (user+system) of PID so far
  awk -v t="$(getconf CLK_TCK)" '{print ($14+$15)/t}' "/proc/$1/stat" 2>/dev/null || echo 0
}

for n in $SHARDS; do
  for scen in echo connect; do
    d="$WORK/$n-$scen"; mkdir -p "$d/sock"
    "$BIN/clawtermd" --shards "$n" --cpus "$(SRV_CPUS "$n")" --insecure-plaintext --no-quic \
      --insecure-no-auth --admin off --socket-dir "$d/sock" --bind 127.0.0.1 --port 0 \
      --max-conn-rate-per-ip 0 --max-pending-handshakes 100000 >"$d/server.log" 2>&1 &
    SRV=$!
    addr=$(wait_addr "$d/server.log" "listening on tcp" "$SRV")
    taskset -c "$AGENT_SET" "$BIN/claw-agent" -s "$d/sock" --tenant 1 --agent 1 echo \
      >"$d/agent.log" 2>&1 &
    AG=$!
    wait_socket "$d/sock/1_1"
    if [ -z "$addr" ] || [ ! -S "$d/sock/1_1" ]; then
      echo "[scale] $n shards: server or pod did not start" >&2; tail -3 "$d/server.log" >&2
      FAILED=1; cleanup; continue
    fi
    s0=$(cpu_s "$SRV"); a0=$(cpu_s "$AG")
    case "$scen" in
      echo) args=(echo --sessions "$SESSIONS" --rate 0 --duration "$SECS" --warmup 1) ;;
      connect) args=(connect --duration "$SECS" --inflight 256) ;;
    esac
    t0=$(date +%s.%N)
    taskset -c "$LG_SET" "$BIN/loadgen" "${args[@]}" --target "$addr" --server-pid "$SRV" \
      --workers "$LG_CPUS" --json "$d/out.json" >/dev/null 2>"$d/loadgen.err"
    rc=$?
    t1=$(date +%s.%N)
    s1=$(cpu_s "$SRV"); a1=$(cpu_s "$AG")
    cleanup
    if [ $rc -ne 0 ]; then
      echo "[scale] $n shards $scen: loadgen exit $rc" >&2; tail -3 "$d/loadgen.err" >&2
      FAILED=1; continue
    fi
    line=$(python3 - "$d/out.json" "$n" "$scen" "$s0" "$s1" "$a0" "$a1" "$t0" "$t1" <<'PY'
import json, sys
f, n, scen, s0, s1, a0, a1, t0, t1 = sys.argv[1:]
r = json.load(open(f))
wall = float(t1) - float(t0)
out = {"shards": int(n), "scenario": scen,
       "server_cpus_used": round((float(s1) - float(s0)) / wall, 2),
       "agent_cpus_used": round((float(a1) - float(a0)) / wall, 2)}
for k in ("achieved_rate", "sessions_per_second", "sessions_established", "latency_us", "client_cpu_fraction", "problems"):
    if k in r:
        out[k] = r[k]
print(json.dumps(out))
PY
)
    echo "$line"
    [ -n "$OUT" ] && echo "$line" >>"$OUT"
    echo "[scale] $line" >&2
  done
done
exit $FAILED
