"""ClawTerm sessions for Python.

A :class:`Session` survives its connections: after a network drop, a server restart or a move
it reconnects and resumes by itself, and every byte of output is delivered once, in order.
On top of it, the terminal-as-a-tool layer for programs that drive agent terminals:
:meth:`Session.run` (a command's output and exit status), :meth:`Session.expect` (wait for a
pattern), :meth:`Session.screen` (the rendered screen, from a real VT emulator), and
:class:`AsyncSession` for asyncio.

The sessions are the Rust client library's (``clawterm_client``); blocking calls release the
GIL.
"""

from ._native import ClawtermError, SessionEnded, TakenOver
from .session import AsyncSession, RunResult, Session

__all__ = [
    "AsyncSession",
    "ClawtermError",
    "RunResult",
    "Session",
    "SessionEnded",
    "TakenOver",
]
__version__ = "0.1.0"
