"""Deferral rules, threshold sweeps, summaries and plots on hand-written records (no model)."""

import csv
import json

import numpy as np
import pytest
import sacrebleu

from cat_jax import metrics
from cat_jax.cascade import calibration, curves, posthoc, records, rules, summary
from cat_jax.cascade.curves import CurveKey, CurvePoint

# Four examples. Small quality [1, 0, 0.5, 1] (mean 0.625), large quality [1, 1, 1, 0] (mean 0.75).
# Small FLOPs sum to 10, large FLOPs [10, 20, 50, 20] sum to 100, so F_S / F_L = 0.1.
SMALL_LOGPROBS = [[-0.1, -0.2], [-1.0], [-0.05, -0.05, -0.05, -0.05, -2.0], [-0.3, -0.5, -0.4]]


def make(name, quality, flops, logprobs=SMALL_LOGPROBS, predictions=None, **kw):
    return records.ModelOutputs(
        ids=["e0", "e1", "e2", "e3"],
        predictions=predictions or [f"{name}{i}" for i in range(4)],
        targets=[f"t{i}" for i in range(4)],
        logprobs=logprobs,
        entropies=[np.abs(lp) for lp in logprobs],
        quality=quality,
        flops=flops,
        **kw,
    )


@pytest.fixture
def small():
    return make("s", [1.0, 0.0, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0])


@pytest.fixture
def large():
    return make("l", [1.0, 1.0, 1.0, 0.0], [10.0, 20.0, 50.0, 20.0], logprobs=[[0.0]] * 4)


def as_tuples(points):
    return [(p.deferral_rate, p.relative_flops, p.quality) for p in points]


def assert_curve(points, expected):
    assert len(points) == len(expected)
    for got, want in zip(as_tuples(points), expected):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


# (deferral_rate, relative_flops, quality) after deferring the k lowest-score examples, k = 0..4.
# chow_sum scores [-0.3, -1.0, -2.2, -1.2]: defer e2 (+50), e3 (+20), e1 (+20), e0 (+10).
CHOW_SUM = [(0, 0.1, 0.625), (0.25, 0.6, 0.75), (0.5, 0.8, 0.5), (0.75, 1.0, 0.75), (1, 1.1, 0.75)]
# chow_average scores [-0.15, -1.0, -0.44, -0.4]: defer e1, e2, e3, e0.
CHOW_AVERAGE = [(0, 0.1, 0.625), (0.25, 0.3, 0.875), (0.5, 0.8, 1.0), (0.75, 1.0, 0.75), (1, 1.1, 0.75)]
# chow_quantile q=0 scores (least confident token) [-0.2, -1.0, -2.0, -0.5]: defer e2, e1, e3, e0.
CHOW_QUANTILE_0 = [(0, 0.1, 0.625), (0.25, 0.6, 0.75), (0.5, 0.8, 1.0), (0.75, 1.0, 0.75), (1, 1.1, 0.75)]
# oracle scores q_S - q_L = [0, -1, -0.5, 1]: defer e1, e2, e0, e3.
ORACLE = [(0, 0.1, 0.625), (0.25, 0.3, 0.875), (0.5, 0.8, 1.0), (0.75, 0.9, 1.0), (1, 1.1, 0.75)]


@pytest.mark.parametrize(
    "rule, options, expected",
    [
        ("chow_sum", {}, CHOW_SUM),
        ("chow_average", {}, CHOW_AVERAGE),
        ("chow_quantile", {"quantile": 0.0}, CHOW_QUANTILE_0),
        ("oracle", {}, ORACLE),
    ],
)
def test_curve_points_equal_hand_values(small, large, rule, options, expected):
    scores = rules.compute_scores(rule, small, large, **options)
    points = curves.sweep(scores, small, large)
    assert_curve(points, expected)
    # Rate 0: the small model alone, at F_S / F_L; rate 1: the large model, at 1 + F_S / F_L.
    assert points[0].quality == small.quality.mean()
    assert points[0].relative_flops == pytest.approx(10 / 100)
    assert points[-1].quality == large.quality.mean()
    assert points[-1].relative_flops == pytest.approx(1 + 10 / 100)
    assert points[-1].threshold == np.inf


