"""Speculative cascades: the rules against a NumPy reference, lossless verification reproducing
its target (and a wrong rule failing the same bound), and the batched decoding loop on tiny
random T5 models: exactly the large model's greedy output for gamma 1, 3, 5 with rows accepting
different numbers of drafts, the large model's sampling distribution, and alpha's extremes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from stats_helpers import bound, chi_square, passes
from tolerances import SHALLOW, assert_close

from cat_jax.cascade.speculative import ALPHA_EXTREMES, RULES, cost, rule_id
from cat_jax.cascade.speculative import rules as rules_lib
from cat_jax.decoding import Sampler, greedy_decode
from cat_jax.decoding.speculative import speculative_decode
from cat_jax.models.t5 import T5Config, T5Model, Transformer, decoder_flops, encoder_flops

V = 12


def random_dists(rng: np.random.Generator, rows: int, concentration: float = 0.5) -> np.ndarray:
    return rng.dirichlet(np.full(V, concentration), size=rows).astype(np.float32)


def tempered(d: np.ndarray, temperature: float) -> np.ndarray:
    """The sampling distribution of d [rows, V] at `temperature`: one-hot on the argmax at 0."""
    if temperature == 0:
        return np.eye(d.shape[-1], dtype=d.dtype)[d.argmax(-1)]
    x = np.exp(np.log(d.astype(np.float64)) / temperature)
    return (x / x.sum(-1, keepdims=True)).astype(d.dtype)


def official_opt_keeps(q, p, q_s, p_s, alpha: float) -> np.ndarray:
    """The notebook's OPT decision (speculative_cascades_gemma.ipynb, target_distribution_opt), in
    NumPy: max terms of the unscaled distributions, TV of the sampling ones; True keeps the small."""
    tvd = np.sum(np.maximum(0.0, q_s.astype(np.float64) - p_s), axis=-1)
    return q.max(-1) >= p.max(-1) - alpha * tvd


def reference_target(rule: str, q, p, q_s, p_s, alpha: float) -> np.ndarray:
    """pi of one rule, row by row, written from the paper's definitions (OPT's TV as the notebook's)."""
    out = np.zeros_like(q)
    for i in range(len(q)):
        mq, mp = q[i].max(), p[i].max()
        tv = np.maximum(0.0, q_s[i] - p_s[i]).sum()
        if rule == "lossless":
            out[i] = p_s[i]
        elif rule in ("chow", "diff", "opt"):
            keep = {
                "chow": mq >= 1 - alpha,
                "diff": mq >= mp - alpha,
                "opt": mq >= mp - (alpha * tv if tv > 0 else 0.0),
            }[rule]
            out[i] = q_s[i] if keep else p_s[i]
        else:
            in_set = {
                "token_v1": q[i] >= mp - alpha,
                "token_v2": p[i] >= mp - alpha,
                "token_v3": p[i] >= (1 - alpha) * mp,
            }[rule]
            out[i] = np.where(in_set, q_s[i], 0) + q_s[i][~in_set].sum() * p_s[i]
    return out


