"""Regenerating a recorded conversation's turns against today's worker and guardrails.

For every finished turn of a recorded conversation, `regenerate` runs the
turn again through the real `ConversationApplication` (guardrail pipeline,
tool loop, worker over gRPC), starting from the log exactly as it stood
before the turn began: the recorded prompt (history, system prompt, tools)
and the turn's recorded sampling, seed included, model and tool-round cap.
It then reports, turn by turn, what differs from the record: the outcome,
each generation's text and tool calls, tool results and guardrail verdicts.

Each turn runs on a copy of the log's prefix, so the recorded conversation
is never touched: by default an in-memory event store holds the copy (no
database needed, e.g. replaying an export file); when asked, a fork in the
database does (`ForkTarget`), and the regenerated turn stays there to be read,
exported or continued.

What cannot be reproduced is reported rather than hidden: a turn without a
seed and with a temperature above 0 samples differently; the log keeps the
user's text as the request guardrails left it (redacted), so a request stage
that modified it sees the modified text again; client-side tools have no
client here and time out (which fails the turn).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from turnlog.conversation.application import (
    ConversationApplication,
    ServiceDefaults,
    TurnInput,
    TurnOptions,
)
from turnlog.conversation.tools import ToolRegistry
from turnlog.domain import events as ev
from turnlog.domain.state import TurnStatus
from turnlog.eventlog import conversation_of
from turnlog.guardrails.registry import GuardrailRegistry
from turnlog.history.service import ForkCommand, HistoryService
from turnlog.history.transcript import TurnRecord, build_transcript
from turnlog.storage import EventStore, InMemoryEventStore, RecordedEvent
from turnlog.worker.client import EngineClient

#: Turns in these states ran to an end the record fully shows, so they can be compared.
COMPARABLE = frozenset({TurnStatus.COMPLETED, TurnStatus.FAILED, TurnStatus.BLOCKED})


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkTarget:
    """Write each regenerated turn to a fork `<prefix>-<turn number>` in `store`.

    The source conversation must be in `store` (import an export file first).
    """

    store: EventStore
    prefix: str


@dataclass(slots=True, kw_only=True)
class TurnComparison:
    """One recorded turn and its regeneration.

    Attributes:
        skipped: why the turn was not regenerated ("" when it was).
        differences: what differs, one human-readable item each (empty: same).
        seeded: whether the turn's sampling is reproducible (a seed, or temperature 0).
        fork_id: the fork holding the regenerated turn ("" without `ForkTarget`).
    """

    recorded: TurnRecord
    regenerated: TurnRecord | None = None
    skipped: str = ""
    differences: list[str] = field(default_factory=list)
    seeded: bool = False
    fork_id: str = ""

    @property
    def same(self) -> bool:
        return not self.skipped and not self.differences


@dataclass(slots=True, kw_only=True)
class RegenerationReport:
    conversation_id: str
    version: int
    turns: list[TurnComparison] = field(default_factory=list)

    @property
    def all_same(self) -> bool:
        """True when every regenerated turn matched its record."""
        return all(t.same for t in self.turns if not t.skipped)

    def to_json(self) -> dict[str, object]:
        """The report as plain JSON (for `turnlog replay --regenerate --json`)."""
        return {
            "conversation_id": self.conversation_id,
            "version": self.version,
            "all_same": self.all_same,
            "turns": [
                {
                    "number": t.recorded.number,
                    "turn_id": t.recorded.turn_id,
                    "request_id": t.recorded.request_id,
                    "status": str(t.recorded.status),
                    "regenerated_status": str(t.regenerated.status) if t.regenerated else None,
                    "skipped": t.skipped,
                    "seeded": t.seeded,
                    "same": t.same,
                    "differences": t.differences,
                    "fork_id": t.fork_id,
                    "recorded_texts": [g.said for g in t.recorded.generations],
                    "regenerated_texts": (
                        [g.said for g in t.regenerated.generations] if t.regenerated else []
                    ),
                }
                for t in self.turns
            ],
        }


def _seeded(turn: TurnRecord) -> bool:
    return turn.sampling.seed is not None or turn.sampling.temperature == 0.0


async def regenerate(
    events: Sequence[RecordedEvent],
    *,
    engine: EngineClient,
    guardrails: GuardrailRegistry,
    tools: ToolRegistry,
    defaults: ServiceDefaults | None = None,
    at: int | None = None,
    fork: ForkTarget | None = None,
    progress: Callable[[TurnComparison], object] | None = None,
) -> RegenerationReport:
    """Regenerates every finished turn of one conversation's events (up to version `at`).

    Args:
        events: the conversation's stream from version 1 (log or export file).
        engine: the worker(s) to generate with.
        guardrails, tools: today's guardrail profiles and server-side tools.
        defaults: service defaults (the recorded turn sampling overrides them).
        at: only turns that ended at or before this version.
        fork: write each regenerated turn to a fork in this store.
        progress: called with each turn's comparison as it is done.

    Raises:
        TranscriptError: the events do not fold.
    """
    transcript = build_transcript(events, at=at)
    state = transcript.state
    cid = state.conversation_id
    sid = events[0].stream_id
    report = RegenerationReport(conversation_id=cid, version=state.version)
    for turn in transcript.turns:
        comparison = TurnComparison(recorded=turn, seeded=_seeded(turn))
        if turn.status not in COMPARABLE:
            comparison.skipped = f"{turn.status} in the log: nothing complete to compare"
        else:
            await _regenerate_turn(
                comparison, events, sid, engine, guardrails, tools, defaults, fork
            )
        report.turns.append(comparison)
        if progress is not None:
            progress(comparison)
    return report


async def _regenerate_turn(
    comparison: TurnComparison,
    events: Sequence[RecordedEvent],
    sid: str,
    engine: EngineClient,
    guardrails: GuardrailRegistry,
    tools: ToolRegistry,
    defaults: ServiceDefaults | None,
    fork: ForkTarget | None,
) -> None:
    turn = comparison.recorded
    before = turn.start_version - 1
    if fork is None:
        store: EventStore = InMemoryEventStore()
        target = conversation_of(sid)
        await store.import_events(sid, [e.to_imported() for e in events[:before]])
    else:
        store = fork.store
        target = f"{fork.prefix}-{turn.number}"
        forked = await HistoryService(store, instance="replay").fork(
            ForkCommand(
                source_id=conversation_of(sid),
                version=before,
                fork_id=target,
                request_id=f"regenerate-{turn.request_id}",
            )
        )
        target = forked.state.conversation_id
        comparison.fork_id = target
    app = ConversationApplication(
        store,
        engine,
        tools=tools,
        guardrails=guardrails,
        # Every piece as the engine produces it, as when the turn was
        # recorded: the text streamed before a block depends on it.
        defaults=replace(
            defaults or ServiceDefaults(client_tool_timeout_s=5.0), unwatched_delta_interval_s=0.0
        ),
        instance="replay",
    )
    try:
        await app.send(
            TurnInput(
                conversation_id=target,
                content=turn.user_text,
                request_id=turn.request_id,
                compaction_only=turn.compaction_only,
                options=TurnOptions(
                    model=turn.model or None,
                    sampling=turn.sampling,
                    max_tool_round_trips=turn.max_tool_round_trips,
                    # A log from before context policies had no window: the
                    # whole conversation, as DISABLED builds it.
                    context_policy=turn.context_policy or ev.ContextPolicy.DISABLED,
                    strict_max_tokens=turn.strict_max_tokens,
                ),
            ),
            allow_client_tools=True,
        )
    finally:
        await app.shutdown()
    regenerated = build_transcript(await store.read_stream(f"conversation-{target}")).turns[-1]
    comparison.regenerated = regenerated
    comparison.differences = compare_turns(turn, regenerated)


def _window(window: ev.ContextWindow | None) -> str:
    """A window as compared: what was left out and the counts (versions differ in a fork)."""
    if window is None:
        return "none"
    summary = ", with a summary" if window.compaction_id else ""
    return (
        f"{window.left_out_turns} turns left out{summary}, prompt {window.prompt_tokens} tokens, "
        f"max_tokens {window.max_tokens}"
    )


def _compaction(c: ev.ContextCompacted) -> str:
    """A compaction as compared (its versions differ in a fork)."""
    return (
        f"{c.summarized_turns} turns, {c.replaced_tokens} tokens into {c.summary_tokens}: "
        f"{c.summary!r}"
    )


def _text_difference(label: str, recorded: str, regenerated: str) -> str:
    prefix = 0
    for a, b in zip(recorded, regenerated, strict=False):
        if a != b:
            break
        prefix += 1
    lines = [f"{label} differs from character {prefix}:"]
    for line in difflib.unified_diff(
        recorded.splitlines(), regenerated.splitlines(), "recorded", "regenerated", lineterm="", n=1
    ):
        lines.append(f"    {line}")
    return "\n".join(lines)


def _one_prefixes_the_other(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def compare_turns(recorded: TurnRecord, regenerated: TurnRecord) -> list[str]:
    """What differs between a recorded turn and its regeneration (empty when the same).

    Ids are not compared (a fork's turns have ids of their own, and engines
    name tool calls as they like); text, tool calls by name and arguments,
    tool results, guardrail verdicts and the outcome are.

    When both the recorded turn and its regeneration were blocked, a
    generation's text is the part shown before the block, and how much of it a
    guardrail had released when the blocked term arrived depends on how the
    engine's output was split into deltas, which is timing: such texts match
    when one is a prefix of the other (a worker that now says something else
    before the block still differs).
    """
    differences: list[str] = []
    if (recorded.status, recorded.finish_reason) != (regenerated.status, regenerated.finish_reason):
        differences.append(
            f"outcome: {recorded.status} ({recorded.finish_reason}) -> "
            f"{regenerated.status} ({regenerated.finish_reason})"
        )
    old, new = recorded.generations, regenerated.generations
    if len(old) != len(new):
        differences.append(f"generations: {len(old)} -> {len(new)}")
    both_blocked = recorded.status is regenerated.status is TurnStatus.BLOCKED
    for number, (a, b) in enumerate(zip(old, new, strict=False), start=1):
        if a.said != b.said and not (both_blocked and _one_prefixes_the_other(a.said, b.said)):
            differences.append(_text_difference(f"generation {number} text", a.said, b.said))
        calls_a = [(c.name, c.arguments_json) for c in a.tool_calls]
        calls_b = [(c.name, c.arguments_json) for c in b.tool_calls]
        if calls_a != calls_b:
            differences.append(f"generation {number} tool calls: {calls_a} -> {calls_b}")
        if _window(a.context) != _window(b.context) and a.context is not None:
            differences.append(
                f"generation {number} window: {_window(a.context)} -> {_window(b.context)}"
            )
    summaries_a = [_compaction(c) for c in recorded.compactions]
    summaries_b = [_compaction(c) for c in regenerated.compactions]
    if summaries_a != summaries_b:
        differences.append(f"compactions: {summaries_a} -> {summaries_b}")
    results_a = [(o.ok, o.text) for o in recorded.tool_outcomes]
    results_b = [(o.ok, o.text) for o in regenerated.tool_outcomes]
    if results_a != results_b:
        differences.append(f"tool results: {results_a} -> {results_b}")
    verdicts_a = [(str(d.stage), d.guardrail, str(d.verdict)) for d in recorded.decisions]
    verdicts_b = [(str(d.stage), d.guardrail, str(d.verdict)) for d in regenerated.decisions]
    if verdicts_a != verdicts_b:
        changed = [
            f"{'/'.join(x[:2])}: {x[2]} -> {y[2]}"
            for x, y in zip(verdicts_a, verdicts_b, strict=False)
            if x != y
        ]
        if len(verdicts_a) != len(verdicts_b):
            changed.append(f"{len(verdicts_a)} decisions -> {len(verdicts_b)}")
        differences.append("guardrail verdicts: " + "; ".join(changed))
    return differences


def render_report(report: RegenerationReport) -> str:
    """The report as text: one block per turn."""
    lines = [f"regenerated conversation {report.conversation_id} up to version {report.version}"]
    for t in report.turns:
        head = f"turn {t.recorded.number} [{t.recorded.request_id}]"
        if t.skipped:
            lines.append(f"{head}: skipped ({t.skipped})")
            continue
        where = f" in fork {t.fork_id}" if t.fork_id else ""
        note = "" if t.seeded else " (not seeded: sampling may differ)"
        if t.same:
            lines.append(f"{head}: same{where}{note}")
        else:
            lines.append(f"{head}: {len(t.differences)} difference(s){where}{note}")
            lines.extend(f"  - {d}" for d in t.differences)
    same = sum(1 for t in report.turns if t.same)
    compared = sum(1 for t in report.turns if not t.skipped)
    lines.append(f"{same} of {compared} regenerated turn(s) match the record")
    return "\n".join(lines) + "\n"
