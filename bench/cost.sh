#!/usr/bin/env bash
# Per-round-trip cost of the echo path, component by component (docs/BENCHMARKS.md, "Where
# the time goes").
#
#   bash bench/cost.sh perf IO SESSIONS RATE [SECS [LOADGEN-ARGS...]]   # RATE 0 = closed loop
#   bash bench/cost.sh callgrind COMPONENT [SESSIONS]   # COMPONENT: server | agent | loadgen
#
# perf: starts clawtermd (1 shard, CPU 0, --io IO) with its echo pod on CPU 0 and runs a loadgen
# echo on CPU 1; over 3 s in the middle of the run it counts, per process, CPU time
# (perf cpu-clock, which includes the softirq work a process does), system calls and context
# switches, and system-wide TCP segments sent, each divided by the round trips in those 3 s.
# Needs perf with tracepoints (root). Wall-clock figures: noisy on a shared machine.
#
# callgrind: runs a closed-loop echo (epoll server, default 100 sessions) with one component
# under valgrind's callgrind, once for 2 s and once for 6 s, and prints the component's
# user-space instructions per round trip as (Ir6 - Ir2) / (echoes6 - echoes2), which cancels
# start-up and the handshakes. Repeatable under load; counts no kernel work. (io_uring does
# not run under valgrind 3.19, hence epoll.)
#
# Binaries come from target/release (build first: cargo build --release -p clawterm -p loadgen
# --bins), or from $BIN.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
BIN="${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
MODE="${1:-}"
[ -n "$MODE" ] || { sed -n '2,21p' "$0"; exit 2; }
shift
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clawterm-cost.XXXXXX")"
PIDS=()
cleanup() { for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

# serve DIR IO [WRAP...]: clawtermd (+ WRAP, e.g. valgrind) and a pinned echo pod; sets ADDR.
serve() {
  local d="$1" io="$2"; shift 2
  mkdir -p "$d/sock"
  "$@" "$BIN/clawtermd" --shards 1 --cpus 0 --io "$io" --insecure-plaintext --insecure-no-auth \
    --admin off --no-quic --socket-dir "$d/sock" --bind 127.0.0.1 --port 0 >"$d/srv.log" 2>&1 &
  SRV=$!; PIDS+=("$SRV")
  ADDR=$(wait_addr "$d/srv.log" "listening on tcp" "$SRV" 600)
  [ -n "$ADDR" ] || { echo "clawtermd did not start: $(tail -3 "$d/srv.log")" >&2; exit 1; }
}
agent() {
  local d="$1"; shift
  "$@" "$BIN/claw-agent" -s "$d/sock" --tenant 1 --agent 1 echo >"$d/agent.log" 2>&1 &
  AGENT=$!; PIDS+=("$AGENT")
  wait_socket "$d/sock/1_1" 600 && return 0
  echo "the echo pod did not start" >&2; exit 1
}
stop() { kill -INT "$SRV" 2>/dev/null; kill -TERM "$AGENT" 2>/dev/null; wait "$SRV" "$AGENT" 2>/dev/null; }

case "$MODE" in
perf)
  IO="${1:?IO}"; N="${2:?SESSIONS}"; RATE="${3:?RATE}"; SECS="${4:-8}"; shift 4 2>/dev/null || shift $#
  d="$WORK/run"; serve "$d" "$IO"; agent "$d" taskset -c 0
  echo "load average: $(cat /proc/loadavg)"
  taskset -c 1 "$BIN/loadgen" echo --sessions "$N" --rate "$RATE" --duration "$SECS" --warmup 1 \
    "$@" --target "$ADDR" --server-pid "$SRV" --json "$d/out.json" >/dev/null 2>"$d/lg.err" &
  LG=$!; PIDS+=("$LG")
  for _ in $(seq 1 1200); do grep -q "echoes measured=[1-9]" "$d/lg.err" && break; sleep 0.1; done
  sleep 1
  W=$(pgrep -P "$LG" | head -1)
  grep -E '^Tcp:' /proc/net/snmp | tail -1 >"$d/snmp0"
  for p in "$SRV" "$AGENT" "$W"; do
    perf stat -x, -e cpu-clock,raw_syscalls:sys_enter,context-switches -p "$p" -o "$d/perf.$p" -- sleep 3 &
  done
  wait $(jobs -p | grep -v -e "^$SRV\$" -e "^$AGENT\$" -e "^$LG\$") 2>/dev/null
  grep -E '^Tcp:' /proc/net/snmp | tail -1 >"$d/snmp1"
  wait "$LG"
  stop
  python3 - "$d" "$SRV" "$AGENT" "$W" <<'PY'
