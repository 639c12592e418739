"""Fixtures: a real clawtermd (plaintext) with `claw-agent shell` (agent 1) and
`claw-agent echo` (agent 2), and a TCP proxy in front of it that the tests can cut.
Binaries: $CLAWTERM_BIN_DIR or the workspace's target/debug."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BINS = Path(os.environ.get("CLAWTERM_BIN_DIR", REPO / "target" / "debug"))
TENANT = 7
TOKEN = "ab" * 32
SHELL, ECHO = 1, 2


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWTERM")}
    env.update(extra)
    return env


def _agent(sock, agent, mode):
    p = subprocess.Popen(
        [str(BINS / "claw-agent"), "-s", sock, "--tenant", str(TENANT), "--agent", str(agent), *mode],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=_env(RUST_LOG="warn", SHELL="/bin/sh", HOME=tempfile.gettempdir()),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = p.stdout.readline().decode()
        if "listening on" in line:
            return p
        if p.poll() is not None:
            break
    p.kill()
    raise RuntimeError("claw-agent did not start")


class Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ct-py-")
        sock = os.path.join(self.dir, "sock")
        os.mkdir(sock)
        tokens = os.path.join(self.dir, "tokens")
        with open(tokens, "w") as f:
            f.write(f"{TENANT} {TOKEN}\n")
        self.agents = [_agent(sock, SHELL, ["shell"]), _agent(sock, ECHO, ["echo"])]
        self.proc = subprocess.Popen(
            [str(BINS / "clawtermd"), "--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext",
             "--tokens", tokens, "--socket-dir", sock, "--admin", "off", "--no-quic", "--no-ws",
             "--shards", "2",
             # A full replay ring pauses the agent instead of dropping its oldest output: what
             # a program that must see every line runs (the default, drop, reports a GAP).
             "--overflow", "pause"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(RUST_LOG="info"),
        )
        deadline = time.monotonic() + 10
        self.addr = None
        while time.monotonic() < deadline and self.addr is None:
            line = self.proc.stderr.readline().decode()
            m = re.search(r"listening on tcp (\S+)", line)
            if m:
                self.addr = m.group(1)
        if self.addr is None:
            self.stop()
            raise RuntimeError("clawtermd did not start")
        # Keep draining its log so it never blocks on a full pipe.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self):
        for p in [self.proc, *self.agents]:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """A TCP proxy to the server whose connections `cut()` resets."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.conns = []
        #: Connections accepted so far (a reconnect is one more).
        self.accepted = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            with self.lock:
                self.conns += [c, u]
                self.accepted += 1
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self):
        self.lsock.close()
        self.cut()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def proxy(server):
    p = Proxy(server.addr)
    yield p
    p.close()
