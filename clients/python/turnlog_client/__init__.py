"""turnlog-client: the Python SDK of the turnlog conversation service.

`TurnlogClient` (blocking) and `AsyncTurnlogClient` (asyncio) wrap
`turnlog.v1.ConversationService` with credentials, request ids, retries,
typed errors, resumable turn streams, client-side tool callbacks, paging,
typed history and subscriptions; `verify_export` checks an export file
offline. See clients/python/README.md.
"""

from turnlog_client.aio import DEFAULT_TARGET, AsyncTurnlogClient, conversation_name
from turnlog_client.credentials import Credentials
from turnlog_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    TurnlogError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from turnlog_client.retry import NO_RETRY, RetryPolicy
from turnlog_client.streams import ConverseTurn, Subscription, ToolCallback, TurnStream
from turnlog_client.sync import TurnlogClient
from turnlog_client.transcript import Transcript, TranscriptTurn
from turnlog_client.verify import ExportFormatError, StreamReport, verify_events, verify_export

__all__ = [
    "DEFAULT_TARGET",
    "NO_RETRY",
    "Aborted",
    "AlreadyExists",
    "AsyncTurnlogClient",
    "Cancelled",
    "ConverseTurn",
    "Credentials",
    "DataLoss",
    "DeadlineExceeded",
    "ExportFormatError",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "StreamReport",
    "Subscription",
    "ToolCallback",
    "Transcript",
    "TranscriptTurn",
    "TurnStream",
    "TurnlogClient",
    "TurnlogError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "conversation_name",
    "verify_events",
    "verify_export",
]
