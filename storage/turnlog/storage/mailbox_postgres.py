"""`TurnMailbox` on PostgreSQL: the `turnlog.turn_mailbox` table (migration 0003) and `LISTEN/NOTIFY`.

A NOTIFY payload is capped at 8,000 bytes and a tool result may be a
million characters, so the notification carries only the turn id; the
letter itself is a row, which the replica running the turn deletes as it
reads it (`DELETE ... RETURNING`: taken once, by one replica). The insert
and its NOTIFY are one statement, so the notification is delivered exactly
when the row is visible (at commit).

Each process listens on one dedicated connection (outside the pool),
reconnecting after a drop with backoff; `wait` also returns after its
timeout, and after every reconnect, with `Notice(everything=True)`, so a
lost notification only delays a letter until the receiver's next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from turnlog.errors import StorageUnavailableError
from turnlog.storage.mailbox import Letter, Notice

_log = logging.getLogger(__name__)

#: The NOTIFY channel of the turn mailbox (payload: the turn id).
CHANNEL: Final = "turnlog_turn_control"

_POST: Final = (
    "WITH posted AS ("
    " INSERT INTO turnlog.turn_mailbox (turn_id, body) VALUES (%s, %s) RETURNING letter_id)"
    f" SELECT letter_id, pg_notify('{CHANNEL}', %s) FROM posted"
)
_TAKE: Final = (
    "DELETE FROM turnlog.turn_mailbox WHERE turn_id = ANY(%s) RETURNING letter_id, turn_id, body"
)
_WITHDRAW: Final = "DELETE FROM turnlog.turn_mailbox WHERE letter_id = %s"
_EXPIRE: Final = (
    "DELETE FROM turnlog.turn_mailbox WHERE posted_at < now() - make_interval(secs => %s)"
)


class PostgresTurnMailbox:
    """The turn mailbox of one process: a small pool plus one listening connection.

    Open with `await PostgresTurnMailbox.open(conninfo)`; `close()` when done.
    Safe for the tasks of one event loop.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], conninfo: str) -> None:
        """Wraps an open pool of autocommit connections, which `close` closes."""
        self._pool = pool
        self._conninfo = conninfo
        self._pending: set[str] = set()
        #: Set by the listener after a (re)connect: notifications may have been lost.
        self._missed = True
        self._event = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._closed = False
        #: Set once the listener's LISTEN is in place (tests wait for it).
        self.listening = asyncio.Event()

    @classmethod
    async def open(
        cls, conninfo: str, *, max_size: int = 4, connect_timeout: float = 10.0
    ) -> PostgresTurnMailbox:
        """Connects to a migrated database and starts listening.

        Raises:
            StorageUnavailableError: no connection within `connect_timeout` seconds.
        """
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            timeout=connect_timeout,
            kwargs={"autocommit": True},
            open=False,
            name="turnlog-turn-mailbox",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            await pool.close()
            raise StorageUnavailableError("cannot connect to the turn mailbox database") from e
        mailbox = cls(pool, conninfo)
        mailbox.start()
        return mailbox

    @property
    def backend_pid(self) -> int | None:
        """The listening session's server process id (diagnostics and tests)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def start(self) -> None:
        """Starts the listener task (idempotent)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="turn-mailbox-listener")

    async def close(self) -> None:
        """Stops the listener and closes its connection and the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        self._event.set()
        await self._pool.close()

    async def _run(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall() if cursor.description is not None else []
        except (psycopg.Error, PoolTimeout) as e:
            raise StorageUnavailableError("the turn mailbox is unavailable") from e

    async def post(self, turn_id: str, body: str) -> int:
        rows = await self._run(_POST, (turn_id, body, turn_id))
        return int(rows[0][0])

    async def take(self, turn_ids: Collection[str]) -> list[Letter]:
        if not turn_ids:
            return []
        rows = await self._run(_TAKE, (list(turn_ids),))
        letters = [Letter(letter_id=int(r[0]), turn_id=str(r[1]), body=str(r[2])) for r in rows]
        return sorted(letters, key=lambda letter: letter.letter_id)

    async def withdraw(self, letter_id: int) -> None:
        try:
            await self._run(_WITHDRAW, (letter_id,))
        except StorageUnavailableError as e:
            _log.warning("could not withdraw a turn letter: %s", e.__cause__)

    async def expire(self, older_than_s: float) -> int:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_EXPIRE, (older_than_s,))
                return int(max(cursor.rowcount, 0))
        except (psycopg.Error, PoolTimeout) as e:
            _log.warning("could not expire old turn letters: %s", e)
            return 0

    async def wait(self, timeout_s: float) -> Notice:
        self.start()
        if not self._pending and not self._missed and not self._closed:
            try:
                await asyncio.wait_for(self._event.wait(), timeout_s)
            except TimeoutError:
                return Notice(everything=True)
        self._event.clear()
        pending, self._pending = self._pending, set()
        missed, self._missed = self._missed, False
        return Notice(turn_ids=frozenset(pending), everything=missed or self._closed)

    async def _listen(self) -> None:
        """Turns notifications into notices; reconnects forever (with backoff) until closed."""
        delay = 0.05
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name="turnlog-turn-mailbox",
                    # Notice a dead network path within ~30 s rather than hours.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._conn = conn
                    delay = 0.05
                    # Letters may have been posted while nobody listened.
                    self._missed = True
                    self._event.set()
                    self.listening.set()
                    async for notify in conn.notifies():
                        self._pending.add(notify.payload)
                        self._event.set()
            except psycopg.Error as e:
                _log.warning("turn mailbox listener connection lost: %s", e)
            finally:
                self._conn = None
                self.listening.clear()
            self._missed = True
            self._event.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


__all__ = ["CHANNEL", "PostgresTurnMailbox"]
