"""A partner's lifetime budget, as its state folder holds it: spent, left, and whether the next
training round fits.

Read from ``state_dir/ledger.jsonl`` (every mechanism run, charged before it ran) and
``state_dir/plan.json`` (the noise fixed at the first round); nothing is written, so asking never
spends anything. Everything here stays at the partner: the coordinator learns a partner's
epsilon only from what the partner reports in its replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedpersona.config.files import load_plan
from fedpersona.config.settings import PrivacySettings

__all__ = ["LifetimeBudget", "lifetime_budget"]


@dataclass(frozen=True)
class LifetimeBudget:
    """The lifetime budget of one state folder.

    ``entries`` is the number of mechanism runs the ledger holds (0: the budget is untouched);
    ``next_round_epsilon`` what one more planned training round would bring the ledger to
    (``inf`` when the plan's rounds are used up, None when no plan is fixed yet, so the next run
    plans its noise from what is left).
    """

    state_dir: Path
    target_epsilon: float
    spent: float
    entries: int
    rounds_spent: int
    planned_rounds: int | None
    next_round_epsilon: float | None

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.spent < 0 or self.entries < 0 or self.rounds_spent < 0:
            raise ValueError(f"spent, entries and rounds_spent must be >= 0, got {self}")

    @property
    def untouched(self) -> bool:
        return self.entries == 0

    @property
    def left(self) -> float:
        return max(0.0, self.target_epsilon - self.spent)

    @property
    def next_round_fits(self) -> bool | None:
        """Whether another training round fits the budget (None: no plan fixed yet)."""
        if self.next_round_epsilon is None:
            return None if self.untouched or self.planned_rounds is None else False
        return self.next_round_epsilon <= self.target_epsilon * (1 + 1e-9)

    def text(self) -> str:
        """One line for a person: untouched, or spent / left / whether the next round fits."""
        where = f"lifetime budget of {self.state_dir}"
        if not math.isfinite(self.target_epsilon):
            return f"{where}: NOT PRIVATE (target_epsilon = inf); {self.entries} mechanism run(s) recorded"
        if self.untouched:
            return f"{where}: UNTOUCHED (epsilon 0 of {self.target_epsilon:g} spent; no mechanism has run)"
        line = (
            f"{where}: epsilon {self.spent:.4f} of {self.target_epsilon:g} spent, {self.left:.4f} left, "
            f"over {self.rounds_spent} training round(s)"
            + (f" of {self.planned_rounds} planned" if self.planned_rounds is not None else "")
        )
        fits = self.next_round_fits
        if fits is None:
            return line + "; no plan is fixed: the next run plans its noise from what is left"
        if fits:
            return line + f"; the next training round fits (it would bring epsilon to {self.next_round_epsilon:.4f})"
        reason = (
            "the planned rounds are used up"
            if self.next_round_epsilon is None or math.isinf(self.next_round_epsilon)
            else f"it would reach epsilon {self.next_round_epsilon:.4f}"
        )
        return line + f"; the next training round does NOT fit ({reason}): this partner refuses to train again"


def lifetime_budget(state_dir: str | Path, *, settings: PrivacySettings | None = None) -> LifetimeBudget:
    """The budget ``state_dir`` holds. ``settings`` (the partner's ``[privacy]``) names the budget
    when no plan is fixed yet; a fixed plan's budget wins, as it does when training."""
    from fedpersona.privacy.ledger import PrivacyLedger

    state_dir = Path(state_dir)
    plan = load_plan(state_dir)
    if plan is not None:
        settings = PrivacySettings(
            target_epsilon=plan.target_epsilon,
            delta=plan.delta,
            max_grad_norm=plan.max_grad_norm,
            accountant=plan.accountant,
        )
    settings = settings or PrivacySettings()
    if not (state_dir / PrivacyLedger.FILE).exists():
        return LifetimeBudget(
            state_dir=state_dir, target_epsilon=settings.target_epsilon, spent=0.0, entries=0, rounds_spent=0,
            planned_rounds=plan.planned_rounds if plan is not None else None, next_round_epsilon=None,
        )  # fmt: skip
    ledger = PrivacyLedger(state_dir, settings=settings)
    done = sum(1 for e in ledger.entries if e.mechanism == "dp-sgd")
    following: float | None = None
    if plan is not None and plan.noise_multiplier is not None:
        following = (
            math.inf
            if done >= plan.planned_rounds
            else ledger.would_reach(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        )
    return LifetimeBudget(
        state_dir=state_dir,
        target_epsilon=settings.target_epsilon,
        spent=ledger.epsilon() if ledger.entries else 0.0,
        entries=len(ledger.entries),
        rounds_spent=done,
        planned_rounds=plan.planned_rounds if plan is not None else None,
        next_round_epsilon=following,
    )
