"""The load driver: many conversations' turns at once through the authenticated gRPC service.

`run_load` creates `LoadPlan.conversations` conversations spread over
`LoadPlan.tenants` tenants, then runs every conversation's `LoadPlan.turns`
turns back to back, all conversations at once, alternating `SendMessage` and
`StreamTurn` (a conversation starts with the one its neighbour does not, so
both kinds are always in flight). Everything is bounded: a fixed number of
calls, a deadline per call and one for the whole run (`asyncio.timeout`).
Each turn's outcome (acknowledged with its turn id and status, or the error's
status code and `ErrorInfo` reason) and latency is kept in a `LoadReport`,
whose figures are printed (never asserted) and can be written as JSON.

`LogSubscriber` is the all-conversation subscriber that runs beside the load:
`SubscribeEvents` with no conversation, on an administrator's credential so
that it covers every tenant.

The read-back checks of what the load left in the log: log_audit.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from conversation_helpers import ServedApp, error_reason

from turnlog.auth.principal import Scope
from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc

SEND_MESSAGE = "SendMessage"
STREAM_TURN = "StreamTurn"
CREATE = "CreateConversation"
#: `TURNLOG_LOAD_JSON=DIR` writes each load test's figures to DIR/load-<name>.json.
JSON_DIR_ENV = "TURNLOG_LOAD_JSON"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    """What a load run does.

    Attributes:
        name: names the run in its printout and JSON file.
        conversations: conversations, all running at once.
        turns: turns per conversation, back to back.
        tenants: conversation i belongs to tenant `tenant_name(i % tenants)`.
        deadline_s: the whole run's limit (creation and turns).
        call_timeout_s: each call's gRPC deadline.
        defaults: the conversations' turn defaults (e.g. a short max_tokens).
    """

    name: str
    conversations: int
    turns: int
    tenants: int = 4
    deadline_s: float = 240.0
    call_timeout_s: float = 120.0
    defaults: pb.TurnDefaults | None = None

    @staticmethod
    def tenant_name(index: int) -> str:
        return f"load-tenant-{index}"

    def tenant_of(self, conversation: int) -> str:
        """The tenant conversation number `conversation` is created in."""
        return self.tenant_name(conversation % self.tenants)

    def rpc_of(self, conversation: int, turn: int) -> str:
        """The RPC that runs turn `turn` of conversation number `conversation`."""
        return STREAM_TURN if (conversation + turn) % 2 else SEND_MESSAGE

    @staticmethod
    def request_id(conversation: int, turn: int) -> str:
        return f"load-{conversation}-{turn}"

    def requests_per_tenant(self) -> int:
        """The most calls one tenant makes: its creations and its turns."""
        per_tenant = math.ceil(self.conversations / self.tenants)
        return per_tenant * (1 + self.turns)

    def conversations_per_tenant(self) -> int:
        """The most conversations of one tenant (each runs one turn at a time)."""
        return math.ceil(self.conversations / self.tenants)


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOutcome:
    """One call of the load: a conversation's creation or one of its turns.

    Attributes:
        rpc: `CREATE`, `SEND_MESSAGE` or `STREAM_TURN`.
        tenant: the tenant of the caller's credential.
        conversation: the conversation's resource name ("" when its creation failed).
        request_id: the idempotency key sent.
        latency_s: from the call to its last reply (the response, or `TurnEnded`).
        turn_id: the turn the service acknowledged ("" for a creation or an error).
        status: the acknowledged turn's status, as the domain names it
            ("completed", ...; "" for a creation or an error).
        completion_tokens: the tokens the acknowledged turn generated.
        error: "" when acknowledged; else "<status code>/<ErrorInfo reason>",
            or "PROTOCOL/<what>" for a stream that broke the turn protocol.
    """

    rpc: str
    tenant: str
    conversation: str
    request_id: str
    latency_s: float
    turn_id: str = ""
    status: str = ""
    completion_tokens: int = 0
    error: str = ""

    @property
    def acknowledged(self) -> bool:
        return not self.error


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-quantile (0 < q ≤ 1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass(slots=True, kw_only=True)
class LoadReport:
    """Every outcome of a load run, and its phases' wall times."""

    plan: LoadPlan
    creations: list[CallOutcome] = field(default_factory=list)
    turns: list[CallOutcome] = field(default_factory=list)
    create_wall_s: float = 0.0
    turns_wall_s: float = 0.0
    timed_out: bool = False

    def acknowledged(self) -> list[CallOutcome]:
        """The turns the service acknowledged (the client saw their end)."""
        return [t for t in self.turns if t.acknowledged]

    def errors(self) -> Counter[tuple[str, str]]:
        """(rpc, error) -> count, over creations and turns."""
        return Counter((o.rpc, o.error) for o in [*self.creations, *self.turns] if o.error)

    def figures(self) -> dict[str, Any]:
        """The run's figures, as printed and written to JSON."""
        acked = self.acknowledged()

        def latency(outcomes: list[CallOutcome]) -> dict[str, Any]:
            values = [o.latency_s for o in outcomes]
            return {
                "count": len(values),
                "p50_ms": _ms(percentile(values, 0.50)),
                "p99_ms": _ms(percentile(values, 0.99)),
                "max_ms": _ms(max(values, default=None)),
            }

        plan = self.plan
        wall = self.turns_wall_s or math.inf
        tokens = sum(o.completion_tokens for o in acked)
        return {
            "name": plan.name,
            "conversations": plan.conversations,
            "turns_per_conversation": plan.turns,
            "tenants": plan.tenants,
            "turns_sent": len(self.turns),
            "turns_acknowledged": len(acked),
            "turn_statuses": dict(Counter(o.status for o in acked)),
            "errors": {f"{rpc} {error}": n for (rpc, error), n in sorted(self.errors().items())},
            "timed_out": self.timed_out,
            "create_wall_s": round(self.create_wall_s, 2),
            "turns_wall_s": round(self.turns_wall_s, 2),
            "turns_per_s": round(len(acked) / wall, 1),
            "completion_tokens": tokens,
            "completion_tokens_per_s": round(tokens / wall, 1),
            "latency": {
                "all": latency(acked),
                SEND_MESSAGE: latency([o for o in acked if o.rpc == SEND_MESSAGE]),
                STREAM_TURN: latency([o for o in acked if o.rpc == STREAM_TURN]),
                CREATE: latency([o for o in self.creations if o.acknowledged]),
            },
            "cpu_count": os.cpu_count(),
        }

    def summary(self) -> str:
        """The figures as a few lines for `pytest -s`."""
        f = self.figures()
        lines = [
            f"load {f['name']}: {f['conversations']} conversations x {f['turns_per_conversation']}"
            f" turns over {f['tenants']} tenants: {f['turns_acknowledged']}/{f['turns_sent']}"
            f" turns acknowledged in {f['turns_wall_s']} s ({f['turns_per_s']} turns/s;"
            f" creations {f['create_wall_s']} s){' TIMED OUT' if f['timed_out'] else ''}",
            f"  {f['completion_tokens']} tokens generated ({f['completion_tokens_per_s']} tokens/s)",
        ]
        for kind, figures in f["latency"].items():
            lines.append(
                f"  {kind:<18} n={figures['count']:<5} p50 {figures['p50_ms']} ms"
                f"  p99 {figures['p99_ms']} ms  max {figures['max_ms']} ms"
            )
        lines.append(f"  statuses {f['turn_statuses']}  errors {f['errors'] or 'none'}")
        return "\n".join(lines)

    def publish(self, extra: dict[str, Any] | None = None) -> None:
        """Prints the summary; writes the figures as JSON when `TURNLOG_LOAD_JSON` names a folder."""
        print("\n" + self.summary())
        folder = os.environ.get(JSON_DIR_ENV)
        if folder:
            path = Path(folder) / f"load-{self.plan.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**self.figures(), **(extra or {})}, indent=2) + "\n")
            print(f"  figures written to {path}")