def reference_speed(q_s, p_s, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(accept, residual) of lossy speculative decoding."""
    with np.errstate(divide="ignore", invalid="ignore"):
        accept = np.where((1 - alpha) * q_s > 0, np.minimum(1, p_s / ((1 - alpha) * q_s)), 1.0)
    residual = np.maximum(p_s - q_s, 0)
    total = residual.sum(-1, keepdims=True)
    return accept, np.where(total > 0, residual / np.maximum(total, 1e-30), p_s)  # p_s: never drawn


@pytest.fixture(scope="module")
def dists():
    rng = np.random.default_rng(0)
    q, p = random_dists(rng, 200), random_dists(rng, 200)
    q[:20] = p[:20]  # identical rows: every rule keeps them alike
    temper = lambda d: (d**2) / (d**2).sum(-1, keepdims=True)  # temperature 1/2
    return q, p, temper(q), temper(p)


def swept_alphas(rule: str, num: int = 6) -> np.ndarray:
    """num alphas from the large-model extreme to the small-model one (inner ones in SWEEP_SPANS)."""
    if rule == "lossless":
        return np.zeros(1)
    low, high = ALPHA_EXTREMES[rule]
    return np.array([low, *np.linspace(*rules_lib.SWEEP_SPANS.get(rule, (low, high)), num)[1:-1], high])


@pytest.mark.parametrize("rule", RULES)
def test_rules_match_numpy_reference(rule, dists):
    q, p, q_s, p_s = dists
    alphas = swept_alphas(rule)
    verify = jax.jit(functools.partial(rules_lib.verification, rule))
    by_id = jax.jit(rules_lib.verification_by_id)
    decisions = set()
    for alpha in alphas:
        got = verify(q, p, q_s, p_s, jnp.float32(alpha))
        if rule == "speed":
            accept, residual = reference_speed(q_s, p_s, alpha)
            kept = q_s * accept
            target = kept + (1 - kept.sum(-1, keepdims=True)) * residual
            assert_close(got.accept, accept, SHALLOW)
            assert_close(got.residual, residual, SHALLOW)
        else:
            target = reference_target(rule, q, p, q_s, p_s, alpha)
            with np.errstate(divide="ignore", invalid="ignore"):
                accept = np.where(q_s > 0, np.minimum(1, target / q_s), 1.0)
            assert_close(got.accept, accept, SHALLOW)
            decisions.add(np.isclose(target, q_s, atol=1e-7).all(-1).sum())
        assert_close(got.target, target, SHALLOW)
        assert_close(np.asarray(got.target).sum(-1), 1.0, SHALLOW)
        traced = by_id(jnp.int32(rule_id(rule)), q, p, q_s, p_s, jnp.float32(alpha))
        assert_close(traced.target, got.target, SHALLOW)
    if rule in rules_lib.DEFERRAL_RULES + rules_lib.TOKEN_RULES:
        assert len(decisions) >= 3, decisions  # the sweep moves the decision


def test_deferral_decisions_and_accepted_sets():
    q = jnp.array([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    p = jnp.array([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05]])
    keep = lambda rule, alpha, q_s=q, p_s=p: rules_lib.keep_small(rule, q, p, q_s, p_s, alpha)  # noqa: E731
    np.testing.assert_array_equal(keep("chow", 0.35), [True, False])
    np.testing.assert_array_equal(keep("diff", 0.0), [True, False])
    np.testing.assert_array_equal(keep("diff", 0.6), [True, True])
    # At temperature 1, TV = 0.2 and 0.5: keep iff max q >= max p - alpha * TV.
    np.testing.assert_array_equal(keep("opt", -1.5), [False, False])
    np.testing.assert_array_equal(keep("opt", 0.5), [True, False])
    np.testing.assert_array_equal(keep("opt", 1.1), [True, True])
    # Greedy (one-hot q_s, p_s): row 0's greedy tokens agree (TV 0, keep iff max q >= max p), row
    # 1's do too; TV of the untempered rows (0.2, 0.5) would defer row 0 at alpha -1.5.
    greedy_q, greedy_p = jnp.eye(3)[jnp.argmax(q, -1)], jnp.eye(3)[jnp.argmax(p, -1)]
    np.testing.assert_array_equal(keep("opt", -1.5, greedy_q, greedy_p), [True, False])
    np.testing.assert_array_equal(keep("opt", jnp.inf, greedy_q, greedy_p), [True, False])
    np.testing.assert_array_equal(
        rules_lib.accepted_set("token_v2", q, p, 0.15), [[True, True, False], [True, False, False]]
    )
    np.testing.assert_array_equal(
        rules_lib.accepted_set("token_v3", q, p, 0.5), [[True, True, False], [True, False, False]]
    )


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_opt_matches_the_official_formula(temperature):
    """OPT's decision against a NumPy transcription of the notebook's, on 640 random rows and
    alphas across (-1.5, 1.5); at temperatures 0 and 0.7 that differs from TV of the untempered
    distributions on some rows, which this test would catch."""
    rng = np.random.default_rng(5)
    q, p = random_dists(rng, 640, 0.3), random_dists(rng, 640, 0.3)
    q_s, p_s = tempered(q, temperature), tempered(p, temperature)
    keep = jax.jit(functools.partial(rules_lib.keep_small, "opt"))
    differs = 0
    for alpha in np.linspace(-1.5, 1.5, 13):
        official = official_opt_keeps(q, p, q_s, p_s, alpha)
        got = np.asarray(keep(q, p, q_s, p_s, jnp.float32(alpha)))
        tv = np.maximum(0.0, q_s.astype(np.float64) - p_s).sum(-1)
        clear = np.abs(q.max(-1) - p.max(-1) + alpha * tv) > 1e-5  # no float32 rounding at the boundary
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(got[clear], official[clear])
        untempered_tv = 0.5 * np.abs(q.astype(np.float64) - p).sum(-1)
        differs += int(np.sum(official != (q.max(-1) >= p.max(-1) - alpha * untempered_tv)))
    assert (differs > 0) == (temperature != 1.0), differs


@pytest.mark.parametrize("rule", sorted(ALPHA_EXTREMES))
def test_alpha_extremes_are_the_large_and_the_small_model_alone(rule, dists):
    q, p, q_s, p_s = dists
    large, small = ALPHA_EXTREMES[rule]
    assert_close(rules_lib.verification(rule, q, p, q_s, p_s, large).target, p_s, SHALLOW)
    small_target = rules_lib.verification(rule, q, p, q_s, p_s, small)
    assert_close(small_target.target, q_s, SHALLOW)
    np.testing.assert_array_equal(small_target.accept, 1.0)  # every draft kept


def empirical(verdict: rules_lib.Verification, q_s: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Counts [V] of `draws` tokens produced by drafting from q_s [V] and verifying (one row)."""
    rng = np.random.default_rng(seed)
    accept, residual = np.asarray(verdict.accept[0], np.float64), np.asarray(verdict.residual[0], np.float64)
    drafts = rng.choice(V, size=draws, p=q_s / q_s.sum())
    kept = rng.random(draws) < accept[drafts]
    redrawn = rng.choice(V, size=draws, p=residual / residual.sum())
    return np.bincount(np.where(kept, drafts, redrawn), minlength=V)


def test_verification_reproduces_the_target_and_a_wrong_residual_fails():
    rng = np.random.default_rng(1)
    q, p = random_dists(rng, 1, 3.0), random_dists(rng, 1, 3.0)
    for rule, alpha in (("lossless", 0.0), ("speed", 0.5), ("chow", 0.6), ("opt", 0.3), ("token_v2", 0.05)):
        verdict = rules_lib.verification(rule, q, p, q, p, jnp.float32(alpha))
        assert passes(empirical(verdict, q[0], 200_000, 2), np.asarray(verdict.target[0])), rule
    lossless = rules_lib.verification("lossless", q, p, q, p, jnp.float32(0))
    assert passes(empirical(lossless, q[0], 200_000, 3), p[0])
    # A rule that redraws from p itself after a rejection (not its excess over q) is not lossless.
    wrong = lossless._replace(residual=jnp.asarray(p))
    statistic, dof = chi_square(empirical(wrong, q[0], 200_000, 3), p[0])
    assert statistic > 10 * bound(dof)


# ----------------------------------------------------------------------------- the decoding loop

# One layer each: every test compiles the loop once per gamma (tests/test_decoding.py checks the
# per-row cache through two layers).
CONFIG = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1
)
ENC = jnp.array(np.random.default_rng(0).integers(2, 64, (6, 7)), jnp.int32).at[2, 4:].set(0)
MAX_LEN = 10

