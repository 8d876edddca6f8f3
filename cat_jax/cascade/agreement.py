"""Agreement-based cascading (ABC, Kolawole et al. 2024): an ensemble tier answers with its majority
answer and defers when its members agree too little (agreement below the boundary's threshold).

Two statistics, named by the tier rule that reads them:
- `abc`, the authors' (stevenkolawole/Agreement-Based-Cascading, src/methods/coe.py and
  src/methods/utils.py normalize_answer). The tier answers with the most frequent answer after
  `normalize_answer` (ties: the one given first in tier order), through the first member giving it.
  Label-like tasks: agreement = that answer's share of the M votes (1 unanimous, 1/M all split).
  Free-text tasks: agreement = the mean Jaccard similarity over the M(M-1)/2 distinct pairs of
  members, each answer the set of its normalised tokens stemmed by nltk's PorterStemmer (an empty
  set shares nothing: similarity 0). {A, A, B} with A, B sharing no token: (1 + 0 + 0) / 3.
  An empty majority answer always defers: its agreement is EMPTY_MAJORITY, below any real one.
- `abc_central`, this project's earlier variant: member m's support is its mean similarity to every
  member, its own included; the member of largest support answers (the earliest on ties) and the
  agreement is that support, in [1/M, 1]. Similarity: equality after SQuAD normalisation (labels),
  or the Jaccard similarity of unstemmed SQuAD-normalised token sets, 1 for two empty answers
  (free text). {A, A, B} scores 2/3.

A task's answers are free text when it has a corpus metric (BLEU) or scores its answers as SQuAD
does (token-overlap QA such as ReCoRD): `is_free_text`. Labels, numbers and exact strings (class
names, syllable counts, phoneme strings scored by exact match) are label-like.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cat_jax import metrics
from cat_jax.metrics import squad_normalize

ABC = "abc"
ABC_CENTRAL = "abc_central"
STATISTICS = (ABC, ABC_CENTRAL)
EMPTY_MAJORITY = -1.0
# Per-example metrics whose answers are free text (scored by token overlap after normalisation).
FREE_TEXT_PER_EXAMPLE: tuple[Callable[..., Any], ...] = (metrics.squad_exact_match_scores,)

_DROPPED = re.compile(r"[^\w\s-]")
_ARTICLE = re.compile(r"\b(?:a|an|the)\b")


def is_free_text(quality: metrics.Quality) -> bool:
    """True when a task's answers are free text: it has a corpus metric, or a per-example metric in
    FREE_TEXT_PER_EXAMPLE; False for label-like answers."""
    return quality.corpus is not None or quality.per_example in FREE_TEXT_PER_EXAMPLE


def normalize_answer(text: str) -> str:
    """The ABC authors' normalisation: lowercase, every character but word characters, whitespace
    and '-' removed, the words a / an / the removed, whitespace collapsed."""
    text = _DROPPED.sub("", str(text).lower())
    return " ".join(_ARTICLE.sub("", text).split())


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    from nltk.stem import PorterStemmer  # imported on first use: decoding jobs never need it

    return PorterStemmer()


def stemmed_tokens(text: str) -> frozenset[str]:
    """The set of Porter stems of an answer's normalised tokens."""
    stem = _stemmer().stem
    return frozenset(stem(word) for word in normalize_answer(text).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|, 0 when either set is empty (as the authors' code)."""
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def mean_pairwise_jaccard(answers: Sequence[str]) -> float:
    """The authors' free-text agreement: mean Jaccard similarity of the stemmed token sets over
    distinct pairs of answers (1 for fewer than two answers)."""
    sets = [stemmed_tokens(a) for a in answers]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    if not pairs:
        return 1.0
    return sum(jaccard(sets[i], sets[j]) for i, j in pairs) / len(pairs)


def majority_vote(answers: Sequence[str], free_text: bool) -> tuple[float, int]:
    """(`abc` agreement, answering member) of one example's M answers in tier order."""
    normalized = [normalize_answer(a) for a in answers]
    majority, count = Counter(normalized).most_common(1)[0]  # ties: the first given (insertion order)
    winner = normalized.index(majority)
    if majority == "":
        return EMPTY_MAJORITY, winner
    return (mean_pairwise_jaccard(answers) if free_text else count / len(answers)), winner


def token_set_similarity(a: str, b: str) -> float:
    """`abc_central`'s free-text similarity: Jaccard of the SQuAD-normalised, unstemmed token sets
    of two answers, 1 for two empty answers."""
    ta, tb = set(squad_normalize(a).split()), set(squad_normalize(b).split())
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def central_vote(answers: Sequence[str], free_text: bool) -> tuple[float, int]:
    """(`abc_central` agreement, answering member): the most central member's mean similarity to
    every member, its own included."""
    if free_text:
        similarity = np.array([[token_set_similarity(a, b) for b in answers] for a in answers])
    else:
        normalized = [squad_normalize(a) for a in answers]
        similarity = np.array([[float(a == b) for b in normalized] for a in normalized])
    support = similarity.mean(axis=1)
    winner = int(np.argmax(support))  # the first maximum: earlier members win ties
    return float(support[winner]), winner


def ensemble_vote(
    predictions: Sequence[Sequence[str]], free_text: np.ndarray | bool, statistic: str = ABC
) -> tuple[np.ndarray, np.ndarray]:
    """(agreement [N], winner [N] int: the answering member) of an ensemble.

    predictions: [M][N] each member's answers, members in tier order. free_text: [N] bool (or one
    bool for all), True where the example's task is free text. statistic: one of STATISTICS.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown agreement statistic {statistic!r}; choose from {STATISTICS}.")
    members = [list(p) for p in predictions]
    if not members:
        raise ValueError("ensemble_vote needs at least one member's predictions.")
    n = len(members[0])
    if any(len(p) != n for p in members):
        raise ValueError(f"every member needs one prediction per example; got lengths {[len(p) for p in members]}.")
    free_text = np.broadcast_to(np.asarray(free_text, dtype=bool), (n,))
    vote = majority_vote if statistic == ABC else central_vote
    agreement, winner = np.empty(n), np.empty(n, dtype=np.int64)
    for i in range(n):
        agreement[i], winner[i] = vote([p[i] for p in members], bool(free_text[i]))
    return agreement, winner