def _failure(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}/{error_reason(error)}"


async def _stream_turn(
    stub: sgrpc.ConversationServiceStub, turn: spb.TurnInput, timeout_s: float
) -> tuple[pb.Turn, str]:
    """Runs a turn with StreamTurn, reading every event; the ended turn, or a protocol error."""
    call = stub.StreamTurn(spb.StreamTurnRequest(start=turn), timeout=timeout_s)
    events: list[spb.TurnEvent] = [r.event async for r in call]  # type: ignore[attr-defined]
    if not events or not events[0].HasField("turn_started"):
        return pb.Turn(), "PROTOCOL/NO_TURN_STARTED"
    if [e.sequence for e in events] != list(range(1, len(events) + 1)):
        return pb.Turn(), "PROTOCOL/SEQUENCE_GAP"
    if not events[-1].HasField("turn_ended") or {e.turn_id for e in events} != {events[0].turn_id}:
        return pb.Turn(), "PROTOCOL/NO_TURN_ENDED"
    return events[-1].turn_ended.turn, ""


def _status(status: int) -> str:
    """A TurnStatus number as the domain's `TurnStatus` value ("completed", ...)."""
    return str(pb.TurnStatus.Name(status)).removeprefix("TURN_STATUS_").lower()  # type: ignore[arg-type]


async def _run_turns(
    stub: sgrpc.ConversationServiceStub,
    plan: LoadPlan,
    index: int,
    name: str,
    outcomes: list[CallOutcome],
) -> None:
    tenant = plan.tenant_of(index)
    for number in range(plan.turns):
        rpc = plan.rpc_of(index, number)
        request_id = plan.request_id(index, number)
        turn = spb.TurnInput(
            conversation=name, request_id=request_id, content=f"Load turn {number} of {index}."
        )
        start = time.perf_counter()
        ended, error = pb.Turn(), ""
        try:
            if rpc == SEND_MESSAGE:
                sent = await stub.SendMessage(  # type: ignore[misc]  # a grpc.aio stub
                    spb.SendMessageRequest(input=turn), timeout=plan.call_timeout_s
                )
                ended = sent.turn
            else:
                ended, error = await _stream_turn(stub, turn, plan.call_timeout_s)
        except grpc.aio.AioRpcError as e:
            error = _failure(e)
        outcomes.append(
            CallOutcome(
                rpc=rpc,
                tenant=tenant,
                conversation=name,
                request_id=request_id,
                latency_s=time.perf_counter() - start,
                turn_id="" if error else ended.turn_id,
                status="" if error else _status(ended.status),
                completion_tokens=ended.usage.completion_tokens,
                error=error,
            )
        )


