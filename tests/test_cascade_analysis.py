"""The analysis of records without models: budget calibration on synthetic records with known score
distributions, the records' exact round trip through files, and the plan's checks."""

import dataclasses

import numpy as np
import pytest

from cat_jax.cascade import analysis, plan, posthoc, rules, store
from cat_jax.cascade.curves import CurveKey
from cat_jax.cascade.plan import LARGE, AnalysisConfig, Options
from cat_jax.cascade.records import ModelOutputs, SplitRecords
from cat_jax.cascade.tiers import TierKey
from cat_jax.errors import ConfigError

TASK = "t"
N = 2000
# Sampling error of a deferral rate realised on N test examples: 3 standard deviations of a
# binomial share near 0.3 (the quantile threshold's own validation error is of the same size).
RATE_TOLERANCE = 3 * np.sqrt(0.3 * 0.7 / N) * np.sqrt(2)


def synthetic_split(name, rng, n=N):
    """One-token outputs whose log-prob (the chow scores) is uniform on (-3, 0); the small model is
    right where its score is above -1.5, the large one always; FLOPs: small 1, large uniform on [5, 15]."""
    logprob = rng.uniform(-3.0, 0.0, size=n)
    ids = [f"{TASK}/{name}{i}" for i in range(n)]

    def outputs(quality, flops, lp):
        return ModelOutputs(
            ids=ids,
            predictions=[str(q) for q in quality],
            targets=["1.0"] * n,
            logprobs=[[x] for x in lp],
            entropies=[[-x] for x in lp],
            quality=quality,
            flops=flops,
        )

    small = outputs((logprob > -1.5).astype(float), np.ones(n), logprob)
    large = outputs(np.ones(n), rng.uniform(5.0, 15.0, size=n), np.zeros(n))
    return SplitRecords(name, [TASK] * n, {LARGE: large, "ce": small})


def config(**options):
    options = {"rules": ("chow_average", "random"), **options}
    return AnalysisConfig(TASK, "test", "validation", {LARGE: "/l", "ce": "/s"}, Options(**options), {TASK: None})


def test_calibration_meets_the_budget_on_validation_and_nearly_on_test():
    rng = np.random.default_rng(0)
    validation, test = synthetic_split("validation", rng), synthetic_split("test", rng)
    result = analysis.analyse(
        config(target_deferral_rate=0.3, target_relative_flops=0.5), test, validation, {TASK: None}
    )
    by_rate, by_flops = result.calibrations[CurveKey(TASK, "ce", "chow_average")]
    # Deferral rate 0.3 of 2000 distinct scores: exactly the 600 lowest on validation; the threshold
    # is the 601st lowest validation score, that is the 0.3-quantile of its distribution (-2.1).
    val_scores = np.sort([lp[0] for lp in validation.models["ce"].logprobs])
    assert by_rate.met_on_validation and by_rate.validation.deferral_rate == 0.3
    assert by_rate.thresholds == (val_scores[600],)
    assert abs(by_rate.test.deferral_rate - 0.3) < RATE_TOLERANCE
    test_scores = np.array([lp[0] for lp in test.models["ce"].logprobs])
    assert by_rate.test.deferral_rate == np.mean(test_scores < val_scores[600])
    # Quality by hand: the small model is right above -1.5, so deferring below -2.1 leaves the
    # kept examples in (-2.1, -1.5) wrong: quality = 1 - P(-2.1 < s < -1.5) = 0.8 on average.
    assert by_rate.test.quality == pytest.approx(1 - np.mean((test_scores >= val_scores[600]) & (test_scores <= -1.5)))
    assert abs(by_rate.test.quality - 0.8) < 0.05
    # FLOPs 0.5: the largest validation point not above it, one large example short at most.
    large_val = validation.models[LARGE].flops
    assert by_flops.met_on_validation
    assert 0.5 - large_val.max() / large_val.sum() < by_flops.validation.relative_flops <= 0.5
    assert abs(by_flops.test.relative_flops - 0.5) < 0.05
    # Random deferral is calibrated too, with its own (seeded) scores.
    random_rate = result.calibrations[CurveKey(TASK, "ce", "random")][0]
    assert random_rate.validation.deferral_rate == 0.3 and abs(random_rate.test.deferral_rate - 0.3) < RATE_TOLERANCE


