"""The durable delivery queue: the `notifications` table of a ShadowDeployment's database.

`enqueue` inserts each message once per (id, receiver): announcing a transition again (after a restart,
by a replica that took over) queues nothing new. `claim` hands due rows to one worker for a lease
(FOR UPDATE SKIP LOCKED: two workers never hold the same row), counting the attempt. Only the oldest
waiting message of each receiver is ever due, so a receiver gets its messages in order, one at a time,
and one that hangs or is down holds back its own messages only. The worker then
marks each row `delivered`, due again later (`retry`), or `abandon`s it. A row whose worker died is due
again when its lease ends. Statements are short and hold no connection while a message is posted.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from shadowgate_operator.notify.messages import Channel, Envelope, Outgoing

_COLUMNS = "id, receiver, namespace, deployment, format, url_secret, url_key, headers, body, created_at, attempts"

_CLAIM = f"""
WITH heads AS (
    SELECT DISTINCT ON (namespace, deployment, receiver) id, receiver, due_at, leased_until
    FROM notifications
    WHERE delivered_at IS NULL AND abandoned_at IS NULL AND ($3::text[] IS NULL OR namespace = ANY($3::text[]))
    ORDER BY namespace, deployment, receiver, seq
), due AS (
    SELECT n.id, n.receiver FROM notifications AS n JOIN heads AS h ON n.id = h.id AND n.receiver = h.receiver
    WHERE h.due_at <= now() AND (h.leased_until IS NULL OR h.leased_until <= now())
    ORDER BY h.due_at
    LIMIT $1
    FOR UPDATE OF n SKIP LOCKED
)
UPDATE notifications AS n
SET leased_until = now() + make_interval(secs => $2), attempts = n.attempts + 1
FROM due WHERE n.id = due.id AND n.receiver = due.receiver
RETURNING {", ".join(f"n.{column.strip()}" for column in _COLUMNS.split(","))}"""


@dataclass(frozen=True)
class Claimed:
    """A queued message a worker holds for one attempt."""

    message: Outgoing
    created_at: dt.datetime
    attempts: int
    """Attempts so far, this one included."""


async def enqueue(connection: asyncpg.Connection, messages: Sequence[Outgoing]) -> int:
    """Queue these messages on `connection` (inside the caller's transaction, if it holds one: the Reconciler
    queues a transition's messages with its history rows, so both are written or neither), each once per id
    and receiver; returns how many were new."""
    if not messages:
        return 0
    rows = await connection.fetch(
        """INSERT INTO notifications (id, receiver, namespace, deployment, format, url_secret, url_key,
               headers, body)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
               $7::text[], $8::jsonb[], $9::bytea[])
           ON CONFLICT (id, receiver) DO NOTHING
           RETURNING id""",
        [m.id for m in messages], [m.receiver for m in messages], [m.namespace for m in messages],
        [m.deployment for m in messages], [m.format.value for m in messages], [m.url_secret for m in messages],
        [m.url_key for m in messages], [json.dumps(m.envelope.headers) for m in messages],
        [m.envelope.body for m in messages],
    )  # fmt: skip
    return len(rows)


@dataclass
class NotificationQueue:
    pool: asyncpg.Pool

    async def enqueue(self, messages: Sequence[Outgoing]) -> int:
        """Queue these messages (each once per id and receiver); returns how many were new."""
        async with self.pool.acquire() as connection:
            return await enqueue(connection, messages)

    async def claim(self, limit: int, lease_seconds: float, namespaces: Sequence[str] | None = None) -> list[Claimed]:
        """Up to `limit` due messages, held for `lease_seconds`, oldest due first; only those of ShadowDeployments
        in `namespaces` when given (an operator watching some namespaces shares the database with others)."""
        rows = await self.pool.fetch(
            _CLAIM, limit, float(lease_seconds), None if namespaces is None else list(namespaces)
        )
        return [
            Claimed(
                message=Outgoing(
                    id=row["id"],
                    receiver=row["receiver"],
                    namespace=row["namespace"],
                    deployment=row["deployment"],
                    format=Channel(row["format"]),
                    url_secret=row["url_secret"],
                    url_key=row["url_key"],
                    envelope=Envelope(headers=json.loads(row["headers"]), body=bytes(row["body"])),
                ),
                created_at=row["created_at"],
                attempts=row["attempts"],
            )
            for row in rows
        ]

    async def delivered(self, claimed: Claimed) -> None:
        await self.pool.execute(
            """UPDATE notifications SET delivered_at = now(), leased_until = NULL, last_error = NULL
               WHERE id = $1 AND receiver = $2""",
            claimed.message.id, claimed.message.receiver,
        )  # fmt: skip

    async def retry(self, claimed: Claimed, error: str, delay_seconds: float) -> None:
        """Due again in `delay_seconds`; `error` says why this attempt failed."""
        await self.pool.execute(
            """UPDATE notifications SET due_at = now() + make_interval(secs => $3), leased_until = NULL,
                   last_error = $4
               WHERE id = $1 AND receiver = $2""",
            claimed.message.id, claimed.message.receiver, float(delay_seconds), error[:1000],
        )  # fmt: skip

    async def abandon(self, claimed: Claimed, error: str) -> None:
        """Given up on: never attempted again."""
        await self.pool.execute(
            """UPDATE notifications SET abandoned_at = now(), leased_until = NULL, last_error = $3
               WHERE id = $1 AND receiver = $2""",
            claimed.message.id, claimed.message.receiver, error[:1000],
        )  # fmt: skip

    async def waiting(self) -> int:
        """Messages not delivered yet and not given up on."""
        count = await self.pool.fetchval(
            "SELECT count(*) FROM notifications WHERE delivered_at IS NULL AND abandoned_at IS NULL"
        )
        return int(count)

    async def prune(self, older_than: dt.timedelta) -> int:
        """Drop finished rows (delivered or abandoned) older than this; returns how many."""
        result = await self.pool.execute(
            """DELETE FROM notifications
               WHERE (delivered_at IS NOT NULL OR abandoned_at IS NOT NULL) AND created_at < now() - $1::interval""",
            older_than,
        )
        return int(result.split()[-1])
