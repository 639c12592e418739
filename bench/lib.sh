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

# wait_socket PATH [TRIES]: waits (TRIES x 50 ms, default 200) for a Unix socket to appear.
wait_socket() {
  local path="$1" tries="${2:-200}"
  for _ in $(seq 1 "$tries"); do
    [ -S "$path" ] && return 0
    sleep 0.05
  done
  return 1
}
