#!/usr/bin/env bash
# Shell sessions at scale: N sessions of `claw-agent shell` opened through a real clawtermd, and
# (when tmux is installed) N detached tmux sessions side by side, with the same shell.
#
#   bash bench/shells.sh N [--bin DIR] [--agent-bin PATH] [--window W] [--shell PATH]
#                          [--no-tmux] [--out FILE]
#
# claw-agent: `loadgen shells` opens the sessions (at most W opening or unanswered at a time,
# default 16), types `echo READY_$((i+0))` into each and waits for `READY_i`; it reports the
# time until every shell answered, the answer rate over the first and the last 10 % of the
# sessions, and from /proc: the pod's descriptors, threads and memory maps per session and the
# PSS (smaps_rollup) of the pod and every process under it (its shells), per session.
# tmux: `tmux -L NAME -f /dev/null new-session -d` N times in a row (each returns once the
# server has started the shell), the same rates, then the PSS of the tmux server and its shells.
# Both sides run SHELL (default /bin/bash) as a login shell with HOME an empty directory.
# Prints one JSON line per side (to --out too). Everything it starts is stopped at the end
# (shells included). --bin: where clawtermd, claw-agent and loadgen are (default: a release
# build); --agent-bin: another claw-agent (e.g. an older build, for a before/after).
# See docs/BENCHMARKS.md ("Shell sessions").
set -uo pipefail

N="${1:-}"
case "$N" in
  ''|*[!0-9]*) sed -n '2,17p' "$0"; exit 2 ;;
esac
shift
BIN=""
AGENT_BIN=""
WINDOW=16
SHELL_PATH=/bin/bash
TMUX_TOO=1
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --agent-bin) AGENT_BIN="$2"; shift 2 ;;
    --window) WINDOW="$2"; shift 2 ;;
    --shell) SHELL_PATH="$2"; shift 2 ;;
    --no-tmux) TMUX_TOO=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench/shells.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$N" -lt 1 ] || [ "$N" -gt 9000 ]; then
  echo "bench/shells.sh: N must be in 1..9000 (one pod, one descriptor limit)" >&2
  exit 2
fi

