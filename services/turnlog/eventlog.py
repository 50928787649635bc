"""How the service names and writes conversation events: stream ids, derived ids, the clock.

Shared by the conversation and history layers, so that both derive the same
ids and stamp events the same way:

- One stream per conversation, `conversation-<id>` (`stream_id`,
  `conversation_of`).
- Ids derived from a client's request id (`derived_id`, uuid5 in one fixed
  namespace): a retried request gets the same ids, so the log's idempotency
  by event id makes it safe.
- The clock is a value passed in (`Clock`, microseconds since the Unix
  epoch); `wall_clock_us` is the real one.
- `new_event` turns a domain event into what the store appends: its codec
  payload, the writer as actor, the correlation id and the shape version;
  `with_tenant` stamps the owning tenant into its metadata.
- Ids derived from request ids include the tenant (`derived_id(tenant, ...)`
  where a request creates a resource), so two tenants reusing a request id
  get resources of their own.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable

from turnlog.domain import codec
from turnlog.domain import events as ev
from turnlog.storage import EventMetadata, NewEvent

#: Namespace of every id derived from a client's request id.
ID_NAMESPACE = uuid.UUID("8f0c4b8e-4d3a-5c1e-9a57-2f6f1d0b7a31")
#: Every conversation's stream id starts with this.
STREAM_PREFIX = "conversation-"

#: Microseconds since the Unix epoch.
Clock = Callable[[], int]


def stream_id(conversation_id: str) -> str:
    """The event stream of a conversation."""
    return STREAM_PREFIX + conversation_id


def conversation_of(sid: str) -> str:
    """The conversation id of a conversation stream id."""
    return sid.removeprefix(STREAM_PREFIX)


def derived_id(*parts: str) -> str:
    """A stable id from parts (uuid5): the same request always gets the same ids."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join(parts)))


def wall_clock_us() -> int:
    """The system clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


def new_event(event_id: str, event: ev.Event, *, actor: str, correlation: str = "") -> NewEvent:
    """The store's form of a domain event, written by `actor` for request `correlation`."""
    type_name, data = codec.encode(event)
    return NewEvent(
        event_id=uuid.UUID(event_id),
        type=type_name,
        data=data,
        metadata=EventMetadata(
            correlation_id=correlation or None,
            actor=actor,
            schema_version=codec.written_schema_version(type_name),
        ),
    )


def with_tenant(event: NewEvent, tenant: str) -> NewEvent:
    """`event` with `tenant` in its metadata (where the hash chain covers it)."""
    if event.metadata.tenant == tenant:
        return event
    return dataclasses.replace(event, metadata=dataclasses.replace(event.metadata, tenant=tenant))


__all__ = [
    "ID_NAMESPACE",
    "STREAM_PREFIX",
    "Clock",
    "conversation_of",
    "derived_id",
    "new_event",
    "stream_id",
    "wall_clock_us",
    "with_tenant",
]