def test_rule_scores_by_hand(small, large):
    np.testing.assert_allclose(rules.chow_sum(small.logprobs), [-0.3, -1.0, -2.2, -1.2])
    np.testing.assert_allclose(rules.chow_average(small.logprobs), [-0.15, -1.0, -0.44, -0.4])
    np.testing.assert_allclose(rules.chow_quantile(small.logprobs, 0.5), [-0.15, -1.0, -0.05, -0.4])
    np.testing.assert_allclose(rules.chow_quantile(small.logprobs, 1.0), [-0.1, -1.0, -0.05, -0.3])
    # entropies are |logprobs| here: mean [0.15, 1, 0.44, 0.4], max [0.2, 1, 2, 0.5], negated.
    entropy_mean = rules.compute_scores("entropy_mean", small, large)
    np.testing.assert_allclose(entropy_mean, [-0.15, -1.0, -0.44, -0.4])
    entropy_max = rules.compute_scores("entropy_max", small, large)
    np.testing.assert_allclose(entropy_max, [-0.2, -1.0, -2.0, -0.5])
    np.testing.assert_allclose(rules.compute_scores("oracle", small, large), [0.0, -1.0, -0.5, 1.0])
    r1 = rules.compute_scores("random", small, large, seed=3)
    assert np.array_equal(r1, rules.compute_scores("random", small, large, seed=3))
    assert not np.array_equal(r1, rules.compute_scores("random", small, large, seed=4))


def test_margin_min_uses_margins_and_requires_them(small, large):
    margins = [[0.9, 0.2], [0.5], [0.3] * 4 + [0.7], [0.6, 0.1, 0.8]]
    with_margins = make("s", small.quality, small.flops, margins=margins)
    scores = rules.compute_scores("margin_min", with_margins, large)
    np.testing.assert_allclose(scores, [0.2, 0.5, 0.3, 0.1])
    with pytest.raises(ValueError, match="margins"):
        rules.compute_scores("margin_min", small, large)


def test_ties_are_deferred_together_and_num_thresholds(small, large):
    points = curves.sweep(np.array([0.0, 0.0, 1.0, 2.0]), small, large)
    assert [p.deferral_rate for p in points] == [0.0, 0.5, 0.75, 1.0]
    assert [p.threshold for p in points] == [0.0, 1.0, 2.0, np.inf]
    # Deferring e0 and e1 together: (10 + 10 + 20) / 100 and (1 + 1 + 0.5 + 1) / 4.
    assert points[1].relative_flops == pytest.approx(0.4) and points[1].quality == pytest.approx(0.875)
    coarse = curves.sweep(np.array([3.0, 1.0, 2.0, 0.0]), small, large, num_thresholds=3)
    assert [p.deferral_rate for p in coarse] == [0.0, 0.5, 1.0]
    assert coarse[1].relative_flops == pytest.approx(0.1 + 0.4)  # e3 and e1 deferred: 20 + 20
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        curves.sweep(np.array([0.0, np.inf, 1.0, 2.0]), small, large)
    with pytest.raises(ValueError, match="num_thresholds"):
        curves.sweep(np.zeros(4), small, large, num_thresholds=1)


def test_peer_agreement_orders_by_disagreement_and_pays_for_every_small_model(small, large):
    primary = make("s", small.quality, small.flops, predictions=["a", "b", "c", "d"])
    other1 = make("o", small.quality, [1.0] * 4, predictions=["a", "x", "c", "y"])
    other2 = make("o", small.quality, [2.0] * 4, predictions=["a", "b", "z", "w"])
    scores = rules.compute_scores("peer_agreement", primary, large, others=[other1, other2])
    # Agreement fractions [1, 0.5, 0.5, 0]; the e1/e2 tie goes to the lower chow_average (e1: -1.0 < -0.44).
    assert list(np.argsort(scores)) == [3, 1, 2, 0]
    assert np.floor(scores * 2).tolist() == [2.0, 1.0, 1.0, 0.0]
    extra = rules.extra_small_flops("peer_agreement", [other1, other2])
    np.testing.assert_array_equal(extra, [3.0, 3.0, 3.0, 3.0])
    assert rules.extra_small_flops("chow_sum", [other1, other2]) is None
    points = curves.sweep(scores, primary, large, extra_small_flops=extra)
    # Small cost is 10 + 12 for the two other small models, at every threshold.
    expected = [(0, 0.22, 0.625), (0.25, 0.42, 0.375), (0.5, 0.62, 0.625), (0.75, 1.12, 0.75), (1, 1.22, 0.75)]
    assert_curve(points, expected)
    with pytest.raises(ValueError, match="at least one other small model"):
        rules.compute_scores("peer_agreement", primary, large)
    with pytest.raises(ValueError, match="'agreement' is now called 'peer_agreement'"):
        rules.compute_scores("agreement", primary, large, others=[other1])


def bleu(hypotheses, references):
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