spec = jax.jit(
    speculative_decode, static_argnums=(0, 2), static_argnames=("gamma", "max_decode_length", "eos_id", "sampler")
)


def init(config: T5Config, seed: int, enc=ENC):
    net = Transformer(config)
    return T5Model(config), nn.unbox(
        net.init({"params": jax.random.key(seed)}, enc, jnp.zeros((enc.shape[0], 3), int))
    )["params"]


@pytest.fixture(scope="module")
def models():
    large, large_params = init(CONFIG, 1)
    # A drafter that agrees with the large model often but not always: its parameters plus noise.
    noise = jax.tree_util.tree_map(
        lambda x: 0.1 * jnp.std(x) * jax.random.normal(jax.random.key(7), x.shape), large_params
    )
    near_params = jax.tree_util.tree_map(jnp.add, large_params, noise)
    greedy = jax.jit(functools.partial(greedy_decode, large, max_decode_length=MAX_LEN))
    out = dict(
        large=(large, large_params),
        near=(large, near_params),
        large_greedy=greedy(large_params, {"encoder_input_tokens": ENC}),
        near_greedy=greedy(near_params, {"encoder_input_tokens": ENC}),
    )
    assert not np.array_equal(out["large_greedy"].tokens, out["near_greedy"].tokens)
    return out


def run(models, drafter: str, rule: str, alpha: float, gamma: int, seed: int = 0):
    (draft_model, draft_params), (large, large_params) = models[drafter], models["large"]
    return spec(
        draft_model,
        draft_params,
        large,
        large_params,
        {"encoder_input_tokens": ENC},
        jax.random.key(seed),
        jnp.int32(rule_id(rule)),
        jnp.float32(alpha),
        gamma=gamma,
        max_decode_length=MAX_LEN,
    )


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_decoding_is_the_large_models_greedy_output(models, gamma):
    expected = models["large_greedy"]
    out = run(models, "near", "lossless", 0.0, gamma)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(out.lengths, expected.lengths)
    accepted, rounds = np.asarray(out.accepted), np.asarray(out.rounds)
    per_round = accepted / rounds
    assert len(set(per_round.round(6))) > 2, per_round  # rows accept different numbers of drafts
    assert 0 < accepted.sum() < gamma * rounds.sum()
    assert (rounds < np.asarray(expected.lengths)).any()  # fewer large-model calls than tokens
    starts = np.asarray(out.round_starts)
    assert ((starts >= 0).sum(1) == rounds).all() and (starts[:, 0] == 0).all()
    np.testing.assert_array_equal(run(models, "near", "lossless", 0.0, gamma, seed=5).tokens, out.tokens)


