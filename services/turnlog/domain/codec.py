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
# v2: a failed turn keeps its error (`Turn.failure`).
STATE_KIND = "conversation.v2"


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
    "ConversationUpdated": (_labels_to_object, _labels_to_pairs),
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


# Encoding and decoding run for every event written and, above all, for every
# event replayed, so neither walks values generically. Plain JSON scalars are
# passed through without a call, and decoding compiles, once per type hint, a
# function that does only the conversions that type needs (see `_decoder`).

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})

Decoder = Callable[[JSON], Any]


def _to_json(value: object) -> JSON:
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    cls: type = type(value)
    names = _field_names(cls)
    if names is not None:
        data = {}
        for name in names:
            item = getattr(value, name)
            data[name] = item if type(item) in _PLAIN_TYPES else _to_json(item)
        return data
    if isinstance(value, tuple | list):
        return [item if type(item) in _PLAIN_TYPES else _to_json(item) for item in value]
    return value


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """The field names of a dataclass, None for any other class."""
    if not dataclasses.is_dataclass(cls):
        return None
    return tuple(f.name for f in dataclasses.fields(cls))


def _from_json(tp: Any, value: JSON) -> Any:
    decoder = _decoder(tp)
    return value if decoder is None else decoder(value)


@cache
def _decoder(tp: Any) -> Decoder | None:
    """A function rebuilding a value of type `tp` from its JSON form.

    None where the JSON value is used as it is (str, int, bool), so that
    callers skip the call; a tuple of those is just `tuple(value)`. Compiled
    and cached because replay decodes every event of a stream: the generic
    walk this replaces inspected the type hint of every value, each token id
    included, and cost several times `json.loads`.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # Only optional values: X | None.
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        inner_decoder = _decoder(inner)
        if inner_decoder is None:
            return None
        return lambda value: None if value is None else inner_decoder(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_decoder = _decoder(args[0])
            if item_decoder is None:
                return tuple
            return lambda value: tuple([item_decoder(item) for item in value])
        return _fixed_tuple_decoder(tuple(_decoder(a) for a in args))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if tp is float:
        return _float_from_json
    return None


def _float_from_json(value: JSON) -> JSON:
    # JSON has one kind of number: a whole float may be stored as an int.
    return float(value) if isinstance(value, int) else value


def _fixed_tuple_decoder(item_decoders: tuple[Decoder | None, ...]) -> Decoder:
    """A decoder of tuple[A, B, ...] (a fixed length) from its items' decoders."""
    length = len(item_decoders)
    if all(d is None for d in item_decoders):

        def decode_plain(value: JSON) -> tuple[Any, ...]:
            items = tuple(value)
            if len(items) != length:
                raise ValueError(f"expected {length} items, got {len(items)}")
            return items

        return decode_plain

    def decode(value: JSON) -> tuple[Any, ...]:
        return tuple(
            item if d is None else d(item) for d, item in zip(item_decoders, value, strict=True)
        )

    return decode


# A dataclass's fields taken as they are, and those with their decoders.
_FieldDecoders = tuple[frozenset[str], tuple[tuple[str, Decoder], ...]]


def _dataclass_decoder(cls: type) -> Decoder:
    """A decoder of a dataclass from a JSON object.

    Keys the class has no field for are ignored (data written by newer code),
    and missing ones take the field's default.
    """
    # Compiled at the first call, not now, so that a dataclass may refer to itself.
    fields: _FieldDecoders | None = None

    def decode(value: JSON) -> Any:
        nonlocal fields
        if fields is None:
            fields = _field_decoders(cls)
        plain, converted = fields
        kwargs = {name: item for name, item in value.items() if name in plain}
        for name, decoder in converted:
            if name in value:
                kwargs[name] = decoder(value[name])
        return cls(**kwargs)

    return decode


def _field_decoders(cls: type) -> _FieldDecoders:
    hints = typing.get_type_hints(cls)
    decoders = {f.name: _decoder(hints[f.name]) for f in dataclasses.fields(cls)}
    plain = frozenset(name for name, d in decoders.items() if d is None)
    converted = tuple((name, d) for name, d in decoders.items() if d is not None)
    return plain, converted
