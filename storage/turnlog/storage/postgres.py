"""`EventStore` on PostgreSQL, with psycopg 3 (async) and psycopg_pool.

Design (docs/event-log.md has the full argument):

- An append is one round trip: `turnlog.append_events(...)`, a plpgsql
  function (migration 0001) that checks idempotency and the expected version,
  extends the hash chain and inserts the batch in one statement, in
  autocommit. Concurrent appends to one stream race on the unique
  (stream_id, stream_version) index; the loser gets a conflict naming the
  winner's version.
- All-stream reads order by (transaction_id, global_position) and return only
  rows of transactions older than the reading snapshot's xmin, so an event
  that commits late with a small position is never skipped.
- Subscriptions read the table (the truth) and sleep between pages until
  woken: directly by appends of this process, by a coalesced NOTIFY sent
  after commit for other processes, or by a poll timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from typing import Any, Final, Self, TypeVar
from uuid import UUID

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from turnlog.errors import (
    DuplicateEventError,
    HistoryDivergedError,
    InvalidArgumentError,
    StorageUnavailableError,
    TurnlogError,
    VersionConflictError,
)
from turnlog.storage.checks import check_import_batch, check_metadata, check_name
from turnlog.storage.hashchain import verify_chain
from turnlog.storage.migrations import SCHEMA
from turnlog.storage.port import (
    START_POSITION,
    AppendResult,
    Direction,
    EventFilter,
    EventPage,
    ImportedEvent,
    ImportResult,
    NewEvent,
    Position,
    RawJson,
    RecordedEvent,
    Snapshot,
    VerificationReport,
)

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The NOTIFY channel appends signal on (per database, payload empty).
NOTIFY_CHANNEL: Final = "turnlog_events"

_MAX_VERSION: Final = 2**63 - 1
# Attempts for an operation whose connection broke (a restarted server, a
# killed backend). Retrying an append is safe: it is idempotent by event id.
_ATTEMPTS: Final = 3
# Runs of one append that lost a unique-index race to a concurrent append.
# With an expected version the second run always decides; only ANY_VERSION
# appends to a hot stream can lose repeatedly.
_RACE_ATTEMPTS: Final = 20
# Appends committed within this window share one NOTIFY (remote subscribers
# wake at most this much later; local ones are woken at once). Each NOTIFY is
# a write transaction: 50 ms lets a conversation turn's two appends (and,
# under load, many turns) share one (docs/event-log.md, Subscriptions).
_NOTIFY_WINDOW_SECONDS: Final = 0.05


def _q(template: str) -> bytes:
    """Renders a query once, with the schema-qualified names it uses, to bytes."""
    return (
        sql.SQL(template)
        .format(
            events=sql.Identifier(SCHEMA, "events"),
            snapshots=sql.Identifier(SCHEMA, "snapshots"),
            append_events=sql.Identifier(SCHEMA, "append_events"),
            event_hash=sql.Identifier(SCHEMA, "event_hash"),
            channel=sql.Identifier(NOTIFY_CHANNEL),
        )
        .as_bytes(None)
    )


_EVENT_COLUMNS = (
    "global_position, transaction_id::text::bigint, stream_id, stream_version, event_id,"
    " type, data::text, metadata::text, recorded_at, prev_hash, hash"
)

_APPEND = _q(
    "SELECT first_version, last_version, positions, recorded_at"
    # %b: the arrays go in binary (length-prefixed elements), not as array
    # literals that Python would quote and escape element by element.
    " FROM {append_events}(%s, %s, %b::uuid[], %b::text[], %b::text[], %b::text[], %s)"
)
# The common case, one event, as one plain statement: the same checks and
# hash as `append_events` without a plpgsql call (which costs more server CPU
# than the insert itself). It inserts nothing when the stream is not at the
# expected version; the caller then runs `append_events` with the id lookup,
# which tells an idempotent retry from a conflict. A reused event id or a lost
# race fails on a unique index and is decided the same way.
_APPEND_ONE = _q(
    "WITH head AS ("
    "  SELECT stream_version, hash FROM {events}"
    "  WHERE stream_id = %(stream_id)s::text ORDER BY stream_version DESC LIMIT 1"
    "), cur AS ("
    "  SELECT coalesce((SELECT stream_version FROM head), 0) AS version,"
    "    coalesce((SELECT hash FROM head), decode(repeat('00', 32), 'hex')) AS prev_hash,"
    "    now() AS recorded_at"
    ")"
    " INSERT INTO {events}"
    " (stream_id, stream_version, event_id, type, data, metadata, recorded_at, prev_hash, hash)"
    " SELECT %(stream_id)s::text, cur.version + 1, %(event_id)s::uuid, %(type)s::text,"
    "  %(data)s::text::json, %(metadata)s::text::json, cur.recorded_at, cur.prev_hash,"
    "  {event_hash}(cur.prev_hash, %(stream_id)s::text, cur.version + 1, %(event_id)s::uuid,"
    "   %(type)s::text, %(data)s::text, %(metadata)s::text, cur.recorded_at)"
    " FROM cur"
    " WHERE %(expected)s::bigint IS NULL OR cur.version = %(expected)s::bigint"
    " RETURNING stream_version, stream_version, ARRAY[global_position], recorded_at"
)
_READ_FORWARDS = _q(
    f"SELECT {_EVENT_COLUMNS} FROM {{events}}"
    " WHERE stream_id = %s AND stream_version >= %s ORDER BY stream_version LIMIT %s"
)
_READ_BACKWARDS = _q(
    f"SELECT {_EVENT_COLUMNS} FROM {{events}}"
    " WHERE stream_id = %s AND stream_version <= %s ORDER BY stream_version DESC LIMIT %s"
)
# The no-skip read: only transactions older than this snapshot's xmin (all of
# them finished, so this set of rows can no longer change), in
# (transaction_id, global_position) order, after the checkpoint. Filtered-out
# rows still come back (without payload) so the checkpoint passes them.
_READ_ALL = _q(
    "SELECT s.global_position, s.transaction_id::text::bigint, s.stream_id, s.stream_version,"
    " s.event_id, s.type, CASE WHEN s.keep THEN s.data::text END,"
    " CASE WHEN s.keep THEN s.metadata::text END, s.recorded_at, s.prev_hash, s.hash, s.keep"
    " FROM (SELECT e.*,"
    "   (%(types)s::text[] IS NULL OR e.type = ANY (%(types)s::text[]))"
    "   AND (%(prefix)s::text IS NULL OR starts_with(e.stream_id, %(prefix)s::text)) AS keep"
    "   FROM {events} e"
    "   WHERE (e.transaction_id, e.global_position) > (%(tx)s::text::xid8, %(pos)s)"
    "     AND e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))"
    "   ORDER BY e.transaction_id, e.global_position"
    "   LIMIT %(limit)s) s"
    " ORDER BY s.transaction_id, s.global_position"
)
# One tenant's events: the same read through the (tenant, transaction_id,
# global_position) index (migration 0002), in its order, so other tenants'
# rows are never visited; the limit counts this tenant's rows. The xmin is
# inline (a stable function: the planner evaluates it to estimate, so it sees
# how many of the tenant's rows remain and takes an ordered index scan rather
# than fetching all of them to sort; both calls see the statement's one
# snapshot). The checkpoint must still move past other tenants' rows, so one
# extra row (keep NULL, only the pair set) is the last row of the whole log
# below that xmin, one probe of the primary key: a page that reaches the end
# continues from there. Every row ordered before it is final (below xmin),
# and this tenant's were all returned.
_READ_ALL_TENANT = _q(
    "SELECT s.global_position, s.transaction_id::text::bigint, s.stream_id, s.stream_version,"
    " s.event_id, s.type, CASE WHEN s.keep THEN s.data::text END,"
    " CASE WHEN s.keep THEN s.metadata::text END, s.recorded_at, s.prev_hash, s.hash, s.keep"
    " FROM (SELECT e.*,"
    "   (%(types)s::text[] IS NULL OR e.type = ANY (%(types)s::text[]))"
    "   AND (%(prefix)s::text IS NULL OR starts_with(e.stream_id, %(prefix)s::text)) AS keep"
    "   FROM {events} e"
    "   WHERE e.tenant = %(tenant)s::text"
    "     AND (e.transaction_id, e.global_position) > (%(tx)s::text::xid8, %(pos)s)"
    "     AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
    "   ORDER BY e.transaction_id, e.global_position"
    "   LIMIT %(limit)s) s"
    " UNION ALL"
    " SELECT * FROM (SELECT t.global_position, t.transaction_id::text::bigint, NULL::text,"
    "   NULL::bigint, NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::timestamptz,"
    "   NULL::bytea, NULL::bytea, NULL::boolean"
    "   FROM {events} t WHERE t.transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
    "   ORDER BY t.transaction_id DESC, t.global_position DESC LIMIT 1) tail"
)
# Per stream, the highest-version event of the given types (DISTINCT ON walks
# the rows sorted by stream and version, newest first, keeping the first of
# each stream); the caller's prefix and last-type filters run in the server,
# so only the matching streams' rows cross the wire.
_LATEST_OF_TYPES = _q(
    f"SELECT {_EVENT_COLUMNS} FROM ("
    "  SELECT DISTINCT ON (stream_id) * FROM {events}"
    "  WHERE type = ANY (%(types)s::text[]) AND starts_with(stream_id, %(prefix)s::text)"
    "    AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)"
    "  ORDER BY stream_id, stream_version DESC"
    ") latest"
    " WHERE %(last)s::text IS NULL OR type = %(last)s::text"
    " ORDER BY stream_id"
)
_STREAM_VERSION = _q("SELECT coalesce(max(stream_version), 0) FROM {events} WHERE stream_id = %s")
_SAVE_SNAPSHOT = _q(
    "INSERT INTO {snapshots} (stream_id, kind, stream_version, state)"
    " SELECT %(stream_id)s, %(kind)s, %(version)s, %(state)s"
    " WHERE EXISTS (SELECT 1 FROM {events}"
    "   WHERE stream_id = %(stream_id)s AND stream_version = %(version)s)"
    " ON CONFLICT (stream_id, kind, stream_version)"
    " DO UPDATE SET state = EXCLUDED.state, recorded_at = now()"
)
_LOAD_SNAPSHOT = _q(
    "SELECT stream_id, kind, stream_version, state, recorded_at FROM {snapshots}"
    " WHERE stream_id = %s AND kind = %s AND stream_version <= %s"
    " ORDER BY stream_version DESC LIMIT 1"
)
# Imports: the stored events from one version before the batch on, to
# compare with the batch (same id and hash: already imported) and to find the
# head the batch must link to.
_IMPORT_EXISTING = _q(
    "SELECT stream_version, event_id, hash FROM {events}"
    " WHERE stream_id = %s AND stream_version >= %s ORDER BY stream_version"
)
# Inserts given events verbatim, in version order, but only rows whose given
# hash the server's own `event_hash` (the function appends use) recomputes:
# the caller compares the row count, so the SQL and Python encodings of the
# chain are checked against each other on every import.
_IMPORT_INSERT = _q(
    "INSERT INTO {events}"
    " (stream_id, stream_version, event_id, type, data, metadata, recorded_at, prev_hash, hash)"
    " SELECT %(stream_id)s::text, n.version, n.event_id, n.type, n.data::json, n.metadata::json,"
    "  n.recorded_at, n.prev_hash, n.hash"
    " FROM unnest(%(versions)s::bigint[], %(event_ids)s::uuid[], %(types)s::text[],"
    "   %(data)s::text[], %(metadata)s::text[], %(recorded_at)s::timestamptz[],"
    "   %(prev_hashes)s::bytea[], %(hashes)s::bytea[]) WITH ORDINALITY"
    "   AS n (version, event_id, type, data, metadata, recorded_at, prev_hash, hash, ord)"
    " WHERE {event_hash}(n.prev_hash, %(stream_id)s::text, n.version, n.event_id, n.type,"
    "   n.data, n.metadata, n.recorded_at) = n.hash"
    " ORDER BY n.ord"
)
_NOTIFY = _q("NOTIFY {channel}")
_LISTEN = _q("LISTEN {channel}")

_RowTuple = tuple[Any, ...]


def _event_from_row(row: _RowTuple) -> RecordedEvent:
    return RecordedEvent(
        global_position=row[0],
        transaction_id=row[1],
        stream_id=row[2],
        stream_version=row[3],
        event_id=row[4],
        type=row[5],
        data_json=row[6],
        metadata_json=row[7],
        recorded_at=row[8],
        prev_hash=row[9],
        hash=row[10],
    )


class _WakeUp:
    """Wakes every waiting subscriber of this process at once.

    A subscriber takes `waiter()` *before* it reads, so an append that lands
    between its read and its wait still wakes it (no lost wake-ups).
    """

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def waiter(self) -> asyncio.Future[None]:
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None


class PostgresEventStore:
    """The event log in a PostgreSQL database migrated by `turnlog.storage.migrations`.

    Create with `await PostgresEventStore.open(conninfo)` (or give it a pool
    you own), use as an async context manager or call `close()`. One instance
    per process and database is enough; it is safe for concurrent use by
    many tasks of one event loop.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        notify: bool = True,
        poll_interval: float = 1.0,
        page_size: int = 500,
        owns_pool: bool = False,
    ) -> None:
        """Wraps an open pool whose connections are in autocommit mode.

        Args:
            pool: the connection pool (connections must use autocommit).
            notify: send a coalesced NOTIFY after appends commit, to wake
                subscribers in other processes.
            poll_interval: seconds a caught-up subscriber sleeps at most
                before reading again without a wake-up signal.
            page_size: events per read of a subscription.
            owns_pool: close the pool in `close()`.
        """
        self._pool = pool
        # Cross-process wake-ups need a connection of their own, outside the pool.
        self._listen_conninfo = pool.conninfo if isinstance(pool.conninfo, str) else None
        self._notify = notify
        self._poll_interval = poll_interval
        self._page_size = page_size
        self._owns_pool = owns_pool
        self._wakeup = _WakeUp()
        self._notify_pending = False
        self._notify_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        connect_timeout: float = 10.0,
        notify: bool = True,
        poll_interval: float = 1.0,
    ) -> PostgresEventStore:
        """Opens a pool on a migrated database and returns a store that owns it.

        Raises:
            StorageUnavailableError: no connection within `connect_timeout` seconds.
        """
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            kwargs={"autocommit": True},
            open=False,
            name="turnlog-events",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            await pool.close()
            raise StorageUnavailableError("cannot connect to the event log database") from e
        return cls(pool, notify=notify, poll_interval=poll_interval, owns_pool=True)

    async def close(self) -> None:
        """Stops background tasks and, if owned, closes the pool. Idempotent."""
        self._closed = True
        for task in (self._notify_task, self._listener_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._notify_task = self._listener_task = None
        self._wakeup.fire()
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------

    async def _with_connection(
        self, operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]
    ) -> _T:
        """Runs `operation` on a pooled connection, retrying if the connection broke.

        Only for operations that are safe to repeat (reads; appends, which are
        idempotent by event id). Translates unavailability into
        `StorageUnavailableError`; other psycopg errors propagate.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self._pool.connection() as conn:
                    return await operation(conn)
            except PoolTimeout as e:
                raise StorageUnavailableError("no database connection available") from e
            except psycopg.OperationalError as e:
                if attempt == _ATTEMPTS:
                    raise StorageUnavailableError("the event log database is unavailable") from e
                # The pool drops the broken connection; its idle siblings may
                # have died with it (a server restart), so check them all.
                _log.warning("event store connection failed (attempt %d): %s", attempt, e)
                with contextlib.suppress(psycopg.Error, PoolTimeout):
                    await self._pool.check()
        raise AssertionError("unreachable")

    def _after_append(self) -> None:
        """Wakes local subscribers now and schedules one coalesced NOTIFY."""
        self._wakeup.fire()
        if not self._notify or self._closed:
            return
        self._notify_pending = True
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.create_task(self._send_notifies())

    async def _send_notifies(self) -> None:
        # At most one NOTIFY in flight: appends that commit meanwhile set the
        # flag again and share the next one. NOTIFY never runs inside an
        # append transaction (it would serialize their commits).
        while self._notify_pending:
            self._notify_pending = False
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(_NOTIFY)
            except (psycopg.Error, PoolTimeout) as e:
                # Other processes' subscribers fall back to polling.
                _log.warning("could not NOTIFY subscribers: %s", e)
                return
            # Under a steady stream of appends, back-to-back NOTIFYs would cost
            # a connection and a commit of their own all the time; one per
            # window wakes remote subscribers just as well.
            await asyncio.sleep(_NOTIFY_WINDOW_SECONDS)

    def _ensure_listener(self) -> None:
        if self._listen_conninfo is None:
            return  # a pool with computed conninfo: subscribers poll
        if self._listener_task is None or self._listener_task.done():
            self._listener_task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        """Turns NOTIFYs from any process into local wake-ups; reconnects forever."""
        assert self._listen_conninfo is not None
        delay = 0.05
        while not self._closed:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._listen_conninfo, autocommit=True
                ) as conn:
                    await conn.execute(_LISTEN)
                    delay = 0.05
                    # Appends may have committed while no one listened.
                    self._wakeup.fire()
                    async for _ in conn.notifies():
                        self._wakeup.fire()
            except psycopg.Error as e:
                _log.warning("event listener connection lost: %s", e)
            self._wakeup.fire()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _wait(self, waiter: asyncio.Future[None]) -> None:
        # asyncio.wait, not wait_for: the future is shared and must not be cancelled.
        await asyncio.wait((waiter,), timeout=self._poll_interval)

    # -- writing ----------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        """Appends a batch atomically in one round trip; see `EventStore.append`."""
        check_name("stream id", stream_id)
        if not events:
            raise InvalidArgumentError("an append needs at least one event")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgumentError("expected_version must be >= 0 or None")
        event_ids: list[UUID] = []
        types_: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for event in events:
            check_name("event type", event.type)
            text = event.data_json()
            if isinstance(event.data, RawJson) and "\x00" in text:
                raise InvalidArgumentError("raw JSON must not contain NUL characters")
            check_metadata(event.metadata)
            event_ids.append(event.event_id)
            types_.append(event.type)
            data.append(text)
            metadata.append(event.metadata.to_json())
        if len(set(event_ids)) != len(event_ids):
            raise InvalidArgumentError("a batch must not repeat an event id")
        check_ids = False

        async def run(conn: psycopg.AsyncConnection[Any]) -> _RowTuple | None:
            if len(event_ids) == 1 and not check_ids:
                cursor = await conn.execute(
                    _APPEND_ONE,
                    {
                        "stream_id": stream_id,
                        "event_id": event_ids[0],
                        "type": types_[0],
                        "data": data[0],
                        "metadata": metadata[0],
                        "expected": expected_version,
                    },
                )
                inserted: _RowTuple | None = await cursor.fetchone()
                if inserted is not None:
                    return inserted
                # Not at the expected version: a conflict or an idempotent
                # retry, which the function's id lookup tells apart.
            lookup = check_ids or len(event_ids) == 1
            cursor = await conn.execute(
                _APPEND, (stream_id, expected_version, event_ids, types_, data, metadata, lookup)
            )
            return await cursor.fetchone()

        try:
            for attempt in range(1, _RACE_ATTEMPTS + 1):
                try:
                    row = await self._with_connection(run)
                    break
                except pg_errors.UniqueViolation as e:
                    # A concurrent append committed first, or an id is reused.
                    # Running again with the id lookup decides against the
                    # committed rows: the same result for an identical batch
                    # (idempotency), TL001 with the actual version, TL002, or
                    # (with ANY_VERSION) an append after the winner.
                    check_ids = True
                    if attempt == _RACE_ATTEMPTS:
                        raise StorageUnavailableError("append kept losing races; retry") from e
            else:  # pragma: no cover - the loop always breaks or raises
                raise AssertionError("unreachable")
        except psycopg.Error as e:
            raise self._translate(e, stream_id, expected_version) from e
        finally:
            # Also after failures: a failed append may have been what held a
            # reader's snapshot xmin back, and it is cheap.
            self._after_append()
        assert row is not None
        return AppendResult(
            stream_id=stream_id,
            first_version=row[0],
            last_version=row[1],
            positions=tuple(row[2]),
            recorded_at=row[3],
        )

    @staticmethod
    def _translate(e: psycopg.Error, stream_id: str, expected_version: int | None) -> TurnlogError:
        state = e.sqlstate
        if state == "TL001":
            actual = int(e.diag.message_detail or "0")
            return VersionConflictError(stream_id, expected_version, actual)
        if state == "TL002":
            return DuplicateEventError(
                f"event {e.diag.message_detail} is stored already with other content or stream",
                metadata={"eventId": e.diag.message_detail or ""},
            )
        if state in ("22P02", "22023", "23514", "22021", "22P05", "54000"):
            # invalid JSON text, empty batch, check constraint, bad encoding, too large
            return InvalidArgumentError(
                f"event rejected by the event log: {e.diag.message_primary}"
            )
        if isinstance(e, psycopg.OperationalError):
            return StorageUnavailableError("the event log database is unavailable")
        return TurnlogError("unexpected event log database error")

    async def import_events(self, stream_id: str, events: Sequence[ImportedEvent]) -> ImportResult:
        """Stores events from another log verbatim; see `EventStore.import_events`.

        The chain is checked twice: in Python before anything is sent, and by
        the server (`turnlog.event_hash`) on insert. Everything runs in one
        transaction; a concurrent append or import that wins the race to a
        version makes this one re-run and decide against the committed rows.
        """
        check_name("stream id", stream_id)
        check_import_batch(stream_id, events)
        first = events[0].stream_version

        async def run(conn: psycopg.AsyncConnection[Any]) -> ImportResult:
            async with conn.transaction():
                cursor = await conn.execute(_IMPORT_EXISTING, (stream_id, first - 1))
                stored = {row[0]: (row[1], bytes(row[2])) for row in await cursor.fetchall()}
                head = max(stored, default=0)
                if first > 1 and stored.get(first - 1, (None, b""))[1] != events[0].prev_hash:
                    raise HistoryDivergedError(
                        f"stream {stream_id!r} does not hold the history this import extends"
                        f" (version {first - 1})",
                        metadata={"streamId": stream_id, "version": str(first - 1)},
                    )
                present = 0
                for event in events:
                    if event.stream_version > head:
                        break
                    if stored.get(event.stream_version) != (event.event_id, event.hash):
                        raise HistoryDivergedError(
                            f"stream {stream_id!r} holds a different event at version"
                            f" {event.stream_version}",
                            metadata={
                                "streamId": stream_id,
                                "version": str(event.stream_version),
                            },
                        )
                    present += 1
                new = events[present:]
                if new:
                    cursor = await conn.execute(
                        _IMPORT_INSERT,
                        {
                            "stream_id": stream_id,
                            "versions": [e.stream_version for e in new],
                            "event_ids": [e.event_id for e in new],
                            "types": [e.type for e in new],
                            "data": [e.data_json for e in new],
                            "metadata": [e.metadata_json for e in new],
                            "recorded_at": [e.recorded_at for e in new],
                            "prev_hashes": [e.prev_hash for e in new],
                            "hashes": [e.hash for e in new],
                        },
                    )
                    if cursor.rowcount != len(new):
                        # Rolls the transaction back: nothing is written.
                        raise InvalidArgumentError(
                            "an imported hash does not match the event log's own encoding"
                        )
                return ImportResult(
                    stream_id=stream_id,
                    written=len(new),
                    already_present=present,
                    last_version=max(head, events[-1].stream_version),
                )

        try:
            for attempt in range(1, _RACE_ATTEMPTS + 1):
                try:
                    return await self._with_connection(run)
                except pg_errors.UniqueViolation as e:
                    if e.diag.constraint_name == "events_event_id_key":
                        raise DuplicateEventError(
                            "an imported event id is stored already in another stream"
                            " or at another version",
                            metadata={"streamId": stream_id},
                        ) from e
                    if attempt == _RACE_ATTEMPTS:
                        raise StorageUnavailableError("import kept losing races; retry") from e
            raise AssertionError("unreachable")
        except psycopg.Error as e:
            raise self._translate(e, stream_id, None) from e
        finally:
            self._after_append()

    # -- reading ----------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        direction: Direction = Direction.FORWARDS,
        limit: int | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Reads one stream in version order; see `EventStore.read_stream`."""
        if limit is not None and limit < 0:
            raise InvalidArgumentError("limit must be >= 0")
        if direction is Direction.FORWARDS:
            query, start = _READ_FORWARDS, 1 if from_version is None else from_version
        else:
            query, start = _READ_BACKWARDS, _MAX_VERSION if from_version is None else from_version

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[_RowTuple]:
            cursor = await conn.execute(query, (stream_id, start, limit))
            return await cursor.fetchall()

        rows = await self._read(run)
        return tuple(_event_from_row(row) for row in rows)

    async def _read(self, run: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
        try:
            return await self._with_connection(run)
        except psycopg.Error as e:
            raise TurnlogError("unexpected event log database error") from e

    async def read_all(
        self,
        *,
        after: Position = START_POSITION,
        limit: int = 1000,
        filter: EventFilter | None = None,
    ) -> EventPage:
        """Reads all streams after a checkpoint, never skipping; see `EventStore.read_all`."""
        if limit < 1:
            raise InvalidArgumentError("limit must be >= 1")
        tenant = None if filter is None else filter.tenant
        params = {
            "tx": after.transaction_id,
            "pos": after.global_position,
            "limit": limit,
            "types": None if filter is None or filter.types is None else sorted(filter.types),
            "prefix": None if filter is None else filter.stream_prefix,
            "tenant": tenant,
        }
        query = _READ_ALL if tenant is None else _READ_ALL_TENANT

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[_RowTuple]:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

        rows = await self._read(run)
        # The tenant query's extra row (keep NULL) is the log's last readable
        # row, told apart by that wherever the UNION puts it; the page's own
        # rows keep their order (a Limit over the subquery's ORDER BY).
        scanned = [row for row in rows if row[11] is not None]
        tail = next((row for row in rows if row[11] is None), None)
        events = tuple(_event_from_row(row) for row in scanned if row[11])
        reached_end = len(scanned) < limit
        last = tail if reached_end and tail is not None else scanned[-1] if scanned else None
        next_position = after if last is None else max(after, Position(last[1], last[0]))
        return EventPage(events=events, next_position=next_position, reached_end=reached_end)

    async def latest_events_of_types(
        self,
        types: Collection[str],
        *,
        stream_prefix: str = "",
        last_type: str | None = None,
        tenant: str | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Per stream, the latest event of `types`; see `EventStore.latest_events_of_types`.

        One statement; without an index on `type` it is one sequential scan of
        the table in the server (no rows but the answer are sent).

        Raises:
            InvalidArgumentError: `types` is empty.
        """
        if not types:
            raise InvalidArgumentError("types must name at least one event type")
        params = {
            "types": sorted(types),
            "prefix": stream_prefix,
            "last": last_type,
            "tenant": tenant,
        }

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[_RowTuple]:
            cursor = await conn.execute(_LATEST_OF_TYPES, params)
            return await cursor.fetchall()

        rows = await self._read(run)
        return tuple(_event_from_row(row) for row in rows)

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version, 0 if it does not exist."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(_STREAM_VERSION, (stream_id,))
            row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        return await self._read(run)

    # -- subscriptions ----------------------------------------------------

    async def subscribe_all(
        self,
        *,
        after: Position = START_POSITION,
        filter: EventFilter | None = None,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Catch-up then live over all streams; see `EventStore.subscribe_all`."""
        self._ensure_listener()
        position = after
        failures = 0
        while not self._closed:
            waiter = self._wakeup.waiter()
            try:
                page = await self.read_all(after=position, limit=self._page_size, filter=filter)
            except StorageUnavailableError:
                failures += 1
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                continue
            failures = 0
            for event in page.events:
                yield event
            position = page.next_position
            if page.reached_end:
                await self._wait(waiter)

    async def subscribe_stream(
        self, stream_id: str, *, after_version: int = 0
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Catch-up then live over one stream; see `EventStore.subscribe_stream`."""
        self._ensure_listener()
        version = after_version
        failures = 0
        while not self._closed:
            waiter = self._wakeup.waiter()
            try:
                events = await self.read_stream(
                    stream_id, from_version=version + 1, limit=self._page_size
                )
            except StorageUnavailableError:
                failures += 1
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                continue
            failures = 0
            for event in events:
                yield event
                version = event.stream_version
            if len(events) < self._page_size:
                await self._wait(waiter)

    # -- snapshots and verification ---------------------------------------

    async def save_snapshot(
        self, stream_id: str, *, kind: str, stream_version: int, state: bytes
    ) -> None:
        """Stores derived state at a version; see `EventStore.save_snapshot`."""
        check_name("snapshot kind", kind)
        params = {
            "stream_id": stream_id,
            "kind": kind,
            "version": stream_version,
            "state": state,
        }

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(_SAVE_SNAPSHOT, params)
            return cursor.rowcount

        if await self._read(run) == 0:
            raise InvalidArgumentError(
                f"stream {stream_id!r} has no event at version {stream_version} to snapshot"
            )

    async def load_snapshot(
        self, stream_id: str, *, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The latest snapshot at or below `max_version`; see `EventStore.load_snapshot`."""
        limit = _MAX_VERSION if max_version is None else max_version

        async def run(conn: psycopg.AsyncConnection[Any]) -> _RowTuple | None:
            cursor = await conn.execute(_LOAD_SNAPSHOT, (stream_id, kind, limit))
            return await cursor.fetchone()

        row = await self._read(run)
        if row is None:
            return None
        return Snapshot(
            stream_id=row[0],
            kind=row[1],
            stream_version=row[2],
            state=bytes(row[3]),
            recorded_at=row[4],
        )

    async def verify(self, stream_id: str) -> VerificationReport:
        """Recomputes the stream's hash chain in Python; see `EventStore.verify`."""
        return verify_chain(stream_id, await self.read_stream(stream_id))
