"""The Python package against a real clawtermd and real `claw-agent shell` / `echo` pods."""

import asyncio
import shutil
import subprocess
import textwrap
import threading
import time

import pytest

import clawterm
from conftest import ECHO, SHELL, TENANT, TOKEN


def shell(addr, **kw):
    s = clawterm.Session.connect(addr, TENANT, SHELL, TOKEN, **kw)
    s.send("export PS1='ct$ '\n")
    s.expect(r"ct\$ $")
    return s


def test_run_returns_every_line_once_while_the_connection_is_cut_twice(proxy):
    s = shell(proxy.addr)
    cuts = []

    def cutter():
        # Two cuts while the output flows: after about 100 KB and 400 KB of its ~690 KB.
        start = s._s.received
        for mark in (100_000, 400_000):
            deadline = time.monotonic() + 60
            while s._s.received - start < mark and time.monotonic() < deadline:
                time.sleep(0.001)
            proxy.cut()
            cuts.append(s._s.received - start)

    t = threading.Thread(target=cutter)
    t.start()
    r = s.run("seq 1 100000", timeout=120)
    t.join()
    assert (r.status, r.lost) == (0, False)
    lines = r.output.splitlines()
    assert lines == [str(i) for i in range(1, 100001)], (len(lines), lines[:3], lines[-3:])
    assert len(cuts) == 2
    # Both cuts landed while the command ran: the session had reconnected twice by its end.
    assert proxy.accepted >= 3, proxy.accepted
    r = s.run("false")
    assert (r.output, r.status) == ("", 1)
    r = s.run("printf 'no newline'")
    assert (r.output, r.status) == ("no newline", 0)
    s.close()


def test_expect_waits_for_the_prompt(server):
    s = shell(server.addr)
    s.send("sleep 0.3; echo done-$((6*7))\n")
    m = s.expect(r"done-(\d+)", timeout=10)
    assert m.group(1) == "42"
    s.expect(r"ct\$ $")
    with pytest.raises(TimeoutError):
        s.expect("never printed", timeout=0.5)
    s.close()


DRAW = textwrap.dedent(
    """
    import curses, time
    def main(w):
        curses.curs_set(0)
        w.clear()
        w.addstr(0, 0, "clawterm screen test")
        w.addstr(5, 10, "row five, col ten")
        w.addstr(10, 3, "x" * 40)
        w.addstr(23, 60, "bottom right")
        w.move(12, 0); w.clrtoeol()
        w.refresh()
        time.sleep(30)
    curses.wrapper(main)
    """
)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_screen_after_a_full_screen_program_matches_tmux(server, tmp_path):
    prog = tmp_path / "draw.py"
    prog.write_text(DRAW)
    s = shell(server.addr, cols=80, rows=24)
    s.send(f"TERM=xterm python3 {prog}\n")
    deadline = time.monotonic() + 15
    while "bottom right" not in s.screen() and time.monotonic() < deadline:
        s.read(0.2)
    ours = s.screen()
    name = f"ct-{int(time.time() * 1000)}"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "24",
                    f"TERM=xterm python3 {prog}"], check=True)
    try:
        theirs = ""
        deadline = time.monotonic() + 15
        while "bottom right" not in theirs and time.monotonic() < deadline:
            time.sleep(0.2)
            theirs = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name])
    norm = lambda t: [l.rstrip() for l in t.rstrip("\n").split("\n")]
    a, b = norm(ours), norm(theirs)
    while a and not a[-1]:
        a.pop()
    while b and not b[-1]:
        b.pop()
    assert a == b, "\n".join(["ours:", *a, "tmux:", *b])
    s.send("\x03")
    s.close()


def test_resume_from_exported_credentials_with_exact_replay(server):
    s = clawterm.Session.connect(server.addr, TENANT, ECHO, TOKEN)
    s.send("one;")
    s.expect("one;")
    s.send("two;")
    time.sleep(0.3)  # echoed while nobody reads
    creds = s.detach()
    r = clawterm.Session.resume(creds)
    r.expect("two;")
    r.send("three;")
    r.expect("three;")
    assert "one;" not in r._text
    r.close()


def test_errors_are_exceptions():
    with pytest.raises(ValueError):
        clawterm.Session.connect("127.0.0.1:1", 1, 1, "zz")
    with pytest.raises(clawterm.ClawtermError):
        clawterm.Session.connect("127.0.0.1:1", 1, 1, "00" * 32)
    with pytest.raises(clawterm.ClawtermError):
        clawterm.Session.resume("{not json")


def test_take_over_raises_in_the_old_session(server):
    a = clawterm.Session.connect(server.addr, TENANT, ECHO, TOKEN)
    b = clawterm.Session.resume(a.export())
    b.send("mine")
    b.expect("mine")
    with pytest.raises(clawterm.TakenOver):
        for _ in range(50):
            a.read(0.1)
    b.close()


def test_asyncio_runs_100_sessions_at_once(server):
    async def one(i):
        async with await clawterm.AsyncSession.connect(server.addr, TENANT, ECHO, TOKEN) as s:
            await s.send(f"hello {i};")
            await s.expect(f"hello {i};", timeout=30)
            return i

    async def main():
        return await asyncio.gather(*(one(i) for i in range(100)))

    assert sorted(asyncio.run(main())) == list(range(100))
