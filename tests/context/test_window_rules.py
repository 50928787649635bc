"""The window decision on its own (`context.plan_window`): pure, so every rule is checked exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnlog import errors
from turnlog.conversation.context import TurnTokens, WindowRules, plan_window
from turnlog.domain import events as ev

TRUNCATE = ev.ContextPolicy.TRUNCATE


def turns(*tokens: int, first: int = 2) -> list[TurnTokens]:
    """Turns of the given sizes, each 10 versions long, the first starting at `first`."""
    return [TurnTokens(start_version=first + 10 * i, tokens=t) for i, t in enumerate(tokens)]


def rules(**changes: object) -> WindowRules:
    base: dict[str, object] = {
        "policy": TRUNCATE,
        "max_context_tokens": 1000,
        "requested_max_tokens": 200,
        "keep_fraction": 0.5,
        "min_reply_tokens": 16,
    }
    return WindowRules(**{**base, **changes})  # type: ignore[arg-type]


def test_everything_fits_nothing_is_left_out() -> None:
    window = plan_window(
        head_tokens=50,
        turns=turns(100, 100, 100),
        previous_first_version=0,
        left_out_before=0,
        rules=rules(),
    )
    assert (window.first_version, window.left_out_turns, window.prompt_tokens) == (0, 0, 350)
    assert window.max_tokens == 200
    assert window.requested_max_tokens is None


def test_when_it_no_longer_fits_the_window_moves_in_one_step_to_the_keep_fraction() -> None:
    # budget 800, target 400: 50 + 8 * 100 = 850 > 800, so turns go until <= 400.
    window = plan_window(
        head_tokens=50,
        turns=turns(*[100] * 8),
        previous_first_version=0,
        left_out_before=0,
        rules=rules(),
    )
    assert window.prompt_tokens == 350  # 50 + 3 turns: the first total at or under 400
    assert window.left_out_turns == 5
    assert window.first_version == 2 + 10 * 5


def test_the_window_keeps_its_start_while_it_fits() -> None:
    # Hysteresis: after a move, later turns add to the same start until the budget is passed.
    candidates = turns(100, 100, 100, 100, first=52)
    window = plan_window(
        head_tokens=50,
        turns=candidates,
        previous_first_version=52,
        left_out_before=5,
        rules=rules(),
    )
    assert (window.first_version, window.left_out_turns, window.prompt_tokens) == (52, 5, 450)


def test_the_current_turn_is_never_left_out_and_a_big_one_clamps_max_tokens() -> None:
    window = plan_window(
        head_tokens=50,
        turns=turns(100, 880),
        previous_first_version=0,
        left_out_before=0,
        rules=rules(),
    )
    assert window.left_out_turns == 1
    assert window.prompt_tokens == 930
    assert window.max_tokens == 70
    assert window.requested_max_tokens == 200


def test_strict_max_tokens_refuses_instead_of_clamping() -> None:
    with pytest.raises(errors.ContextLengthExceededError) as caught:
        plan_window(
            head_tokens=50,
            turns=turns(880),
            previous_first_version=0,
            left_out_before=0,
            rules=rules(strict_max_tokens=True),
        )
    assert caught.value.metadata["promptTokens"] == "930"
    assert caught.value.metadata["maxTokens"] == "200"


def test_a_turn_that_cannot_fit_even_alone_is_refused_with_the_counts() -> None:
    with pytest.raises(errors.ContextLengthExceededError) as caught:
        plan_window(
            head_tokens=50,
            turns=turns(100, 940),
            previous_first_version=0,
            left_out_before=0,
            rules=rules(),
        )
    assert caught.value.metadata == {
        "promptTokens": "990",
        "maxTokens": "200",
        "maxContextTokens": "1000",
        "policy": "truncate",
        "minReplyTokens": "16",
    }


def test_disabled_leaves_nothing_out_and_refuses_what_does_not_fit() -> None:
    ok = plan_window(
        head_tokens=50,
        turns=turns(300, 300),
        previous_first_version=0,
        left_out_before=0,
        rules=rules(policy=ev.ContextPolicy.DISABLED),
    )
    assert ok.left_out_turns == 0
    assert ok.prompt_tokens == 650
    with pytest.raises(errors.ContextExhaustedError) as caught:
        plan_window(
            head_tokens=50,
            turns=turns(300, 300, 300),
            previous_first_version=0,
            left_out_before=0,
            rules=rules(policy=ev.ContextPolicy.DISABLED),
        )
    assert caught.value.metadata["promptTokens"] == "950"
    assert caught.value.metadata["policy"] == "disabled"


@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=40),
    head=st.integers(0, 200),
    reply=st.integers(1, 600),
)
def test_any_window_that_is_chosen_fits_and_keeps_the_current_turn(
    sizes: list[int], head: int, reply: int
) -> None:
    candidates = turns(*sizes)
    try:
        window = plan_window(
            head_tokens=head,
            turns=candidates,
            previous_first_version=0,
            left_out_before=0,
            rules=rules(requested_max_tokens=reply),
        )
    except errors.ContextLengthExceededError:
        assert head + sizes[-1] + 16 > 1000  # refused only when the current turn cannot fit
        return
    kept = sizes[window.left_out_turns :]
    assert kept
    assert kept[-1] is sizes[-1]
    assert window.prompt_tokens == head + sum(kept)
    assert window.prompt_tokens + window.max_tokens <= 1000
    assert window.max_tokens == min(reply, 1000 - window.prompt_tokens)
    assert window.max_tokens >= min(reply, 16)


def test_stepped_window_moves_rarely_over_a_long_conversation() -> None:
    """Over 200 turns of 60 tokens the start moves a few times, not once per turn."""
    first, left_out, moves = 0, 0, 0
    sizes: list[int] = []
    for n in range(200):
        sizes.append(60)
        candidates = [
            TurnTokens(start_version=2 + 10 * i, tokens=s)
            for i, s in enumerate(sizes)
            if 2 + 10 * i >= first
        ]
        window = plan_window(
            head_tokens=40,
            turns=candidates,
            previous_first_version=first,
            left_out_before=n + 1 - len(candidates),
            rules=rules(keep_fraction=0.6),
        )
        moves += window.first_version != first
        first, left_out = window.first_version, window.left_out_turns
        assert window.prompt_tokens + window.max_tokens <= 1000
    assert left_out > 150
    assert moves <= 200 // 4  # each move frees room for ~5 turns


def test_compact_moves_at_its_threshold_before_the_budget_is_reached() -> None:
    # 50 + 6 * 100 = 650 fits the budget (800), but with the reply (200) it
    # passes 0.8 of the context (800 - 200 = 600): compact moves (and the turns
    # it leaves out are the ones a summary replaces); truncate does not.
    compact = rules(policy=ev.ContextPolicy.COMPACT, trigger_fraction=0.8)
    moved = plan_window(
        head_tokens=50,
        turns=turns(*[100] * 6),
        previous_first_version=0,
        left_out_before=0,
        rules=compact,
    )
    assert moved.left_out_turns == 3
    assert moved.prompt_tokens == 350
    kept = plan_window(
        head_tokens=50,
        turns=turns(*[100] * 6),
        previous_first_version=0,
        left_out_before=0,
        rules=rules(),
    )
    assert kept.left_out_turns == 0
    below = plan_window(
        head_tokens=50,
        turns=turns(*[100] * 5),
        previous_first_version=0,
        left_out_before=0,
        rules=compact,
    )
    assert below.left_out_turns == 0
