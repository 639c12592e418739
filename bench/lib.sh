# Shared helpers for the bench scripts (sourced, not run).

# wait_addr LOG PREFIX PID [TRIES]: waits (TRIES x 50 ms, default 200) for a line
# "... PREFIX ADDR:PORT ..." in LOG while PID lives; prints ADDR:PORT, or nothing on failure.
wait_addr() {
  local log="$1" prefix="$2" pid="$3" tries="${4:-200}" addr=""
  for _ in $(seq 1 "$tries"); do
    addr=$(sed -n "s/.*${prefix} \([0-9.]*:[0-9]*\).*/\1/p" "$log" 2>/dev/null | head -1)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  printf '%s' "$addr"
}

# start_clawtermd LOG WHAT CMD...: starts CMD (a clawtermd command line) in the background,
# output in LOG, and waits for its TCP address: sets SRV_PID and SRV_ADDR, or says on stderr
# that WHAT's clawtermd did not start (with the end of LOG) and returns 1.
start_clawtermd() {
  local log="$1" what="$2"
  shift 2
  "$@" >"$log" 2>&1 &
  SRV_PID=$!
  SRV_ADDR=$(wait_addr "$log" "listening on tcp" "$SRV_PID")
  if [ -z "$SRV_ADDR" ]; then
    echo "$what: clawtermd did not start:" >&2
    tail -5 "$log" >&2
    return 1
  fi
}

# wait_socket PATH [TRIES]: waits (TRIES x 50 ms, default 200) for a Unix socket to appear.
wait_socket() {
  local path="$1" tries="${2:-200}"
  for _ in $(seq 1 "$tries"); do
    [ -S "$path" ] && return 0
    sleep 0.05
  done
  return 1
}
