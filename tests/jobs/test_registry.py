from __future__ import annotations

from jobs.registry import decide_promotion


def test_first_version_is_promoted() -> None:
    decision = decide_promotion("if_better", None, None, None)
    assert decision.promote and "first version" in decision.reason


def test_better_challenger_replaces_the_champion() -> None:
    assert decide_promotion("if_better", 1, 0.80, 0.85).promote


def test_worse_or_equal_challenger_is_kept_as_a_candidate() -> None:
    worse = decide_promotion("if_better", 1, 0.85, 0.80)
    tie = decide_promotion("if_better", 1, 0.85, 0.85)
    assert not worse.promote and not tie.promote
    assert "kept as a candidate" in worse.reason


def test_policy_always_and_never_override_the_scores() -> None:
    assert decide_promotion("always", 1, 0.9, 0.1).promote
    assert not decide_promotion("never", None, None, None).promote
