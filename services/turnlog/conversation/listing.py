"""The conversation list: an in-memory read model per process, caught up from the log.

Every `ConversationIndex.page` call first reads the lifecycle events
(`ConversationCreated`, `ConversationForked`, `ConversationArchived`,
`ConversationUnarchived`, `ConversationUpdated`: what the filters read) that
were appended since the last call: the first call scans the log, later ones
read only what is new. Page tokens are opaque (create time + id), newest first.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, replace

from turnlog import errors
from turnlog.conversation.repository import ConversationRepository
from turnlog.domain import events as ev
from turnlog.domain.state import ConversationState, evolve, fold
from turnlog.storage import START_POSITION, Position

_LIFECYCLE_TYPES = frozenset(
    {
        "ConversationCreated",
        "ConversationForked",
        "ConversationArchived",
        "ConversationUnarchived",
        "ConversationUpdated",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListQuery:
    """Input of `ConversationApplication.list_conversations`."""

    page_size: int = 50
    page_token: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    created_after_us: int | None = None
    created_before_us: int | None = None
    show_archived: bool = False
    tenant: str | None = ev.DEFAULT_TENANT
    """Only this tenant's conversations (the caller's); None: every tenant's (an administrator)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationSummary:
    """A list entry."""

    conversation_id: str
    created_at_us: int
    labels: tuple[tuple[str, str], ...]
    archived: bool
    state: ConversationState


class ConversationIndex:
    """The list read model of this process."""

    def __init__(self, repository: ConversationRepository) -> None:
        self._repository = repository
        #: tenant -> conversation id -> entry: a page sorts one tenant's only.
        self._index: dict[str, dict[str, ConversationSummary]] = {}
        self._tenant_of: dict[str, str] = {}
        self._fork_heads: dict[str, ev.ConversationForked] = {}
        self._position: Position = START_POSITION
        self._lock = asyncio.Lock()

    async def page(self, query: ListQuery) -> tuple[list[ConversationSummary], str]:
        """A page of conversations, newest first, and the next page token ("" at the end).

        Raises:
            InvalidArgumentError: A malformed page token.
        """
        await self._catch_up()
        after: tuple[int, str] | None = None
        if query.page_token:
            try:
                raw = base64.urlsafe_b64decode(query.page_token.encode()).decode()
                created, _, cid = raw.partition(":")
                after = (int(created), cid)
            except (ValueError, UnicodeDecodeError) as e:
                raise errors.PageTokenError("malformed page token") from e
        wanted = set(query.labels)
        tenants = (
            list(self._index.values())
            if query.tenant is None
            else [self._index.get(query.tenant, {})]
        )
        items = sorted(
            (item for entries in tenants for item in entries.values()),
            key=lambda s: (s.created_at_us, s.conversation_id),
            reverse=True,
        )
        page: list[ConversationSummary] = []
        for item in items:
            key = (item.created_at_us, item.conversation_id)
            if after is not None and key >= after:
                continue
            if item.archived and not query.show_archived:
                continue
            if not wanted <= set(item.labels):
                continue
            if query.created_after_us is not None and item.created_at_us < query.created_after_us:
                continue
            if (
                query.created_before_us is not None
                and item.created_at_us >= query.created_before_us
            ):
                continue
            page.append(item)
            if len(page) > query.page_size:
                break
        token = ""
        if len(page) > query.page_size:
            page = page[: query.page_size]
            last = page[-1]
            token = base64.urlsafe_b64encode(
                f"{last.created_at_us}:{last.conversation_id}".encode()
            ).decode()
        return page, token

    async def _catch_up(self) -> None:
        async with self._lock:
            while True:
                page = await self._repository.read_all(_LIFECYCLE_TYPES, after=self._position)
                for cid, event in page.events:
                    if isinstance(event, ev.ConversationForked):
                        # A fork's stream starts with this, then a copy of the
                        # source's ConversationCreated (naming the source).
                        self._fork_heads[cid] = event
                    elif isinstance(event, ev.ConversationCreated):
                        fork_head = self._fork_heads.pop(cid, None)
                        state = fold([fork_head, event] if fork_head else [event])
                        self._tenant_of[cid] = state.tenant
                        self._index.setdefault(state.tenant, {})[cid] = ConversationSummary(
                            conversation_id=cid,
                            created_at_us=state.created_at_us,
                            labels=event.labels,
                            archived=False,
                            state=state,
                        )
                    elif cid in self._tenant_of:
                        # Archived, unarchived or updated (labels): refold the entry.
                        entries = self._index[self._tenant_of[cid]]
                        entry = entries[cid]
                        state = evolve(entry.state, event)
                        entries[cid] = replace(
                            entry, archived=state.archived, labels=state.labels, state=state
                        )
                self._position = page.next_position
                if page.reached_end:
                    return


__all__ = ["ConversationIndex", "ConversationSummary", "ListQuery"]
