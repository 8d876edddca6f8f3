"""Pearson's chi-square test of token counts against a distribution, shared by the speculative
decoding tests (T5 and decoder-only)."""

from __future__ import annotations

import numpy as np
from scipy import stats

# A chi-square statistic above this bound has probability P_VALUE under the null hypothesis.
P_VALUE = 1e-4


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """(Pearson's statistic, degrees of freedom), outcomes expected fewer than 5 times pooled."""
    expected = probs * counts.sum()
    rare = expected < 5
    counts = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    statistic = float(((counts - expected) ** 2 / np.maximum(expected, 1e-12)).sum())
    return statistic, len(expected) - 1 - int(not rare.any())


def bound(dof: int) -> float:
    """The statistic exceeded with probability P_VALUE at `dof` degrees of freedom."""
    return float(stats.chi2.ppf(1 - P_VALUE, dof))


def passes(counts: np.ndarray, probs: np.ndarray) -> bool:
    statistic, dof = chi_square(counts, probs)
    return statistic < bound(dof)