import json, sys
d, srv, agent, w = sys.argv[1:5]
v = json.load(open(f"{d}/out.json"))
rate = v.get("achieved_rate") or 0
lat = v.get("latency_us", {})
print(f"echo {v.get('mode')}: {rate:,.0f} round trips/s, latency p50/p99/p99.9 "
      f"{lat.get('p50')}/{lat.get('p99')}/{lat.get('p999')} us, ok={v.get('ok')}")
n = rate * 3
hdr = [l for l in open('/proc/net/snmp') if l.startswith('Tcp:')][0].split()
a, b = open(f"{d}/snmp0").read().split(), open(f"{d}/snmp1").read().split()
i = hdr.index('OutSegs')
print(f"TCP segments sent per round trip (system-wide): {(int(b[i]) - int(a[i])) / max(n, 1):.2f}")
for name, p in (("clawtermd", srv), ("claw-agent", agent), ("loadgen", w)):
    vals = {}
    try:
        for line in open(f"{d}/perf.{p}"):
            f = line.strip().split(',')
            if len(f) > 3 and f[0][:1].isdigit():
                vals[f[2]] = float(f[0])
    except OSError:
        continue
    ms = vals.get('cpu-clock', 0)
    print(f"  {name:10s} CPU {ms / 30:5.1f} %   {ms * 1000 / max(n, 1):6.2f} us/round trip   "
          f"{vals.get('raw_syscalls:sys_enter', 0) / max(n, 1):5.2f} syscalls   "
          f"{vals.get('context-switches', 0) / max(n, 1):5.3f} context switches")
PY
  ;;
callgrind)
  COMP="${1:?COMPONENT}"; N="${2:-100}"
  command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }
  echo "load average: $(cat /proc/loadavg)"
  for secs in 2 6; do
    d="$WORK/cg$secs"; mkdir -p "$d"
    vg=(valgrind --tool=callgrind --trace-children=yes "--callgrind-out-file=$d/cg.%p.out")
    s=(); a=(); l=()
    case "$COMP" in server) s=("${vg[@]}") ;; agent) a=("${vg[@]}") ;; loadgen) l=("${vg[@]}") ;;
      *) echo "COMPONENT: server, agent or loadgen" >&2; exit 2 ;; esac
    serve "$d" epoll "${s[@]+"${s[@]}"}"; agent "$d" "${a[@]+"${a[@]}"}"
    "${l[@]+"${l[@]}"}" "$BIN/loadgen" echo --sessions "$N" --rate 0 --duration "$secs" --warmup 0 \
      --target "$ADDR" --json "$d/out.json" >/dev/null 2>"$d/lg.err"
    stop
    sleep 1
  done
  python3 - "$WORK" "$COMP" <<'PY'
import glob, json, sys
work, comp = sys.argv[1:3]
def ir(d):
    t = 0
    for f in glob.glob(f"{d}/cg.*.out"):
        for line in open(f):
            if line.startswith("summary:"):
                t += int(line.split()[1])
                break
    return t
r = {s: (ir(f"{work}/cg{s}"), json.load(open(f"{work}/cg{s}/out.json"))["counts"].get("received", 0))
     for s in (2, 6)}
(i2, n2), (i6, n6) = r[2], r[6]
print(f"{comp}: {(i6 - i2) / max(n6 - n2, 1):,.0f} instructions (Ir) per round trip "
      f"({i6 - i2:,} Ir over {n6 - n2:,} round trips)")
PY
  ;;
*) sed -n '2,21p' "$0"; exit 2 ;;
esac