async def _create(stub: sgrpc.ConversationServiceStub, plan: LoadPlan, index: int) -> CallOutcome:
    request_id = f"load-conversation-{index}"
    start = time.perf_counter()
    try:
        created = await stub.CreateConversation(  # type: ignore[misc]  # a grpc.aio stub
            spb.CreateConversationRequest(
                request_id=request_id, system_prompt="Be brief.", defaults=plan.defaults
            ),
            timeout=plan.call_timeout_s,
        )
    except grpc.aio.AioRpcError as e:
        return CallOutcome(
            rpc=CREATE,
            tenant=plan.tenant_of(index),
            conversation="",
            request_id=request_id,
            latency_s=time.perf_counter() - start,
            error=_failure(e),
        )
    return CallOutcome(
        rpc=CREATE,
        tenant=plan.tenant_of(index),
        conversation=created.conversation.name,
        request_id=request_id,
        latency_s=time.perf_counter() - start,
    )


async def run_load(serving: ServedApp, plan: LoadPlan) -> LoadReport:
    """Runs `plan` against `serving`; returns every outcome (a run past its deadline is cut).

    Each tenant's calls share one channel, with a token of that tenant (scopes
    of an ordinary caller). Errors are recorded, never raised; a run cut by
    `plan.deadline_s` has `timed_out` set and the outcomes it reached.
    """
    report = LoadReport(plan=plan)
    tenants = sorted({plan.tenant_of(i) for i in range(plan.conversations)})
    async with contextlib.AsyncExitStack() as channels:
        stubs = {t: await channels.enter_async_context(serving.stub(t)) for t in tenants}
        try:
            async with asyncio.timeout(plan.deadline_s):
                start = time.perf_counter()
                report.creations = list(
                    await asyncio.gather(
                        *(
                            _create(stubs[plan.tenant_of(i)], plan, i)
                            for i in range(plan.conversations)
                        )
                    )
                )
                report.create_wall_s = time.perf_counter() - start
                start = time.perf_counter()
                try:
                    async with asyncio.TaskGroup() as group:
                        for i, created in enumerate(report.creations):
                            if created.acknowledged:
                                group.create_task(
                                    _run_turns(
                                        stubs[created.tenant],
                                        plan,
                                        i,
                                        created.conversation,
                                        report.turns,
                                    )
                                )
                finally:
                    report.turns_wall_s = time.perf_counter() - start
        except TimeoutError:
            report.timed_out = True
    return report


@dataclass(frozen=True, slots=True)
class SeenEvent:
    """An event as the subscriber received it."""

    event_id: str
    stream_id: str
    version: int
    position: str


class LogSubscriber:
    """An all-conversation `SubscribeEvents` (administrator: every tenant), kept while in use.

    Entering starts the subscription and waits for its `caught_up` marker,
    so every event appended afterwards must reach `seen`. `wait_for` waits
    until a given event has arrived; leaving cancels the call.
    """

    ADMIN_TENANT = "load-operators"

    def __init__(self, serving: ServedApp, *, timeout_s: float = 60.0) -> None:
        self._serving = serving
        self._timeout_s = timeout_s
        self.seen: list[SeenEvent] = []
        self.caught_up = False
        self._ids: set[str] = set()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        stub = await self._channel.enter_async_context(
            self._serving.stub(self.ADMIN_TENANT, (Scope.ADMIN,))
        )
        self._task = asyncio.create_task(self._follow(stub))
        try:
            await self._wait(lambda: self.caught_up)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.aclose()

    async def _follow(self, stub: sgrpc.ConversationServiceStub) -> None:
        responses: AsyncIterator[spb.SubscribeEventsResponse] = stub.SubscribeEvents(
            spb.SubscribeEventsRequest()
        )  # type: ignore[assignment]
        try:
            async for response in responses:
                if response.HasField("caught_up"):
                    self.caught_up = True
                for e in response.events:
                    self.seen.append(SeenEvent(e.event_id, e.stream_id, e.version, e.position))
                    self._ids.add(e.event_id)
                self._arrived.set()
        finally:
            self._arrived.set()

    async def _wait(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(self._timeout_s):
            while not done():
                assert self._task is not None
                if self._task.done():
                    self._task.result()  # raises the call's error
                    raise AssertionError("the subscription ended by itself")
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_for(self, event_id: str) -> None:
        """Waits until the event with this id has been received (or the timeout passes)."""
        await self._wait(lambda: event_id in self._ids)
