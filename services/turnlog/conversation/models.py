"""Which model runs a turn: the one it names, if a connected worker serves it.

A turn's model comes from the override chain (turn → conversation →
service, `options.resolve`). Running it on whatever model happens to be
there would record a model name that never generated, so a model no
connected worker serves is refused before anything is recorded; an empty
name means "whatever the workers serve", and the name recorded is then the
one the workers report (GetModelInfo). The engine requests of the turn are
routed to workers serving that model (`EngineClient.generate(model=...)`).
"""

from __future__ import annotations

from turnlog import errors
from turnlog.worker.client import EngineClient


async def model_for_turn(engine: EngineClient, requested: str) -> str:
    """The served model that will run a turn asking for `requested` ("" for any).

    With several models served and none asked for, the first by name, so
    that the choice (and the log) does not depend on which worker answers.

    Raises:
        ModelNotServedError: `requested` is served by no reachable worker.
        EngineUnavailableError: no worker answered at all.
    """
    served = await engine.served_models()
    if not served:
        raise errors.EngineUnavailableError("no engine worker is reachable")
    if not requested:
        return min(served)
    if requested not in served:
        raise errors.ModelNotServedError(
            f"no connected worker serves the model {requested!r}",
            metadata={"model": requested, "servedModels": ",".join(sorted(served))},
        )
    return requested


__all__ = ["model_for_turn"]
