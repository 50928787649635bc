"""The replica-liveness port: is the replica that wrote something still alive?

Replicas of the service share one event log; every event names the replica
that appended it (`EventMetadata.actor`). Work that a gone replica left
unfinished may be taken over; a live replica's may not. `ReplicaLiveness`
answers that question for one replica (this one) about others, and
`PostgresReplicaLock` (`turnlog.storage.replica_lock`) implements it with
PostgreSQL session advisory locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Claim:
    """A hold on a gone replica's liveness; give it back with `ReplicaLiveness.release`."""

    actor: str
    locked: bool  # False: this replica's own (its lock is held anyway)


class ReplicaLiveness(Protocol):
    """This replica's liveness, held while it runs, and a test of other replicas'.

    Contracts:

    - While open, this replica (`instance`) counts as alive to every other.
    - `claim_orphan(actor)` returns a `Claim` when the replica named `actor`
      is gone (and keeps others from claiming it until `release`), or is this
      replica; None while `actor` is alive or claimed elsewhere.
    - `check()` makes sure this replica still holds its liveness (re-taking
      it if it was lost) and returns True when it had been lost meanwhile:
      other replicas may have taken over its work.
    - Safety never rests on this port: it only keeps takeovers away from
      live replicas' work. Callers still make every write conditional.
    """

    @property
    def instance(self) -> str:
        """This replica's name (the actor of the events it writes)."""
        ...

    async def claim_orphan(self, actor: str) -> Claim | None:
        """A claim on the work of replica `actor` when it is gone (or is this one); else None.

        Raises:
            StorageUnavailableError: liveness cannot be checked now.
        """
        ...

    async def release(self, claim: Claim) -> None:
        """Gives back a claim from `claim_orphan`. Never raises."""
        ...

    async def check(self) -> bool:
        """True if this replica's liveness had been lost (and is now held again).

        Raises:
            StorageUnavailableError: it cannot be re-taken now.
            AlreadyExistsError: another process holds this replica's name.
        """
        ...

    async def close(self) -> None:
        """Gives up this replica's liveness. Idempotent."""
        ...


__all__ = ["Claim", "ReplicaLiveness"]
