"""Metric functions against hand-computed values."""

import numpy as np
import pytest
import sacrebleu

from cat_jax import metrics


def test_edit_distance():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance(["a", "b"], []) == 2
    assert metrics.edit_distance([], ["x"]) == 1
    assert metrics.edit_distance(["HH", "AH0"], ["HH", "AH0"]) == 0


def test_exact_match_normalises_whitespace():
    assert metrics.exact_match(["a b", "c", "d"], [" a  b ", "c", "e"]) == {"exact_match": pytest.approx(200 / 3)}
    assert metrics.exact_match_scores(["x", "y"], ["x", "z"]) == [1.0, 0.0]


def test_exact_match_any_accepts_every_alternative():
    targets = [["HH AH0 L OW1", "HH EH0 L OW1"], ["K AE1 T"], "D AO1 G"]
    predictions = ["HH EH0 L OW1", "K AE1 D", "D AO1 G"]
    assert metrics.exact_match_any_scores(targets, predictions) == [1.0, 0.0, 1.0]
    assert metrics.exact_match_any(targets, predictions)["exact_match"] == pytest.approx(200 / 3)


def test_accuracy():
    assert metrics.accuracy(["2", "3", "1", "1"], ["2", "2", "1", "1"]) == {"accuracy": 75.0}


def test_phoneme_error_rate_uses_closest_alternative_and_corpus_sums():
    # Example 1: closest alternative is the second (0 edits, length 4) rather than the first (1 edit).
    # Example 2: "K AE1 T" vs "K AE1" -> 1 deletion over 3 phonemes.
    targets = [["HH AH0 L OW1", "HH EH0 L OW1"], ["K AE1 T"]]
    predictions = ["HH EH0 L OW1", "K AE1"]
    assert metrics.phoneme_errors(targets[0], predictions[0]) == (0, 4)
    assert metrics.phoneme_errors(targets[1], predictions[1]) == (1, 3)
    assert metrics.phoneme_error_rate(targets, predictions) == {"phoneme_error_rate": pytest.approx(100 / 7)}
    # Corpus-level: (2 + 0) / (2 + 4), not the mean of per-example rates (0.5 + 0) / 2.
    per = metrics.phoneme_error_rate([["A B"], ["C D E F"]], ["X Y", "C D E F"])
    assert per["phoneme_error_rate"] == pytest.approx(100 * 2 / 6)


def test_bleu_equals_sacrebleu():
    targets = ["vingt et un", "cent deux", "mille trois cent quatre"]
    predictions = ["vingt et un", "cent trois", "mille trois cents quatre"]
    expected = sacrebleu.corpus_bleu(predictions, [targets]).score
    assert metrics.bleu(targets, predictions) == {"bleu": pytest.approx(expected)}
    assert 0.0 < expected < 100.0
    assert metrics.corpus_bleu(targets, targets) == pytest.approx(100.0)


def test_bleu_from_summed_statistics_equals_sacrebleu_on_any_mix():
    rng = np.random.default_rng(0)
    words = "un deux trois quatre cinq six sept huit neuf dix cent mille et".split()
    targets = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(40)]
    noisy = [" ".join(w for w in t.split() if rng.random() > 0.3) + " un" for t in targets]
    other = [t if rng.random() > 0.5 else "  cent   deux " for t in targets]
    noisy_stats, other_stats = (metrics.bleu_statistics(targets, p) for p in (noisy, other))
    assert noisy_stats.shape == (40, 10)
    for _ in range(5):
        pick = rng.random(40) < 0.5
        mixed = [o if k else n for k, n, o in zip(pick, noisy, other)]
        expected = sacrebleu.corpus_bleu([" ".join(m.split()) for m in mixed], [targets]).score
        summed = np.where(pick[:, None], other_stats, noisy_stats).sum(axis=0)
        assert metrics.bleu_from_statistics(summed) == pytest.approx(expected, abs=1e-9)
        assert metrics.corpus_bleu(targets, mixed) == pytest.approx(expected, abs=1e-9)


def test_length_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        metrics.accuracy([], [])


def test_quality_registry():
    metrics.register_quality("test_bleu_task", metrics.exact_match_scores, metrics.corpus_bleu)
    metrics.register_quality("test_em_task", metrics.exact_match_scores)
    targets, predictions = ["a b c d", "e f g h"], ["a b c d", "e f g x"]
    bleu_quality = metrics.get_quality("test_bleu_task")
    assert bleu_quality.score(targets, predictions) == pytest.approx(metrics.corpus_bleu(targets, predictions))
    assert metrics.get_quality("test_em_task").score(targets, predictions) == 50.0
    assert metrics.get_quality("test_em_task").per_example(targets, predictions) == [1.0, 0.0]
    with pytest.raises(ValueError, match="test_em_task"):
        metrics.get_quality("no_such_task")
