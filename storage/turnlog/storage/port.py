"""The event store port: what the application layer needs from an event log.

Adapters (`turnlog.storage.postgres.PostgresEventStore`, and any later one)
implement `EventStore`; `tests/storage/storage_contract.py` is the contract suite every
adapter must pass. All types here are plain frozen dataclasses, free of any
database library.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol
from uuid import UUID

from turnlog.errors import InvalidArgumentError

#: `expected_version` for "append at the end, whatever the version".
ANY_VERSION: Final = None
#: `expected_version` for "the stream must not exist yet".
NO_STREAM: Final = 0

#: The longest stream id or event type accepted (characters).
MAX_NAME_LENGTH: Final = 512

#: The tenant of an event whose metadata names none (or names it as JSON
#: null): every event recorded before tenancy. The event log's `tenant`
#: column (migration 0002) is `coalesce(metadata->>'tenant', 'default')`,
#: generated from the hashed metadata, and `RecordedEvent.tenant` reads the
#: metadata the same way, so both adapters and every reader agree.
DEFAULT_TENANT: Final = "default"


class Direction(enum.Enum):
    """Which way `EventStore.read_stream` walks a stream."""

    FORWARDS = "forwards"
    BACKWARDS = "backwards"


@dataclass(frozen=True, slots=True, kw_only=True)
class RawJson:
    """A JSON document already serialized, stored and hashed byte for byte.

    Use it to pass payloads through without decoding them. The store checks
    that the text is valid JSON (the whole batch fails if not).
    """

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EventMetadata:
    """Who and what caused an event; every field is optional.

    Attributes:
        correlation_id: ties together every event of one user-visible operation.
        causation_id: the id of the event or request that caused this one.
        trace_id: the distributed-tracing trace id (W3C, 32 hex digits).
        tenant: the tenant the stream belongs to; None stores no tenant, and
            the event then belongs to `DEFAULT_TENANT`.
        actor: who acted (a user id, "system", a worker id).
        schema_version: the version of the payload's shape for its event type,
            when the writer's codec is past the first (None means 1); readers
            upcast older shapes by it.
    """

    correlation_id: str | None = None
    causation_id: str | None = None
    trace_id: str | None = None
    tenant: str | None = None
    actor: str | None = None
    schema_version: int | None = None

    def to_json(self) -> str:
        """The stored form: a compact JSON object of the fields that are set, keys sorted."""
        fields = {
            "actor": self.actor,
            "causation_id": self.causation_id,
            "correlation_id": self.correlation_id,
            "schema_version": self.schema_version,
            "tenant": self.tenant,
            "trace_id": self.trace_id,
        }
        return encode_json({k: v for k, v in fields.items() if v is not None})

    @classmethod
    def from_json(cls, text: str) -> EventMetadata:
        """Parses the stored form; unknown keys (from a later version) are ignored."""
        raw = json.loads(text)
        known = ("correlation_id", "causation_id", "trace_id", "tenant", "actor")
        version = raw.get("schema_version")
        return cls(
            **{k: raw[k] for k in known if isinstance(raw.get(k), str)},
            schema_version=version if type(version) is int and version > 1 else None,
        )


def tenant_of(metadata_json: str) -> str:
    """The tenant an event with this stored metadata belongs to.

    The metadata's "tenant" string, or `DEFAULT_TENANT` when there is none
    (absent, JSON null, or metadata that is not an object): what migration
    0002's generated column computes in PostgreSQL. The stores accept a
    tenant only as a JSON string (`turnlog.storage.checks`), so no other
    value reaches this.
    """
    raw = json.loads(metadata_json)
    tenant = raw.get("tenant") if isinstance(raw, dict) else None
    return tenant if isinstance(tenant, str) else DEFAULT_TENANT


def encode_json(value: Any) -> str:
    """Serializes a payload the way the store does: compact, keys sorted, UTF-8 safe.

    Raises:
        InvalidArgumentError: the value is not JSON (NaN, infinities, other
            types, lone surrogates).
    """
    try:
        text = json.dumps(
            value, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
        )
        text.encode("utf-8")
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise InvalidArgumentError(f"event payload is not JSON-serializable: {e}") from e
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to append.

    Attributes:
        event_id: the idempotency key, unique across the whole log. Pass it in
            (never generate it inside a retry loop): re-appending the same id
            with the same content is a no-op that returns the original result.
        type: the event type name, e.g. "MessageAppended".
        data: the payload, a JSON object (serialized with sorted keys), or
            `RawJson` to store given text verbatim.
        metadata: correlation/causation ids, trace id, tenant, actor.
    """

    event_id: UUID
    type: str
    data: Mapping[str, Any] | RawJson
    metadata: EventMetadata = field(default_factory=EventMetadata)

    def data_json(self) -> str:
        """The payload text that will be stored (and hashed)."""
        if isinstance(self.data, RawJson):
            return self.data.text
        return encode_json(self.data)


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A checkpoint in the all-streams order.

    All-stream reads are ordered by (transaction_id, global_position), not by
    global_position alone: see docs/event-log.md, "No skipped events". Resume
    with the position of the last event handled; `START_POSITION` is before
    every event. `str()` gives an opaque token that `parse` reads back.
    """

    transaction_id: int
    global_position: int

    def __str__(self) -> str:
        return f"{self.transaction_id}-{self.global_position}"

    @classmethod
    def parse(cls, token: str) -> Position:
        """Reads a token made by `str(position)`.

        Raises:
            InvalidArgumentError: the token is malformed.
        """
        tx, sep, pos = token.partition("-")
        # ASCII digits only ("²".isdigit() holds, int("²") fails), and each
        # part a bigint, as the columns it is compared with.
        if not sep or not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in (tx, pos)):
            raise InvalidArgumentError("malformed event log position token")
        if max(int(tx), int(pos)) > 2**63 - 1:
            raise InvalidArgumentError("malformed event log position token")
        return cls(int(tx), int(pos))


#: The checkpoint before every event.
START_POSITION: Final = Position(0, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedEvent:
    """An event as stored.

    `data_json` and `metadata_json` are the stored JSON text, exactly as
    hashed; `data` and `metadata` decode it on each access, so code that only
    forwards events never pays for decoding.
    """

    global_position: int
    transaction_id: int
    stream_id: str
    stream_version: int
    event_id: UUID
    type: str
    data_json: str
    metadata_json: str
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes

    @property
    def data(self) -> Any:
        """The payload, decoded (a new object on every access)."""
        return json.loads(self.data_json)

    @property
    def metadata(self) -> EventMetadata:
        """The metadata, decoded."""
        return EventMetadata.from_json(self.metadata_json)

    @property
    def tenant(self) -> str:
        """The tenant the event belongs to: its metadata's, else `DEFAULT_TENANT`.

        Decodes the metadata on each access, like `metadata`; it always equals
        the `tenant` column the PostgreSQL store filters on.
        """
        return tenant_of(self.metadata_json)

    @property
    def position(self) -> Position:
        """This event's checkpoint in the all-streams order."""
        return Position(self.transaction_id, self.global_position)

    def to_imported(self) -> ImportedEvent:
        """The event as `EventStore.import_events` takes it (ids, times and hashes kept)."""
        return ImportedEvent(
            stream_version=self.stream_version,
            event_id=self.event_id,
            type=self.type,
            data_json=self.data_json,
            metadata_json=self.metadata_json,
            recorded_at=self.recorded_at,
            prev_hash=self.prev_hash,
            hash=self.hash,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResult:
    """What an append wrote (or, for an idempotent retry, had written).

    Attributes:
        stream_id: the stream appended to.
        first_version: the stream version of the batch's first event.
        last_version: the stream version of its last event: pass it as the
            next `expected_version`.
        positions: the global positions of the events, in batch order.
        recorded_at: the time recorded on every event of the batch.
    """

    stream_id: str
    first_version: int
    last_version: int
    positions: tuple[int, ...]
    recorded_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """Selects events in all-stream reads and subscriptions; None matches all.

    Attributes:
        types: only events of these types.
        stream_prefix: only streams whose id starts with this text.
        tenant: only events of this tenant (`RecordedEvent.tenant`; events
            without a tenant in their metadata belong to `DEFAULT_TENANT`).
            PostgreSQL reads one tenant's events through an index and never
            scans the other tenants'.
    """

    types: frozenset[str] | None = None
    stream_prefix: str | None = None
    tenant: str | None = None

    def matches(self, stream_id: str, event_type: str, tenant: str) -> bool:
        """Whether an event passes this filter (adapters may filter in the database).

        Args:
            stream_id: the event's stream.
            event_type: its type.
            tenant: its tenant (`RecordedEvent.tenant`).
        """
        if self.types is not None and event_type not in self.types:
            return False
        if self.tenant is not None and tenant != self.tenant:
            return False
        return self.stream_prefix is None or stream_id.startswith(self.stream_prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventPage:
    """One page of an all-stream read.

    Attributes:
        events: the matching events, in (transaction_id, global_position) order.
        next_position: where to continue; past every event scanned, including
            those the filter dropped, so a sparse filter still makes progress.
            With a tenant filter, other tenants' events are not scanned but
            passed over all the same: a page that reaches the end moves past
            every event readable at that moment, whatever its tenant.
        reached_end: True when no more events are readable right now.
    """

    events: tuple[RecordedEvent, ...]
    next_position: Position
    reached_end: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Derived state of a stream at a version ("loading = latest snapshot + tail").

    Attributes:
        stream_id: the stream.
        kind: the state's schema name and version, e.g. "conversation.v1".
        stream_version: the version of the last event folded into `state`.
        state: the serialized state, opaque to the store.
        recorded_at: when the snapshot was saved.
    """

    stream_id: str
    kind: str
    stream_version: int
    state: bytes
    recorded_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationReport:
    """The outcome of checking a stream's hash chain and version sequence.

    Attributes:
        stream_id: the stream checked.
        events_checked: how many stored events were read.
        last_version: the highest version found (0 for an empty stream).
        broken_at_version: the version of the first event that fails, or None.
        problem: what is wrong there ("hash mismatch", "version gap: ..."), or None.
    """

    stream_id: str
    events_checked: int
    last_version: int
    broken_at_version: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True when the whole chain verifies."""
        return self.broken_at_version is None


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportedEvent:
    """A recorded event from another log, to store verbatim with its hashes.

    Everything the hash chain covers is given (nothing is recomputed or
    re-serialized); the importing store assigns only its own
    `global_position` and `transaction_id`, which no hash covers.
    """

    stream_version: int
    event_id: UUID
    type: str
    data_json: str
    metadata_json: str
    recorded_at: datetime
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What `EventStore.import_events` did.

    Attributes:
        stream_id: the stream imported into.
        written: events stored by this call.
        already_present: events of the batch that were stored already (an
            import repeated, or extended by a longer copy of the same history).
        last_version: the stream's version after the import.
    """

    stream_id: str
    written: int
    already_present: int
    last_version: int


class EventStore(Protocol):
    """An append-only log of streams of events.

    Guarantees every adapter gives (the contract suite checks each): appends
    are atomic, versioned optimistically and idempotent by event id; stream
    versions are gapless from 1; each stream is a hash chain; all-stream reads
    and subscriptions never skip a committed event and never repeat one.
    Errors are `turnlog.errors` classes; `StorageUnavailableError` is
    retryable, and retrying an append after it is safe (idempotency).
    """

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        """Appends a batch to a stream, all or nothing.

        Args:
            stream_id: the stream (created by its first append).
            events: one or more events; their ids must be new, or the whole
                batch must be an exact retry of an earlier append.
            expected_version: the version the stream must be at: `NO_STREAM`
                (0) for a new stream, or `ANY_VERSION` (None) for no check.

        Returns:
            The versions and positions written; for a retry, those of the
            original append.

        Raises:
            VersionConflictError: the stream is at another version (its
                `actual_version` says which); nothing was written.
            DuplicateEventError: an event id is stored with other content or
                in another stream; nothing was written.
            InvalidArgumentError: empty batch, bad name, invalid JSON.
            StorageUnavailableError: the database is unreachable.
        """
        ...

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        direction: Direction = Direction.FORWARDS,
        limit: int | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Reads one stream in version order.

        Args:
            stream_id: the stream; a missing stream reads as empty.
            from_version: the first version returned (inclusive). None means
                the first event forwards, the last event backwards.
            direction: forwards (ascending versions) or backwards.
            limit: at most this many events; None for all.
        """
        ...

    async def read_all(
        self,
        *,
        after: Position = ...,
        limit: int = 1000,
        filter: EventFilter | None = None,
    ) -> EventPage:
        """Reads events of all streams after a checkpoint, never skipping one.

        Args:
            after: the checkpoint (`START_POSITION` to read from the beginning).
            limit: the most events scanned for this page (at least 1); with a
                tenant filter, the most of that tenant's events.
            filter: types, stream prefix and tenant to keep; None keeps all.
        """
        ...

    async def latest_events_of_types(
        self,
        types: Collection[str],
        *,
        stream_prefix: str = "",
        last_type: str | None = None,
        tenant: str | None = None,
    ) -> tuple[RecordedEvent, ...]:
        """Per stream, the latest event whose type is one of `types`; a query, not a scan.

        Finds, for example, the streams where some process is still open:
        with `types` = its start and end events and `last_type` = the start,
        only streams whose latest such event is a start come back.

        Args:
            types: the event types considered (at least one).
            stream_prefix: only streams whose id starts with this.
            last_type: when given, only streams whose latest event among
                `types` has this type.
            tenant: when given, only this tenant's events are considered.

        Returns:
            At most one event per stream (its highest-version event among
            `types`), ordered by stream id; committed events only.
        """
        ...

    def subscribe_all(
        self,
        *,
        after: Position = ...,
        filter: EventFilter | None = None,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Yields every event after `after` (catch-up), then new ones as they commit.

        Never ends by itself; never skips or repeats an event, also across
        lost database connections (it reconnects and resumes). Cancel the
        iterating task, or close the iterator, to stop.
        """
        ...

    def subscribe_stream(
        self, stream_id: str, *, after_version: int = 0
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Yields a stream's events with version > `after_version`, then live ones."""
        ...

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version; 0 when it does not exist."""
        ...

    async def save_snapshot(
        self, stream_id: str, *, kind: str, stream_version: int, state: bytes
    ) -> None:
        """Stores derived state at a version (replacing one of the same kind and version).

        Raises:
            InvalidArgumentError: the stream has no event at `stream_version`.
        """
        ...

    async def load_snapshot(
        self, stream_id: str, *, kind: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The latest snapshot of `kind` at or below `max_version`, or None.

        Load state as this snapshot plus `read_stream(from_version=
        snapshot.stream_version + 1)`.
        """
        ...

    async def import_events(self, stream_id: str, events: Sequence[ImportedEvent]) -> ImportResult:
        """Stores events recorded elsewhere verbatim, keeping their ids, times and hashes.

        The batch is versions `k..n` of the stream, in order, a valid hash
        chain (version 1 links to the genesis hash). Events the stream holds
        already with the same id and hash are skipped; the rest must extend
        the stored head (its hash is the next event's `prev_hash`). All or
        nothing; importing the same batch again writes nothing.

        Raises:
            InvalidArgumentError: empty batch, versions not consecutive, a
                hash that does not match its event or link, invalid JSON.
            HistoryDivergedError: the stream holds different events at these
                versions, or its head does not link to the batch.
            DuplicateEventError: an event id is stored in another stream or
                at another version.
            StorageUnavailableError: the database is unreachable.
        """
        ...

    async def verify(self, stream_id: str) -> VerificationReport:
        """Recomputes a stream's hash chain and reports the first broken link.

        Detects edited and deleted events (a deleted event shows as a version
        gap or a broken link). Truncating a stream's tail is only detectable
        against a version or hash recorded elsewhere.
        """
        ...
