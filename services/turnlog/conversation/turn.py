"""One turn as it runs in this process: start, generations, tool loop, and its record in the log.

`prepare` builds a turn from the conversation's state and the user's message
(request guardrails, start events, the first engine request sent at once);
`TurnRunner.begin` records the start; `TurnRunner.run` does the rest in the
task that the application gives it. `RunningTurn` is what watchers see: the
turn's numbered updates as they are recorded.

A turn is given what it needs (`TurnDependencies`: the repository, the
engine client, tools, guardrails, the clock, the defaults) and knows nothing
of the application that runs it.

Watchers are shown only what the log holds: every update is published
after the append that records its event, so a client never saw anything
that a crash could lose, and resuming from any sequence number it saw, on
any replica, after any crash, continues exactly where it was
(docs/conversation.md, "Resumable streams"). When the log is written is
decided in one place, `TurnRunner._record`:

- **start**: `TurnStarted`, the user message and the request decisions, one
  append that claims the turn (its expected version decides a race);
- **text**: once a client streams the turn, a generation's first piece at
  once, then what came since every `text_flush_interval_s` (nobody sees a
  `SendMessage` turn's text before its end, so no commit carries it earlier);
- **show**: once a client streams the turn, everything so far when there is
  something to show between pieces of text (a server tool about to run, its
  outcome, a summary);
- **client tool**: everything so far, before a client-side tool is awaited
  (the call must be visible to resumes on any replica);
- **end**: the rest with the terminal event. A tool-less `SendMessage` turn
  is therefore exactly two appends (start, end).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from turnlog import errors, metrics
from turnlog.conversation import context, engine_io
from turnlog.conversation.models import model_for_turn
from turnlog.conversation.options import ResolvedOptions, ServiceDefaults, TurnOptions, resolve
from turnlog.conversation.projection import TurnProjector, TurnUpdate
from turnlog.conversation.repository import ConversationRepository
from turnlog.conversation.tools import ToolError, ToolRegistry
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, evolve
from turnlog.engine.v1 import engine_pb2
from turnlog.eventlog import Clock, derived_id
from turnlog.guardrails import (
    EmitText,
    GenerationFinished,
    GenerationRequest,
    GuardrailDecision,
    GuardrailPipeline,
    GuardrailRegistry,
    RequestSubject,
    ResponseContext,
    RetractText,
    StopResponse,
    StreamAction,
    TextDelta,
    decisions_to_events,
    sampling_fields,
)
from turnlog.guardrails.execution import ExecutionEvent
from turnlog.worker.client import EngineClient, PooledRequestStream

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnDependencies:
    """What every turn of a process is given."""

    repository: ConversationRepository
    engine: EngineClient
    tools: ToolRegistry
    guardrails: GuardrailRegistry
    clock: Clock
    defaults: ServiceDefaults
    tokens: context.TokenCounter


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolOutcome:
    """A tool call's outcome as the sanitize guardrails left it: the events that record it.

    Made where the outcome arrives (this process for a server-side tool or a
    result sent here; another replica for a result sent there, which hands
    it over through the turn mailbox), so the raw text never travels or
    rests anywhere beyond the process that received it.
    """

    decisions: tuple[ev.GuardrailDecided, ...]
    recorded: ev.ToolCallCompleted | ev.ToolCallFailed | ev.TurnBlocked
    """The outcome's record, or the block that ends the turn (nothing of the text is kept)."""


def check_tool_outcome(
    pipeline: GuardrailPipeline,
    turn_id: str,
    call_id: str,
    *,
    result: str,
    error: str,
    blocked_at_us: int,
) -> ToolOutcome:
    """A tool's result or error through the sanitize-request guardrails (stage 2).

    A tool's result or error enters the conversation like the user's text:
    the log and the next generation's prompt, which is built from the log,
    only hold the sanitized text (JSON value by value).
    """
    checked = pipeline.sanitize_input(
        error or result,
        subject=f"the {'error' if error else 'result'} of tool call {call_id!r}",
    )
    decisions = decisions_to_events(checked.decisions, turn_id=turn_id)
    recorded: ev.ToolCallCompleted | ev.ToolCallFailed | ev.TurnBlocked
    if checked.blocked is not None:
        recorded = checked.blocked.to_event(turn_id=turn_id, blocked_at_us=blocked_at_us)
    elif error:
        recorded = ev.ToolCallFailed(turn_id=turn_id, call_id=call_id, error=checked.text)
    else:
        recorded = ev.ToolCallCompleted(turn_id=turn_id, call_id=call_id, result=checked.text)
    return ToolOutcome(decisions=decisions, recorded=recorded)