def test_two_tier_cascade_through_the_analysis():
    rng = np.random.default_rng(1)
    validation, test = synthetic_split("validation", rng, 400), synthetic_split("test", rng, 400)
    result = analysis.analyse(
        config(tiers=(("ce",), (LARGE,)), target_relative_flops=0.5), test, validation, {TASK: None}
    )
    key = TierKey(TASK, "ce > large", "chow_average")
    frontier = result.tier_curves[key]
    flops = [p.relative_flops for p in frontier]
    assert flops == sorted(flops) and [p.quality for p in frontier] == sorted({p.quality for p in frontier})
    assert frontier[-1].quality == 1.0 and frontier[0].deferral_rate == 0.0
    (calibrated,) = result.tier_calibrations[key]
    assert calibrated.met_on_validation and calibrated.validation.relative_flops <= 0.5


def test_records_round_trip_exactly_through_files(tmp_path):
    rng = np.random.default_rng(2)
    lp = [rng.normal(size=k).astype(np.float32).astype(np.float64) for k in (3, 1, 5)]
    out = ModelOutputs(
        ids=["g2p/0", "g2p/1", "sums/0"],
        predictions=["HH AH0", "", "3"],
        targets=[["HH AH0", "HH AA0"], ["X"], "3"],
        logprobs=lp,
        entropies=[-x for x in lp],
        margins=[np.abs(x) for x in lp],
        quality=[1.0, 0.0, 1.0],
        flops=[1e9 / 3, 2.5e8, 7.0],
        hidden=rng.normal(size=(3, 4)).astype(np.float32),
    )
    large = dataclasses.replace(
        out, embedding=rng.normal(size=(3, 2)).astype(np.float32), embedding_flops=[1e9 / 7, 3.0, 5.5]
    )
    records = SplitRecords("test", ["g2p", "g2p", "sums"], {LARGE: large, "ce": out.take([0, 1, 2])})
    texts = store.SplitTexts(
        ["0", "1", "0"],
        ["in0", "in1", "in2"],
        ["HH AH0", "X", "3"],
        {LARGE: ["HH AH0", "", "3"], "ce": ["HH AH0", "", "3"]},
    )
    path = str(tmp_path / store.EXAMPLES)
    assert store.write_split(path, records, texts) == [path, str(tmp_path / "examples_hidden.npz")]
    back = store.read_split(path, "test")
    assert back.tasks == records.tasks and list(back.models) == [LARGE, "ce"]
    for name in (LARGE, "ce"):
        a, b = records.models[name], back.models[name]
        assert a.ids == b.ids and a.predictions == b.predictions
        assert [list(t) if isinstance(t, list) else t for t in a.targets] == list(b.targets)
        for field in ("logprobs", "entropies", "margins"):
            for x, y in zip(getattr(a, field), getattr(b, field)):
                assert x.tobytes() == y.tobytes()  # bit for bit, not approximately
        assert a.quality.tobytes() == b.quality.tobytes() and a.flops.tobytes() == b.flops.tobytes()
        assert a.hidden.tobytes() == b.hidden.tobytes()
        for field in ("embedding", "embedding_flops"):
            assert (getattr(a, field) is None) == (getattr(b, field) is None) == (name != LARGE)
            assert name != LARGE or getattr(a, field).tobytes() == getattr(b, field).tobytes()


def test_config_round_trips_and_plan_errors_name_the_fix():
    c = config(tiers=[["ce"], [LARGE]], tier_rules=["chow_quantile_0.1"], target_deferral_rate=0.3)
    assert AnalysisConfig.from_json(c.to_json()) == c
    assert c.tier_plan().rules[0] == plan.RuleSpec("chow_quantile_0.1", "chow_quantile", 0.1)
    assert not config().needs_validation() and config(target_relative_flops=0.5).needs_validation()
    models = [LARGE, "ce", "cat"]
    with pytest.raises(ConfigError, match=r"unknown: \['distill'\]"):
        plan.plan_tiers([["ce"], ["distill"], [LARGE]], None, models)
    with pytest.raises(ConfigError, match=r"repeated: \['ce'\]"):
        plan.plan_tiers([["ce"], ["ce", "cat"], [LARGE]], None, models)
    with pytest.raises(ConfigError, match="one rule per tier boundary: 2 for 3 tiers"):
        plan.plan_tiers([["ce"], ["cat"], [LARGE]], ["chow_sum"], models)
    with pytest.raises(ConfigError, match="'abc' after tier \\['ce'\\] needs an ensemble"):
        plan.plan_tiers([["ce"], [LARGE]], ["abc"], models)
    with pytest.raises(ConfigError, match="unknown tier rule 'post_hoc'"):
        plan.plan_tiers([["ce"], [LARGE]], ["post_hoc"], models)
    assert plan.plan_tiers([["ce", "cat"], [LARGE]], None, models).rules_label == "abc"
    with pytest.raises(ConfigError, match="tier_rules=\\['abc'\\] is set but run_cascade_eval.tiers is not"):
        plan.plan_tiers([], ["abc"], models)
    with pytest.raises(ConfigError, match="TARGET_DEFERRAL_RATE"):
        config(target_deferral_rate=1.5).check()


