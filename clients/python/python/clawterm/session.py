"""The Python layer over ``clawterm._native.Session``: text, ``run``, ``expect``, asyncio."""

from __future__ import annotations

import asyncio
import codecs
import re
import secrets
import time
from dataclasses import dataclass
from typing import Optional, Pattern, Union

from . import _native


@dataclass(frozen=True)
class RunResult:
    """What :meth:`Session.run` returns."""

    #: The command's output (terminal line endings normalised to ``\\n``).
    output: str
    #: Its exit status.
    status: int
    #: Output was lost while the connection was down (the server's replay ring overflowed
    #: under ``--overflow drop``, its default): ``output`` then lacks part of what was printed.
    lost: bool = False


class Session:
    """A ClawTerm session (see the module's documentation).

    Make one with :meth:`connect` or :meth:`resume`. Text read from the session accumulates in
    a buffer that :meth:`expect` and :meth:`run` consume; :meth:`read` returns raw bytes.
    """

    def __init__(self, native: _native.Session) -> None:
        self._s = native
        # Text received and not yet consumed by expect/run: chunks, joined only when searched,
        # and bounded (the newest TEXT_LIMIT characters are kept).
        self._chunks: list = []
        self._size = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # -- making one ----------------------------------------------------------------------
    @classmethod
    def connect(
        cls, endpoint: str, tenant: int, agent: int, token: str, cols: int = 80, rows: int = 24,
        screen: bool = True,
    ) -> "Session":
        """A new session at ``endpoint`` (``HOST:PORT``, ``tls://HOST:PORT?ca=FILE``, ...).
        ``screen=False`` skips the VT emulator behind :meth:`screen` (bulk output)."""
        return cls(_native.Session.connect(endpoint, tenant, agent, token, cols, rows, screen))

    @classmethod
    def resume(cls, credentials: str, cols: int = 80, rows: int = 24, screen: bool = True) -> "Session":
        """Resume a session from :meth:`export` / :meth:`detach` credentials (JSON)."""
        return cls(_native.Session.resume(credentials, cols, rows, screen))

    # -- bytes ---------------------------------------------------------------------------
    def send(self, data: Union[str, bytes]) -> None:
        """Input for the agent (queued while down, resent until the server has it)."""
        self._s.send(data)

    def read(self, timeout: Optional[float] = None) -> bytes:
        """Raw output received since the last read (``b""`` if none came within ``timeout``)."""
        data = self._s.read(timeout)
        self._add_text(data)
        return data

    #: Most text kept for :meth:`expect` when nothing consumes it (characters).
    TEXT_LIMIT = 16 << 20

    def _add_text(self, data: bytes) -> None:
        # An incremental decoder keeps a UTF-8 sequence split across reads for the next one.
        t = self._decoder.decode(data)
        if t:
            self._chunks.append(t)
            self._size += len(t)
            while self._size > self.TEXT_LIMIT and len(self._chunks) > 1:
                self._size -= len(self._chunks.pop(0))

    @property
    def _text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _consume(self, upto: int) -> None:
        rest = self._text[upto:]
        self._chunks = [rest] if rest else []
        self._size = len(rest)

    # -- the terminal as a tool ------------------------------------------------------------
    def screen(self) -> str:
        """The rendered terminal screen (rows joined by ``\\n``), from a VT emulator fed by
        everything received so far."""
        return self._s.screen()

    def cursor(self) -> tuple:
        """The cursor's (row, col), 0-based."""
        return self._s.cursor()

    def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 10.0) -> "re.Match[str]":
        """Wait until the text received (since the last match) matches ``pattern``; returns the
        match and consumes the text up to its end. Raises ``TimeoutError`` with what came."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._text)
            if m:
                self._consume(m.end())
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{rx.pattern!r} not seen within {timeout} s; received: {self._text[-500:]!r}")
            self.read(min(left, 1.0))

    def run(self, command: str, timeout: float = 60.0) -> RunResult:
        """Run ``command`` in the session's shell; return its output and exit status.

        The output is exactly what the command printed (terminal line endings normalised to
        ``\\n``), taken between two markers the shell prints around it, so the shell's echo of
        the line and its prompts are not part of it. The session may
        lose its connection any number of times meanwhile: nothing is lost or repeated.
        """
        self.take_gap()
        tag = secrets.token_hex(6)
        # printf with %s so the shell's echo of this line never looks like the markers.
        # One line, so no prompt comes between the command and the END marker.
        begin_cmd = f"printf '\\n__CT_%s_{tag}__\\n' BEGIN"
        end_cmd = f"printf '__CT_%s_{tag}_%d__\\n' END $?"
        self.send(f"{begin_cmd}; {command}; {end_cmd}\n")
        begin = re.compile(rf"__CT_BEGIN_{tag}__\r?\n")
        end = re.compile(rf"__CT_END_{tag}_(\d+)__")
        deadline = time.monotonic() + timeout
        self.expect(begin, timeout)
        m = self.expect(end, max(0.0, deadline - time.monotonic()))
        out = m.string[: m.start()]
        out = out.replace("\r\n", "\n")
        return RunResult(output=out, status=int(m.group(1)), lost=self.take_gap())

    # -- the rest --------------------------------------------------------------------------
    def resize(self, cols: int, rows: int) -> None:
        self._s.resize(cols, rows)

    def take_gap(self) -> bool:
        """True if output was lost while away (the server's replay ring overflowed)."""
        return self._s.take_gap()

    def drop_connection(self) -> None:
        """Drop the connection as a network failure would (it reconnects by itself)."""
        self._s.drop_connection()

    def export(self) -> str:
        """Credentials (JSON) to resume this session elsewhere; keep them secret."""
        return self._s.export()

    def detach(self) -> str:
        """Leave the session running on the server; returns its credentials."""
        return self._s.detach()

    def close(self) -> None:
        """End the session."""
        self._s.close()

    @property
    def session_id(self) -> int:
        return self._s.session_id

    @property
    def connected(self) -> bool:
        return self._s.connected

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSession:
    """:class:`Session` for asyncio: each call runs in a worker thread (the GIL is released
    while the library waits), so many sessions proceed at once."""

    def __init__(self, session: Session) -> None:
        self.sync = session

    @classmethod
    async def connect(cls, endpoint: str, tenant: int, agent: int, token: str, cols: int = 80, rows: int = 24,
                      screen: bool = True) -> "AsyncSession":
        return cls(await asyncio.to_thread(Session.connect, endpoint, tenant, agent, token, cols, rows, screen))

    @classmethod
    async def resume(cls, credentials: str, cols: int = 80, rows: int = 24) -> "AsyncSession":
        return cls(await asyncio.to_thread(Session.resume, credentials, cols, rows))

    async def send(self, data: Union[str, bytes]) -> None:
        await asyncio.to_thread(self.sync.send, data)

    async def read(self, timeout: Optional[float] = None) -> bytes:
        return await asyncio.to_thread(self.sync.read, timeout)

    async def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 10.0) -> "re.Match[str]":
        return await asyncio.to_thread(self.sync.expect, pattern, timeout)

    async def run(self, command: str, timeout: float = 60.0) -> RunResult:
        return await asyncio.to_thread(self.sync.run, command, timeout)

    def screen(self) -> str:
        return self.sync.screen()

    async def detach(self) -> str:
        return await asyncio.to_thread(self.sync.detach)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