class RunningTurn:
    """The live side of one turn in this process: updates so far and their waiters."""

    def __init__(self, conversation_id: str, turn_id: str, *, tenant: str) -> None:
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        #: The tenant owning the conversation (limits count running turns by it).
        self.tenant = tenant
        self.updates: list[TurnUpdate] = []
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason = ""
        #: The cancel reason's guardrail decisions, when they were made where
        #: the cancel arrived (another replica): recorded as they are.
        self.cancel_decisions: tuple[ev.GuardrailDecided, ...] | None = None
        #: The client-side calls of the current generation that are not
        #: answered yet: each gets its checked outcome (`deliver_tool_outcome`).
        self.tool_results: dict[str, asyncio.Future[ToolOutcome]] = {}
        self.error: errors.TurnlogError | None = None
        #: A streaming client watches this turn (it was started for one, or
        #: `watch` attached one): its text is recorded every flush interval,
        #: and its generations ask the worker for every piece as it comes.
        self.streamed = False
        loop = asyncio.get_running_loop()
        self._changed: asyncio.Future[None] = loop.create_future()
        self._over: asyncio.Future[None] = loop.create_future()

    def deliver_tool_outcome(self, call_id: str, outcome: ToolOutcome) -> bool:
        """Answer an awaited client-side call; False if it is not awaited (or answered already)."""
        future = self.tool_results.get(call_id)
        if future is None or future.done():
            return False
        future.set_result(outcome)
        return True

    def publish(self, updates: Sequence[TurnUpdate]) -> None:
        if not updates:
            return
        self.updates.extend(updates)
        self.publish_wakeup()
        if updates[-1].is_last and not self._over.done():
            self._over.set_result(None)

    def fail(self, error: errors.TurnlogError) -> None:
        """The turn's end could not be recorded: watchers get `error`."""
        self.error = error
        self.publish_wakeup()
        if not self._over.done():
            self._over.set_result(None)

    def publish_wakeup(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    @property
    def ended(self) -> bool:
        return bool(self.updates) and self.updates[-1].is_last

    async def watch(self, after_sequence: int) -> AsyncIterator[TurnUpdate]:
        """Every update after `after_sequence` as it comes (a streaming client)."""
        self.streamed = True
        index = after_sequence
        while True:
            while index < len(self.updates):
                update = self.updates[index]
                index += 1
                yield update
                if update.is_last:
                    return
            if self.ended:
                return
            if self.error is not None:
                raise self.error
            await asyncio.shield(self._changed)

    async def outcome(self) -> list[TurnUpdate]:
        """All the turn's updates once it has ended (a unary caller: one wake-up, not one per piece)."""
        await asyncio.shield(self._over)
        if not self.ended and self.error is not None:
            raise self.error
        return list(self.updates)


async def prepare(
    deps: TurnDependencies,
    state: ConversationState,
    *,
    content: str,
    options: TurnOptions,
    request_id: str,
    streamed: bool,
    arrived: float,
    compaction_only: bool = False,
    request_digest: str = "",
) -> TurnRunner:
    """The turn's start events (after the request guardrails), not yet recorded.

    Unless a request guardrail blocked it, the first generation's engine
    request is sent already: the worker prefills while `TurnStarted`
    commits, and nothing it returns is read (or shown) before that commit.
    """
    turn_id = derived_id(state.conversation_id, "turn", request_id)
    pipeline = GuardrailPipeline.for_profile(
        state.guardrail_profile or deps.defaults.guardrail_profile, deps.guardrails
    )
    # The turn's own stop sequences and regex are recorded as given: refused
    # (before anything is recorded or sent) if a sanitize guardrail would change them.
    pipeline.check_fields(sampling_fields(options.sampling, prefix="options"))
    resolved = resolve(deps.defaults, state, options)
    # Refused here, before anything is recorded or sent, if no worker serves it.
    resolved = replace(resolved, model=await model_for_turn(deps.engine, resolved.model))
    if compaction_only:
        return await _prepare_compaction(
            deps, state, pipeline, turn_id, request_id, resolved, request_digest
        )
    with metrics.stage_timer("request_guardrails"):
        outcome = await pipeline.check_request(
            RequestSubject(
                user_text=content,
                system_prompt=state.system_prompt,
                model=resolved.model,
                tool_definitions=state.tools,
                labels=state.labels,
            )
        )
    run = TurnRunner(
        deps,
        state,
        turn_id,
        request_id,
        pipeline,
        resolved.model,
        resolved.sampling,
        resolved.max_tool_round_trips,
        context_policy=resolved.context_policy,
        strict_max_tokens=resolved.strict_max_tokens,
    )
    run.arrived = arrived
    run.live.streamed = streamed
    run.add(
        ev.TurnStarted(
            turn_id=turn_id,
            request_id=request_id,
            started_at_us=deps.clock(),
            sampling=resolved.sampling,
            max_tool_round_trips=resolved.max_tool_round_trips,
            context_policy=resolved.context_policy,
            strict_max_tokens=resolved.strict_max_tokens,
            request_digest=request_digest,
        )
    )
    # The log keeps the user text as the request stages left it (redacted).
    run.add(
        ev.MessageAppended(
            message_id=derived_id(turn_id, "user"),
            role=ev.Role.USER,
            content=outcome.text_to_send,
            turn_id=turn_id,
        )
    )
    for decided in decisions_to_events(outcome.decisions, turn_id=turn_id):
        run.add(decided)
    if outcome.blocked is not None:
        run.add(outcome.blocked.to_event(turn_id=turn_id, blocked_at_us=deps.clock()))
    else:
        # The window is decided (and a turn that cannot fit refused) before
        # anything is recorded or generated.
        await run.prestart()
    return run


async def _prepare_compaction(
    deps: TurnDependencies,
    state: ConversationState,
    pipeline: GuardrailPipeline,
    turn_id: str,
    request_id: str,
    resolved: ResolvedOptions,
    request_digest: str = "",
) -> TurnRunner:
    """A `CompactConversation` unit: a turn with no message whose one piece of work is a summary.

    Raises:
        NothingToCompactError: the window holds no turn to summarize (nothing
            is recorded).
    """
    plan = await context.plan_compaction(
        deps.tokens,
        state,
        through_version=state.version + 1,
        summary_max_tokens=deps.defaults.context_summary_max_tokens,
        affinity_key=state.conversation_id,
    )
    if plan is None:
        raise errors.NothingToCompactError(
            "the conversation's window holds no turn to summarize",
            metadata={"conversation": state.conversation_id},
        )
    run = TurnRunner(
        deps,
        state,
        turn_id,
        request_id,
        pipeline,
        resolved.model,
        resolved.sampling,
        0,
        context_policy=ev.ContextPolicy.COMPACT,
    )
    run.compaction_only = True
    run.compaction = plan
    run.generates = True
    run.add(
        ev.TurnStarted(
            turn_id=turn_id,
            request_id=request_id,
            started_at_us=deps.clock(),
            sampling=resolved.sampling,
            context_policy=ev.ContextPolicy.COMPACT,
            compaction_only=True,
            request_digest=request_digest,
        )
    )
    return run


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """One generation, decided before it starts: its prompt's window, its sampling, its request."""

    window: ev.ContextWindow
    sampling: ev.SamplingParams
    start: engine_io.EngineRequest


class _Moment(enum.Enum):
    """The points of a turn at which the log may be written (`TurnRunner._record`)."""

    START = enum.auto()
    TEXT = enum.auto()
    SHOW = enum.auto()
    CLIENT_TOOL = enum.auto()
    END = enum.auto()


#: The `kind` label of `metrics.TURN_APPENDS` of each moment's append.
_APPEND_KIND = {
    _Moment.START: "begin",
    _Moment.TEXT: "flush",
    _Moment.SHOW: "flush",
    _Moment.CLIENT_TOOL: "flush",
    _Moment.END: "end",
}


async def _complete_despite_cancel(operation: Awaitable[object]) -> bool:
    """Await `operation` to its end even if cancelled meanwhile; True if a cancel came."""
    task = asyncio.ensure_future(operation)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    task.result()
    return cancelled


class TurnRunner:
    """Runs one turn: buffers its events in order, records them, and publishes their updates."""

    def __init__(
        self,
        deps: TurnDependencies,
        state: ConversationState,
        turn_id: str,
        request_id: str,
        pipeline: GuardrailPipeline,
        model: str,
        sampling: ev.SamplingParams,
        rounds: int,
        *,
        context_policy: ev.ContextPolicy = ev.ContextPolicy.TRUNCATE,
        strict_max_tokens: bool = False,
    ) -> None:
        self.deps = deps
        self.context_policy = context_policy
        self.strict_max_tokens = strict_max_tokens
        #: The first generation's plan, made by `prestart`.
        self.first_plan: _Plan | None = None
        #: A `CompactConversation` unit (no message, no reply).
        self.compaction_only = False
        #: The summary to make before the first generation (its plan, or the
        #: version the window must start at: `prestart` found it due).
        self.compaction: context.CompactionPlan | None = None
        self.compaction_due = 0
        self.pipeline = pipeline
        self.model = model
        self.sampling = sampling
        self.rounds = rounds
        #: The first generation's engine request, sent before the turn's start
        #: was recorded (`prestart`); taken by its first engine call.
        self.prestarted: PooledRequestStream | None = None
        #: When the prestarted request was sent (for the first-token time).
        self.prestarted_at = 0.0
        #: False when a request guardrail blocked the turn (its start is its end).
        self.generates = False
        #: When the turn's request arrived (`time.perf_counter()`).
        self.arrived = time.perf_counter()
        self.state = state
        self.durable_version = state.version
        self.last_snapshot_version = state.version
        self.turn_id = turn_id
        self.request_id = request_id
        self.cid = state.conversation_id
        self.live = RunningTurn(self.cid, turn_id, tenant=state.tenant)
        # The same projection a resume reads from the log: live and resumed
        # streams number every update alike by construction.
        self.projector = TurnProjector(self.cid, turn_id)
        self.pending: list[ev.Event] = []
        #: Updates of buffered events: published once their events are recorded.
        self.unpublished: list[TurnUpdate] = []
        self.event_count = 0
        self.chunk: list[str] = []
        self.chunk_generation = ""
        self.last_flush = time.monotonic()
        #: The generation whose text has been recorded (so shown) already.
        self.text_shown_of = ""

    # -- the turn's record -------------------------------------------------------

    def add(self, event: ev.Event) -> None:
        """Buffer an event (closing the open text chunk first) and number its updates."""
        self._close_chunk()
        self._add(event)

    def _add(self, event: ev.Event) -> None:
        self.pending.append(event)
        self.state = evolve(self.state, event)
        self.unpublished.extend(self.projector.apply(event, self.state))

    def text(self, generation_id: str, text: str) -> None:
        """Buffer a text piece; it is recorded, then shown, with the next flush."""
        if self.chunk and self.chunk_generation != generation_id:
            self._close_chunk()
        self.chunk_generation = generation_id
        self.chunk.append(text)

    def _close_chunk(self) -> None:
        if self.chunk:
            pieces = tuple(self.chunk)
            self.chunk = []
            self._add(
                ev.TextStreamed(
                    turn_id=self.turn_id, generation_id=self.chunk_generation, pieces=pieces
                )
            )

    def publish_pending(self) -> None:
        """Show watchers the updates of the events recorded so far (call only after a flush)."""
        updates, self.unpublished = self.unpublished, []
        self.live.publish(updates)

    async def _record(self, moment: _Moment) -> None:
        """The one place that decides whether the log is written now, and writes it.

        Text and what there is to show are recorded only once a client
        streams the turn: a generation's first text at once, later text when
        the flush interval has passed; the start, the moment before a
        client-side tool is awaited, and the end are always recorded (module
        docstring).
        """
        if moment is _Moment.TEXT or moment is _Moment.SHOW:
            if not self.live.streamed:
                return
            if moment is _Moment.TEXT:
                first = self.chunk_generation != self.text_shown_of
                interval = self.deps.defaults.text_flush_interval_s
                if not first and time.monotonic() - self.last_flush < interval:
                    return
                self.text_shown_of = self.chunk_generation
        await self._flush(publish=moment is not _Moment.START, kind=_APPEND_KIND[moment])

    async def _flush(self, *, publish: bool, kind: str) -> None:
        """Append everything buffered in one commit, then publish its updates.

        Updates are published only after the commit that records their
        events, so a client is never shown anything the log does not hold.
        """
        self._close_chunk()
        if not self.pending:
            return
        repository = self.deps.repository
        new_events = []
        for event in self.pending:
            self.event_count += 1
            new_events.append(
                repository.new_event(
                    derived_id(self.turn_id, str(self.event_count)),
                    event,
                    correlation=self.request_id,
                )
            )
        cancelled = await _complete_despite_cancel(
            repository.append(
                self.cid, new_events, expected_version=self.durable_version, state=self.state
            )
        )
        metrics.TURN_APPENDS.labels(kind).inc()
        self.durable_version = self.state.version
        self.pending = []
        self.last_flush = time.monotonic()
        if publish:
            self.publish_pending()
        if cancelled:
            # The append landed; only now may the cancel proceed, so that the
            # version this turn expects next is the true one.
            raise asyncio.CancelledError

    async def begin(self) -> None:
        """Record the turn's start (its claim). If that fails, the prestarted request is cancelled.

        Raises:
            VersionConflictError, DuplicateEventError: another start won (or
                the state was stale); StorageUnavailableError.
        """
        try:
            with metrics.stage_timer("begin_append"):
                await self._record(_Moment.START)
        except BaseException:
            await asyncio.shield(self.abandon())
            raise
        self.publish_pending()

    async def finish(self, event: ev.Event) -> None:
        """Buffer the terminal event and commit; never raises (a lost end is recovered later).

        A version conflict means the turn's stream moved on without this
        process: recovery on another replica closed it (this replica's lock
        was lost). Watchers then get that conflict (ABORTED), never an end the
        log does not hold.
        """
        self.add(event)
        try:
            with metrics.stage_timer("end_append"):
                await self._record(_Moment.END)
        except asyncio.CancelledError:
            raise
        except errors.VersionConflictError as e:
            log.warning("turn %s was closed elsewhere (interrupted): %s", self.turn_id, e)
            self.live.fail(e)
            return
        except Exception as e:
            log.error("could not record the end of turn %s (%s)", self.turn_id, type(e).__name__)
            self.live.fail(
                errors.StorageUnavailableError(
                    "the turn's outcome could not be recorded; recovery closes it as interrupted",
                    metadata={"turnId": self.turn_id},
                )
            )
            return
        self.count_end()
        await self.deps.repository.maybe_snapshot(self.state, self.last_snapshot_version)

    def count_end(self) -> None:
        """Counts the turn's recorded end by outcome, and its whole time."""
        turn = self.state.turn(self.turn_id)
        if turn is not None:
            metrics.TURNS_ENDED.labels(turn.status.value).inc()
        metrics.observe_stage("turn", time.perf_counter() - self.arrived)

    # -- the generation and tool loop -------------------------------------------

    def _summary_id(self) -> str:
        """The latest summary (what a compact window holds), "" when none."""
        return self.state.compactions[-1].compaction_id if self.state.compactions else ""

    def _window_start(self) -> int:
        """Where the next compact window starts at the earliest (without moving)."""
        window = self.state.context_window
        start = window.first_version if window is not None else 0
        summary = self.state.compaction(self._summary_id())
        return max(start, summary.through_version) if summary is not None else start

    async def _plan(self, sampling: ev.SamplingParams, *, use_summary: bool = True) -> _Plan:
        """The next generation's window, sampling (max_tokens as clamped) and engine request.

        Raises:
            ContextLengthExceededError, ContextExhaustedError: it cannot fit
                (`context.plan_window`).
        """
        defaults = self.deps.defaults
        compact = self.context_policy is ev.ContextPolicy.COMPACT
        summary = self._summary_id() if compact and use_summary else ""
        with metrics.stage_timer("context"):
            window = await context.decide_window(
                self.deps.tokens,
                self.state,
                context.WindowRules(
                    policy=self.context_policy,
                    max_context_tokens=0,
                    requested_max_tokens=sampling.max_tokens,
                    strict_max_tokens=self.strict_max_tokens,
                    keep_fraction=defaults.context_keep_fraction,
                    min_reply_tokens=defaults.context_min_reply_tokens,
                    trigger_fraction=defaults.context_compact_threshold if compact else 1.0,
                ),
                affinity_key=self.cid,
                compaction_id=summary,
            )
        used = replace(sampling, max_tokens=window.max_tokens)
        interval = 0.0 if self.live.streamed else defaults.unwatched_delta_interval_s
        start = engine_io.start_generation(
            self.state,
            used,
            first_version=window.first_version,
            compaction_id=window.compaction_id,
            min_delta_interval_s=interval,
        )
        return _Plan(window=window, sampling=used, start=start)

    async def prestart(self) -> None:
        """Plan the first generation and send its engine request now (see `_engine_call`).

        Raises:
            ContextLengthExceededError, ContextExhaustedError: the turn
                cannot fit; nothing was sent.
        """
        start = self._window_start()
        plan = await self._plan(self.sampling)
        self.generates = True
        if self.context_policy is ev.ContextPolicy.COMPACT and plan.window.first_version > start:
            # The window must move: summarize the turns it would leave out
            # first (in `run`, once the turn's start is recorded), then plan again.
            self.compaction_due = plan.window.first_version
            return
        self.first_plan = plan
        stream = self.deps.engine.generate(
            engine_io.copy_of(plan.start), affinity_key=self.cid, model=self.model
        )
        stream.start()
        self.prestarted = stream
        self.prestarted_at = time.perf_counter()

    async def abandon(self) -> None:
        """Cancel the prestarted engine request if nothing took it."""
        stream, self.prestarted = self.prestarted, None
        if stream is not None:
            await stream.aclose()

    async def run(self) -> None:
        """The generations and the tool loop, to the turn's recorded end (never raises but a cancel)."""
        pipeline, model, sampling, rounds = self.pipeline, self.model, self.sampling, self.rounds
        clock = self.deps.clock
        phase = "generation"
        try:
            if self.compaction is not None or self.compaction_due:
                phase = "compaction"
                await self._compact()
                if self.compaction_only:
                    await self.finish(
                        ev.TurnCompleted(
                            turn_id=self.turn_id,
                            completed_at_us=clock(),
                            finish_reason=ev.FinishReason.STOP,
                            usage=self._turn_usage(),
                        )
                    )
                    return
            round_trips = 0
            generation = 0
            while True:
                generation += 1
                phase = "generation"
                # A structured-output regex constrains only the turn's first
                # generation (e.g. to force a tool call); later ones may end with text.
                constrained = sampling if generation == 1 else replace(sampling, regex=None)
                result = await self._one_generation(pipeline, model, constrained, generation)
                if result is None:
                    return  # blocked and recorded
                completed = result
                if not completed.tool_calls:
                    await self.finish(
                        ev.TurnCompleted(
                            turn_id=self.turn_id,
                            completed_at_us=clock(),
                            finish_reason=completed.finish_reason,
                            usage=self._turn_usage(),
                        )
                    )
                    return
                if round_trips >= rounds:
                    self.add(ev.ToolRoundLimitReached(turn_id=self.turn_id, limit=rounds))
                    await self.finish(
                        ev.TurnCompleted(
                            turn_id=self.turn_id,
                            completed_at_us=clock(),
                            finish_reason=ev.FinishReason.TOOL_CALLS,
                            usage=self._turn_usage(),
                        )
                    )
                    return
                round_trips += 1
                phase = "tool"
                with metrics.stage_timer("tools"):
                    if not await self._run_tools(completed.tool_calls):
                        return  # a tool's outcome was blocked, and recorded
        except asyncio.CancelledError:
            await self.finish(
                ev.TurnCancelled(
                    turn_id=self.turn_id,
                    cancelled_at_us=clock(),
                    reason=self._cancel_reason(),
                )
            )
        except errors.TurnlogError as e:
            await self.finish(
                ev.TurnFailed(
                    turn_id=self.turn_id,
                    failed_at_us=clock(),
                    error_kind=e.reason,
                    phase=phase,
                    retryable=e.retryable,
                    message=e.message,
                    metadata=tuple(sorted(e.metadata.items())),
                )
            )
        except Exception:
            log.exception("turn %s failed", self.turn_id)
            await self.finish(
                ev.TurnFailed(
                    turn_id=self.turn_id,
                    failed_at_us=clock(),
                    error_kind="INTERNAL",
                    phase=phase,
                    retryable=False,
                    message="internal error",  # a bug's own text is for the log only
                )
            )
        finally:
            # Cancelled before its first generation read the prestarted request.
            await asyncio.shield(self.abandon())

    def _cancel_reason(self) -> str:
        """The cancel reason to record: a client's text, so it passes the sanitize guardrails."""
        reason = self.live.cancel_reason or "cancelled"
        if self.state.open_turn is None:
            return reason  # ended already: nothing more can be recorded of it
        if self.live.cancel_decisions is not None:
            # Checked where the cancel arrived (another replica).
            for decided in self.live.cancel_decisions:
                self.add(decided)
            return reason
        checked = self.pipeline.sanitize_input(reason, subject="the cancel reason")
        for decided in decisions_to_events(checked.decisions, turn_id=self.turn_id):
            self.add(decided)
        return "cancelled" if checked.blocked is not None else checked.text

    def _turn_usage(self) -> ev.Usage:
        turn = self.state.turn(self.turn_id)
        return turn.usage if turn is not None else ev.Usage()

    async def _one_generation(
        self,
        pipeline: GuardrailPipeline,
        model: str,
        sampling: ev.SamplingParams,
        number: int,
    ) -> ev.GenerationCompleted | None:
        generation_id = f"{self.turn_id}/{number}"
        plan, self.first_plan = self.first_plan, None
        if plan is None or number != 1:
            try:
                plan = await self._plan(sampling)
            except errors.ContextLengthExceededError:
                if not self._summary_id():
                    raise
                # The summary itself leaves no room: truncate without it.
                plan = await self._plan(sampling, use_summary=False)
        sampling = plan.sampling
        self.add(
            ev.GenerationStarted(
                turn_id=self.turn_id,
                generation_id=generation_id,
                worker="",
                model=model,
                sampling=sampling,
                prompt_token_count=plan.window.prompt_tokens,
                context=plan.window,
            )
        )
        stream = pipeline.response_stream(ResponseContext(tool_definitions=self.state.tools))
        call = pipeline.wrap_execution(self._engine_call(plan.start))
        final: GenerationFinished | None = None
        user_text = self.state.messages[-1].content if self.state.messages else ""
        request = GenerationRequest(model=model, text=user_text, labels=self.state.labels)
        stopped = False
        try:
            async with contextlib.aclosing(call(request)) as events:
                async for item in events:
                    if isinstance(item, GuardrailDecision):
                        # Shown with the generation's first text, recorded at once.
                        self.add(item.to_event(turn_id=self.turn_id))
                    elif isinstance(item, TextDelta):
                        stopped = self._apply(generation_id, stream.feed(item.text))
                        if stopped:
                            break  # leaving aclosing aborts the engine request
                        await self._record(_Moment.TEXT)
                    else:
                        final = item
        finally:
            # An execution intercept that never called the engine leaves the
            # prestarted request unread.
            await asyncio.shield(self.abandon())
        outcome = stream.finish(final.tool_calls if final is not None and not stopped else ())
        self._apply(generation_id, list(outcome.actions))
        for decided in decisions_to_events(outcome.decisions, turn_id=self.turn_id):
            self.add(decided)
        if outcome.blocked is not None or stopped:
            block = outcome.blocked or stream.blocked
            assert block is not None
            await self.finish(block.to_event(turn_id=self.turn_id, blocked_at_us=self.deps.clock()))
            return None
        assert final is not None
        modified = any(d.verdict is ev.Verdict.MODIFY for d in outcome.decisions)
        completed = ev.GenerationCompleted(
            turn_id=self.turn_id,
            generation_id=generation_id,
            text=outcome.final_text,
            # Token ids of a modified (redacted) response would keep what the
            # guardrail removed, so they are not recorded.
            token_ids=() if modified else final.token_ids,
            finish_reason=ev.FinishReason.TOOL_CALLS if outcome.tool_calls else final.finish_reason,
            usage=final.usage,
            model=final.model or model,
            sampling=sampling,
            tool_calls=outcome.tool_calls,
        )
        self.add(completed)
        return completed

    async def _compact(self) -> None:
        """Summarize the oldest turns of the window (a generation through the guardrails).

        Records the guardrail decisions and, unless a guardrail blocked the
        summary or it came back empty, one `ContextCompacted`. Without one,
        the turn's window truncates instead (docs/context.md, "Compaction").
        """
        deps, pipeline = self.deps, self.pipeline
        plan = self.compaction
        if plan is None:
            plan = await context.plan_compaction(
                deps.tokens,
                self.state,
                through_version=self.compaction_due,
                summary_max_tokens=deps.defaults.context_summary_max_tokens,
                affinity_key=self.cid,
            )
        if plan is None:
            return
        compaction_id = f"{self.turn_id}/compaction"
        # The turn's sampling (its seed makes the summary reproducible), with
        # the summary's room and no structured-output constraint.
        sampling = replace(self.sampling, max_tokens=plan.max_tokens, regex=None)
        request_outcome = await pipeline.check_request(
            RequestSubject(
                user_text=context.SUMMARY_INSTRUCTION,
                system_prompt=self.state.system_prompt,
                model=self.model,
                tool_definitions=(),
                labels=self.state.labels,
            )
        )
        for decided in decisions_to_events(request_outcome.decisions, turn_id=self.turn_id):
            self.add(decided)
        if request_outcome.blocked is not None:
            return
        start = engine_pb2.StartGeneration(
            chat=plan.prompt, sampling=engine_io.engine_sampling(sampling)
        )
        stream = pipeline.response_stream(ResponseContext(tool_definitions=()))
        call = pipeline.wrap_execution(self._engine_call(start))
        request = GenerationRequest(
            model=self.model, text=context.SUMMARY_INSTRUCTION, labels=self.state.labels
        )
        final: GenerationFinished | None = None
        stopped = False
        try:
            async with contextlib.aclosing(call(request)) as events:
                async for item in events:
                    if isinstance(item, GuardrailDecision):
                        self.add(item.to_event(turn_id=self.turn_id))
                    elif isinstance(item, TextDelta):
                        # The summary is not the turn's text: nothing is streamed.
                        if any(isinstance(a, StopResponse) for a in stream.feed(item.text)):
                            stopped = True
                            break
                    else:
                        final = item
        except errors.TurnlogError as e:
            # A summary that fails must not fail every later turn: truncate
            # instead (an engine that is down fails the generation that follows).
            log.warning("the summary of %s failed (%s); truncating instead", self.cid, e.reason)
            return
        outcome = stream.finish(())
        for decided in decisions_to_events(outcome.decisions, turn_id=self.turn_id):
            self.add(decided)
        summary = outcome.final_text.strip()
        if outcome.blocked is not None or stopped or final is None or not summary:
            return
        compacted = ev.ContextCompacted(
            turn_id=self.turn_id,
            compaction_id=compaction_id,
            first_version=plan.first_version,
            through_version=plan.through_version,
            summarized_turns=plan.turns,
            summary=summary,
            model=final.model or self.model,
            sampling=sampling,
            summary_tokens=0,
            replaced_tokens=plan.replaced_tokens,
            usage=final.usage,
            previous_compaction_id=plan.previous_compaction_id,
        )
        tokens = await context.summary_tokens(
            deps.tokens, evolve(self.state, compacted), compaction_id, affinity_key=self.cid
        )
        self.add(replace(compacted, summary_tokens=tokens))
        await self._record(_Moment.SHOW)
        log.info(
            "compacted %d turn(s) of %s: %d tokens into %d",
            plan.turns,
            self.cid,
            plan.replaced_tokens,
            tokens,
        )

    def _apply(self, generation_id: str, actions: Sequence[StreamAction]) -> bool:
        stopped = False
        for action in actions:
            if isinstance(action, EmitText):
                if action.text:
                    self.text(generation_id, action.text)
            elif isinstance(action, RetractText):
                self.add(
                    ev.TextRetracted(
                        turn_id=self.turn_id,
                        generation_id=generation_id,
                        start=action.start,
                        end=action.end,
                        reason=action.reason,
                    )
                )
            elif isinstance(action, StopResponse):
                stopped = True
        return stopped

    def _engine_call(
        self, start: engine_io.EngineRequest
    ) -> Callable[[GenerationRequest], AsyncGenerator[ExecutionEvent, None]]:
        """The engine call of one generation, for the execution intercepts to wrap.

        The first call of the turn's first generation reads the prestarted
        request, which is exactly the request it would send (same chat, same
        sampling); every other call (a retry, a later generation) sends anew.
        """
        engine = self.deps.engine
        affinity = self.cid

        async def call(request: GenerationRequest) -> AsyncGenerator[ExecutionEvent, None]:
            stream, self.prestarted = self.prestarted, None
            sent = self.prestarted_at
            if stream is None:
                stream = engine.generate(
                    engine_io.copy_of(start), affinity_key=affinity, model=request.model
                )
                sent = time.perf_counter()
            reader = engine_io.GenerationReader(
                turn_id=self.turn_id, model=request.model, sent_at=sent
            )
            async with stream as events:
                async for item in events:
                    yield reader.read(item)

        return call

    async def _run_tools(self, calls: Sequence[ev.ToolCall]) -> bool:
        """Run the calls (already sanitized, stage 5) and record each outcome.

        Server-side calls run here; client-side calls are awaited (each for
        at most `client_tool_timeout_s`) from whoever answers them, on any
        replica (`deliver_tool_outcome`, fed by `RunningTurns` and the turn
        mailbox). Every client-side call of the generation can be answered
        from the moment the generation is recorded, even the ones whose turn
        to be requested has not come yet. Each outcome passes the
        sanitize-request guardrails before it is recorded (`check_tool_outcome`).

        Returns:
            False when a guardrail blocked an outcome: the turn then ended
            blocked (recorded), and the calls after it did not run.

        Raises:
            ClientToolTimeoutError: a client-side call went unanswered; its
                `ToolCallFailed` is buffered, and the turn ends FAILED.
        """
        definitions = {t.name: t for t in self.state.tools}
        loop = asyncio.get_running_loop()
        client_calls = {
            call.call_id
            for call in calls
            if (d := definitions.get(call.name)) is not None and d.client_side
        }
        self.live.tool_results = {call_id: loop.create_future() for call_id in client_calls}
        try:
            for call in calls:
                client_side = call.call_id in client_calls
                self.add(
                    ev.ToolCallRequested(turn_id=self.turn_id, call=call, client_side=client_side)
                )
                if client_side:
                    outcome = await self._await_client(call)
                else:
                    await self._record(_Moment.SHOW)
                    try:
                        result, error = (
                            await self.deps.tools.execute(call.name, call.arguments_json),
                            "",
                        )
                    except ToolError as e:
                        result, error = "", str(e)
                    outcome = check_tool_outcome(
                        self.pipeline,
                        self.turn_id,
                        call.call_id,
                        result=result,
                        error=error,
                        blocked_at_us=self.deps.clock(),
                    )
                for decided in outcome.decisions:
                    self.add(decided)
                if isinstance(outcome.recorded, ev.TurnBlocked):
                    await self.finish(outcome.recorded)
                    return False
                self.add(outcome.recorded)
                await self._record(_Moment.SHOW)
        finally:
            self.live.tool_results = {}
        return True

    async def _await_client(self, call: ev.ToolCall) -> ToolOutcome:
        """Record the request (resumes on any replica must see it), then await its answer.

        Raises:
            ClientToolTimeoutError: no answer within `client_tool_timeout_s`.
        """
        future = self.live.tool_results[call.call_id]
        await self._record(_Moment.CLIENT_TOOL)
        timeout_s = self.deps.defaults.client_tool_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            # The call gets an outcome (the history stays a well-formed chat:
            # every call answered), then the turn fails: a model told that a
            # tool failed would answer without it, which is not what the
            # client asked for.
            self.add(
                ev.ToolCallFailed(
                    turn_id=self.turn_id,
                    call_id=call.call_id,
                    error="the client did not answer in time",
                )
            )
            raise errors.ClientToolTimeoutError(
                f"no result for client tool call {call.call_id!r} within {timeout_s:g} s",
                metadata={"callId": call.call_id, "timeoutS": f"{timeout_s:g}"},
            ) from None


__all__ = [
    "RunningTurn",
    "ToolOutcome",
    "TurnDependencies",
    "TurnRunner",
    "check_tool_outcome",
    "prepare",
]