def test_renamed_rule_abc_statistics_and_free_text_in_the_plan(caplog):
    specs = plan.plan_rules(["agreement", "chow_sum"], [0.0], 2)
    assert [s.label for s in specs] == ["peer_agreement", "chow_sum"]
    assert "'agreement' is now called 'peer_agreement'" in caplog.text
    models = [LARGE, "a", "b", "c", "d"]
    tiers = plan.plan_tiers([["a", "b"], ["c", "d"], [LARGE]], ["abc_central", "chow_sum"], models)
    assert [tiers.statistic(k) for k in range(3)] == ["abc_central", "abc", "abc"]
    assert plan.plan_tiers([["a", "b"], [LARGE]], None, models).rules[0] == plan.RuleSpec("abc", "abc")
    with pytest.raises(ConfigError, match="'abc_central' after tier \\['a'\\] needs an ensemble"):
        plan.plan_tiers([["a"], [LARGE]], ["abc_central"], models)
    # Free text as recorded; records of an older run: the tasks with a corpus metric.
    assert config().free_text_tasks() == {TASK: False}
    recorded = AnalysisConfig(TASK, "test", None, {LARGE: "/l", "ce": "/s"}, Options(), {TASK: "m:bleu"})
    assert recorded.free_text_tasks() == {TASK: True}
    qa = AnalysisConfig(TASK, "test", None, {LARGE: "/l"}, Options(), {TASK: None}, {TASK: True})
    assert qa.free_text_tasks() == {TASK: True} and AnalysisConfig.from_json(qa.to_json()) == qa


def noise_split(name, rng, n, embedding_signal=False):
    """The small model right on a random half, the large always; the small model's features are
    noise (64 hidden dimensions: enough for the MLP to memorise its training set). The large
    model's input embedding [n, 3] carries the answer in its first coordinate when
    embedding_signal, else noise; it costs 2 FLOPs an example (small 1, large 10)."""
    small_right = rng.random(n) < 0.5
    ids = [f"{TASK}/{name}{i}" for i in range(n)]
    embedding = rng.normal(size=(n, 3))
    if embedding_signal:
        embedding[:, 0] = np.where(small_right, 1.0, -1.0) + 0.3 * rng.normal(size=n)
    common = dict(ids=ids, predictions=ids, targets=ids, entropies=[[0.1]] * n)
    small = ModelOutputs(
        **common,
        logprobs=[[-0.5]] * n,
        quality=small_right.astype(float),
        flops=np.ones(n),
        hidden=rng.normal(size=(n, 64)),
    )
    large = ModelOutputs(
        **common,
        logprobs=[[0.0]] * n,
        quality=np.ones(n),
        flops=np.full(n, 10.0),
        embedding=embedding,
        embedding_flops=np.full(n, 2.0),
    )
    return SplitRecords(name, [TASK] * n, {LARGE: large, "ce": small})


def test_learned_rules_are_calibrated_out_of_sample():
    """A post_hoc MLP memorises noise features: in sample it finds every validation example the
    small model gets wrong, out of fold it does no better than chance. The budget's validation
    quality is out of fold, so it predicts what the threshold realises on test (0.5 + 0.3 / 2),
    where an in-sample calibration would read 0.5 + 0.3 = 0.8."""
    rng = np.random.default_rng(3)
    validation, test = noise_split("validation", rng, 400), noise_split("test", rng, 400)
    small, large = validation.models["ce"], validation.models[LARGE]
    wrong = small.quality == 0

    def share_wrong_first(scores):  # of the examples deferred first, the share the small model got wrong
        return wrong[np.argsort(scores, kind="stable")[: wrong.sum()]].mean()

    in_sample = rules.compute_scores("post_hoc", small, large, validation=(small, large))
    out_of_fold = rules.cross_fitted_scores("post_hoc", small, large)
    assert share_wrong_first(in_sample) > 0.95
    assert abs(share_wrong_first(out_of_fold) - wrong.mean()) < 0.1
    result = analysis.analyse(
        config(rules=("post_hoc",), plot_rule="post_hoc", target_deferral_rate=0.3), test, validation, {TASK: None}
    )
    (calibrated,) = result.calibrations[CurveKey(TASK, "ce", "post_hoc")]
    assert calibrated.validation.deferral_rate == 0.3
    assert abs(calibrated.validation.quality - 0.65) < 0.06 and abs(calibrated.test.quality - 0.65) < 0.06


