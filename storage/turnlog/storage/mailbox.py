"""The turn mailbox port: control letters (cancel, tool results) for a turn running on another replica.

A turn runs in the process of the replica that started it; a cancel or a
client tool result may arrive at any replica. The receiving replica posts a
letter addressed to the turn; the replica running the turn takes it (taking
deletes it) and acts on it. The conversation layer decides what a letter
says (`turnlog.conversation.control`); to this port a letter is an opaque
text.

Adapters: `InMemoryTurnMailbox` (below; replicas that share one instance
in one process, as tests run them) and `PostgresTurnMailbox`
(`turnlog.storage.mailbox_postgres`: a table plus `LISTEN/NOTIFY`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class Letter:
    """One control letter: who it is for and what it says."""

    letter_id: int
    turn_id: str
    body: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """What `TurnMailbox.wait` saw: letters arrived for `turn_ids`, or maybe for any turn.

    `everything` is True after a poll timeout or a reconnect (a notification
    may have been lost): the receiver then looks for letters of every turn
    it runs.
    """

    turn_ids: frozenset[str] = frozenset()
    everything: bool = False


class TurnMailbox(Protocol):
    """Letters addressed to running turns, shared by every replica of one event log.

    Contracts:

    - `post` stores a letter and wakes the `wait`ers of every replica
      (best effort: a lost wake-up only delays delivery until the next poll).
    - `take(turn_ids)` removes and returns the letters of those turns, oldest
      first; a letter is taken at most once, by one replica.
    - `withdraw` removes a letter that nobody took (its sender gave up
      waiting); `expire` removes every letter older than a bound (a sender
      that died before withdrawing).
    - `wait` returns when letters may have arrived, or after `timeout_s`
      with `Notice(everything=True)`.
    """

    async def post(self, turn_id: str, body: str) -> int:
        """Stores a letter for `turn_id`; returns its id.

        Raises:
            StorageUnavailableError: the letter could not be stored.
        """
        ...

    async def take(self, turn_ids: Collection[str]) -> list[Letter]:
        """Removes and returns the letters of `turn_ids`, oldest first.

        Raises:
            StorageUnavailableError: the mailbox cannot be read now.
        """
        ...

    async def withdraw(self, letter_id: int) -> None:
        """Removes a letter if it is still there. Never raises."""
        ...

    async def expire(self, older_than_s: float) -> int:
        """Removes letters older than `older_than_s`; returns how many. Never raises."""
        ...

    async def wait(self, timeout_s: float) -> Notice:
        """Waits for letters of any turn (or `timeout_s`)."""
        ...

    async def close(self) -> None:
        """Stops listening. Idempotent."""
        ...


class InMemoryTurnMailbox:
    """A `TurnMailbox` in this process's memory: replicas in one process share one instance.

    Each `wait`er gets its own notices (a listener per replica, as with
    PostgreSQL); `subscribe()` returns a view for one replica.
    """

    def __init__(self) -> None:
        self._letters: dict[int, tuple[Letter, float]] = {}
        self._ids = itertools.count(1)
        self._views: list[_InMemoryView] = []

    def subscribe(self) -> _InMemoryView:
        """One replica's handle on the shared mailbox (its own notices)."""
        view = _InMemoryView(self)
        self._views.append(view)
        return view

    def _post(self, turn_id: str, body: str) -> int:
        letter_id = next(self._ids)
        self._letters[letter_id] = (
            Letter(letter_id=letter_id, turn_id=turn_id, body=body),
            time.monotonic(),
        )
        for view in self._views:
            view.notify(turn_id)
        return letter_id

    def _take(self, turn_ids: Collection[str]) -> list[Letter]:
        wanted = set(turn_ids)
        taken = [letter for letter, _ in self._letters.values() if letter.turn_id in wanted]
        for letter in taken:
            del self._letters[letter.letter_id]
        return sorted(taken, key=lambda letter: letter.letter_id)

    def _withdraw(self, letter_id: int) -> None:
        self._letters.pop(letter_id, None)

    def _expire(self, older_than_s: float) -> int:
        cutoff = time.monotonic() - older_than_s
        old = [i for i, (_, at) in self._letters.items() if at < cutoff]
        for letter_id in old:
            del self._letters[letter_id]
        return len(old)

    def __len__(self) -> int:
        return len(self._letters)


class _InMemoryView:
    """One replica's `TurnMailbox` over a shared `InMemoryTurnMailbox`."""

    def __init__(self, shared: InMemoryTurnMailbox) -> None:
        self._shared = shared
        self._pending: set[str] = set()
        self._event = asyncio.Event()
        self._closed = False

    def notify(self, turn_id: str) -> None:
        self._pending.add(turn_id)
        self._event.set()

    async def post(self, turn_id: str, body: str) -> int:
        return self._shared._post(turn_id, body)

    async def take(self, turn_ids: Collection[str]) -> list[Letter]:
        return self._shared._take(turn_ids)

    async def withdraw(self, letter_id: int) -> None:
        self._shared._withdraw(letter_id)

    async def expire(self, older_than_s: float) -> int:
        return self._shared._expire(older_than_s)

    async def wait(self, timeout_s: float) -> Notice:
        if not self._pending and not self._closed:
            try:
                await asyncio.wait_for(self._event.wait(), timeout_s)
            except TimeoutError:
                return Notice(everything=True)
        self._event.clear()
        pending, self._pending = self._pending, set()
        return Notice(turn_ids=frozenset(pending), everything=self._closed)

    async def close(self) -> None:
        self._closed = True
        self._event.set()
        if self in self._shared._views:
            self._shared._views.remove(self)


__all__ = ["InMemoryTurnMailbox", "Letter", "Notice", "TurnMailbox"]
