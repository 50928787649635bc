"""Which replica runs a conversation's turn: PostgreSQL session advisory locks.

Several `turnlog serve` replicas share one event log. A replica that runs a
turn holds a session-level advisory lock keyed on the conversation, on one
connection of its own (`TurnOwnership`, outside the pool: a session lock
lives exactly as long as its session). PostgreSQL drops a session's locks
when the session ends, so the turns of a replica that died (or lost its
connection) become claimable by the others; recovery closes an open turn
only after taking its lock, i.e. only when no live replica owns it.

The lock is for liveness only (do not interrupt a live turn). Safety is the
log's: every append of a turn, and recovery's `TurnInterrupted`, names the
version it expects, so a turn is never both interrupted and completed
whatever the locks say. docs/conversation.md ("Turn ownership") has the
reasons and the edge cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Final, Self

import psycopg

from turnlog import errors

log = logging.getLogger(__name__)

#: The first key of every turn lock (`pg_advisory_lock(int4, int4)`): the
#: lock namespace of turnlog's turn ownership ("tl" in ASCII). The two-int
#: form never collides with one-bigint keys (such as the migrations' lock):
#: PostgreSQL keeps the two forms apart.
LOCK_CLASS_ID: Final = 0x746C

_TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s, %s)"
_UNLOCK: Final = "SELECT pg_advisory_unlock(%s, %s)"
_PING: Final = "SELECT 1"


def lock_key(conversation_id: str) -> int:
    """The conversation's lock key: a stable signed 32-bit hash of its id.

    Stable across processes and versions (blake2b, not Python's `hash`). Two
    conversations may share a key (about one in 4 billion pairs); the cost of
    that is a spurious "busy" between them, never a wrong interruption.
    """
    digest = hashlib.blake2b(conversation_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(eq=False, slots=True)
class _Hold:
    """This process's hold on one conversation's lock (one PostgreSQL lock, counted here)."""

    conversation_id: str
    count: int = 1


@dataclass(frozen=True, slots=True)
class Claim:
    """One claim on a conversation's lock; give it back with `TurnOwnership.release`."""

    conversation_id: str
    hold: _Hold | None  # None: no ownership tracking (a single-replica application)


class TurnOwnership:
    """This replica's turn locks, on one dedicated PostgreSQL connection.

    Contracts:

    - `claim(cid)` succeeds when no *other* session holds the conversation's
      lock. Claims of one process on one conversation are counted here and
      share one PostgreSQL lock (taken by the first, released by the last),
      so a turn starting right after another turn of this process ended
      never sees its own lock as busy.
    - `claim_orphan(cid)` (recovery) succeeds only when nobody holds the lock,
      this process included: a turn running here is never an orphan.
    - When the lock connection breaks, every lock it held is gone. The next
      operation (or `check()`, which recovery runs periodically) reconnects
      and re-takes the locks of the claims still held; a claim whose lock
      another replica took meanwhile is *lost*: its release is a no-op, and
      the turn's next append fails with a version conflict if that replica
      interrupted it. While no connection can be made, claims raise
      `StorageUnavailableError`: no new turn starts without a lock.
    - Cost: one `SELECT` (one read-only transaction, no xid, no WAL) per
      first claim and one per last release; nested claims cost nothing.

    Safe for concurrent use by the tasks of one event loop.
    """

    def __init__(self, conninfo: str, *, connect_timeout: float = 5.0) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._held: dict[str, _Hold] = {}
        # Check-then-lock must be atomic per conversation, and statements go
        # one at a time on the one connection anyway.
        self._mutex = asyncio.Lock()
        self._closed = False
        #: Conversations whose lock was lost to another session on a reconnect.
        self.lost: list[str] = []

    @classmethod
    async def open(cls, conninfo: str, *, connect_timeout: float = 5.0) -> TurnOwnership:
        """Connects the lock connection.

        Raises:
            StorageUnavailableError: the database cannot be reached.
        """
        ownership = cls(conninfo, connect_timeout=connect_timeout)
        async with ownership._mutex:
            await ownership._connect()
        return ownership

    async def close(self) -> None:
        """Closes the connection, which releases every lock it holds. Idempotent."""
        self._closed = True
        async with self._mutex:
            self._held.clear()
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._conn.close()
                self._conn = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def backend_pid(self) -> int | None:
        """The lock session's server process id (for diagnostics and tests)."""
        return None if self._conn is None or self._conn.closed else self._conn.info.backend_pid

    def holds(self, conversation_id: str) -> bool:
        """Whether this process holds (or believes it holds) the conversation's lock."""
        return conversation_id in self._held

    # -- claims ------------------------------------------------------------

    async def claim(self, conversation_id: str) -> Claim | None:
        """Claims the conversation for a turn; None when another session holds it.

        Raises:
            StorageUnavailableError: no lock connection can be made.
        """
        async with self._mutex:
            hold = self._held.get(conversation_id)
            if hold is not None:
                hold.count += 1
                return Claim(conversation_id, hold)
            return await self._lock_new(conversation_id)

    async def claim_orphan(self, conversation_id: str) -> Claim | None:
        """Claims a conversation that nobody, this process included, holds; else None.

        Raises:
            StorageUnavailableError: no lock connection can be made.
        """
        async with self._mutex:
            if conversation_id in self._held:
                return None
            return await self._lock_new(conversation_id)

    async def release(self, claim: Claim) -> None:
        """Gives a claim back; the last one of a conversation unlocks it. Never raises."""
        hold = claim.hold
        if hold is None:
            return
        async with self._mutex:
            if self._held.get(claim.conversation_id) is not hold:
                return  # lost on a reconnect, or closed: nothing of ours to unlock
            hold.count -= 1
            if hold.count > 0:
                return
            del self._held[claim.conversation_id]
            if self._conn is None or self._conn.closed:
                return  # the lock died with its session
            try:
                await self._conn.execute(_UNLOCK, (LOCK_CLASS_ID, lock_key(claim.conversation_id)))
            except psycopg.Error as e:
                # The session (and so the lock) is gone; the next use reconnects.
                log.warning("turn lock connection failed on unlock: %s", e)
                await self._drop_connection()

    async def check(self) -> list[str]:
        """Pings the lock connection, reconnecting if it broke; returns locks lost.

        Raises:
            StorageUnavailableError: the connection is broken and cannot be remade.
        """
        async with self._mutex:
            before = len(self.lost)
            if self._conn is not None and not self._conn.closed:
                try:
                    await self._conn.execute(_PING)
                    return []
                except psycopg.Error as e:
                    log.warning("turn lock connection failed: %s", e)
                    await self._drop_connection()
            await self._connect()
            return self.lost[before:]

    # -- plumbing (callers hold the mutex) -----------------------------------

    async def _lock_new(self, conversation_id: str) -> Claim | None:
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                await self._connect()
            assert self._conn is not None
            try:
                cursor = await self._conn.execute(
                    _TRY_LOCK, (LOCK_CLASS_ID, lock_key(conversation_id))
                )
                row = await cursor.fetchone()
            except psycopg.Error as e:
                # A dead session holds no locks: reconnect (re-taking the
                # others) and try once more on the new one.
                log.warning("turn lock connection failed (attempt %d): %s", attempt, e)
                await self._drop_connection()
                continue
            if row is None or not row[0]:
                return None
            hold = _Hold(conversation_id)
            self._held[conversation_id] = hold
            return Claim(conversation_id, hold)
        raise errors.StorageUnavailableError("the turn lock connection keeps failing")

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
        self._conn = None

    async def _connect(self) -> None:
        """Opens the lock session and re-takes the locks of the claims still held."""
        if self._closed:
            raise errors.StorageUnavailableError("turn ownership is closed")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name="turnlog-turn-locks",
                # Notice a dead network path within ~30 s rather than hours.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.Error as e:
            raise errors.StorageUnavailableError("cannot open the turn lock connection") from e
        self._conn = conn
        for cid in list(self._held):
            try:
                cursor = await conn.execute(_TRY_LOCK, (LOCK_CLASS_ID, lock_key(cid)))
                row = await cursor.fetchone()
            except psycopg.Error as e:
                await self._drop_connection()
                raise errors.StorageUnavailableError("the turn lock connection failed") from e
            if row is None or not row[0]:
                # Another replica took it while we had no session (it is
                # recovering the turn): the turn is no longer ours, and its
                # claims' releases become no-ops (they compare holds).
                del self._held[cid]
                self.lost.append(cid)
                log.warning("lost the turn lock of conversation %s on reconnect", cid)
            # else: re-taken once for all `hold.count` claims, as before.