def test_folds_are_stratified_seeded_and_checked():
    y = np.array([1.0] * 7 + [0.0] * 13)
    folds = posthoc.fold_indices(y, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(20))
    assert [len(f) for f in folds] == [4] * 5 and all(1 <= y[f].sum() <= 2 for f in folds)
    assert all((a == b).all() for a, b in zip(folds, posthoc.fold_indices(y, 5, seed=0)))
    assert any((a != b).any() for a, b in zip(folds, posthoc.fold_indices(y, 5, seed=1)))
    with pytest.raises(ValueError, match="folds=5 for 4 validation examples.*posthoc_folds"):
        posthoc.fold_indices(y[:4], 5, seed=0)
    with pytest.raises(ConfigError, match="posthoc_folds=1 must be an int >= 2"):
        config(rules=("post_hoc",), plot_rule="post_hoc", posthoc_folds=1).check()
    rng = np.random.default_rng(5)
    with pytest.raises(
        ConfigError,
        match=r"posthoc_folds=5 folds, but the validation split has fewer examples in "
        r"\{'t': 4\}: decode more",
    ):
        analysis.analyse(
            config(rules=("post_hoc",), plot_rule="post_hoc"),
            noise_split("test", rng, 20),
            noise_split("validation", rng, 4),
            {TASK: None},
        )
    config(rules=("chow_sum",), plot_rule="chow_sum").check_folds({TASK: 4})  # no learned rule: no folds


def test_post_hoc_embed_reads_the_large_embedding_and_pays_for_it_everywhere():
    rng = np.random.default_rng(4)
    validation = noise_split("validation", rng, 300, embedding_signal=True)
    test = noise_split("test", rng, 300, embedding_signal=True)
    result = analysis.analyse(
        config(rules=("post_hoc", "post_hoc_embed"), plot_rule="post_hoc", target_deferral_rate=0.3),
        test,
        validation,
        {TASK: None},
    )
    embed = result.curves[CurveKey(TASK, "ce", "post_hoc_embed")]
    plain = result.curves[CurveKey(TASK, "ce", "post_hoc")]
    # FLOPs: the small model (1) and the embedding (2) on every example, rate 0 included; the large (10) when deferred.
    assert embed[0].deferral_rate == 0.0 and embed[0].relative_flops == pytest.approx(3 / 10)
    assert embed[-1].deferral_rate == 1.0 and embed[-1].relative_flops == pytest.approx(13 / 10)
    assert plain[0].relative_flops == pytest.approx(1 / 10)
    auc = (
        lambda points: sum(
            (b.deferral_rate - a.deferral_rate) * (a.quality + b.quality) / 2  # noqa: E731
            for a, b in zip(points, points[1:])
        )
    )
    # The embedding tells where the small model errs: near the oracle's area (1 - 0.48^2 / 2 = 0.885),
    # while the noise features stay at random deferral's (0.76).
    assert auc(embed) > 0.84 and auc(plain) < 0.79
    (calibrated,) = result.calibrations[CurveKey(TASK, "ce", "post_hoc_embed")]
    assert calibrated.validation.relative_flops == pytest.approx((1 + 2 + 0.3 * 10) / 10)
    assert calibrated.test.quality > 0.7  # random deferral of 0.3: 0.52 + 0.3 * 0.48 = 0.66
    without = SplitRecords(
        "test",
        test.tasks,
        {LARGE: dataclasses.replace(test.models[LARGE], embedding=None, embedding_flops=None), "ce": test.models["ce"]},
    )
    with pytest.raises(ValueError, match="post_hoc_embed' needs the large model's input embeddings"):
        analysis.analyse(
            config(rules=("post_hoc_embed",), plot_rule="post_hoc_embed"), without, validation, {TASK: None}
        )