def test_alpha_extremes_give_each_model_alone_end_to_end(models):
    for rule, (large_alpha, small_alpha) in ALPHA_EXTREMES.items():
        np.testing.assert_array_equal(
            run(models, "near", rule, large_alpha, 3).tokens, models["large_greedy"].tokens, err_msg=rule
        )
        small = run(models, "near", rule, small_alpha, 3)
        np.testing.assert_array_equal(small.tokens, models["near_greedy"].tokens, err_msg=rule)
        np.testing.assert_array_equal(small.accepted, 3 * np.asarray(small.rounds), err_msg=rule)


TINY_VOCAB = T5Config(
    vocab_size=6, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1
)


def exact_two_token_distribution(model, params, enc) -> dict[tuple[int, ...], float]:
    """P(first two output tokens) under the model's sampling distribution (tokens 1..5, EOS = 1)."""
    vocab = TINY_VOCAB.vocab_size
    dec = jnp.array([[0, a] for a in range(1, vocab)], jnp.int32)
    logits = model.network.apply({"params": params}, jnp.repeat(enc, vocab - 1, axis=0), dec)
    probs = np.asarray(jax.nn.softmax(logits.at[..., 0].set(-jnp.inf), axis=-1), np.float64)
    first = probs[0, 0]
    dist = {(1,): first[1]}
    for a in range(2, vocab):
        for b in range(1, vocab):
            dist[(a, b)] = first[a] * probs[a - 1, 1, b]
    return dist


@pytest.mark.slow  # 20-60 s of compiles and decoding on 2 cores: the full suite runs it
def test_lossless_sampling_follows_the_large_models_distribution_and_speed_does_not():
    rows = 6000
    enc = jnp.tile(jnp.array([[3, 4, 5, 1]], jnp.int32), (rows, 1))
    large, large_params = init(TINY_VOCAB, 3, enc[:1])
    small, small_params = init(TINY_VOCAB.replace(emb_dim=8, head_dim=4), 4, enc[:1])
    exact = exact_two_token_distribution(large, large_params, enc[:1])
    outcomes = list(exact)

    def counts(rule: str, alpha: float, seed: int) -> np.ndarray:
        out = spec(
            small,
            small_params,
            large,
            large_params,
            {"encoder_input_tokens": enc},
            jax.random.key(seed),
            jnp.int32(rule_id(rule)),
            jnp.float32(alpha),
            gamma=1,
            max_decode_length=2,
            sampler=Sampler(temperature=1.0),
        )
        tokens = np.asarray(out.tokens)
        keys = [(1,) if t[0] == 1 else (int(t[0]), int(t[1])) for t in tokens]
        return np.array([keys.count(o) for o in outcomes])

    probs = np.array([exact[o] for o in outcomes])
    assert passes(counts("lossless", 0.0, 0), probs)
    assert passes(counts("speed", 0.0, 1), probs)  # alpha 0 is lossless too
    statistic, dof = chi_square(counts("speed", 0.9, 1), probs)  # a lenient (lossy) rule fails
    assert statistic > 3 * bound(dof)


def test_speculative_flops_count_every_draft_step_and_block():
    """Rounds starting after 0 and 2 tokens with gamma 1: drafter steps at contexts 0, 1, 2, 3, the
    large model's blocks of 2 at contexts 0 and 2; -1 marks rounds that did not happen."""
    small, li = CONFIG.replace(emb_dim=16, mlp_dim=32), 7
    got = cost.speculative_flops(T5Model(small), T5Model(CONFIG), li, np.array([0, 2, -1, -1]), gamma=1)
    want = (
        encoder_flops(small, li)
        + encoder_flops(CONFIG, li)
        + sum(decoder_flops(small, li, c, 1) for c in range(4))
        + decoder_flops(CONFIG, li, 0, 2)
        + decoder_flops(CONFIG, li, 2, 2)
    )
    assert got == want
    assert cost.decode_flops(T5Model(CONFIG), li, 3) == encoder_flops(CONFIG, li) + sum(
        decoder_flops(CONFIG, li, t, 1) for t in range(3)
    )
