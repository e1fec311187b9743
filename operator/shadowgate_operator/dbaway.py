"""What "the database is away" looks like through asyncpg: one tuple for every place that waits for it.

Server errors (PostgresError: refused, shutting down, a failed statement), the client's own errors
(InterfaceError: a connection closed under it or released twice; InternalClientError, ProtocolError
among them: a broken protocol exchange), and the socket's (OSError, TimeoutError). Whoever catches
these keeps what it was writing and tries again later; anything else is a bug and propagates.
"""

from __future__ import annotations

import asyncpg

DATABASE_AWAY: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def describe(exc: BaseException) -> str:
    """The error in one line, its type first (asyncpg's messages alone are often empty)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