# Every session takes a PTY out of the machine's kernel.pty.max (4096 by default), shared with
# everyone else on it: keep 256 free.
if [ -r /proc/sys/kernel/pty/max ] && [ -r /proc/sys/kernel/pty/nr ]; then
  PTY_FREE=$(( $(cat /proc/sys/kernel/pty/max) - $(cat /proc/sys/kernel/pty/nr) - 256 ))
  if [ "$N" -gt "$PTY_FREE" ]; then
    echo "bench/shells.sh: $N sessions need $N PTYs; only $PTY_FREE are free (kernel.pty.max $(cat /proc/sys/kernel/pty/max), $(cat /proc/sys/kernel/pty/nr) in use, 256 kept for others)" >&2
    exit 2
  fi
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
if [ -z "$BIN" ]; then
  (cd "$ROOT" && cargo build --release -p clawterm -p loadgen --bins >&2) || exit 1
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
[ -n "$AGENT_BIN" ] || AGENT_BIN="$BIN/claw-agent"
for b in "$BIN/clawtermd" "$AGENT_BIN" "$BIN/loadgen"; do
  [ -x "$b" ] || { echo "bench/shells.sh: $b missing" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/clawterm-shells.XXXXXX")"
SRV_PID=""
AGENT_PID=""
TMUX_SOCK="clawbench$$"
# Shells started by the pod (recorded before the pod stops: they outlive it if it dies).
SHELL_PIDS=()

stop_all() {
  if [ -n "$AGENT_PID" ]; then
    mapfile -t SHELL_PIDS < <(pgrep -P "$AGENT_PID" 2>/dev/null)
    kill -TERM "$AGENT_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
    AGENT_PID=""
  fi
  if [ -n "$SRV_PID" ]; then
    kill -TERM "$SRV_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SRV_PID" 2>/dev/null
    wait "$SRV_PID" 2>/dev/null
    SRV_PID=""
  fi
  # The pod hangs its shells up when it stops; whatever is left after 3 s is killed.
  if [ "${#SHELL_PIDS[@]}" -gt 0 ]; then
    for _ in $(seq 1 30); do
      local left=0
      for p in "${SHELL_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && left=1 && break; done
      [ "$left" = 0 ] && break
      sleep 0.1
    done
    kill -KILL "${SHELL_PIDS[@]}" 2>/dev/null
    SHELL_PIDS=()
  fi
  if command -v tmux >/dev/null 2>&1; then
    tmux -L "$TMUX_SOCK" kill-server 2>/dev/null
  fi
}
trap 'stop_all; rm -rf "$RUN_DIR"' EXIT
trap 'exit 130' INT TERM

emit() {
  echo "$1"
  [ -n "$OUT" ] && echo "$1" >>"$OUT"
}

# --- claw-agent shell behind clawtermd ---------------------------------------------------------
mkdir -p "$RUN_DIR/sock" "$RUN_DIR/home"
# Both sides' shells start with an empty HOME (no ~/.profile or ~/.bashrc of whoever runs the
# bench: a .bashrc that runs pyenv, say, costs more than everything measured here), the same
# TERM and the system-wide startup files only.
export HOME="$RUN_DIR/home" TERM=xterm-256color
start_clawtermd "$RUN_DIR/clawtermd.log" bench/shells.sh \
  "$BIN/clawtermd" --shards 1 --io epoll --insecure-plaintext --no-quic --insecure-no-auth \
  --admin off --socket-dir "$RUN_DIR/sock" --bind 127.0.0.1 --port 0 \
  --max-sessions 100000 --max-conn-rate-per-ip 0 || exit 1
RUST_LOG=warn "$AGENT_BIN" -s "$RUN_DIR/sock" --tenant 1 --agent 1 shell --shell "$SHELL_PATH" \
  >"$RUN_DIR/claw-agent.log" 2>&1 &
AGENT_PID=$!
if ! wait_socket "$RUN_DIR/sock/1_1"; then
  echo "bench/shells.sh: the shell pod's socket did not appear" >&2
  tail -5 "$RUN_DIR/claw-agent.log" >&2
  exit 1
fi
echo "[shells] claw-agent shell ($AGENT_BIN, $SHELL_PATH): $N sessions, window $WINDOW" >&2
"$BIN/loadgen" shells --target "$SRV_ADDR" --sessions "$N" --window "$WINDOW" \
  --agent-pid "$AGENT_PID" --server-pid "$SRV_PID" --json "$RUN_DIR/claw.json" >/dev/null
LG_RC=$?
if [ -s "$RUN_DIR/claw.json" ]; then
  emit "$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$RUN_DIR/claw.json" 2>/dev/null || tr -d '\n' <"$RUN_DIR/claw.json")"
fi
grep -E "WARN|ERROR" "$RUN_DIR/claw-agent.log" | sort | uniq -c | sort -rn | head -5 >&2
stop_all

