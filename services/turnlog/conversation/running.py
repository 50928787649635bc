"""The turns this process runs: the only process-local state of the conversation service.

`RunningTurns` holds each running turn's live side (`RunningTurn`: its
updates and waiters, its task, the client-tool results it awaits), the
turns whose start is being recorded, and one start at a time per request
id. Recovery asks it which turns are alive here; watchers, cancels and
client-tool results find their turn through it (those that arrived at
another replica come through `turnlog.conversation.control`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from turnlog import errors, metrics
from turnlog.conversation.turn import RunningTurn, TurnRunner
from turnlog.domain import events as ev


class RunningTurns:
    """The registry of this process's turns (safe for the tasks of one event loop)."""

    def __init__(self) -> None:
        #: Turns running here, by turn id.
        self.turns: dict[str, RunningTurn] = {}
        #: Turns whose `TurnStarted` is being appended here (not yet in
        #: `turns`): recovery must not take them for orphans.
        self._starting: set[str] = set()
        #: Starts in progress by (conversation, request id).
        self._requests: dict[tuple[str, str], asyncio.Event] = {}
        #: Turns running or starting here, per tenant (`TenantLimits`).
        self.per_tenant: collections.Counter[str] = collections.Counter()

    def check_room(self, tenant: str, limit: int) -> None:
        """Raises when `tenant` runs `limit` turns here already (0: no limit).

        Raises:
            TenantLimitExceededError: retry after a second or so.
        """
        if limit and self.per_tenant[tenant] >= limit:
            raise errors.TenantLimitExceededError(
                f"the tenant runs {limit} turns already; retry when one has ended",
                metadata={"limit": "running_turns", "retryAfterMs": "1000"},
            )

    def get(self, conversation_id: str, turn_id: str) -> RunningTurn | None:
        """The turn if it runs here (and belongs to that conversation)."""
        live = self.turns.get(turn_id)
        return live if live is not None and live.conversation_id == conversation_id else None

    def is_live(self, turn_id: str) -> bool:
        """Whether the turn runs here, or its start is being recorded here."""
        return turn_id in self.turns or turn_id in self._starting

    @contextlib.asynccontextmanager
    async def one_start(self, conversation_id: str, request_id: str) -> AsyncIterator[None]:
        """Holds the only start of this request id here; a second waits until the first is done.

        The waiter then decides like any retry (and finds the first's turn
        without a read when it started: the cached state has it), so
        concurrent sends of one request send one engine request.
        """
        key = (conversation_id, request_id)
        while (other := self._requests.get(key)) is not None:
            await other.wait()
        self._requests[key] = done = asyncio.Event()
        try:
            yield
        finally:
            del self._requests[key]
            done.set()

    async def begin(self, run: TurnRunner, *, tenant_limit: int = 0) -> None:
        """Record the turn's start and run it in a task of its own.

        No lock: the `TurnStarted` append names the version it expects, so of
        two starts racing (on any replicas) one wins and the other reloads.
        The tenant's running turns are counted from here until the turn's
        task ends; at `tenant_limit` (0: none) the start is refused and its
        prestarted engine request cancelled.

        Raises:
            VersionConflictError, DuplicateEventError: the start lost a race.
            TenantLimitExceededError: the tenant runs `tenant_limit` turns.
        """
        turn_id = run.turn_id
        tenant = run.live.tenant
        try:
            self.check_room(tenant, tenant_limit)
        except errors.TenantLimitExceededError:
            await run.abandon()
            raise
        self.per_tenant[tenant] += 1
        self._starting.add(turn_id)
        running = False
        try:
            await run.begin()
            if not run.generates:
                run.count_end()  # blocked by a request guardrail: its start was its end
                return
            live = run.live
            self.turns[turn_id] = live
            live.task = asyncio.create_task(run.run(), name=f"turn-{turn_id}")
            running = True
        finally:
            self._starting.discard(turn_id)
            if not running:
                self._release(tenant)
        metrics.TURNS_RUNNING.inc()
        live.task.add_done_callback(lambda _: self.turns.pop(turn_id, None))
        live.task.add_done_callback(lambda _: metrics.TURNS_RUNNING.dec())
        live.task.add_done_callback(lambda _: self._release(tenant))

    def _release(self, tenant: str) -> None:
        self.per_tenant[tenant] -= 1
        if self.per_tenant[tenant] <= 0:
            del self.per_tenant[tenant]

    def cancel(
        self,
        conversation_id: str,
        turn_id: str,
        reason: str,
        *,
        decisions: tuple[ev.GuardrailDecided, ...] | None = None,
    ) -> None:
        """Cancel a running turn (it records `TurnCancelled`).

        `decisions`: the reason's sanitize decisions when they were made where
        the cancel arrived (another replica; `reason` is then sanitized
        already); None: the turn checks the reason itself.

        Raises:
            TurnNotRunningHereError: The turn is not running in this process.
        """
        live = self.get(conversation_id, turn_id)
        if live is None or live.task is None:
            raise errors.TurnNotRunningHereError(
                "the turn is not running on this server", metadata={"turnId": turn_id}
            )
        if live.cancel_reason:
            return  # cancelled already: the first reason is the one recorded
        live.cancel_reason = reason
        live.cancel_decisions = decisions
        live.task.cancel()

    async def cancel_all(self, reason: str) -> None:
        """Cancel every running turn and wait for them (each records `TurnCancelled`)."""
        tasks = [r.task for r in self.turns.values() if r.task is not None]
        for live in self.turns.values():
            live.cancel_reason = reason
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["RunningTurns"]
