"""Input checks every `EventStore` adapter applies, so all reject the same input alike."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from turnlog.errors import InvalidArgumentError
from turnlog.storage.hashchain import GENESIS_HASH, event_hash
from turnlog.storage.port import MAX_NAME_LENGTH, EventMetadata, ImportedEvent


def check_name(what: str, value: str) -> None:
    """Rejects an empty, overlong or NUL-containing stream id, type or kind."""
    if not value or len(value) > MAX_NAME_LENGTH or "\x00" in value:
        raise InvalidArgumentError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters without NUL")


def check_metadata(metadata: EventMetadata) -> None:
    """Rejects metadata with a NUL character in a field.

    PostgreSQL derives each event's tenant from its metadata (migration 0002),
    and its JSON functions cannot turn the `\\u0000` escape that a NUL
    becomes into text, anywhere in the document: the insert would fail.
    """
    fields = (
        metadata.correlation_id,
        metadata.causation_id,
        metadata.trace_id,
        metadata.tenant,
        metadata.actor,
    )
    if any(value is not None and "\x00" in value for value in fields):
        raise InvalidArgumentError("event metadata must not contain NUL characters")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON document, object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def check_imported_metadata(metadata_json: str) -> None:
    """Rejects imported metadata that the event log cannot read a tenant from.

    The tenant, when given, must be a JSON string (or null); and no string may
    hold a NUL or an unpaired surrogate (escaped as `\\u0000`, `\\ud800`), which
    PostgreSQL's JSON functions refuse anywhere in the document (migration
    0002). Invalid JSON is left to the store's own check.
    """
    try:
        raw = json.loads(metadata_json)
    except (ValueError, RecursionError):
        return
    if isinstance(raw, dict) and not isinstance(raw.get("tenant"), str | None):
        raise InvalidArgumentError("the metadata's tenant must be a JSON string")
    for text in _strings(raw):
        try:
            text.encode("utf-8")  # fails on an unpaired surrogate
        except UnicodeEncodeError:
            valid = False
        else:
            valid = "\x00" not in text
        if not valid:
            raise InvalidArgumentError(
                "event metadata must not contain NUL characters or unpaired surrogates"
            )


def check_import_batch(stream_id: str, events: Sequence[ImportedEvent]) -> None:
    """Rejects a batch that is not consecutive versions forming a valid hash chain."""
    if not events:
        raise InvalidArgumentError("an import needs at least one event")
    if events[0].stream_version < 1:
        raise InvalidArgumentError("stream versions start at 1")
    if events[0].stream_version == 1 and events[0].prev_hash != GENESIS_HASH:
        raise InvalidArgumentError("version 1 must link to the genesis hash")
    previous: ImportedEvent | None = None
    for event in events:
        check_name("event type", event.type)
        if "\x00" in event.data_json or "\x00" in event.metadata_json:
            raise InvalidArgumentError("event JSON must not contain NUL characters")
        check_imported_metadata(event.metadata_json)
        if previous is not None:
            if event.stream_version != previous.stream_version + 1:
                raise InvalidArgumentError(
                    f"imported versions must be consecutive (after {previous.stream_version}"
                    f" came {event.stream_version})"
                )
            if event.prev_hash != previous.hash:
                raise InvalidArgumentError(
                    f"version {event.stream_version} does not link to the previous event's hash"
                )
        recomputed = event_hash(
            prev_hash=event.prev_hash,
            stream_id=stream_id,
            stream_version=event.stream_version,
            event_id=event.event_id,
            type=event.type,
            data_json=event.data_json,
            metadata_json=event.metadata_json,
            recorded_at=event.recorded_at,
        )
        if recomputed != event.hash:
            raise InvalidArgumentError(
                f"version {event.stream_version}: the hash does not match the event's content"
            )
        previous = event
