"""`turnlog.v1.ConversationService`: the conversation RPCs and the history RPCs in one service.

The wiring of the two layers below lives here, not in either of them: the
history RPCs get a `HistoryService` over the application's store, clock and
instance unless one is given.
"""

from __future__ import annotations

from turnlog.api.conversations import ConversationRpcs
from turnlog.api.history import HistoryRpcs
from turnlog.api.turns import TurnRpcs
from turnlog.conversation.application import ConversationApplication
from turnlog.history.service import HistoryService
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc


class ConversationServicer(
    ConversationRpcs, TurnRpcs, HistoryRpcs, sgrpc.ConversationServiceServicer
):
    """Implements turnlog.v1.ConversationService over `ConversationApplication` and `HistoryService`."""

    def __init__(self, app: ConversationApplication, history: HistoryService | None = None) -> None:
        self.app = app
        self.history = history or HistoryService(app.store, clock=app.clock, instance=app.instance)


__all__ = ["ConversationServicer"]
