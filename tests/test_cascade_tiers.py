"""k-tier cascades and ABC agreement on hand-made records, their numbers worked out by hand."""

import numpy as np
import pytest

from cat_jax import metrics
from cat_jax.cascade import agreement, calibration, summary, tiers
from cat_jax.cascade.records import ModelOutputs

IDS = ["e0", "e1", "e2", "e3"]


def make(predictions, quality, flops, logprobs=None):
    logprobs = logprobs or [[-0.5]] * 4
    return ModelOutputs(
        ids=IDS,
        predictions=predictions,
        targets=["t"] * 4,
        logprobs=logprobs,
        entropies=[np.abs(lp) for lp in logprobs],
        quality=quality,
        flops=flops,
    )


def test_abc_vote_on_unanimous_majority_and_split_ensembles():
    members = [["Paris", "yes", "1", "a b"], ["paris.", "no", "2", "A  B"], ["The Paris", "no", "3", "c"]]
    share, winner = agreement.ensemble_vote(members, np.zeros(4, bool))
    # e0 unanimous after normalisation (case, punctuation, article): 3/3, first member answers.
    # e1 majority "no": 2/3, answered by member 1 (the first "no"). e2 all split: 1/3, member 0.
    # e3 "a b" == "A  B" (whitespace collapsed): 2/3, member 0.
    np.testing.assert_allclose(share, [1.0, 2 / 3, 1 / 3, 2 / 3])
    assert winner.tolist() == [0, 1, 0, 0]
    # Two members that disagree: a tie of 1/2, the earlier member answers.
    share, winner = agreement.ensemble_vote([["x"], ["y"]], np.zeros(1, bool))
    assert share.tolist() == [0.5] and winner.tolist() == [0]


def test_abc_free_text_is_the_authors_mean_pairwise_jaccard_of_stemmed_tokens():
    """{A, A, B} scores 1/3 (the pairs AA, AB, AB: 1, 0, 0) and answers A; the most central member's
    support (abc_central) gives it 2/3."""
    members = [["red cat sat"], ["Red cat, sat."], ["blue dog"]]
    share, winner = agreement.ensemble_vote(members, np.ones(1, bool))
    assert share.tolist() == pytest.approx([1 / 3]) and winner.tolist() == [0]
    central, _ = agreement.ensemble_vote(members, np.ones(1, bool), "abc_central")
    assert central.tolist() == pytest.approx([2 / 3])
    # Porter stems: "running dogs" and "the dog runs" share {run, dog}; "jumped" and "jumps" share "jump".
    assert agreement.stemmed_tokens("The running dogs") == {"run", "dog"}
    members = [["running dogs"], ["the dog runs"], ["dog jumped"], ["dogs jumps"]]
    share, winner = agreement.ensemble_vote(members, np.ones(1, bool))
    # Sets {run, dog} x2, {dog, jump} x2: pairs 1, 1/3, 1/3, 1/3, 1/3, 1 -> 10/3 / 6; the most
    # frequent normalised string is each answer once, so the first member answers.
    assert share.tolist() == pytest.approx([(2 + 4 / 3) / 6]) and winner.tolist() == [0]
    stemmed, _ = agreement.ensemble_vote(members[:2], np.ones(1, bool))
    unstemmed, _ = agreement.ensemble_vote(members[:2], np.ones(1, bool), "abc_central")
    assert stemmed.tolist() == [1.0] and unstemmed.tolist() == [0.5]  # unstemmed they share no token
    # The answer is the most frequent normalised string, through the first member giving it.
    share, winner = agreement.ensemble_vote([["x y"], ["z"], ["X, y!"]], np.ones(1, bool))
    assert winner.tolist() == [0] and share.tolist() == pytest.approx([1 / 3])
    share, winner = agreement.ensemble_vote([["z"], ["x y"], ["X, y!"]], np.zeros(1, bool))
    assert winner.tolist() == [1] and share.tolist() == pytest.approx([2 / 3])