@pytest.mark.parametrize("additive", [False, True], ids=["any_corpus_metric", "from_summed_statistics"])
def test_corpus_bleu_recomputed_on_mixed_hypotheses(additive):
    refs = [
        "the cat sat on the mat near the door",
        "a quick brown fox jumps over the lazy dog",
        "we walked to the old market in the rain",
        "she reads a long book every single night",
    ]
    small_h = [
        "the cat sat on a mat near the door",
        "a fast brown fox jumped over the dog",
        "we walked to the market in rain",
        "she reads a book every night",
    ]
    large_h = [
        "the cat sat on the mat near the door",
        "a quick brown fox jumps over a lazy dog",
        "we walked to the old market in the rain",
        "she reads a long book each single night",
    ]
    ids = ["a", "b", "c", "d"]

    def outputs(hyps):
        return records.ModelOutputs(ids, hyps, refs, [[-0.5]] * 4, [[0.1]] * 4, np.zeros(4), np.ones(4))

    small, large = outputs(small_h), outputs(large_h)
    metric = metrics.corpus_bleu if additive else (lambda targets, hypotheses: bleu(hypotheses, targets))
    points = curves.sweep(np.array([0.3, 0.1, 0.4, 0.2]), small, large, corpus_metric=metric)
    assert points[0].quality == pytest.approx(bleu(small_h, refs), abs=1e-9)
    assert points[-1].quality == pytest.approx(bleu(large_h, refs), abs=1e-9)
    mixed = [small_h[0], large_h[1], small_h[2], large_h[3]]  # scores 0.1 and 0.2 deferred
    assert points[2].deferral_rate == 0.5 and points[2].quality == pytest.approx(bleu(mixed, refs), abs=1e-9)
    assert 0 < bleu(small_h, refs) < bleu(mixed, refs) < bleu(large_h, refs)
    small_pt, large_pt = curves.standalone_points(small, large, corpus_metric=metric)
    assert small_pt == pytest.approx((1.0, bleu(small_h, refs))) and large_pt == pytest.approx(
        (1.0, bleu(large_h, refs))
    )


def synthetic(rng, n):
    """Large model better exactly when the small output is short (<= 3 tokens): the opposite of Chow-Sum."""
    lengths = rng.integers(1, 9, size=n)
    logprobs = [rng.uniform(-2.0, 0.0, size=t) for t in lengths]
    short = (lengths <= 3).astype(float)
    ids = [str(i) for i in range(n)]
    common = dict(ids=ids, predictions=ids, targets=ids, flops=np.ones(n))
    small = records.ModelOutputs(
        **common, logprobs=logprobs, entropies=logprobs, quality=1 - short, hidden=rng.normal(size=(n, 4))
    )
    large = records.ModelOutputs(**common, logprobs=[[0.0]] * n, entropies=[[0.0]] * n, quality=short)
    return small, large


def precision_at_positives(scores, small, large):
    """Fraction of large-better examples among the k lowest scores, k = number of large-better examples."""
    better = posthoc.targets(small, large)
    k = int(better.sum())
    return better[np.argsort(scores, kind="stable")[:k]].mean()


def test_post_hoc_learns_separable_problem_better_than_random():
    rng = np.random.default_rng(0)
    small_val, large_val = synthetic(rng, 300)
    small_test, large_test = synthetic(rng, 300)
    assert posthoc.features(small_test).shape == (300, len(posthoc.QUANTILES) + 1 + 4)
    learned = rules.compute_scores("post_hoc", small_test, large_test, validation=(small_val, large_val))
    assert np.all((learned >= -1) & (learned <= 0))
    baseline = rules.compute_scores("random", small_test, large_test, seed=0)
    assert precision_at_positives(learned, small_test, large_test) >= 0.95
    assert precision_at_positives(baseline, small_test, large_test) < 0.6
    auc = lambda s: summary.area_under_curve(curves.sweep(s, small_test, large_test))  # noqa: E731
    assert auc(learned) > auc(baseline) + 0.1
    with pytest.raises(ValueError, match="validation"):
        rules.compute_scores("post_hoc", small_test, large_test)


HAND_CURVE = [
    CurvePoint(threshold=-1.0, deferral_rate=0.0, relative_flops=0.1, quality=0.6),
    CurvePoint(threshold=0.0, deferral_rate=0.5, relative_flops=0.6, quality=0.9),
    CurvePoint(threshold=np.inf, deferral_rate=1.0, relative_flops=1.1, quality=0.8),
]


