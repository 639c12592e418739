#!/usr/bin/env python3
"""Benchmark history and dashboard for ClawTerm (standard library only).

  render.py record RUN_DIR --profile P --history bench/history.jsonl [--failed JSON]
            [--seconds S] [--ios "uring epoll"] [--placement TEXT]
      Summarises the loadgen JSON files of one bench/run.sh run (and state_figures.json, the
      state dir and live upgrade figures) into one JSON line appended to the history file (and
      prints it), with every goal of the benchmark issues (6, 14) next to the figure measured
      for it (met / not met; not evaluated where the run is smaller than the goal's setting).
  render.py goals RECORD_JSON
      Prints the goals of one recorded run (the JSON line `record` printed) as text.
  render.py quick RECORD_JSON
      Prints the quick profile's table (RSS per idle session, closed-loop echo rate).
  render.py render --history bench/history.jsonl --out bench/dashboard.html
      Writes a self-contained HTML dashboard (inline SVG, no network fetches).
"""

import argparse
import datetime
import html
import json
import os
import platform
import subprocess
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pick(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def read_first(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def host_info():
    info = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "somaxconn": (read_first("/proc/sys/net/core/somaxconn") or [None])[0],
        "tcp_max_syn_backlog": (read_first("/proc/sys/net/ipv4/tcp_max_syn_backlog") or [None])[0],
        "ip_local_port_range": " ".join(read_first("/proc/sys/net/ipv4/ip_local_port_range") or []),
        "tcp_tw_reuse": (read_first("/proc/sys/net/ipv4/tcp_tw_reuse") or [None])[0],
    }
    try:
        import resource

        info["nofile_soft_hard"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    except Exception:  # pragma: no cover
        pass
    return info


def git_rev(root):
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except Exception:
        return None


def cores(d, srv_cpu, lg_cpu):
    """How busy the server's and loadgen's CPUs were during a run (loadgen's `cpus`)."""
    out = {}
    for c in d.get("cpus") or []:
        for name, n in (("server_core", srv_cpu), ("loadgen_core", lg_cpu)):
            if n is not None and c.get("cpu") == n:
                out[name] = {k: c.get(k) for k in ("busy", "user", "system", "softirq", "steal")}
    return out


def summarize(kind, d, srv_cpu=None, lg_cpu=None):
    """The figures of one loadgen result that the history keeps."""
    if d is None:
        return {"missing": True}
    s = {"ok": d.get("ok"), "problems": d.get("problems", [])[:5]}
    s.update(cores(d, srv_cpu, lg_cpu))
    lat = lambda k: {q: pick(d, k, q) for q in ("p50", "p90", "p99", "p999", "max")}
    if kind == "idle":
        s.update(sessions=d.get("sessions_established"),
                 rss_bytes_per_session=d.get("server_rss_bytes_per_session"),
                 rss_before=d.get("server_rss_before_bytes"), rss_after=d.get("server_rss_after_bytes"),
                 open_per_s=d.get("open_sessions_per_second"),
                 handshake_us=lat("handshake_us"))
        # One shard pinned to one CPU: sessions held per server core.
        s["sessions_per_core"] = d.get("sessions_alive_at_end")
    elif kind == "connect":
        s.update(per_s=d.get("sessions_per_second"), completed=d.get("sessions_completed"),
                 handshake_us=lat("handshake_us"), server_cpu=d.get("server_cpu_fraction"))
    elif kind in ("echo", "echo_closed"):
        s.update(sessions=d.get("sessions_established"), target_rate=d.get("target_rate"),
                 rate=d.get("achieved_rate"), latency_us=lat("latency_us"),
                 send_lag_us=lat("send_lag_us"), ack_delay_ms=pick(d, "params", "ack_delay_ms"),
                 server_cpu=d.get("server_cpu_fraction"), client_cpu=d.get("client_cpu_fraction"))
        # Round trips per second of the server core's busy time (its softirq included): the
        # server's own cost, whichever side limited the rate.
        busy = pick(s, "server_core", "busy")
        if s.get("rate") and busy:
            s["per_server_core_second"] = round(s["rate"] / busy)
    elif kind in ("resume", "resume_paced"):
        s.update(sessions=d.get("resumed"), per_s=d.get("resumes_per_second"),
                 mode=pick(d, "params", "resume_mode"), resume_rate=pick(d, "params", "resume_rate"),
                 resumed_us=lat("resume_resumed_us"), first_replay_us=lat("resume_first_replay_us"))
    elif kind in ("resume_cross", "resume_cross_paced"):
        s.update(sessions=d.get("resumed"),
                 mode=pick(d, "params", "resume_mode"), resume_rate=pick(d, "params", "resume_rate"),
                 same_port_resumed_us=lat("same_port_resumed_us"),
                 cross_port_resumed_us=lat("cross_port_resumed_us"),
                 same_port_first_replay_us=lat("same_port_first_replay_us"),
                 cross_port_first_replay_us=lat("cross_port_first_replay_us"),
                 shard_split={k: v for k, v in (d.get("shard_split") or {}).items() if k != "method"},
                 predicted_owner_shards=d.get("predicted_owner_shards"))
    elif kind == "bulk":
        s.update(mb_s=d.get("bulk_mb_s"), bulk_sessions=d.get("bulk_sessions"),
                 probe_sessions=d.get("probe_sessions"),
                 probe_rtt_us={q: pick(d, "probe_rtt_us", q) for q in ("p50", "p90", "p99", "max")})
    if d.get("transport") not in (None, "tcp"):
        s["transport"] = d.get("transport")
    return s


def summarize_state(d):
    """The figures of one state_figures run (bench/src/bin/state_figures.rs) that the history
    keeps: live upgrades under busy and idle load, SIGKILL + restart, the state dir's cost."""
    if d is None:
        return {"missing": True}
    s = {"ok": d.get("ok"), "problems": (d.get("problems") or [])[:5], "params": d.get("params"),
         "placement": d.get("placement")}
    lat = lambda h: {q: pick(h, q) for q in ("count", "p50", "p99", "max")}
    for k in ("busy_upgrade", "idle_upgrade"):
        u = d.get(k)
        if not isinstance(u, dict):
            continue
        s[k] = {
            "sessions": u.get("sessions"),
            "upgrades": len(u.get("upgrades") or []),
            "start_to_old_exit_ms": lat(pick(u, "upgrade", "start_to_old_exit_ms")),
            "start_to_listening_ms": lat(pick(u, "upgrade", "start_to_listening_ms")),
            "frozen_ms": lat(pick(u, "upgrade", "frozen_ms")),
            "took_ms": lat(pick(u, "upgrade", "took_ms")),
            "pause_p99_ms": u.get("pause_p99_ms"),
            "pause_max_ms": u.get("pause_max_ms"),
            "session_max_latency_us": lat(u.get("session_max_latency_us")),
            "latency_us": lat(u.get("latency_us") or u.get("probe_latency_us")),
            "lost": u.get("lost", u.get("probe_lost")),
            "refused_connects": pick(u, "probes", "tcp_refused_or_failed"),
            "tcp_connects_during_upgrades": pick(u, "probes", "tcp_connects_during_upgrades"),
            "new_sessions_failed": pick(u, "probes", "new_sessions_failed"),
            "new_session_ms": lat(pick(u, "probes", "new_session_ms")),
        }
        if k == "idle_upgrade":
            s[k]["alive_at_end"] = u.get("sessions_alive_at_end")
        else:
            s[k]["rate_total_per_s"] = u.get("rate_total_per_s")
    k = d.get("kill_restart")
    if isinstance(k, dict):
        s["kill_restart"] = {x: k.get(x) for x in (
            "sessions", "restored", "fold_ms", "start_to_listening_ms", "start_to_all_resumed_ms",
            "resume_failures", "pending_bytes_expected", "pending_bytes_replayed", "bytes_lost",
            "bytes_duplicated")}
        s["kill_restart"]["resume_ms"] = lat(k.get("resume_ms"))
    c = d.get("cost")
    if isinstance(c, dict):
        e, r = c.get("echo_closed_loop") or {}, c.get("rss_per_idle_session") or {}
        s["cost"] = {
            "echo_sessions": e.get("sessions"),
            "echo_rate_without": e.get("median_without"), "echo_rate_with": e.get("median_with"),
            "echo_ratio": e.get("ratio_of_medians"), "echo_median_pair_ratio": e.get("median_pair_ratio"),
            "echo_rate_reps": {"without": e.get("rate_without"), "with": e.get("rate_with")},
            "rss_sessions": r.get("sessions"),
            "rss_bytes_without": r.get("median_without"), "rss_bytes_with": r.get("median_with"),
            "rss_bytes_difference": r.get("difference"),
            "rss_parts_per_session": r.get("rss_parts_per_session"),
            "state_dir_allocated_bytes": r.get("state_dir_allocated_bytes"),
        }
    return s


def closed_reps(run_dir, io, sm):
    """The closed-loop echo reps of one backend, in run order ({io}.echo_closed.N.json)."""
    out, n = [], 1
    while os.path.exists(os.path.join(run_dir, f"{io}.echo_closed.{n}.json")):
        out.append(sm("echo_closed", f"{io}.echo_closed.{n}"))
        n += 1
    if not out:  # a single run (older layout, or every rep failed to start)
        out.append(sm("echo_closed", f"{io}.echo_closed"))
    return out


def median_rep(reps):
    """The rep with the median rate, with every rep's rate alongside."""
    ok = [r for r in reps if isinstance(r.get("rate"), (int, float))]
    if not ok:
        return reps[0] if reps else {"missing": True}
    ok.sort(key=lambda r: r["rate"])
    m = dict(ok[(len(ok) - 1) // 2])
    m["rate_reps"] = [r.get("rate") for r in reps]
    return m


def paired_ratio(a, b, key):
    """Median over reps of a[i][key] / b[i][key] (each uring rep against the epoll rep next
    to it in time)."""
    rs = sorted(x for x in (ratio(pick(u, key), pick(e, key)) for u, e in zip(a, b)) if x is not None)
    if not rs:
        return None
    mid = len(rs) // 2
    return rs[mid] if len(rs) % 2 else round((rs[mid - 1] + rs[mid]) / 2, 3)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def record(a):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ios = a.ios.split()
    sm = lambda kind, name: summarize(kind, load(os.path.join(a.run_dir, f"{name}.json")),
                                      a.server_cpu, a.loadgen_cpu)
    res = {}
    for io in ios:
        res[io] = {k: sm(k, f"{io}.{k}")
                   for k in ("idle", "connect", "echo", "resume", "resume_paced")}
    # Closed-loop echo: CLOSED_REPS runs per backend, taking turns (bench/run.sh).
    reps = {io: closed_reps(a.run_dir, io, sm) for io in ios}
    for io in ios:
        res[io]["echo_closed"] = median_rep(reps[io])
    res["raw"] = {k: sm(k, f"raw.{k}") for k in ("echo", "echo_closed")}
    for k in ("resume_cross", "resume_cross_paced"):
        res[k] = sm(k, k)
    res["tls"] = {"idle": sm("idle", "tls.idle")}
    res["quic"] = {k: sm(k, f"quic.{k}") for k in ("idle", "echo")}
    # Frame size: bulk output next to keystroke echoes, --max-send-payload 16384 vs 65535, the
    # median rep (by bulk throughput) of each, with every rep's figures alongside.
    bulk = {}
    for fs in ("16384", "65535"):
        reps_fs, n = [], 1
        while os.path.exists(os.path.join(a.run_dir, f"bulk.{fs}.{n}.json")):
            reps_fs.append(sm("bulk", f"bulk.{fs}.{n}"))
            n += 1
        ok = sorted((r for r in reps_fs if isinstance(r.get("mb_s"), (int, float))),
                    key=lambda r: r["mb_s"])
        if ok:
            m = dict(ok[(len(ok) - 1) // 2])
            m["mb_s_reps"] = [r.get("mb_s") for r in reps_fs]
            m["probe_p99_reps"] = [pick(r, "probe_rtt_us", "p99") for r in reps_fs]
            bulk[fs] = m
    if bulk:
        res["bulk"] = bulk
    # The state dir and live upgrade figures (state_figures, issue 14), when the run had them.
    if os.path.exists(os.path.join(a.run_dir, "state_figures.json")):
        res["state"] = summarize_state(load(os.path.join(a.run_dir, "state_figures.json")))

    g = lambda *k: pick(res, *k)
    ratios = {}
    if "uring" in res and "epoll" in res:
        ratios["uring_over_epoll"] = {
            "echo_closed_rate": paired_ratio(reps["uring"], reps["epoll"], "rate"),
            "echo_closed_per_server_core_second": paired_ratio(reps["uring"], reps["epoll"],
                                                               "per_server_core_second"),
            "echo_closed_rate_per_rep": [ratio(pick(u, "rate"), pick(e, "rate"))
                                         for u, e in zip(reps["uring"], reps["epoll"])],
            "echo_p50": ratio(g("uring", "echo", "latency_us", "p50"), g("epoll", "echo", "latency_us", "p50")),
            "echo_p99": ratio(g("uring", "echo", "latency_us", "p99"), g("epoll", "echo", "latency_us", "p99")),
            "connect_rate": ratio(g("uring", "connect", "per_s"), g("epoll", "connect", "per_s")),
            "rss_per_session": ratio(g("uring", "idle", "rss_bytes_per_session"),
                                     g("epoll", "idle", "rss_bytes_per_session")),
            "resume_p50": ratio(g("uring", "resume", "resumed_us", "p50"), g("epoll", "resume", "resumed_us", "p50")),
        }
    for io in ios:
        ratios[f"{io}_over_raw"] = {
            "echo_closed_rate": ratio(g(io, "echo_closed", "rate"), g("raw", "echo_closed", "rate")),
            "echo_p50": ratio(g(io, "echo", "latency_us", "p50"), g("raw", "echo", "latency_us", "p50")),
            "echo_p99": ratio(g(io, "echo", "latency_us", "p99"), g("raw", "echo", "latency_us", "p99")),
        }
    failed = json.loads(a.failed) if a.failed else []
    goals = evaluate_goals(a.profile, ios, res, ratios)
    line = {
        "ts": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": a.profile,
        "git": git_rev(root),
        "host": host_info(),
        "loadavg_at_start": " ".join((read_first(os.path.join(a.run_dir, "loadavg.start")) or [])[:3]),
        "seconds": a.seconds,
        "ok": not failed,
        "failed": failed,
        "placement": a.placement,
        "results": res,
        "ratios": ratios,
        "goals": goals,
    }
    if a.note:
        line["note"] = a.note
    with open(a.history, "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    print(json.dumps(line, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------
# Goals (issues 6 and 14): each next to the figure measured for it.

def _delta(a, b):
    return None if a is None or b is None else a - b


def goal_table(ios):
    """(id, goal, comparison, target, unit, figure(res, ratios), applies(profile, res))."""
    io = ios[0] if ios else "uring"
    full = lambda p, r: p == "full"
    def echo_setting(p, r):
        return (p == "full" and pick(r, io, "echo", "target_rate") == 50000
                and pick(r, io, "echo", "sessions") == 10000)
    return [
        ("idle_sessions", f"live idle sessions on one shard, all answering keepalives ({io})", ">=", 19000, "",
         lambda r, q: pick(r, io, "idle", "sessions_per_core"), full),
        ("idle_bytes", f"server RSS per idle session ({io}, 19,000 sessions)", "<=", 1024, " B",
         lambda r, q: pick(r, io, "idle", "rss_bytes_per_session"), full),
        ("connect_rate", f"new sessions per second on one shard, pod OPEN included ({io})", ">=", 20000, "/s",
         lambda r, q: pick(r, io, "connect", "per_s"), full),
        ("echo_rate", f"echo round trips per second, 10,000 sessions, closed loop ({io})", ">=", 100000, "/s",
         lambda r, q: pick(r, io, "echo_closed", "rate"), full),
        ("echo_p99_half_rate", f"echo p99 at 50,000/s open loop, 10,000 sessions ({io})", "<=", 500, " µs",
         lambda r, q: pick(r, io, "echo", "latency_us", "p99"), echo_setting),
        ("uring_over_epoll", "io_uring / epoll closed-loop echo throughput (median of the paired reps)", ">=", 1.2, "×",
         lambda r, q: pick(q, "uring_over_epoll", "echo_closed_rate"), full),
        ("uring_over_epoll_per_core", "the same per busy second of the server core (softirq included)",
         ">=", 1.2, "×", lambda r, q: pick(q, "uring_over_epoll", "echo_closed_per_server_core_second"), full),
        ("server_over_raw", f"server / raw TCP echo closed-loop throughput ({io})", ">=", 0.5, "×",
         lambda r, q: pick(q, f"{io}_over_raw", "echo_closed_rate"), full),
        ("resume_p99_burst", f"resume 10,000, p99 to RESUMED, burst of 256 in flight ({io})", "<=", 2000, " µs",
         lambda r, q: pick(r, io, "resume", "resumed_us", "p99"), full),
        ("resume_p99_paced", f"resume 10,000, p99 to RESUMED, paced ({io})", "<=", 2000, " µs",
         lambda r, q: pick(r, io, "resume_paced", "resumed_us", "p99"), full),
        ("cross_shard_extra_p50", "cross-shard minus same-shard resume, median, paced (2 shards)", "<=", 20, " µs",
         lambda r, q: _delta(pick(r, "resume_cross_paced", "cross_port_resumed_us", "p50"),
                             pick(r, "resume_cross_paced", "same_port_resumed_us", "p50")), full),
        ("tls_idle_bytes", "server RSS per idle TLS session", "<=", 16384, " B",
         lambda r, q: pick(r, "tls", "idle", "rss_bytes_per_session"), full),
        # Issue 14: sessions across restarts and live upgrades (state_figures).
        ("upgrade_pause_busy", "live upgrade under 2,000 busy echo sessions: p99 over sessions of "
         "each one's longest echo wait", "<=", 50, " ms",
         lambda r, q: pick(r, "state", "busy_upgrade", "pause_p99_ms"),
         lambda p, r: (pick(r, "state", "busy_upgrade", "sessions") or 0) >= 2000),
        ("upgrade_pause_idle", "live upgrade with 10,000 idle sessions: p99 pause of the echo probes",
         "<=", 50, " ms", lambda r, q: pick(r, "state", "idle_upgrade", "pause_p99_ms"),
         lambda p, r: (pick(r, "state", "idle_upgrade", "sessions") or 0) >= 10000),
        ("upgrade_refused", "connects refused during live upgrades (busy and idle)", "<=", 0, "",
         lambda r, q: _sum(pick(r, "state", "busy_upgrade", "refused_connects"),
                           pick(r, "state", "idle_upgrade", "refused_connects")),
         lambda p, r: pick(r, "state", "busy_upgrade") is not None),
        ("kill_all_resumed", "SIGKILL + restart, 10,000 sessions: new process's start to every "
         "session RESUMEd", "<=", 1000, " ms",
         lambda r, q: pick(r, "state", "kill_restart", "start_to_all_resumed_ms"),
         lambda p, r: (pick(r, "state", "kill_restart", "sessions") or 0) >= 10000),
        ("kill_bytes_lost", "SIGKILL + restart: bytes of pending output lost", "<=", 0, " B",
         lambda r, q: pick(r, "state", "kill_restart", "bytes_lost"),
         lambda p, r: pick(r, "state", "kill_restart") is not None),
        ("state_echo_ratio", "closed-loop echo with / without a state dir (1 shard, same run)", ">=", 0.95, "×",
         lambda r, q: pick(r, "state", "cost", "echo_ratio"), full),
        ("state_idle_bytes", "server RSS per idle session, with minus without a state dir", "<=", 64, " B",
         lambda r, q: pick(r, "state", "cost", "rss_bytes_difference"),
         lambda p, r: (pick(r, "state", "cost", "rss_sessions") or 0) >= 10000),
    ]


def _sum(*xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) if xs else None


def evaluate_goals(profile, ios, res, ratios):
    out = []
    for gid, text, cmp, target, unit, figure, applies in goal_table(ios):
        try:
            v = figure(res, ratios)
        except Exception:
            v = None
        ok = applies(profile, res)
        met = None
        if ok and isinstance(v, (int, float)):
            met = v >= target if cmp == ">=" else v <= target
        note = "" if ok else f"not evaluated: the {profile} profile does not run the goal's setting"
        if ok and v is None:
            note = "not measured in this run"
        out.append({"id": gid, "goal": text, "target": f"{cmp} {fmt(target)}{unit}",
                    "measured": v, "unit": unit.strip(), "met": met, "note": note})
    return out


def print_goals(a):
    """The goals of a recorded run as text (bench/run.sh prints them at the end)."""
    line = load(a.record_json) or {}
    print(f"[bench] goals ({line.get('profile')} profile, load average at start "
          f"{line.get('loadavg_at_start')}):")
    for g in line.get("goals", []):
        met = {True: "met", False: "NOT MET"}.get(g["met"], "n/a")
        m = g["measured"]
        ms = "–" if m is None else (f"{m:,.3g}" if isinstance(m, float) and m < 10 else f"{m:,.0f}")
        print(f"  {met:8s} {g['goal']}: {ms} {g['unit']} (target {g['target']})"
              + (f" [{g['note']}]" if g.get("note") else ""))


# ------------------------------------------------------------------------------------------
# Dashboard

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, (list, tuple)):
        return " / ".join(fmt(x) for x in v)
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
    return f"{int(v):,}"


def chart(title, runs, series, unit="", log=False, w=560, h=230):
    """An inline SVG line chart: one point per run, one line per series."""
    rows = (len(series) + 3) // 4
    h = h + 12 * (rows - 1)
    pad_l, pad_r, pad_t, pad_b = 62, 12, 26, 34 + 12 * rows
    pts = []
    for name, fn in series:
        vals = []
        for r in runs:
            try:
                v = fn(r)
            except Exception:
                v = None
            vals.append(v if isinstance(v, (int, float)) and (v > 0 or not log) else None)
        pts.append((name, vals))
    allv = [v for _, vs in pts for v in vs if v is not None]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    if not allv:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    import math
    lo, hi = min(allv), max(allv)
    if log:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        if hi <= lo:
            hi = lo + 1
        tr = lambda v: math.log10(v)
    else:
        lo = 0 if lo >= 0 else lo
        hi = hi * 1.1 if hi > 0 else 1
        tr = lambda v: v
    n = len(runs)
    xw = w - pad_l - pad_r
    yh = h - pad_t - pad_b
    X = lambda i: pad_l + (xw / 2 if n == 1 else xw * i / (n - 1))
    Y = lambda v: pad_t + yh - (tr(v) - lo) / ((hi - lo) or 1) * yh
    out.append(f'<rect x="{pad_l}" y="{pad_t}" width="{xw}" height="{yh}" fill="none" stroke="#ccc"/>')
    for k in range(5):
        t = lo + (hi - lo) * k / 4
        val = 10 ** t if log else t
        y = pad_t + yh - yh * k / 4
        out.append(f'<line x1="{pad_l}" x2="{pad_l + xw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{fmt(val)}{unit}</text>')
    step = max(1, n // 6)
    for i, r in enumerate(runs):
        if i % step == 0 or i == n - 1:
            out.append(f'<text x="{X(i):.1f}" y="{pad_t + yh + 14}" text-anchor="middle" font-size="9">'
                       f'{html.escape(r["ts"][5:16].replace("T", " "))}</text>')
    for si, (name, vals) in enumerate(pts):
        c = COLORS[si % len(COLORS)]
        seg = []
        for i, v in enumerate(vals):
            if v is None:
                if len(seg) > 1:
                    out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{" ".join(seg)}"/>')
                seg = []
                continue
            seg.append(f"{X(i):.1f},{Y(v):.1f}")
            out.append(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="2.6" fill="{c}">'
                       f'<title>{html.escape(name)} {html.escape(runs[i]["ts"])}: {fmt(v)}{unit}</title></circle>')
        if len(seg) > 1:
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{" ".join(seg)}"/>')
        lx = pad_l + 4 + (si % 4) * 125
        ly = h - 12 * rows + 6 + (si // 4) * 12
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{c}"/>'
                   f'<text x="{lx + 14}" y="{ly - 4}" font-size="10">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def G(*keys):
    return lambda r: pick(r, *keys)


def profile_section(profile, runs):
    ios = [io for io in ("uring", "epoll") if any(io in r.get("results", {}) for r in runs)]
    charts = []
    charts.append(chart("Idle sessions held per server core (1 shard)", runs,
                        [(io, G("results", io, "idle", "sessions_per_core")) for io in ios]))
    charts.append(chart("Server RSS per idle session (log)", runs,
                        [(io, G("results", io, "idle", "rss_bytes_per_session")) for io in ios] +
                        [("TLS", G("results", "tls", "idle", "rss_bytes_per_session")),
                         ("QUIC", G("results", "quic", "idle", "rss_bytes_per_session"))],
                        unit=" B", log=True))
    charts.append(chart("Echo throughput, closed loop (round trips/s)", runs,
                        [(io, G("results", io, "echo_closed", "rate")) for io in ios] +
                        [("raw TCP echo", G("results", "raw", "echo_closed", "rate"))]))
    ser = []
    for name in ios + ["raw"]:
        for q in ("p50", "p99", "p999"):
            ser.append((f"{name} {q}", G("results", name, "echo", "latency_us", q)))
    charts.append(chart("Echo latency at a fixed open-loop rate (µs, log)", runs, ser, log=True))
    charts.append(chart("Server core busy in the closed-loop echo (softirq included)", runs,
                        [(io, G("results", io, "echo_closed", "server_core", "busy")) for io in ios] +
                        [(f"{io} softirq", G("results", io, "echo_closed", "server_core", "softirq")) for io in ios] +
                        [(f"loadgen core ({io} run)", G("results", io, "echo_closed", "loadgen_core", "busy"))
                         for io in ios]))
    charts.append(chart("New sessions per second (connect + close)", runs,
                        [(io, G("results", io, "connect", "per_s")) for io in ios]))
    ser = []
    for io in ios:
        ser += [(f"{io} burst p50", G("results", io, "resume", "resumed_us", "p50")),
                (f"{io} burst p99", G("results", io, "resume", "resumed_us", "p99")),
                (f"{io} paced p50", G("results", io, "resume_paced", "resumed_us", "p50")),
                (f"{io} paced p99", G("results", io, "resume_paced", "resumed_us", "p99"))]
    charts.append(chart("Time to RESUMED from reconnect (µs, log)", runs, ser, log=True))
    ser = [("same-shard p50", G("results", "resume_cross_paced", "same_port_resumed_us", "p50")),
           ("cross-shard p50", G("results", "resume_cross_paced", "cross_port_resumed_us", "p50")),
           ("same-shard p99", G("results", "resume_cross_paced", "same_port_resumed_us", "p99")),
           ("cross-shard p99", G("results", "resume_cross_paced", "cross_port_resumed_us", "p99"))]
    charts.append(chart("Same- vs cross-shard resume, paced, 2 shards (µs, log)", runs, ser, log=True))
    ser = [("uring/epoll closed-loop rate", G("ratios", "uring_over_epoll", "echo_closed_rate")),
           ("uring/epoll per server-core second", G("ratios", "uring_over_epoll", "echo_closed_per_server_core_second")),
           ("uring/epoll echo p99", G("ratios", "uring_over_epoll", "echo_p99"))]
    charts.append(chart("uring / epoll ratios", runs, ser))
    ser = [(f"{fs} B frames {q}", G("results", "bulk", fs, "probe_rtt_us", q))
           for fs in ("16384", "65535") for q in ("p50", "p99")]
    charts.append(chart("Keystroke echo next to bulk output, by DATA frame size (µs, log)", runs, ser, log=True))
    charts.append(chart("Bulk output next to keystroke echoes, by DATA frame size (MB/s)", runs,
                        [(f"{fs} B frames", G("results", "bulk", fs, "mb_s")) for fs in ("16384", "65535")]))
    ser = []
    for io in ios:
        ser += [(f"{io}/raw closed-loop rate", G("ratios", f"{io}_over_raw", "echo_closed_rate")),
                (f"{io}/raw echo p99", G("ratios", f"{io}_over_raw", "echo_p99"))]
    charts.append(chart("server / raw TCP echo ratios", runs, ser, log=True))
    # Issue 14 (state_figures): live upgrades, SIGKILL + restart, the state dir's cost (only
    # once a run of this profile has them).
    st = lambda *k: G("results", "state", *k)
    if any(isinstance(pick(r, "results", "state"), dict) for r in runs):
        charts.append(chart("Live upgrade: longest echo wait per session, p99 and max (ms, log)", runs,
                            [("busy p99", st("busy_upgrade", "pause_p99_ms")),
                             ("busy max", st("busy_upgrade", "pause_max_ms")),
                             ("idle probes p99", st("idle_upgrade", "pause_p99_ms")),
                             ("idle probes max", st("idle_upgrade", "pause_max_ms"))], unit=" ms", log=True))
        charts.append(chart("Live upgrade: new process's start to the old one's exit, and frozen (ms, max)", runs,
                            [("busy start→old exit", st("busy_upgrade", "start_to_old_exit_ms", "max")),
                             ("idle start→old exit", st("idle_upgrade", "start_to_old_exit_ms", "max")),
                             ("busy frozen", st("busy_upgrade", "frozen_ms", "max")),
                             ("idle frozen", st("idle_upgrade", "frozen_ms", "max"))], unit=" ms"))
        charts.append(chart("SIGKILL + restart: start to listening and to every session RESUMEd (ms)", runs,
                            [("start→listening", st("kill_restart", "start_to_listening_ms")),
                             ("start→all resumed", st("kill_restart", "start_to_all_resumed_ms")),
                             ("journal fold", st("kill_restart", "fold_ms"))], unit=" ms"))
        charts.append(chart("State dir cost: closed-loop echo, 1 shard, same run (round trips/s)", runs,
                            [("without state dir", st("cost", "echo_rate_without")),
                             ("with state dir", st("cost", "echo_rate_with"))]))
        charts.append(chart("State dir cost: server RSS per idle session (B)", runs,
                            [("without state dir", st("cost", "rss_bytes_without")),
                             ("with state dir", st("cost", "rss_bytes_with"))], unit=" B"))

    last = runs[-1]
    rows = []
    for io in ios + ["raw", "tls", "quic"]:
        r = pick(last, "results", io) or {}
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in [
            io,
            fmt(pick(r, "idle", "sessions_per_core")),
            fmt(pick(r, "idle", "rss_bytes_per_session")),
            fmt(pick(r, "connect", "per_s")),
            fmt(pick(r, "echo_closed", "rate")),
            f'{fmt(pick(r, "echo", "rate"))} / {fmt(pick(r, "echo", "target_rate"))}',
            " / ".join(fmt(pick(r, "echo", "latency_us", q)) for q in ("p50", "p90", "p99", "p999", "max")),
            " / ".join(fmt(pick(r, "resume", "resumed_us", q)) for q in ("p50", "p99")),
            " / ".join(fmt(pick(r, "resume_paced", "resumed_us", q)) for q in ("p50", "p99")),
            " / ".join(fmt(pick(r, "resume", "first_replay_us", q)) for q in ("p50", "p99")),
        ]) + "</tr>")
    goal_rows = "".join(
        f'<tr><td style="text-align:left">{html.escape(g["goal"])}</td><td>{html.escape(g["target"])}</td>'
        f'<td>{fmt(g["measured"])}{(" " + html.escape(g["unit"])) if g["unit"] and g["measured"] is not None else ""}</td>'
        f'<td class="{ {True: "met", False: "miss"}.get(g["met"], "na") }">'
        f'{ {True: "met", False: "not met"}.get(g["met"], "–") }</td>'
        f'<td style="text-align:left">{html.escape(g.get("note", ""))}</td></tr>'
        for g in last.get("goals", []))
    goals_html = (f'<table><tr><th>goal (issues 6, 14)</th><th>target</th><th>measured</th><th></th><th>note</th></tr>'
                  f'{goal_rows}</table>') if goal_rows else "<p>No goals recorded for this run.</p>"
    state_html = state_table(pick(last, "results", "state"))
    rat = pick(last, "ratios") or {}
    rat_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(kk)}</td><td>{fmt(vv)}</td></tr>"
                       for k, v in rat.items() for kk, vv in v.items())
    status = "ok" if last.get("ok") else "FAILED: " + "; ".join(last.get("failed", []))
    hist_rows = "".join(
        f'<tr><td>{html.escape(r["ts"])}</td><td>{html.escape(str(r.get("git")))}</td>'
        f'<td>{"ok" if r.get("ok") else "FAILED: " + html.escape("; ".join(r.get("failed", [])))}</td>'
        f'<td>{fmt(r.get("seconds"))} s</td><td>{html.escape(str(r.get("loadavg_at_start", "")))}</td>'
        f'<td style="text-align:left">{html.escape(r.get("note", ""))}</td></tr>'
        for r in reversed(runs[-20:]))
    return f"""
<h2>Profile <code>{html.escape(profile)}</code> — {len(runs)} run(s)</h2>
<p>Latest: {html.escape(last["ts"])}, git {html.escape(str(last.get("git")))}, {status};
load average at start {html.escape(str(last.get("loadavg_at_start")))};
placement: {html.escape(str(last.get("placement") or "server shard on CPU 0, loadgen on CPU 1, echo pod unpinned"))};
host {html.escape(json.dumps(last.get("host", {})))}</p>
<h3>Goals, latest run</h3>
{goals_html}
<h3>Figures, latest run</h3>
<table><tr><th>server</th><th>idle sessions / core</th><th>RSS B / idle session</th>
<th>connects / s</th><th>closed-loop echo / s</th><th>open-loop achieved / target</th>
<th>echo µs p50 / p90 / p99 / p99.9 / max</th><th>RESUMED µs p50 / p99, burst</th>
<th>RESUMED µs p50 / p99, paced</th><th>1st replay µs p50 / p99, burst</th></tr>
{"".join(rows)}</table>
{state_html}
<div class="charts">{"".join(f'<div>{c}</div>' for c in charts)}</div>
<details><summary>Ratios of the latest run</summary><table>{rat_rows}</table></details>
<details><summary>Runs</summary><table><tr><th>time (UTC)</th><th>git</th><th>status</th><th>wall</th><th>load avg at start</th><th>note</th></tr>{hist_rows}</table></details>
"""


def state_table(st):
    """The latest run's state dir and live upgrade figures (state_figures), as a table."""
    if not isinstance(st, dict) or st.get("missing"):
        return ""
    rows = []
    for k, name in (("busy_upgrade", "live upgrade, busy echo sessions"),
                    ("idle_upgrade", "live upgrade, idle sessions (+ echo probes)")):
        u = st.get(k)
        if not isinstance(u, dict):
            continue
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in [
            html.escape(name), fmt(u.get("sessions")), fmt(u.get("upgrades")),
            " / ".join(fmt(pick(u, "start_to_old_exit_ms", q)) for q in ("p50", "max")),
            " / ".join(fmt(pick(u, "frozen_ms", q)) for q in ("p50", "max")),
            f'{fmt(u.get("pause_p99_ms"))} / {fmt(u.get("pause_max_ms"))}',
            fmt(u.get("lost")), fmt(u.get("refused_connects")),
        ]) + "</tr>")
    up = ""
    if rows:
        up = ("<table><tr><th>live upgrade</th><th>sessions</th><th>upgrades</th>"
              "<th>start→old exit ms p50 / max</th><th>frozen ms p50 / max</th>"
              "<th>pause ms p99 / max (per-session longest echo wait)</th><th>echoes lost</th>"
              "<th>connects refused</th></tr>" + "".join(rows) + "</table>")
    k = st.get("kill_restart")
    kill = ""
    if isinstance(k, dict):
        kill = ("<table><tr><th>SIGKILL + restart</th><th>restored</th><th>start→listening ms</th>"
                "<th>journal fold ms</th><th>start→all RESUMEd ms</th><th>resume failures</th>"
                "<th>pending bytes</th><th>bytes lost</th><th>bytes duplicated</th></tr><tr>"
                + "".join(f"<td>{fmt(k.get(x))}</td>" for x in (
                    "sessions", "restored", "start_to_listening_ms", "fold_ms",
                    "start_to_all_resumed_ms", "resume_failures", "pending_bytes_expected",
                    "bytes_lost", "bytes_duplicated")) + "</tr></table>")
    c = st.get("cost")
    cost = ""
    if isinstance(c, dict):
        cost = ("<table><tr><th>state dir cost</th><th>closed-loop echo/s without / with</th>"
                "<th>ratio (medians; median pair)</th><th>RSS B/idle session without / with</th>"
                "<th>difference</th><th>state dir allocated</th></tr><tr><td>1 shard</td>"
                f'<td>{fmt(c.get("echo_rate_without"))} / {fmt(c.get("echo_rate_with"))}</td>'
                f'<td>{fmt(c.get("echo_ratio"))}; {fmt(c.get("echo_median_pair_ratio"))}</td>'
                f'<td>{fmt(c.get("rss_bytes_without"))} / {fmt(c.get("rss_bytes_with"))}</td>'
                f'<td>{fmt(c.get("rss_bytes_difference"))}</td>'
                f'<td>{fmt(c.get("state_dir_allocated_bytes"))} B</td></tr></table>')
    status = "ok" if st.get("ok") else "FAILED: " + html.escape("; ".join(st.get("problems") or []))
    return (f"<h3>Sessions across restarts and live upgrades, latest run (state_figures: {status})</h3>"
            f"<p>{html.escape(str(st.get('placement') or ''))}; "
            f"{html.escape(json.dumps(st.get('params') or {}))}</p>{up}{kill}{cost}")


def render(a):
    runs = []
    try:
        with open(a.history) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        runs.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    by = {}
    for r in runs:
        by.setdefault(r.get("profile", "?"), []).append(r)
    sections = "".join(profile_section(p, rs) for p, rs in sorted(by.items(), key=lambda x: x[0] != "full"))
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ClawTerm benchmarks</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f4f4f4; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.charts div {{ border: 1px solid #eee; }}
td.met {{ background: #dff0d8; }}
td.miss {{ background: #f2dede; }}
td.na {{ color: #888; }}
svg text {{ font-family: system-ui, sans-serif; }}
</style></head><body>
<h1>ClawTerm benchmarks</h1>
<p>Generated {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} from
<code>bench/history.jsonl</code> by <code>bench/render.py</code>. One shard (<code>clawtermd --shards 1
--cpus 0</code>) with its echo agent pod on the same CPU, loadgen pinned to CPU 1, loopback, plaintext
(TLS and QUIC rows say so). Smoke and full profiles use different
session counts and are charted separately; compare runs within one profile only. How to read this:
<code>docs/BENCHMARKS.md</code>.</p>
{sections or "<p>No runs recorded yet: run <code>bash bench/run.sh --profile smoke</code>.</p>"}
</body></html>
"""
    with open(a.out, "w") as f:
        f.write(doc)
    print(f"wrote {a.out} ({len(runs)} runs)", file=sys.stderr)


def print_quick(a):
    """The quick profile's table (bench/run.sh --profile quick): RSS per idle session and
    closed-loop echo round trips per second through one shard, per backend."""
    line = load(a.record_json) or {}
    res = line.get("results", {})
    print(f"quick figures: {line.get('placement')}; load average at start {line.get('loadavg_at_start')}")
    print(f"{'io':<6} {'idle sessions':>13} {'open/s':>8} {'hs p50/p99 ms':>14} {'server B/sess':>13}"
          f" {'echo sessions':>13} {'echoes/s':>9} {'p50/p99 ms':>12} {'server core busy':>16}")
    fmt = lambda v, f="{:,.0f}": "–" if v is None else f.format(v)
    ms = lambda v: "–" if v is None else f"{v / 1000:.2f}"
    for io in (k for k in ("uring", "epoll") if k in res):
        i, e = res[io].get("idle") or {}, res[io].get("echo_closed") or {}
        print(f"{io:<6} {fmt(i.get('sessions')):>13} {fmt(i.get('open_per_s')):>8}"
              f" {ms(pick(i, 'handshake_us', 'p50')) + '/' + ms(pick(i, 'handshake_us', 'p99')):>14}"
              f" {fmt(i.get('rss_bytes_per_session')):>13} {fmt(e.get('sessions')):>13}"
              f" {fmt(e.get('rate')):>9}"
              f" {ms(pick(e, 'latency_us', 'p50')) + '/' + ms(pick(e, 'latency_us', 'p99')):>12}"
              f" {fmt(pick(e, 'server_core', 'busy'), '{:.2f}'):>16}")
    if line.get("failed"):
        print(f"FAILED: {', '.join(line['failed'])}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("run_dir")
    r.add_argument("--profile", required=True)
    r.add_argument("--history", required=True)
    r.add_argument("--failed", default="[]")
    r.add_argument("--seconds", type=int, default=None)
    r.add_argument("--ios", default="uring epoll")
    r.add_argument("--placement", default=None)
    r.add_argument("--note", default="")
    r.add_argument("--server-cpu", type=int, default=None, help="the CPU the server shard ran on")
    r.add_argument("--loadgen-cpu", type=int, default=None, help="the CPU loadgen ran on")
    g = sub.add_parser("goals")
    g.add_argument("record_json")
    q = sub.add_parser("quick")
    q.add_argument("record_json")
    d = sub.add_parser("render")
    d.add_argument("--history", required=True)
    d.add_argument("--out", required=True)
    a = p.parse_args()
    if a.cmd == "record":
        record(a)
    elif a.cmd == "goals":
        print_goals(a)
    elif a.cmd == "quick":
        print_quick(a)
    else:
        render(a)


if __name__ == "__main__":
    main()