def test_abc_empty_majority_always_defers():
    """An empty majority answer scores EMPTY_MAJORITY (below any agreement) on labels and free
    text alike; "the" normalises to empty. abc_central counts two empty answers as agreeing."""
    members = [["", "the", "x"], ["", "", "x"], ["y", "z", "x"]]
    for free_text in (False, True):
        share, _ = agreement.ensemble_vote(members, np.full(3, free_text))
        assert share.tolist() == [agreement.EMPTY_MAJORITY, agreement.EMPTY_MAJORITY, 1.0]
    central, _ = agreement.ensemble_vote(members, np.ones(3, bool), "abc_central")
    assert central.tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert agreement.token_set_similarity("", "") == 1.0 and agreement.jaccard(frozenset(), frozenset()) == 0.0
    with pytest.raises(ValueError, match="unknown agreement statistic 'majority'"):
        agreement.ensemble_vote(members, False, "majority")


def test_free_text_tasks_from_their_quality_metric():
    assert agreement.is_free_text(metrics.Quality(metrics.exact_match_scores, metrics.corpus_bleu))
    assert agreement.is_free_text(metrics.Quality(metrics.squad_exact_match_scores))
    assert not agreement.is_free_text(metrics.Quality(metrics.exact_match_scores))
    assert not agreement.is_free_text(metrics.Quality(metrics.label_match_scores))


# Tier 0: model A; tier 1: ensemble B1+B2+B3 (ABC); tier 2: model C. Per example:
#   A's chow_average score [-0.1, -0.9, -0.5, -0.3], quality [1, 0, 0, 0], FLOPs 1 each.
#   B votes: e0 unanimous (1), e1 "c" 2/3 (B2 answers), e2 split 1/3, e3 "g" 2/3 (B1 answers);
#   the tier's answer quality [1, 1, 0, 1]; FLOPs 2 + 3 + 4 = 9 (latency: the slowest, 4).
#   C: quality [1, 1, 1, 0], FLOPs 20 each; totals 80 for both FLOPs and latency.
# An example answered by tier 0 / 1 / 2 costs 1 / 10 / 30 FLOPs and 1 / 5 / 25 latency.
def three_tiers():
    a = make(["a0", "a1", "a2", "a3"], [1, 0, 0, 0], [1] * 4, logprobs=[[-0.1], [-0.9], [-0.5], [-0.3]])
    b1 = make(["k", "b", "d", "g"], [1, 0, 0, 1], [2] * 4)
    b2 = make(["k", "c", "e", "g"], [1, 1, 0, 1], [3] * 4)
    b3 = make(["k", "c", "f", "h"], [1, 1, 0, 0], [4] * 4)
    c = make(["c0", "c1", "c2", "c3"], [1, 1, 1, 0], [20] * 4)
    answers = [tiers.tier_answer([a]), tiers.tier_answer([b1, b2, b3]), tiers.tier_answer([c])]
    scores = np.array([[-0.1, -0.9, -0.5, -0.3], answers[1].agreement])
    return answers, scores


def test_tier_answers_and_costs():
    answers, scores = three_tiers()
    np.testing.assert_allclose(scores[1], [1.0, 2 / 3, 1 / 3, 2 / 3])
    assert answers[1].outputs.predictions == ("k", "c", "d", "g")
    assert answers[1].outputs.quality.tolist() == [1, 1, 0, 1]
    assert answers[1].flops.tolist() == [9] * 4 and answers[1].latency.tolist() == [4] * 4
    # Joint threshold (+inf, 2/3): everything leaves A; e2 (agreement 1/3) goes on to C.
    (point,) = tiers.evaluate(answers, scores, np.array([[np.inf, 2 / 3]]))
    assert point.exit_shares == (0.0, 0.75, 0.25) and point.deferral_rate == 1.0
    assert point.relative_flops == pytest.approx((10 + 10 + 30 + 10) / 80)
    assert point.relative_latency == pytest.approx((5 + 5 + 25 + 5) / 80)
    assert point.quality == 1.0


