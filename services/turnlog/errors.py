"""The one error hierarchy of turnlog.

Every error the service raises on purpose derives from `TurnlogError`. Each
class names a stable UPPER_SNAKE `reason` (sent to clients in
`google.rpc.ErrorInfo`) and says whether retrying may succeed. Adapters
translate library errors into these with `raise ... from e`; only the gRPC
adapter maps them to status codes, from one table.

`metadata` carries lowerCamel keys safe to show a client (for example
`actualVersion`); the exception message is for logs and may be shown too, so
never put internal details (SQL, stack traces, DSNs) in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

ERROR_DOMAIN = "turnlog.dev"


class TurnlogError(Exception):
    """Base class of every deliberate turnlog error."""

    reason: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(TurnlogError):
    """A request or event is malformed; retrying the same input cannot succeed."""

    reason = "INVALID_ARGUMENT"


class PageTokenError(InvalidArgumentError):
    """A page token that is not ours, or used with other fields than its request's.

    Refused alike by every list RPC: a field violation on `page_token`
    (reason INVALID_REQUEST, as the validation table's), found past the
    table because only the list's own code can read the token.
    """

    reason = "INVALID_REQUEST"

    def __init__(self, message: str) -> None:
        super().__init__(message, metadata={"fields": "page_token"})


class NotFoundError(TurnlogError):
    """The named resource (stream, conversation, turn, request) does not exist."""

    reason = "NOT_FOUND"


class AlreadyExistsError(TurnlogError):
    """The resource to create exists already (and this is not an idempotent retry)."""

    reason = "ALREADY_EXISTS"


class RequestIdReusedError(AlreadyExistsError):
    """A request id was used before with different content (metadata `originalId`).

    Answering the first request's result would hide the client's bug, so a
    retry must repeat its request exactly.
    """

    reason = "REQUEST_ID_REUSED"


class HistoryDivergedError(AlreadyExistsError):
    """Imported history disagrees with the history already stored for its stream."""

    reason = "HISTORY_DIVERGED"


class FailedPreconditionError(TurnlogError):
    """The request is valid but the resource is not in a state that allows it."""

    reason = "FAILED_PRECONDITION"


class TurnInProgressError(FailedPreconditionError):
    """Another turn of the conversation is running; retry when it has ended."""

    reason = "TURN_IN_PROGRESS"
    retryable = True


class ConversationArchivedError(FailedPreconditionError):
    """The conversation is archived and takes no new turns."""

    reason = "CONVERSATION_ARCHIVED"


class TurnNotRunningHereError(FailedPreconditionError):
    """The turn is not running (it has ended), or not in this process where that matters."""

    reason = "TURN_NOT_RUNNING"


class ToolCallNotAwaitedError(FailedPreconditionError):
    """A tool result for a call the turn does not await, or another result for an answered call."""

    reason = "TOOL_CALL_NOT_AWAITED"


class ClientToolsNeedStreamError(FailedPreconditionError):
    """A unary turn (`SendMessage`) on a conversation with client-side tools: nobody could answer them."""

    reason = "CLIENT_TOOLS_NEED_STREAM"


class VersionConflictError(TurnlogError):
    """An append named an expected stream version that is not the actual one."""

    reason = "VERSION_CONFLICT"

    def __init__(self, stream_id: str, expected_version: int | None, actual_version: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual_version}, "
            f"not the expected {expected_version}",
            metadata={
                "streamId": stream_id,
                "expectedVersion": "any" if expected_version is None else str(expected_version),
                "actualVersion": str(actual_version),
            },
        )
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version


class DuplicateEventError(TurnlogError):
    """An event id is stored already with different content, or in another stream."""

    reason = "DUPLICATE_EVENT"


class IntegrityError(TurnlogError):
    """Stored history fails verification (hash chain broken, version gap)."""

    reason = "INTEGRITY_VIOLATION"


class StorageUnavailableError(TurnlogError):
    """The database cannot be reached or refused the operation for a transient cause."""

    reason = "STORAGE_UNAVAILABLE"
    retryable = True


class EngineUnavailableError(TurnlogError):
    """No engine worker can take the request right now."""

    reason = "ENGINE_UNAVAILABLE"
    retryable = True


class OperationCancelledError(TurnlogError):
    """The operation was cancelled by its caller."""

    reason = "CANCELLED"


class DeadlineExceededError(TurnlogError):
    """The operation ran past its deadline."""

    reason = "DEADLINE_EXCEEDED"
    retryable = True


class ClientToolTimeoutError(DeadlineExceededError):
    """The client did not answer a client-side tool call in time (the turn fails)."""

    reason = "CLIENT_TOOL_TIMEOUT"
    retryable = False


class ContextLengthExceededError(InvalidArgumentError):
    """Prompt plus requested output tokens do not fit the model's context."""

    reason = "CONTEXT_LENGTH_EXCEEDED"


class ModelNotServedError(FailedPreconditionError):
    """A turn names a model that no connected worker serves (metadata `model`, `servedModels`).

    Refused before anything is recorded: running it on whatever model is
    there would record a model name that never generated.
    """

    reason = "MODEL_NOT_SERVED"


class ContextExhaustedError(FailedPreconditionError):
    """The conversation's prompt no longer fits the model's context, and its policy leaves nothing out."""

    reason = "CONTEXT_EXHAUSTED"


class NothingToCompactError(FailedPreconditionError):
    """`CompactConversation` found no turn in the window to summarize."""

    reason = "NOTHING_TO_COMPACT"


class UnsupportedByModelError(TurnlogError):
    """The served model cannot do this (for example, embeddings from a generative model)."""

    reason = "UNSUPPORTED_BY_MODEL"


class EngineInternalError(TurnlogError):
    """The engine failed a request for a cause internal to the worker."""

    reason = "ENGINE_INTERNAL"


class UnauthenticatedError(TurnlogError):
    """The call carries no credential, or one that does not verify.

    The subclasses name what is wrong; none says more than that (no key
    material, no claim values a caller did not send).
    """

    reason = "UNAUTHENTICATED"


class CredentialMissingError(UnauthenticatedError):
    """No credential: no bearer token, no API key, no client certificate."""

    reason = "CREDENTIAL_MISSING"


class CredentialMalformedError(UnauthenticatedError):
    """The credential cannot be parsed (not a JWT, not an API key)."""

    reason = "CREDENTIAL_MALFORMED"


class CredentialInvalidError(UnauthenticatedError):
    """The credential does not verify: bad signature, unknown key, unknown or removed API key."""

    reason = "CREDENTIAL_INVALID"


class CredentialExpiredError(UnauthenticatedError):
    """The credential's lifetime is over (or has not begun)."""

    reason = "CREDENTIAL_EXPIRED"


class CredentialWrongIssuerError(UnauthenticatedError):
    """The token was issued by an issuer this service does not trust."""

    reason = "CREDENTIAL_WRONG_ISSUER"


class CredentialWrongAudienceError(UnauthenticatedError):
    """The token is meant for another audience."""

    reason = "CREDENTIAL_WRONG_AUDIENCE"


class PermissionDeniedError(TurnlogError):
    """The caller is authenticated but may not do this."""

    reason = "PERMISSION_DENIED"


class ScopeMissingError(PermissionDeniedError):
    """The credential lacks the scope the RPC needs (metadata `requiredScope`)."""

    reason = "SCOPE_MISSING"


class ResourceExhaustedError(TurnlogError):
    """A limit is reached; retry after `metadata["retryAfterMs"]` milliseconds."""

    reason = "RESOURCE_EXHAUSTED"
    retryable = True


class TenantLimitExceededError(ResourceExhaustedError):
    """The tenant's running turns or request rate is at its limit (metadata `limit`)."""

    reason = "TENANT_LIMIT_EXCEEDED"
