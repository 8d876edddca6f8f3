"""Agreement-based cascading (ABC, Kolawole et al. 2024): an ensemble tier answers with its majority
answer and defers when too few of its members agree.

For M members answering one example, member m's support is the mean similarity of its answer to
every member's (its own included):

    support_m = (1 / M) * sum_j sim(a_m, a_j)          agreement = max_m support_m  in [1/M, 1]

The tier answers with the member of largest support (the first such member in tier order on ties)
and keeps the example when agreement >= the boundary's threshold.
- exact (classification-like tasks): sim = 1 when the answers are equal after `normalize_answer`,
  else 0, so the agreement is the majority answer's share of the votes (1 unanimous, 1/M all split);
- token_set (free text, tasks with a corpus metric such as BLEU): sim is the Jaccard similarity
  |A & B| / |A | B| of the answers' sets of normalised tokens (1 for two empty answers), so
  near-identical sentences agree almost fully and the winner is the most central answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cat_jax.metrics import squad_normalize


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
    return squad_normalize(text)


def token_set_similarity(a: str, b: str) -> float:
    """Jaccard similarity of the normalised token sets of two answers, in [0, 1]."""
    ta, tb = set(normalize_answer(a).split()), set(normalize_answer(b).split())
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def _similarities(answers: Sequence[str], token_set: bool) -> np.ndarray:
    """[M, M] similarity of every pair of one example's M answers."""
    if token_set:
        return np.array([[token_set_similarity(a, b) for b in answers] for a in answers])
    normalized = [normalize_answer(a) for a in answers]
    return np.array([[float(a == b) for b in normalized] for a in normalized])


def ensemble_vote(predictions: Sequence[Sequence[str]], token_set: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agreement [N] in [1/M, 1], winner [N] int: the answering member) of an ensemble.

    predictions: [M][N] each member's answers, members in tier order. token_set: [N] bool, True
    where the example is free text (token-set similarity), False for exact match.
    """
    members = [list(p) for p in predictions]
    if not members:
        raise ValueError("ensemble_vote needs at least one member's predictions.")
    n = len(members[0])
    token_set = np.broadcast_to(np.asarray(token_set, dtype=bool), (n,))
    if any(len(p) != n for p in members):
        raise ValueError(f"every member needs one prediction per example; got lengths {[len(p) for p in members]}.")
    agreement, winner = np.empty(n), np.empty(n, dtype=np.int64)
    for i in range(n):
        support = _similarities([p[i] for p in members], bool(token_set[i])).mean(axis=1)
        winner[i] = int(np.argmax(support))  # the first maximum: earlier members win ties
        agreement[i] = support[winner[i]]
    return agreement, winner
