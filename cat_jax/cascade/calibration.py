"""Budget calibration: pick thresholds on the validation split so that the cascade meets a budget
(a deferral rate or a relative FLOPs), then report what those thresholds do on test.

The validation operating points come from a sweep over every distinct validation score (two
models) or over the joint threshold grid (k tiers). Within the budget means the validation value is
not above the target (up to float rounding, BUDGET_RTOL):
- two models, one threshold (`spend`): the point that spends the budget, i.e. whose validation
  value is the largest within it (ties: better quality, then cheaper). When the target is
  reachable, for instance a deferral rate of k / N_val without ties at the k-th score, validation
  meets it exactly; test then shows the sampling gap.
- k tiers, several thresholds (`best_within`): of the joint grid points within the budget, the one
  of best validation quality (ties: cheaper).
When no point is within the budget (a FLOPs target below the first model's own cost), the cheapest
point is taken and `met_on_validation` is False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

BUDGET_METRICS = ("deferral_rate", "relative_flops")
BUDGET_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Budget:
    """A target for one metric of the cascade: deferral_rate (share of examples leaving the first
    model) or relative_flops (cascade FLOPs over the last model's)."""

    metric: str
    target: float

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise ValueError(f"unknown budget metric {self.metric!r}; choose from {BUDGET_METRICS}.")
        if self.metric == "deferral_rate" and not 0.0 <= self.target <= 1.0:
            raise ValueError(f"a target deferral rate must lie in [0, 1]; got {self.target}.")
        if self.metric == "relative_flops" and self.target < 0.0:
            raise ValueError(f"a target relative FLOPs must be >= 0; got {self.target}.")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a cascade did at the chosen thresholds on one split."""

    deferral_rate: float
    relative_flops: float
    quality: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The budget, the thresholds picked on validation and their outcome on validation and test."""

    budget: Budget
    thresholds: tuple[float, ...]
    validation: Outcome
    test: Outcome
    met_on_validation: bool


def outcome(point: Any) -> Outcome:
    """The Outcome of a curves.CurvePoint or tiers.TierPoint."""
    return Outcome(point.deferral_rate, point.relative_flops, point.quality)


def _within(points: Sequence[Any], budget: Budget) -> list[Any]:
    limit = budget.target + BUDGET_RTOL * max(1.0, abs(budget.target))
    return [p for p in points if getattr(p, budget.metric) <= limit]


def _cheapest(points: Sequence[Any], budget: Budget) -> Any:
    return min(points, key=lambda p: (getattr(p, budget.metric), p.relative_flops, -p.quality))


def _choose(points: Sequence[Any], budget: Budget, preference: Callable[[Any], tuple]) -> tuple[Any, bool]:
    """(the preferred point within the budget, True), or (the cheapest point, False) when none is."""
    if not points:
        raise ValueError("calibration needs at least one validation operating point.")
    within = _within(points, budget)
    if not within:
        return _cheapest(points, budget), False
    return max(within, key=preference), True


def spend(points: Sequence[Any], budget: Budget) -> tuple[Any, bool]:
    """(the point whose value is the largest within the budget, whether any point was within it)."""
    return _choose(points, budget, lambda p: (getattr(p, budget.metric), p.quality, -p.relative_flops))


def best_within(points: Sequence[Any], budget: Budget) -> tuple[Any, bool]:
    """(the point of best quality within the budget, whether any point was within it)."""
    return _choose(points, budget, lambda p: (p.quality, -p.relative_flops))


def budgets(target_deferral_rate: float | None, target_relative_flops: float | None) -> list[Budget]:
    """The budgets that are set, deferral rate first."""
    targets = {"deferral_rate": target_deferral_rate, "relative_flops": target_relative_flops}
    return [Budget(metric, float(target)) for metric, target in targets.items() if target is not None]
