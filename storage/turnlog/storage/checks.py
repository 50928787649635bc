"""Input checks every `EventStore` adapter applies, so all reject the same input alike."""

from __future__ import annotations

from collections.abc import Sequence

from turnlog.errors import InvalidArgumentError
from turnlog.storage.hashchain import GENESIS_HASH, event_hash
from turnlog.storage.port import MAX_NAME_LENGTH, ImportedEvent


def check_name(what: str, value: str) -> None:
    """Rejects an empty, overlong or NUL-containing stream id, type or kind."""
    if not value or len(value) > MAX_NAME_LENGTH or "\x00" in value:
        raise InvalidArgumentError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters without NUL")


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
