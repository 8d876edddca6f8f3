"""Speculative cascades on decoder-only models (`cat_jax.models.decoder`): the batched loop with a
drafter and a verifier both prefilled on left-padded prompts of different lengths. Greedy lossless
decoding is exactly the verifier's greedy decoding for gamma 1, 3 and 5 (rows accepting different
numbers of drafts, caches rolled back per row); sampled lossless decoding follows the verifier's
distribution (chi-square) and a lossy rule does not; the cost model counts each prefill, drafted
token and verified block at the decoder's own contexts; benchmarks/speculative.py runs a decoder pair."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV
from flax import linen as nn
from stats_helpers import bound, chi_square, passes

from cat_jax.cascade.speculative import ALPHA_EXTREMES, cost, rule_id
from cat_jax.decoding import Sampler, greedy_decode
from cat_jax.decoding.speculative import speculative_decode
from cat_jax.models.decoder import DecoderConfig, DecoderModel, decode_flops, init_params

CONFIG = DecoderConfig(
    vocab_size=64, emb_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, dtype="float32"
)
# Six left-padded prompts of 7, 5, 3, 6, 1 and 4 tokens (no 1 = EOS among them).
LENGTHS = np.array([7, 5, 3, 6, 1, 4])
MASK = (np.arange(7)[None, :] >= 7 - LENGTHS[:, None]).astype(np.int32)
INPUTS = {
    "prompt_tokens": jnp.asarray(np.random.default_rng(0).integers(2, 64, (6, 7)) * MASK, jnp.int32),
    "prompt_mask": jnp.asarray(MASK),
}
MAX_LEN = 10

spec = jax.jit(
    speculative_decode, static_argnums=(0, 2), static_argnames=("gamma", "max_decode_length", "eos_id", "sampler")
)


def init(config: DecoderConfig, seed: int):
    return DecoderModel(config), nn.unbox(init_params(config, jax.random.key(seed)))


@pytest.fixture(scope="module")
def models():
    large, large_params = init(CONFIG, 1)
    # A drafter that agrees with the verifier often but not always: its parameters plus noise.
    noise = jax.tree_util.tree_map(
        lambda x: 0.3 * jnp.std(x) * jax.random.normal(jax.random.key(7), x.shape), large_params
    )
    near_params = jax.tree_util.tree_map(jnp.add, large_params, noise)
    greedy = jax.jit(functools.partial(greedy_decode, large, max_decode_length=MAX_LEN))
    out = dict(
        large=(large, large_params),
        near=(large, near_params),
        large_greedy=greedy(large_params, INPUTS),
        near_greedy=greedy(near_params, INPUTS),
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
        INPUTS,
        jax.random.key(seed),
        jnp.int32(rule_id(rule)),
        jnp.float32(alpha),
        gamma=gamma,
        max_decode_length=MAX_LEN,
    )


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_lossless_is_the_verifiers_greedy_decoding(models, gamma):
    expected = models["large_greedy"]
    out = run(models, "near", "lossless", 0.0, gamma)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(out.lengths, expected.lengths)
    accepted, rounds = np.asarray(out.accepted), np.asarray(out.rounds)
    assert len(set((accepted / rounds).round(6))) > 2, accepted / rounds  # rows accept differently
    assert 0 < accepted.sum() < gamma * rounds.sum()
    assert (rounds < np.asarray(expected.lengths)).any()  # fewer verifier calls than tokens
    starts = np.asarray(out.round_starts)
    assert ((starts >= 0).sum(1) == rounds).all() and (starts[:, 0] == 0).all()


def test_alpha_extremes_give_each_model_alone(models):
    for rule, (large_alpha, small_alpha) in ALPHA_EXTREMES.items():
        np.testing.assert_array_equal(
            run(models, "near", rule, large_alpha, 3).tokens, models["large_greedy"].tokens, err_msg=rule
        )
        small = run(models, "near", rule, small_alpha, 3)
        np.testing.assert_array_equal(small.tokens, models["near_greedy"].tokens, err_msg=rule)
        np.testing.assert_array_equal(small.accepted, 3 * np.asarray(small.rounds), err_msg=rule)


TINY_VOCAB = CONFIG.replace(vocab_size=6, emb_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32)


def exact_two_token_distribution(model: DecoderModel, params, prompt: np.ndarray) -> dict[tuple[int, ...], float]:
    """P(first two output tokens) under the model's distribution (EOS = 1 ends after one token):
    teacher-forced logits of the prompt followed by each first token."""
    vocab = model.config.vocab_size
    firsts = [a for a in range(vocab) if a != 1]
    batch = {
        "prompt_tokens": jnp.tile(prompt, (len(firsts), 1)),
        "prompt_mask": jnp.ones((len(firsts), prompt.shape[1]), jnp.int32),
        "decoder_target_tokens": jnp.array([[a, 0] for a in firsts], jnp.int32),
        "decoder_loss_weights": jnp.ones((len(firsts), 2), jnp.float32),
    }
    probs = np.asarray(jax.nn.softmax(model.logits(params, batch).astype(jnp.float32), axis=-1), np.float64)
    first = probs[0, 0]
    dist = {(1,): first[1]}
    for row, a in enumerate(firsts):
        for b in range(vocab):
            dist[(a, b)] = first[a] * probs[row, 1, b]
    return dist


@pytest.mark.slow  # 20-60 s of compiles and decoding on 2 cores: the full suite runs it
def test_lossless_sampling_follows_the_verifiers_distribution_and_speed_does_not():
    rows, prompt = 6000, np.array([[3, 4, 5, 2]], np.int32)
    large, large_params = init(TINY_VOCAB, 3)
    small, small_params = init(TINY_VOCAB.replace(emb_dim=8, head_dim=4), 4)
    exact = exact_two_token_distribution(large, large_params, prompt)
    outcomes = list(exact)
    inputs = {"prompt_tokens": jnp.tile(prompt, (rows, 1)), "prompt_mask": jnp.ones((rows, 4), jnp.int32)}

    def counts(rule: str, alpha: float, seed: int) -> np.ndarray:
        out = spec(
            small,
            small_params,
            large,
            large_params,
            inputs,
            jax.random.key(seed),
            jnp.int32(rule_id(rule)),
            jnp.float32(alpha),
            gamma=1,
            max_decode_length=2,
            sampler=Sampler(temperature=1.0),
        )
        keys = [(1,) if t[0] == 1 else (int(t[0]), int(t[1])) for t in np.asarray(out.tokens)]
        return np.array([keys.count(o) for o in outcomes])

    probs = np.array([exact[o] for o in outcomes])
    assert probs.sum() == pytest.approx(1.0)
    assert passes(counts("lossless", 0.0, 0), probs)
    assert passes(counts("speed", 0.0, 1), probs)  # alpha 0 is lossless too
    statistic, dof = chi_square(counts("speed", 0.9, 1), probs)  # a lenient (lossy) rule fails
    assert statistic > 3 * bound(dof)


def test_speculative_flops_count_prefills_drafts_and_blocks_at_the_prompts_contexts():
    """A prompt of 7 tokens: each model prefills 6 (the 7th is the first token fed); rounds after 0
    and 2 tokens with gamma 1: drafter steps at contexts 6 + 0..3, the verifier's blocks of 2 at
    contexts 6 and 8; -1 marks rounds that did not happen."""
    small, li = CONFIG.replace(emb_dim=16, mlp_dim=32), 7
    got = cost.speculative_flops(DecoderModel(small), DecoderModel(CONFIG), li, np.array([0, 2, -1, -1]), gamma=1)
    want = (
        decode_flops(small, 0, 6)
        + decode_flops(CONFIG, 0, 6)
        + sum(decode_flops(small, 6 + c, 1) for c in range(4))
        + decode_flops(CONFIG, 6, 2)
        + decode_flops(CONFIG, 8, 2)
    )
    assert got == want
    assert cost.decode_flops(DecoderModel(CONFIG), li, 3) == decode_flops(CONFIG, 0, 6) + sum(
        decode_flops(CONFIG, 6 + t, 1) for t in range(3)
    )


@pytest.mark.slow  # 20-60 s of compiles and decoding on 2 cores: the full suite runs it
def test_benchmark_smoke_on_a_decoder_pair():
    """benchmarks/speculative.py in random mode on two decoder_tiny models: the verifier's greedy
    decoding and two rules through one compiled loop, fixed-length (EOS disabled)."""
    tiny = "gin_configs/models/decoder/decoder_tiny.gin"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/speculative.py",
            f"--large={tiny}",
            f"--small={tiny}",
            "--batches=2",
            "--gammas=2",
            "--rules=lossless,chow",
            "--inputs=8",
            "--max-decode-length=3",
            "--vocab=64",
            "--repeats=1",
            "--warmup=0",
        ],
        cwd=REPO,
        env=dict(os.environ, **SUBPROCESS_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert all("error" not in r for r in rows), rows
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], []).append(row)
    assert by_impl["large_greedy"][0]["large"]["family"] == "decoder"
    assert by_impl["large_greedy"][0]["generated_tokens"] == 3 * 2
    assert [r["rule"] for r in by_impl["speculative"]] == ["lossless", "chow"]
    for row in by_impl["speculative"]:
        assert row["generated_tokens"] == 3 * 2 and row["tokens_per_s"] > 0
        assert 0 <= row["acceptance_rate"] <= 1 and row["tokens_per_large_call"] >= 1
    assert by_impl["cache_block_write"][0]["per_row_positions_ms"] > 0
