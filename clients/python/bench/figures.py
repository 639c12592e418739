"""Python binding figures (issue 17), against one real clawtermd (release) and its echo pod:

- echo round trips per second (32 bytes, one at a time) and bulk MB/s (64 KiB writes, 1 MiB
  in flight) through the Python binding and through the Rust client library
  (`target/release/client_echo`), alternating, in the same run: the ratio is the binding's cost;
- memory per idle session in the Python process (RSS growth over N sessions, measured first);
- bulk MB/s again with ``screen=False`` (no VT emulator): what the binding itself costs.

    cargo build --release -p clawterm --bins && cargo build --release -p clawterm-bench --bin client_echo
    target/pyvenv/bin/python clients/python/bench/figures.py [--secs 3] [--reps 3] [--idle 500]

Prints a JSON summary (and the table for docs/BENCHMARKS.md on stderr).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("CLAWTERM_BIN_DIR", str(HERE.parents[2] / "target" / "release"))

import clawterm  # noqa: E402
from conftest import ECHO, TENANT, TOKEN, Server  # noqa: E402


def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def py_rtt(addr, secs):
    s = clawterm.Session.connect(addr, TENANT, ECHO, TOKEN)
    msg = b"x" * 32
    n, t0 = 0, time.monotonic()
    end = t0 + secs
    while time.monotonic() < end:
        s.send(msg)
        got = 0
        while got < len(msg):
            got += len(s.read(10))
        n += 1
    dt = time.monotonic() - t0
    s.close()
    return n / dt


def py_bulk(addr, secs, screen=True):
    s = clawterm.Session.connect(addr, TENANT, ECHO, TOKEN, screen=screen)
    chunk = b"y" * 65536
    sent = got = 0
    t0 = time.monotonic()
    end = t0 + secs
    while time.monotonic() < end:
        while sent - got < 1 << 20:
            s.send(chunk)
            sent += len(chunk)
        got += len(s.read(10))
    while got < sent:
        got += len(s.read(10))
    dt = time.monotonic() - t0
    s.close()
    return got / dt / 1e6


def rust(addr, mode, secs):
    exe = Path(os.environ["CLAWTERM_BIN_DIR"]) / "client_echo"
    out = subprocess.run([str(exe), addr, str(TENANT), str(ECHO), TOKEN, mode, str(secs)],
                         capture_output=True, text=True, check=True).stdout
    v = json.loads(out)
    return v["count"] / v["secs"] if mode == "rtt" else v["bytes"] / v["secs"] / 1e6


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=int, default=500)
    a = ap.parse_args()
    srv = Server()
    try:
        # Idle sessions first, in a process that has not allocated for the echo runs yet.
        before = rss_kib()
        idle = [clawterm.Session.connect(srv.addr, TENANT, ECHO, TOKEN) for _ in range(a.idle)]
        after = rss_kib()
        for s in idle:
            s.close()
        res = {"rtt": {"py": [], "rust": []}, "bulk": {"py": [], "rust": []}, "bulk_noscreen": {"py": [], "rust": []}}
        for rep in range(a.reps):
            for mode, f in (("rtt", py_rtt), ("bulk", py_bulk), ("bulk_noscreen", lambda ad, s: py_bulk(ad, s, False))):
                res[mode]["rust"].append(rust(srv.addr, "rtt" if mode == "rtt" else "bulk", a.secs))
                res[mode]["py"].append(f(srv.addr, a.secs))
                print(f"rep {rep + 1}: {mode} python {res[mode]['py'][-1]:.1f} rust {res[mode]['rust'][-1]:.1f}", file=sys.stderr)
    finally:
        srv.stop()
    out = {
        "figures": "python",
        "round_trips_per_s": {"python": median(res["rtt"]["py"]), "rust": median(res["rtt"]["rust"])},
        "bulk_mb_per_s": {"python": median(res["bulk"]["py"]), "rust": median(res["bulk"]["rust"])},
        "bulk_mb_per_s_without_screen": {"python": median(res["bulk_noscreen"]["py"]), "rust": median(res["bulk_noscreen"]["rust"])},
        "idle_sessions": a.idle,
        "python_rss_kib_per_idle_session": (after - before) / a.idle,
    }
    out["round_trips_ratio"] = out["round_trips_per_s"]["python"] / out["round_trips_per_s"]["rust"]
    out["bulk_ratio"] = out["bulk_mb_per_s"]["python"] / out["bulk_mb_per_s"]["rust"]
    out["bulk_ratio_without_screen"] = (out["bulk_mb_per_s_without_screen"]["python"]
                                        / out["bulk_mb_per_s_without_screen"]["rust"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
