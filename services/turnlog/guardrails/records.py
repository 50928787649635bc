"""What guardrails decide, as records that map 1:1 onto domain events.

Every guardrail that runs yields exactly one `GuardrailDecision` per subject it
checked (an execution intercept: one per action it took, or one ALLOW when it
let the call through untouched). One exception: the sanitize checks of tool
calls and of texts entering beside the user's message (a tool's result or
error, a cancel reason; `turnlog.guardrails.sanitize`) yield a decision only
when they change or block their subject. A decision converts into the domain event
`GuardrailDecided` with `GuardrailDecision.to_event`; a `Block` converts into
`TurnBlocked`.

Digests: `before_digest` is the sha256 hex of the subject text as the guardrail
received it, `after_digest` of the subject text as it left the guardrail. Both
are always filled, so `before_digest == after_digest` exactly when the
guardrail did not change the text (ALLOW and BLOCK never change it). The
subject text is the user text (request stages), the request text handed to
the generation call (execution intercepts), the response text a guardrail saw
(sanitize-response), `tool_call_text(call)` (tool-call guardrails and
sanitizers), or the tool output or cancel reason as it arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from turnlog.domain.events import (
    GuardrailDecided,
    GuardrailStage,
    ToolCall,
    TurnBlocked,
    Verdict,
)


def text_digest(text: str) -> str:
    """Return the sha256 hex digest of `text` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tool_call_text(call: ToolCall) -> str:
    """Return the canonical text of a tool call that tool-call decisions digest.

    The form is `name(arguments_json)`; the call id is not part of it, so the
    same call digests the same under any id.
    """
    return f"{call.name}({call.arguments_json})"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardrailDecision:
    """One guardrail's verdict on one subject: the payload of `GuardrailDecided`.

    Attributes:
        stage: The pipeline stage the guardrail ran in.
        guardrail: The guardrail's stable name.
        guardrail_version: The guardrail's version; bump it when behaviour changes.
        verdict: ALLOW (passed unchanged), MODIFY (passed changed) or BLOCK.
        reason: Human-readable and safe to show a client: it never quotes the
            user's text or an internal error message.
        before_digest: sha256 hex of the subject text before the guardrail.
        after_digest: sha256 hex of the subject text after the guardrail.
    """

    stage: GuardrailStage
    guardrail: str
    guardrail_version: str
    verdict: Verdict
    reason: str = ""
    before_digest: str = ""
    after_digest: str = ""

    @classmethod
    def of(
        cls,
        *,
        stage: GuardrailStage,
        guardrail: str,
        guardrail_version: str,
        before: str,
        after: str,
        blocked: bool = False,
        reason: str = "",
    ) -> GuardrailDecision:
        """Build a decision from the texts before and after, deriving the verdict.

        The verdict is BLOCK when `blocked`, else MODIFY when `after != before`,
        else ALLOW; so a verdict can never disagree with the digests.
        """
        if blocked:
            verdict = Verdict.BLOCK
        elif after != before:
            verdict = Verdict.MODIFY
        else:
            verdict = Verdict.ALLOW
        return cls.from_digests(
            stage=stage,
            guardrail=guardrail,
            guardrail_version=guardrail_version,
            verdict=verdict,
            before_digest=text_digest(before),
            after_digest=text_digest(after),
            reason=reason,
        )

    @classmethod
    def from_digests(
        cls,
        *,
        stage: GuardrailStage,
        guardrail: str,
        guardrail_version: str,
        verdict: Verdict,
        before_digest: str,
        after_digest: str,
        reason: str = "",
    ) -> GuardrailDecision:
        """Build a decision whose digests were computed incrementally (streams)."""
        return cls(
            stage=stage,
            guardrail=guardrail,
            guardrail_version=guardrail_version,
            verdict=verdict,
            reason=reason,
            before_digest=before_digest,
            after_digest=after_digest,
        )

    def to_event(self, *, turn_id: str) -> GuardrailDecided:
        """Return the `GuardrailDecided` event recording this decision in `turn_id`."""
        return GuardrailDecided(
            turn_id=turn_id,
            stage=self.stage,
            guardrail=self.guardrail,
            guardrail_version=self.guardrail_version,
            verdict=self.verdict,
            reason=self.reason,
            before_digest=self.before_digest,
            after_digest=self.after_digest,
        )


def decisions_to_events(
    decisions: Iterable[GuardrailDecision], *, turn_id: str
) -> tuple[GuardrailDecided, ...]:
    """Return one `GuardrailDecided` per decision, in the same order."""
    return tuple(decision.to_event(turn_id=turn_id) for decision in decisions)


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """The outcome "blocked by `guardrail` at `stage` because `reason`".

    A block is a result the pipeline returns, never an exception: the
    orchestrator records it (`to_event`) and tells the client.
    """

    stage: GuardrailStage
    guardrail: str
    guardrail_version: str
    reason: str

    @classmethod
    def from_decision(cls, decision: GuardrailDecision) -> Block:
        """Return the block a BLOCK decision stands for."""
        if decision.verdict is not Verdict.BLOCK:
            raise ValueError(f"decision of {decision.guardrail!r} is not a block")
        return cls(
            stage=decision.stage,
            guardrail=decision.guardrail,
            guardrail_version=decision.guardrail_version,
            reason=decision.reason,
        )

    def describe(self) -> str:
        """Return "blocked by X at stage Y because Z", fit to show a client."""
        return f"blocked by {self.guardrail} at stage {self.stage.value} because {self.reason}"

    def to_event(self, *, turn_id: str, blocked_at_us: int) -> TurnBlocked:
        """Return the `TurnBlocked` event that ends `turn_id` with this block."""
        return TurnBlocked(
            turn_id=turn_id,
            blocked_at_us=blocked_at_us,
            stage=self.stage,
            guardrail=self.guardrail,
            reason=self.reason,
        )
