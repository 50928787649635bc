"""The event log: the `EventStore` port and its PostgreSQL adapter; replica liveness.

The conversation service opens a store with `open_event_store(settings)`
and uses only the `EventStore` protocol and the dataclasses of `port`, and
the `ReplicaLiveness` protocol of `liveness` (PostgreSQL: `PostgresReplicaLock`),
and the `TurnMailbox` protocol of `mailbox` (PostgreSQL: `PostgresTurnMailbox`).
This package is the only one that imports psycopg.
docs/event-log.md describes the schema and guarantees.
"""

from turnlog.storage.connect import OpenedStore, open_event_store
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.hashchain import event_hash, verify_chain
from turnlog.storage.liveness import Claim, ReplicaLiveness
from turnlog.storage.mailbox import InMemoryTurnMailbox, Letter, Notice, TurnMailbox
from turnlog.storage.mailbox_postgres import PostgresTurnMailbox
from turnlog.storage.memory import InMemoryEventStore
from turnlog.storage.migrations import migrate
from turnlog.storage.port import (
    ANY_VERSION,
    DEFAULT_TENANT,
    NO_STREAM,
    START_POSITION,
    AppendResult,
    Direction,
    EventFilter,
    EventMetadata,
    EventPage,
    EventStore,
    ImportedEvent,
    ImportResult,
    NewEvent,
    Position,
    RawJson,
    RecordedEvent,
    Snapshot,
    VerificationReport,
)
from turnlog.storage.postgres import PostgresEventStore
from turnlog.storage.replica_lock import PostgresReplicaLock

__all__ = [
    "ANY_VERSION",
    "DEFAULT_TENANT",
    "NO_STREAM",
    "START_POSITION",
    "AppendResult",
    "Claim",
    "Direction",
    "EmbeddedPostgres",
    "EventFilter",
    "EventMetadata",
    "EventPage",
    "EventStore",
    "ImportResult",
    "ImportedEvent",
    "InMemoryEventStore",
    "InMemoryTurnMailbox",
    "Letter",
    "NewEvent",
    "Notice",
    "OpenedStore",
    "Position",
    "PostgresEventStore",
    "PostgresReplicaLock",
    "PostgresTurnMailbox",
    "RawJson",
    "RecordedEvent",
    "ReplicaLiveness",
    "Snapshot",
    "TurnMailbox",
    "VerificationReport",
    "event_hash",
    "migrate",
    "open_event_store",
    "verify_chain",
]