# --- tmux --------------------------------------------------------------------------------------
if [ "$TMUX_TOO" = 1 ] && command -v tmux >/dev/null 2>&1; then
  echo "[shells] tmux $(tmux -V | cut -d' ' -f2) ($SHELL_PATH): $N detached sessions" >&2
  export SHELL="$SHELL_PATH"
  now() { date +%s.%N; }
  tenth=$(( N / 10 )); [ "$tenth" -ge 1 ] || tenth=1
  T0=$(now); T_FIRST=""; T_LAST_FROM=""
  TMUX_FAIL=""
  for i in $(seq 1 "$N"); do
    if ! tmux -L "$TMUX_SOCK" -f /dev/null new-session -d -s "s$i" -x 80 -y 24 2>"$RUN_DIR/tmux.err"; then
      TMUX_FAIL="session $i: $(head -1 "$RUN_DIR/tmux.err")"
      break
    fi
    [ "$i" = "$tenth" ] && T_FIRST=$(now)
    [ "$i" = $(( N - tenth )) ] && T_LAST_FROM=$(now)
  done
  T_END=$(now)
  [ -n "$T_LAST_FROM" ] || T_LAST_FROM=$T0
  # The last shell answers (it was started; is it up?).
  tmux -L "$TMUX_SOCK" send-keys -t "s$N" "echo READY_\$(($N+0))" Enter 2>/dev/null
  T_ANS=""
  for _ in $(seq 1 100); do
    if tmux -L "$TMUX_SOCK" capture-pane -p -t "s$N" 2>/dev/null | grep -q "^READY_$N\$"; then
      T_ANS=$(now); break
    fi
    sleep 0.05
  done
  sleep 2
  TPID=$(tmux -L "$TMUX_SOCK" display-message -p '#{pid}' 2>/dev/null)
  STATS=""
  if [ -n "$TPID" ]; then
    # PSS of the server and every process under it, KiB.
    STATS=$(python3 - "$TPID" <<'EOF'
import os, sys
root = int(sys.argv[1])
kids = {}
for d in os.listdir('/proc'):
    if not d.isdigit():
        continue
    try:
        st = open(f'/proc/{d}/stat').read()
    except OSError:
        continue
    ppid = int(st.rsplit(') ', 1)[1].split()[1])
    kids.setdefault(ppid, []).append(int(d))
todo, tree = [root], []
while todo:
    p = todo.pop(); tree.append(p); todo.extend(kids.get(p, []))
def pss(p):
    try:
        for l in open(f'/proc/{p}/smaps_rollup'):
            if l.startswith('Pss:'):
                return int(l.split()[1])
    except OSError:
        pass
    return 0
fds = len(os.listdir(f'/proc/{root}/fd'))
thr = len(os.listdir(f'/proc/{root}/task'))
print(f'{sum(pss(p) for p in tree)} {pss(root)} {len(tree) - 1} {fds} {thr}')
EOF
)
  fi
  read -r TREE_PSS SRV_PSS PROCS FDS THR <<<"${STATS:-0 0 0 0 0}"
  emit "$(python3 - "$N" "$T0" "$T_FIRST" "$T_LAST_FROM" "$T_END" "${T_ANS:-}" "$TREE_PSS" "$SRV_PSS" "$PROCS" "$FDS" "$THR" "$TMUX_FAIL" "$tenth" <<'EOF'
import json, sys
n, t0, tf, tl, te, ta, tree, srv, procs, fds, thr, fail, tenth = sys.argv[1:]
n, tenth = int(n), int(tenth)
t0, te = float(t0), float(te)
tf = float(tf) if tf else te
tl = float(tl)
made = n if not fail else 0
print(json.dumps({
  "tool": "tmux", "scenario": "shells", "ok": not fail and bool(ta), "sessions": n,
  "all_started_s": te - t0,
  "last_answered_s": (float(ta) - t0) if ta else None,
  "rate_overall_per_s": n / (te - t0) if te > t0 else 0,
  "rate_first_10pct_per_s": tenth / (tf - t0) if tf > t0 else 0,
  "rate_last_10pct_per_s": tenth / (te - tl) if te > tl else 0,
  "server": {"pss_kib": int(srv), "fds": int(fds), "threads": int(thr), "descendants": int(procs)},
  "per_session": {"tree_pss_kib": int(tree) / n, "server_fds": int(fds) / n,
                   "server_threads": int(thr) / n, "processes": int(procs) / n},
  "failure": fail or None,
}))
EOF
)"
  tmux -L "$TMUX_SOCK" kill-server 2>/dev/null
fi
exit "$LG_RC"