def test_summary_on_hand_curve():
    s = summary.summarize(HAND_CURVE, small_only=0.6, large_only=0.8)
    # AUC-DF = 0.5 * (0.6 + 0.9) / 2 + 0.5 * (0.9 + 0.8) / 2 = 0.375 + 0.425.
    assert s.auc == pytest.approx(0.8)
    # Random deferral's expected curve joins (0, 0.6) and (1, 0.8): area 0.7; gain 0.1 = 14.29 %.
    assert s.auc_df_random == pytest.approx(0.7)
    assert s.auc_df_gain == pytest.approx(0.1) and s.auc_df_gain_pct == pytest.approx(100 / 7)
    # A curve that is the random line itself gains nothing.
    line = [CurvePoint(0.0, r, 0.1 + r, 0.6 + 0.2 * r) for r in (0.0, 0.25, 0.5, 1.0)]
    flat = summary.summarize(line, small_only=0.6, large_only=0.8)
    assert flat.auc == pytest.approx(0.7) and flat.auc_df_gain == pytest.approx(0.0, abs=1e-12)
    assert s.relative_flops_to_match_large == 0.6
    assert (s.best_quality, s.best_relative_flops) == (0.9, 0.6)
    never = summary.summarize(HAND_CURVE, small_only=0.6, large_only=0.95)
    assert never.relative_flops_to_match_large is None
    # Ties in best quality go to the cheaper point.
    tied = [*HAND_CURVE, CurvePoint(1.0, 0.75, 0.4, 0.9)]
    assert summary.summarize(tied, small_only=0.6, large_only=0.8).best_relative_flops == 0.4


def test_writers_round_trip(tmp_path):
    key = CurveKey("boolq", "cat", "chow_sum")
    curves_map = {key: HAND_CURVE, CurveKey("wmt", "ce", "oracle"): HAND_CURVE[:2]}
    summaries = {key: summary.summarize(HAND_CURVE, small_only=0.6, large_only=0.95)}
    budget = calibration.Budget("deferral_rate", 0.3)
    calibrated = {
        key: [
            calibration.Calibration(
                budget, (0.0,), calibration.Outcome(0.25, 0.6, 0.9), calibration.Outcome(0.5, 0.6, 0.9), True
            )
        ]
    }
    summary.write_curves_csv(tmp_path / "curves.csv", curves_map)
    summary.write_curves_json(tmp_path / "curves.json", curves_map)
    summary.write_summary_json(tmp_path / "summary.json", summaries, calibrated)
    summary.write_summary_md(tmp_path / "summary.md", summaries, calibrated, {}, {})

    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert len(rows) == 5
    assert rows[1] == {
        "task": "boolq", "small_model": "cat", "rule": "chow_sum",
        "threshold": "0.0", "deferral_rate": "0.5", "relative_flops": "0.6", "quality": "0.9",
    }  # fmt: skip
    assert float(rows[2]["threshold"]) == np.inf
    loaded = json.loads((tmp_path / "curves.json").read_text())
    assert [c["task"] for c in loaded] == ["boolq", "wmt"]
    last = {"threshold": None, "deferral_rate": 1.0, "relative_flops": 1.1, "quality": 0.8}
    assert loaded[0]["points"][2] == last
    s = json.loads((tmp_path / "summary.json").read_text())[0]
    assert s["auc"] == pytest.approx(0.8) and s["rule"] == "chow_sum"
    assert s["relative_flops_to_match_large"] is None
    assert s["auc_df_random"] == pytest.approx(0.775) and s["auc_df_gain"] == pytest.approx(0.025)
    assert s["calibration"] == [
        {
            "budget": "deferral_rate",
            "target": 0.3,
            "thresholds": [0.0],
            "met_on_validation": True,
            "validation": {"deferral_rate": 0.25, "relative_flops": 0.6, "quality": 0.9},
            "test": {"deferral_rate": 0.5, "relative_flops": 0.6, "quality": 0.9},
        }
    ]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("## boolq\n")
    assert "| cat | chow_sum | 0.6 | 0.95 | 0.8 | 0.775 | +0.025 (+3.23%) | never | 0.9 @ 0.6 |" in md
    assert "| cat | chow_sum | deferral_rate <= 0.3 | 0 | 0.25 / 0.6 / 0.9 | 0.5 / 0.6 / 0.9 |" in md


def test_unknown_rule_lists_known_rules(small, large):
    known = "chow_average, chow_quantile, chow_sum"
    with pytest.raises(ValueError, match=f"unknown deferral rule 'chow_median'.*{known}"):
        rules.compute_scores("chow_median", small, large)


def test_align_reorders_by_id_and_names_missing_ids(small, large):
    shuffled = large.take([2, 0, 3, 1])
    assert shuffled.ids == ("e2", "e0", "e3", "e1")
    aligned = records.align({"small": small, "large": shuffled})
    assert aligned["large"].ids == small.ids
    np.testing.assert_array_equal(aligned["large"].flops, large.flops)
    with pytest.raises(ValueError, match=r"model 'large'.*missing ids \['e1'\]"):
        records.align({"small": small, "large": large.take([0, 2, 3])})
    with pytest.raises(ValueError, match="align"):
        curves.sweep(np.zeros(4), small, shuffled)
