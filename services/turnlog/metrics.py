"""Prometheus metrics of the conversation service (`turnlog serve`).

The metrics live on prometheus_client's default registry, so the exporter
also serves the client library's process and platform collectors. The
endpoint is off unless `turnlog serve --metrics-listen HOST:PORT` (or
`TURNLOG_METRICS_LISTEN`) asks for it; the instruments below are cheap
enough to update whether or not anything scrapes them. docs/metrics.md
lists what is exported.

`turnlog_turn_stage_seconds{stage=...}`: where a turn's time goes.

- `load`: reading the conversation (its events, or the cached state) before
  a turn;
- `request_guardrails`: the request guardrail stages;
- `begin_append`: committing TurnStarted;
- `first_token`: from sending StartGeneration to the first text delta;
- `generation`: from the first to the last text delta of one generation (a
  turn with tool rounds has several generations);
- `end_append`: committing the turn's last events;
- `tools`: running one tool round;
- `turn`: the whole turn, from the request's arrival to its end being
  recorded.

`turnlog_turns_ended_total{outcome=...}`: turns ended, by outcome
(completed, failed, cancelled, blocked, interrupted).
`turnlog_turn_appends_total{kind=...}`: commits made by turns: `begin`
(TurnStarted), `flush` (streamed text written mid-turn), `end` (the turn's
last events). `turnlog_turns_running`: turns in progress in this process.

`stage_timer(stage)` times a block, `observe_stage(stage, seconds)` records a
duration measured by hand; both use `time.perf_counter()` seconds and look
each stage's histogram child up once.
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType

from prometheus_client import Counter, Gauge, Histogram, start_http_server

#: The stage label values the application uses (docstring above).
STAGES = (
    "load",
    "request_guardrails",
    "context",
    "begin_append",
    "first_token",
    "generation",
    "end_append",
    "tools",
    "turn",
)
#: The outcome label values of TURNS_ENDED.
OUTCOMES = ("completed", "failed", "cancelled", "blocked", "interrupted")
#: The kind label values of TURN_APPENDS.
APPEND_KINDS = ("begin", "flush", "end")

#: Seconds; from half a millisecond (an append) to a minute (a long generation).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)  # fmt: skip

TURN_STAGE_SECONDS = Histogram(
    "turnlog_turn_stage_seconds",
    "Seconds spent in each stage of a turn (stage: load, request_guardrails, "
    "begin_append, first_token, generation, end_append, tools, turn)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
TURNS_ENDED = Counter(
    "turnlog_turns_ended",
    "Turns ended, by outcome (completed, failed, cancelled, blocked, interrupted)",
    ["outcome"],
)
TURN_APPENDS = Counter(
    "turnlog_turn_appends",
    "Event log commits made by turns, by kind (begin: TurnStarted, flush: streamed text "
    "mid-turn, end: the turn's last events)",
    ["kind"],
)
TURNS_RUNNING = Gauge("turnlog_turns_running", "Turns in progress in this process")

# Every known series exists from the start (at zero), so that a scrape before
# the first turn already lists them and rates over a restart stay defined.
for _outcome in OUTCOMES:
    TURNS_ENDED.labels(_outcome)
for _kind in APPEND_KINDS:
    TURN_APPENDS.labels(_kind)

_stage_children: dict[str, Histogram] = {
    stage: TURN_STAGE_SECONDS.labels(stage) for stage in STAGES
}


def _stage_child(stage: str) -> Histogram:
    child = _stage_children.get(stage)
    if child is None:
        child = _stage_children[stage] = TURN_STAGE_SECONDS.labels(stage)
    return child


class _StageTimer(contextlib.AbstractContextManager[None]):
    """Observes the seconds between `__enter__` and `__exit__` (errors included)."""

    __slots__ = ("_child", "_start")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._child.observe(time.perf_counter() - self._start)


def stage_timer(stage: str) -> contextlib.AbstractContextManager[None]:
    """A context manager that records how long its block took as `stage`.

    The duration is recorded whether the block returns or raises.
    """
    return _StageTimer(_stage_child(stage))


def observe_stage(stage: str, seconds: float) -> None:
    """Records `seconds` (measured with `time.perf_counter()`) as one `stage` observation."""
    _stage_child(stage).observe(seconds)


def parse_listen(listen: str) -> tuple[str, int]:
    """Splits "HOST:PORT" ("[::1]:9464" for IPv6; port 0: any free port).

    Raises:
        ValueError: with a message fit for a user, if `listen` is malformed.
    """
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"{listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464; port 0 picks a free port)"
        )
    return host, int(port_text)


def start_metrics_server(listen: str) -> int:
    """Serves the default registry at http://HOST:PORT/metrics; returns the bound port.

    The exporter runs in a daemon thread for the rest of the process.

    Raises:
        ValueError: `listen` is not HOST:PORT.
        OSError: the address cannot be bound.
    """
    host, port = parse_listen(listen)
    httpd, _thread = start_http_server(port, addr=host)
    bound: int = httpd.server_port
    return bound
