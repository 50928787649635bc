"""Which replicas are alive: one PostgreSQL session advisory lock per replica.

`PostgresReplicaLock` implements `turnlog.storage.liveness.ReplicaLiveness`.
Several `turnlog serve` replicas share one event log. Each holds, for as long
as it runs, a session-level advisory lock keyed on its instance name, on one
connection of its own (outside the pool: a session lock lives exactly as long
as its session). PostgreSQL drops a session's locks when the session ends:
taking the lock of another replica succeeds only when that replica is gone.

The conversation layer uses it for turn ownership: every event a replica
appends names it as the actor, `TurnStarted` included, and recovery closes an
open turn only after taking the lock of the replica that started it. The lock
is for liveness only; safety is the log's (every append names the version it
expects). docs/conversation.md ("Turn ownership") has the reasons and the
edge cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import types
from typing import Any, Final, Self

import psycopg

from turnlog import errors
from turnlog.storage.liveness import Claim

log = logging.getLogger(__name__)

#: The first key of every replica lock (`pg_advisory_lock(int4, int4)`): the
#: lock namespace of turnlog's replicas ("tr" in ASCII). The two-int form
#: never collides with one-bigint keys (such as the migrations' lock):
#: PostgreSQL keeps the two forms apart.
LOCK_CLASS_ID: Final = 0x7472

_TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s, %s)"
_UNLOCK: Final = "SELECT pg_advisory_unlock(%s, %s)"
_PING: Final = "SELECT 1"


def lock_key(instance: str) -> int:
    """The replica's lock key: a stable signed 32-bit hash of its instance name.

    Stable across processes and versions (blake2b, not Python's `hash`). Two
    names may share a key (about one in 4 billion pairs); the cost is that a
    replica whose key another live replica holds does not start (`open`
    names the collision), never a wrong interruption.
    """
    digest = hashlib.blake2b(instance.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresReplicaLock:
    """This replica's liveness lock, on one dedicated PostgreSQL connection (a `ReplicaLiveness`).

    Contracts:

    - `open(conninfo, instance)` takes the lock of `instance` and holds it
      until `close` (or until the connection breaks). A lock that another
      session holds is retried for `take_timeout` (a recovering replica
      holds a gone replica's lock for one append); after that `open` fails:
      another live process uses the name.
    - `claim_orphan(actor)` (recovery) succeeds when the replica named
      `actor` is gone: its lock is free (and is held by the claim until
      `release`), or `actor` is this replica (whose caller checks that the
      turn does not run here).
    - When the connection breaks, the lock is gone and other replicas may
      close this replica's open turns. The next `check()` (recovery runs it
      periodically) reconnects and takes the lock again; it returns True
      when the lock was lost meanwhile. A turn closed elsewhere meanwhile
      fails its next append with a version conflict. While no connection
      can be made, `check` raises `StorageUnavailableError`.
    - Cost: nothing per turn; one `SELECT` (a read-only transaction, no xid,
      no WAL) per claim and per release, in recovery only.

    Safe for concurrent use by the tasks of one event loop.
    """

    def __init__(
        self,
        conninfo: str,
        instance: str,
        *,
        connect_timeout: float = 5.0,
        take_timeout: float = 10.0,
    ) -> None:
        self.instance = instance
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._take_timeout = take_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # Statements go one at a time on the one connection.
        self._mutex = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        conninfo: str,
        instance: str,
        *,
        connect_timeout: float = 5.0,
        take_timeout: float = 10.0,
    ) -> PostgresReplicaLock:
        """Connects and takes this replica's lock.

        Raises:
            StorageUnavailableError: the database cannot be reached.
            AlreadyExistsError: another live session holds the instance's lock.
        """
        ownership = cls(
            conninfo, instance, connect_timeout=connect_timeout, take_timeout=take_timeout
        )
        async with ownership._mutex:
            await ownership._connect()
        return ownership

    async def close(self) -> None:
        """Closes the connection, which releases the lock. Idempotent."""
        self._closed = True
        async with self._mutex:
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

    # -- recovery ----------------------------------------------------------

    async def claim_orphan(self, actor: str) -> Claim | None:
        """Claims the turns of replica `actor` when it is gone (or is this one); else None.

        Raises:
            StorageUnavailableError: the lock connection cannot be (re)made.
        """
        if actor == self.instance:
            return Claim(actor, locked=False)
        async with self._mutex:
            if not await self._try_lock(lock_key(actor)):
                return None
            return Claim(actor, locked=True)

    async def release(self, claim: Claim) -> None:
        """Gives back a gone replica's lock that `claim_orphan` took. Never raises."""
        if not claim.locked:
            return
        async with self._mutex:
            if self._conn is None or self._conn.closed:
                return  # the lock died with its session
            try:
                await self._conn.execute(_UNLOCK, (LOCK_CLASS_ID, lock_key(claim.actor)))
            except psycopg.Error as e:
                log.warning("replica lock connection failed on unlock: %s", e)
                await self._drop_connection()

    async def check(self) -> bool:
        """Pings the connection, reconnecting (and re-locking) if it broke.

        Returns:
            True if the connection had broken, i.e. this replica's lock was
            free for a while (its open turns may have been closed elsewhere).

        Raises:
            StorageUnavailableError: the connection cannot be remade.
            AlreadyExistsError: another session took this replica's lock.
        """
        async with self._mutex:
            if self._conn is not None and not self._conn.closed:
                try:
                    await self._conn.execute(_PING)
                    return False
                except psycopg.Error as e:
                    log.warning("replica lock connection failed: %s", e)
                    await self._drop_connection()
            await self._connect()
            return True

    # -- plumbing (callers hold the mutex) -----------------------------------

    async def _try_lock(self, key: int) -> bool:
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                await self._connect()
            assert self._conn is not None
            try:
                cursor = await self._conn.execute(_TRY_LOCK, (LOCK_CLASS_ID, key))
                row = await cursor.fetchone()
            except psycopg.Error as e:
                # A dead session holds no locks: reconnect (re-taking this
                # replica's own) and try once more on the new one.
                log.warning("replica lock connection failed (attempt %d): %s", attempt, e)
                await self._drop_connection()
                continue
            return row is not None and bool(row[0])
        raise errors.StorageUnavailableError("the replica lock connection keeps failing")

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
        self._conn = None

    async def _connect(self) -> None:
        """Opens the lock session and takes this replica's lock (retried while busy)."""
        if self._closed:
            raise errors.StorageUnavailableError("the replica lock is closed")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name=f"turnlog-replica {self.instance}"[:63],
                # Notice a dead network path within ~30 s rather than hours.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.Error as e:
            raise errors.StorageUnavailableError("cannot open the replica lock connection") from e
        deadline = time.monotonic() + self._take_timeout
        key = lock_key(self.instance)
        while True:
            try:
                cursor = await conn.execute(_TRY_LOCK, (LOCK_CLASS_ID, key))
                row = await cursor.fetchone()
            except psycopg.Error as e:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
                raise errors.StorageUnavailableError("the replica lock connection failed") from e
            if row is not None and row[0]:
                self._conn = conn
                return
            if time.monotonic() >= deadline:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
                raise errors.AlreadyExistsError(
                    f"another live replica holds the lock of instance {self.instance!r}",
                    metadata={"instance": self.instance},
                )
            # A replica recovering this one's turns holds it for a moment.
            await asyncio.sleep(0.1)
