"""Events to and from the `(type, data)` pairs stored in the event log.

`data` is plain JSON (str, int, float, bool, None, lists, objects): enums as
their values, nested dataclasses as objects, tuples as lists. The type name
is the event class name. `SCHEMA_VERSION` names the shape of each type's
data; when a shape changes, its version goes up and an upcaster registered
in `UPCASTERS` turns older data into the current shape before decoding, so
that logs written by older releases still replay.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Protocol

from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState

JSON = Any
Upcaster = Callable[[dict[str, JSON]], dict[str, JSON]]

EVENT_CLASSES: dict[str, type[ev.Event]] = {cls.__name__: cls for cls in ev.EVENT_TYPES}

#: The snapshot kind of `ConversationState` in its current shape; bump it when
#: the state's shape changes, and old snapshots are simply ignored.
STATE_KIND = "conversation.v1"


def _labels_pairs_to_object(data: dict[str, JSON]) -> dict[str, JSON]:
    """ConversationCreated v1 -> v2: labels from [[key, value], ...] to {key: value}."""
    return {**data, "labels": {key: value for key, value in data.get("labels", [])}}


# The current data shape of each event type. Bump one when its shape changes
# incompatibly, and register an upcaster from the old version. Writers record
# a version above 1 in the event's metadata (`written_schema_version`).
#
# ConversationCreated v2 (v1 until 2026-11): `labels` is a JSON object instead
# of a list of [key, value] pairs, so the log itself can be queried by label
# (`data->'labels' @> '{"env":"prod"}'` in PostgreSQL).
SCHEMA_VERSION: dict[str, int] = {**dict.fromkeys(EVENT_CLASSES, 1), "ConversationCreated": 2}

# (type name, version) -> function turning data of that version into version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("ConversationCreated", 1): _labels_pairs_to_object,
}


# Where the stored shape is not the dataclass's plain JSON form: type name ->
# (dataclass form -> stored form, stored form -> dataclass form).
def _labels_to_object(data: dict[str, JSON]) -> dict[str, JSON]:
    return {**data, "labels": dict(data["labels"])}


def _labels_to_pairs(data: dict[str, JSON]) -> dict[str, JSON]:
    labels = data.get("labels", {})
    if not isinstance(labels, dict):
        raise TypeError("labels must be a JSON object")
    return {**data, "labels": sorted(labels.items())}


_STORED_FORM: dict[str, tuple[Upcaster, Upcaster]] = {
    "ConversationCreated": (_labels_to_object, _labels_to_pairs),
}


class UnknownEventTypeError(Exception):
    """The log holds an event type this code does not know."""


class StoredEvent(Protocol):
    """What `decode_stored` reads of a stored event (a `RecordedEvent`, an exported line)."""

    @property
    def type(self) -> str: ...

    @property
    def data_json(self) -> str: ...

    @property
    def metadata_json(self) -> str: ...


def written_schema_version(type_name: str) -> int | None:
    """The shape version to record in an event's metadata: None for version 1.

    Version 1 is left out, so that events of types whose shape never changed
    carry no version, like every event written before versions were recorded.
    """
    version = SCHEMA_VERSION[type_name]
    return version if version > 1 else None


def schema_version_of(metadata_json: str) -> int:
    """The shape version an event's stored metadata records (1 when it records none)."""
    version = json.loads(metadata_json).get("schema_version", 1)
    return version if type(version) is int and version >= 1 else 1


def decode_stored(event: StoredEvent) -> ev.Event:
    """The domain event of a stored one, upcast from the shape it was written in.

    Raises:
        UnknownEventTypeError: a type this code does not know.
        TypeError, ValueError, KeyError: the payload does not fit the type.
    """
    data = json.loads(event.data_json)
    if not isinstance(data, dict):
        raise TypeError("event data is not a JSON object")
    return decode(event.type, data, schema_version_of(event.metadata_json))


def encode(event: ev.Event) -> tuple[str, dict[str, JSON]]:
    """Return the stored type name and JSON data of `event`."""
    data = _to_json(event)
    assert isinstance(data, dict)
    name = type(event).__name__
    if name in _STORED_FORM:
        data = _STORED_FORM[name][0](data)
    return name, data


def decode(type_name: str, data: Mapping[str, JSON], schema_version: int | None = None) -> ev.Event:
    """Rebuild an event from its stored form, upcasting older shapes first.

    Args:
        type_name: the stored event type.
        data: the stored payload.
        schema_version: the shape version the payload was written with; None
            means the current one.
    """
    cls = EVENT_CLASSES.get(type_name)
    if cls is None:
        raise UnknownEventTypeError(type_name)
    current = SCHEMA_VERSION[type_name]
    version = current if schema_version is None else schema_version
    if version > current:
        raise ValueError(f"{type_name} data of shape version {version} is newer than this code")
    payload = dict(data)
    while version < current:
        payload = UPCASTERS[(type_name, version)](payload)
        version += 1
    if type_name in _STORED_FORM:
        payload = _STORED_FORM[type_name][1](payload)
    value = _from_json(cls, payload)
    return typing.cast(ev.Event, value)


def state_to_json(state: ConversationState) -> dict[str, JSON]:
    """The JSON form of a folded state, for snapshots (see `STATE_KIND`)."""
    data = _to_json(state)
    assert isinstance(data, dict)
    return data


def state_from_json(data: Mapping[str, JSON]) -> ConversationState:
    """Rebuild a state stored by `state_to_json` under the current `STATE_KIND`."""
    value = _from_json(ConversationState, dict(data))
    assert isinstance(value, ConversationState)
    return value


def _to_json(value: object) -> JSON:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_json(tp: Any, value: JSON) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_json(inner, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        return tuple(_from_json(a, v) for a, v in zip(args, value, strict=True))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        kwargs = {k: _from_json(hints[k], v) for k, v in value.items() if k in known}
        return tp(**kwargs)
    if tp is float and isinstance(value, int):
        return float(value)
    return value
