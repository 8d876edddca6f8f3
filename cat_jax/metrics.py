"""Metric functions: seqio metric_fns (`fn(targets, predictions) -> {name: value}`) and the
per-example scores cascades mix.

Conventions: text is compared after collapsing whitespace; corpus-level numbers are percentages
(0-100, like sacrebleu's BLEU); per-example scores are 1.0 / 0.0. A target is either one reference
string or a sequence of acceptable references (`exact_match_any`, `phoneme_error_rate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import sacrebleu

Target = str | Sequence[str]
PerExampleFn = Callable[[Sequence[Target], Sequence[str]], list[float]]
CorpusFn = Callable[[Sequence[Target], Sequence[str]], float]


def normalize(text: str | bytes) -> str:
    """Decodes bytes and collapses runs of whitespace to one space."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return " ".join(text.split())


def _alternatives(target: Target | bytes) -> list[str]:
    if isinstance(target, (str, bytes)):
        return [normalize(target)]
    return [normalize(t) for t in target]


def _check(targets: Sequence[Target], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        raise ValueError("A metric needs at least one example; got none.")


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def exact_match_scores(targets: Sequence[str], predictions: Sequence[str]) -> list[float]:
    """Per example: 1.0 where the prediction equals the single reference."""
    _check(targets, predictions)
    return [float(normalize(t) == normalize(p)) for t, p in zip(targets, predictions)]


def exact_match_any_scores(targets: Sequence[Target], predictions: Sequence[str]) -> list[float]:
    """Per example: 1.0 where the prediction equals any of the acceptable references."""
    _check(targets, predictions)
    return [float(normalize(p) in _alternatives(t)) for t, p in zip(targets, predictions)]


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their reference."""
    scores = exact_match_scores(targets, predictions)
    return {"exact_match": 100.0 * sum(scores) / len(scores)}


def exact_match_any(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to one of their acceptable references."""
    scores = exact_match_any_scores(targets, predictions)
    return {"exact_match": 100.0 * sum(scores) / len(scores)}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predicted labels equal to the reference label."""
    scores = exact_match_scores(targets, predictions)
    return {"accuracy": 100.0 * sum(scores) / len(scores)}


def phoneme_errors(target: Target, prediction: str) -> tuple[int, int]:
    """(edits, reference length) against the closest alternative (fewest edits, first on ties)."""
    hypothesis = normalize(prediction).split()
    best = None
    for alternative in _alternatives(target):
        reference = alternative.split()
        candidate = (edit_distance(reference, hypothesis), len(reference))
        if best is None or candidate[0] < best[0]:
            best = candidate
    assert best is not None, "a target needs at least one alternative"
    return best


def phoneme_error_rate(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus phoneme error rate in percent: sum of edits / sum of reference lengths."""
    _check(targets, predictions)
    errors = [phoneme_errors(t, p) for t, p in zip(targets, predictions)]
    total_length = sum(length for _, length in errors)
    if total_length == 0:
        raise ValueError("phoneme_error_rate: every reference is empty.")
    return {"phoneme_error_rate": 100.0 * sum(edits for edits, _ in errors) / total_length}


class AdditiveForm(NamedTuple):
    """A corpus metric written as a function of per-example statistics summed over the corpus.

    statistics(targets, predictions) -> [N, K]; from_statistics(summed [K]) -> the corpus score.
    A cascade sweep computes the statistics once per model and re-scores each mixed corpus from a
    sum, instead of re-running the metric on N strings at every threshold.
    """

    statistics: Callable[[Sequence[Target], Sequence[str]], np.ndarray]
    from_statistics: Callable[[np.ndarray], float]


_ADDITIVE: dict[CorpusFn, AdditiveForm] = {}


def register_additive_form(
    corpus: CorpusFn,
    statistics: Callable[[Sequence[Target], Sequence[str]], np.ndarray],
    from_statistics: Callable[[np.ndarray], float],
) -> None:
    """Declares that `corpus(t, p) == from_statistics(statistics(t, p).sum(axis=0))`."""
    _ADDITIVE[corpus] = AdditiveForm(statistics, from_statistics)


def additive_form(corpus: CorpusFn | None) -> AdditiveForm | None:
    """The registered AdditiveForm of a corpus metric, or None."""
    return _ADDITIVE.get(corpus) if corpus is not None else None


_BLEU = sacrebleu.metrics.BLEU()  # sacrebleu.corpus_bleu's defaults: 13a tokenizer, exp smoothing, 4-grams
_BLEU_STATS = 2 + 2 * _BLEU.max_ngram_order


def corpus_bleu(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with one reference per example."""
    return bleu_from_statistics(bleu_statistics(targets, predictions).sum(axis=0))


def bleu_statistics(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """[N, 10] int64 sacrebleu statistics per example: hypothesis length, reference length, then
    matching and total n-grams for n = 1..4."""
    _check(targets, predictions)
    # sacrebleu has no public per-sentence statistics; tests check the sums against sacrebleu.corpus_bleu.
    stats = _BLEU._extract_corpus_statistics([normalize(p) for p in predictions], [[normalize(t) for t in targets]])
    return np.asarray(stats, dtype=np.int64).reshape(len(predictions), _BLEU_STATS)


def bleu_from_statistics(summed: np.ndarray) -> float:
    """Corpus BLEU (0-100) from `bleu_statistics` summed over the examples."""
    order = _BLEU.max_ngram_order
    s = [int(v) for v in summed]
    return float(
        sacrebleu.metrics.BLEU.compute_bleu(
            correct=s[2 : 2 + order],
            total=s[2 + order :],
            sys_len=s[0],
            ref_len=s[1],
            smooth_method=_BLEU.smooth_method,
            max_ngram_order=order,
        ).score
    )


register_additive_form(corpus_bleu, bleu_statistics, bleu_from_statistics)


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """seqio metric_fn wrapper of `corpus_bleu`."""
    return {"bleu": corpus_bleu(targets, predictions)}


@dataclasses.dataclass(frozen=True)
class Quality:
    """How a cascade measures a task: per-example scores, and a corpus metric where the task has one.

    `score` is the task's headline quality: the corpus metric when set (e.g. BLEU on the mixed list
    of hypotheses), else 100 x the mean per-example score.
    """

    per_example: PerExampleFn
    corpus: CorpusFn | None = None

    def score(self, targets: Sequence[Target], predictions: Sequence[str]) -> float:
        if self.corpus is not None:
            return self.corpus(targets, predictions)
        scores = self.per_example(targets, predictions)
        return 100.0 * sum(scores) / len(scores)


_QUALITY: dict[str, Quality] = {}


def register_quality(task_name: str, per_example: PerExampleFn, corpus: CorpusFn | None = None) -> None:
    """Declares how cascades score `task_name` (call it next to the seqio registration)."""
    _QUALITY[task_name] = Quality(per_example=per_example, corpus=corpus)


def get_quality(task_name: str) -> Quality:
    """The registered Quality of a task; a clear error names the registered tasks."""
    if task_name not in _QUALITY:
        known = ", ".join(sorted(_QUALITY)) or "none (import tasks first)"
        raise ValueError(
            f"No cascade quality registered for task {task_name!r}; registered: {known}. "
            "Call cat_jax.metrics.register_quality() where the task is registered."
        )
    return _QUALITY[task_name]


# --- SuperGLUE metrics (classification F1, MultiRC, ReCoRD) ---------------------------------------
#
# Simplifications against the official SuperGLUE scorer, documented here once:
# - Labels are compared as strings (whitespace-collapsed); a prediction outside the label set is
#   simply wrong (T5 maps it to class -1, which has the same effect on accuracy and F1).
# - `macro_f1` averages over the labels seen in the targets or the predictions (sklearn's default
#   for average="macro"); CB's official scorer averages over its three classes, which differs only
#   when a class is absent from both.
# - ReCoRD is scored as SQuAD is (lowercase, punctuation and articles removed; max over the gold
#   answers), with one example per query rather than T5's one example per gold answer.

_ARTICLES = frozenset(("a", "an", "the"))
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # string.punctuation


def squad_normalize(text: str | bytes) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in normalize(text).lower() if ch not in _PUNCTUATION)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def token_f1(reference: str, prediction: str) -> float:
    """SQuAD token-overlap F1 (0-1) between two answers after `squad_normalize`."""
    import collections  # pylint: disable=import-outside-toplevel

    ref, hyp = squad_normalize(reference).split(), squad_normalize(prediction).split()
    if not ref or not hyp:
        return float(ref == hyp)
    common = sum((collections.Counter(ref) & collections.Counter(hyp)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _label(target: object) -> str:
    """The label of a target that is a string or a {"value": label, ...} mapping (MultiRC)."""
    if isinstance(target, dict):
        return normalize(target["value"])
    return normalize(target)  # type: ignore[arg-type]


def label_match_scores(targets: Sequence[object], predictions: Sequence[str]) -> list[float]:
    """Per example: 1.0 where the predicted label equals the target's (str or {"value": ...})."""
    _check(targets, predictions)  # type: ignore[arg-type]
    return [float(_label(t) == normalize(p)) for t, p in zip(targets, predictions)]


def macro_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Unweighted mean over labels of the per-label F1, in percent (CB's second metric)."""
    _check(targets, predictions)
    gold = [_label(t) for t in targets]
    pred = [normalize(p) for p in predictions]
    f1s = []
    for label in sorted(set(gold) | set(pred)):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"macro_f1": 100.0 * sum(f1s) / len(f1s)}


def multirc(targets: Sequence[object], predictions: Sequence[str], positive: str = "True") -> dict[str, float]:
    """MultiRC's metrics in percent.

    Targets are {"group": question key, "value": "True"/"False"} (a plain label string is its own
    group). `exact_match`: share of questions whose every answer option is labelled right; `f1a`:
    binary F1 of the `positive` label over all answer options.
    """
    _check(targets, predictions)  # type: ignore[arg-type]
    groups: dict[str, list[bool]] = {}
    tp = fp = fn = 0
    for i, (target, prediction) in enumerate(zip(targets, predictions)):
        gold, pred = _label(target), normalize(prediction)
        key = str(target["group"]) if isinstance(target, dict) else f"#{i}"
        groups.setdefault(key, []).append(gold == pred)
        tp += gold == positive and pred == positive
        fp += gold != positive and pred == positive
        fn += gold == positive and pred != positive
    f1a = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    exact = sum(all(v) for v in groups.values()) / len(groups)
    return {"exact_match": 100.0 * exact, "f1a": 100.0 * f1a}


def _answer_list(target: Target | bytes) -> list[str]:
    answers = _alternatives(target)
    return answers or [""]


def squad_exact_match_scores(targets: Sequence[Target], predictions: Sequence[str]) -> list[float]:
    """Per example: 1.0 where the prediction equals one of the gold answers after `squad_normalize`."""
    _check(targets, predictions)
    return [
        float(max(squad_normalize(a) == squad_normalize(p) for a in _answer_list(t)))
        for t, p in zip(targets, predictions)
    ]


def squad(targets: Sequence[Target], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD-style exact match and token F1 (max over gold answers), in percent (ReCoRD's metrics)."""
    em = squad_exact_match_scores(targets, predictions)
    f1 = [max(token_f1(a, p) for a in _answer_list(t)) for t, p in zip(targets, predictions)]
    return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1)}
