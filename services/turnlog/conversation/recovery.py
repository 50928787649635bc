"""Crash recovery: close the open turns that no live replica runs, with `TurnInterrupted`.

Open turns come from one query (the repository's `open_turns`: per
conversation, its latest `TurnStarted`/terminal event, kept when it is a
start), not from a scan of the log in Python. With replica liveness
(`ReplicaLiveness`), a turn is closed only when the replica that started it
(its `TurnStarted`'s actor) is gone, or is this one and does not run it.
The append names the version just loaded, so a turn that moved on meanwhile
is skipped: a turn is never both interrupted and completed. Without
liveness, every open turn not running in this process is closed (correct
for a single replica only). docs/conversation.md, "Turn ownership".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from turnlog import errors, metrics
from turnlog.conversation.projection import TERMINAL_EVENTS
from turnlog.conversation.repository import ConversationRepository
from turnlog.domain import events as ev
from turnlog.domain.state import evolve
from turnlog.eventlog import Clock, derived_id
from turnlog.storage import Claim, ReplicaLiveness

log = logging.getLogger(__name__)

_TERMINAL_TYPES = frozenset(t.__name__ for t in TERMINAL_EVENTS)


class TurnRecovery:
    """Closes interrupted turns, on demand and periodically.

    Args:
        repository: The conversations.
        clock: Stamps `TurnInterrupted`.
        liveness: This replica's liveness; None: this process is the only replica.
        is_live_here: Whether a turn id runs (or is being started) in this process.
    """

    def __init__(
        self,
        repository: ConversationRepository,
        *,
        clock: Clock,
        liveness: ReplicaLiveness | None,
        is_live_here: Callable[[str], bool],
    ) -> None:
        self._repository = repository
        self._clock = clock
        self._liveness = liveness
        self._is_live_here = is_live_here
        self._task: asyncio.Task[None] | None = None

    async def close_interrupted_turns(self) -> list[tuple[str, str]]:
        """Close the open turns that no live replica runs; safe at any time, on any replica.

        Returns:
            The (conversation id, turn id) pairs closed.

        Raises:
            StorageUnavailableError: the log or the liveness check is unreachable.
        """
        closed: list[tuple[str, str]] = []
        for turn in await self._repository.open_turns(_TERMINAL_TYPES):
            if self._is_live_here(turn.turn_id):
                continue  # running here, alive
            claim: Claim | None = None
            if self._liveness is not None:
                # The replica that started it is gone (its lock is free), or
                # is this one (and the turn does not run here).
                claim = await self._liveness.claim_orphan(turn.actor)
                if claim is None:
                    continue  # its replica is alive (or being recovered elsewhere)
            try:
                if await self._interrupt(turn.conversation_id, turn.turn_id):
                    closed.append((turn.conversation_id, turn.turn_id))
            finally:
                if claim is not None and self._liveness is not None:
                    await self._liveness.release(claim)
        return closed

    async def _interrupt(self, cid: str, turn_id: str) -> bool:
        repository = self._repository
        state = await repository.load(cid)
        if state.open_turn is None or state.open_turn.turn_id != turn_id:
            return False
        event = ev.TurnInterrupted(turn_id=turn_id, detected_at_us=self._clock())
        new = repository.new_event(derived_id(turn_id, "interrupted"), event, correlation=turn_id)
        try:
            await repository.append(
                cid, [new], expected_version=state.version, state=evolve(state, event)
            )
        except errors.VersionConflictError:
            return False  # its owner (or another recovery) moved it on meanwhile
        metrics.TURNS_ENDED.labels("interrupted").inc()
        log.warning("closed interrupted turn %s of %s", turn_id, cid)
        return True

    def start(self, interval_s: float, *, jitter: float = 0.2) -> None:
        """Run `close_interrupted_turns` every `interval_s` (± `jitter`) until `stop`.

        Each round first checks this replica's liveness (re-taking it if it
        was lost). Jitter keeps replicas started together from recovering in
        lockstep. Errors are logged, never fatal.
        """
        if self._task is None:
            self._task = asyncio.create_task(
                self._periodically(interval_s, jitter), name="turn-recovery"
            )

    async def stop(self) -> None:
        """Stop the periodic recovery (if started) and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _periodically(self, interval_s: float, jitter: float) -> None:
        while True:
            await asyncio.sleep(interval_s * random.uniform(1 - jitter, 1 + jitter))
            try:
                if self._liveness is not None and await self._liveness.check():
                    log.warning(
                        "the replica lock was lost for a while: other replicas may have "
                        "closed this replica's open turns"
                    )
                closed = await self.close_interrupted_turns()
                if closed:
                    log.warning("closed %d interrupted turn(s)", len(closed))
            except errors.TurnlogError as e:
                log.warning("turn recovery failed (%s); retrying next round", e)
            except Exception:
                log.exception("turn recovery failed; retrying next round")


__all__ = ["TurnRecovery"]
