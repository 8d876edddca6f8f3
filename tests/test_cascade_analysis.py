"""The analysis of records without models: budget calibration on synthetic records with known score
distributions, the records' exact round trip through files, and the plan's checks."""

import numpy as np
import pytest

from cat_jax.cascade import analysis, plan, store
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
        return ModelOutputs(ids=ids, predictions=[str(q) for q in quality], targets=["1.0"] * n,
                            logprobs=[[x] for x in lp], entropies=[[-x] for x in lp], quality=quality,
                            flops=flops)

    small = outputs((logprob > -1.5).astype(float), np.ones(n), logprob)
    large = outputs(np.ones(n), rng.uniform(5.0, 15.0, size=n), np.zeros(n))
    return SplitRecords(name, [TASK] * n, {LARGE: large, "ce": small})


def config(**options):
    return AnalysisConfig(TASK, "test", "validation", {LARGE: "/l", "ce": "/s"},
                          Options(rules=("chow_average", "random"), **options), {TASK: None})


def test_calibration_meets_the_budget_on_validation_and_nearly_on_test():
    rng = np.random.default_rng(0)
    validation, test = synthetic_split("validation", rng), synthetic_split("test", rng)
    result = analysis.analyse(config(target_deferral_rate=0.3, target_relative_flops=0.5), test, validation,
                              {TASK: None})
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
    result = analysis.analyse(config(tiers=(("ce",), (LARGE,)), target_relative_flops=0.5), test, validation,
                              {TASK: None})
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
    out = ModelOutputs(ids=["g2p/0", "g2p/1", "sums/0"], predictions=["HH AH0", "", "3"],
                       targets=[["HH AH0", "HH AA0"], ["X"], "3"], logprobs=lp, entropies=[-x for x in lp],
                       margins=[np.abs(x) for x in lp], quality=[1.0, 0.0, 1.0], flops=[1e9 / 3, 2.5e8, 7.0],
                       hidden=rng.normal(size=(3, 4)).astype(np.float32))
    records = SplitRecords("test", ["g2p", "g2p", "sums"], {LARGE: out, "ce": out.take([0, 1, 2])})
    texts = store.SplitTexts(["0", "1", "0"], ["in0", "in1", "in2"], ["HH AH0", "X", "3"],
                             {LARGE: ["HH AH0", "", "3"], "ce": ["HH AH0", "", "3"]})
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
                assert x.tobytes() == y.tobytes()          # bit for bit, not approximately
        assert a.quality.tobytes() == b.quality.tobytes() and a.flops.tobytes() == b.flops.tobytes()
        assert a.hidden.tobytes() == b.hidden.tobytes()


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