def test_three_tier_frontier_by_hand():
    answers, scores = three_tiers()
    # Grids: boundary 0 [-0.9, -0.5, -0.3, -0.1, inf] defers {}, {e1}, {e1, e2}, {e1, e2, e3}, all;
    # boundary 1 [1/3, 2/3, 1, inf] sends on {}, {e2}, {e1, e2, e3}, all. Of the 20 points
    # (FLOPs, quality): (4, .25) x4; (13, .5) (13, .5) (33, .5) (33, .5); (22, .5) (42, .75) (62, .75)
    # (62, .75); (31, .75) (51, 1) (91, .75) (91, .75); (40, .75) (60, 1) (100, .75) (120, .75).
    grid = tiers.joint_grid(scores, None)
    assert grid.shape == (20, 2)
    points = tiers.evaluate(answers, scores, grid)
    assert sorted(round(p.relative_flops * 80) for p in points) == sorted(
        [4] * 4 + [13, 13, 33, 33, 22, 42, 62, 62, 31, 51, 91, 91, 40, 60, 100, 120]
    )
    frontier = tiers.sweep_tiers(answers, scores)
    got = [(p.thresholds, p.exit_shares, p.relative_flops, p.relative_latency, p.quality) for p in frontier]
    assert got == [
        ((-0.9, 1 / 3), (1.0, 0.0, 0.0), 4 / 80, 4 / 80, 0.25),  # A alone
        ((-0.5, 1 / 3), (0.75, 0.25, 0.0), 13 / 80, 8 / 80, 0.5),  # e1 to the ensemble
        ((-0.1, 1 / 3), (0.25, 0.75, 0.0), 31 / 80, 16 / 80, 0.75),  # e1..e3 to the ensemble
        ((-0.1, 2 / 3), (0.25, 0.5, 0.25), 51 / 80, 36 / 80, 1.0),  # and the split e2 on to C
    ]
    assert [p.deferral_rate for p in frontier] == [0.0, 0.25, 0.75, 0.75]
    alone = tiers.tiers_alone(answers)
    assert alone == [(4 / 80, 0.25), (36 / 80, 0.75), (1.0, 0.75)]
    s = summary.summarize_tiers(frontier, [["a"], ["b1", "b2", "b3"], ["c"]], ["chow_average", "abc"], alone)
    assert s.relative_flops_to_match_last == 31 / 80  # first frontier point at C's 0.75
    assert (s.best_quality, s.best_relative_flops, s.best_relative_latency) == (1.0, 51 / 80, 36 / 80)
    assert s.frontier_points == 4


def test_three_tier_budget_picks_the_best_validation_point_within_it():
    answers, scores = three_tiers()
    points = tiers.evaluate(answers, scores, tiers.joint_grid(scores, None))
    # Within 0.4 x C's FLOPs (32 of 80), the best quality is 0.75 at 31.
    chosen, met = calibration.best_within(points, calibration.Budget("relative_flops", 0.4))
    assert met and chosen.thresholds == (-0.1, 1 / 3) and chosen.quality == 0.75
    # At most a quarter deferred past A: (13, 0.5) beats (4, 0.25).
    chosen, met = calibration.best_within(points, calibration.Budget("deferral_rate", 0.25))
    assert met and chosen.relative_flops == 13 / 80 and chosen.quality == 0.5
    # Below A's own cost nothing fits: the cheapest point, flagged.
    chosen, met = calibration.best_within(points, calibration.Budget("relative_flops", 0.01))
    assert not met and chosen.relative_flops == 4 / 80


def test_tier_inputs_are_checked():
    answers, scores = three_tiers()
    with pytest.raises(ValueError, match="two or more tiers"):
        tiers.sweep_tiers(answers[:1], scores[:0])
    with pytest.raises(ValueError, match=r"\[K-1, N\] = \(2, 4\)"):
        tiers.sweep_tiers(answers, scores[:1])
