"""Greedy, sampling and beam-search decoding and the block-writable cache, checked against
teacher-forced forward passes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from tolerances import DEEP, assert_close, near_ties

from cat_jax.decoding import (
    DecodeOutput,
    DecodingConfig,
    Sampler,
    beam_search,
    greedy_decode,
    length_penalty,
    make_decoder,
    sample_decode,
    sampling_probs,
    score_tokens,
    shift_right,
)
from cat_jax.decoding.sampling import filtered_logits
from cat_jax.errors import ConfigError
from cat_jax.models.t5 import T5Config, T5Model, Transformer

CONFIG = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
)
ENC = jnp.array([[5, 9, 12, 7, 1, 0], [3, 4, 1, 0, 0, 0], [30, 31, 32, 33, 34, 1]], jnp.int32)
INPUTS = {"encoder_input_tokens": ENC}  # what decoding reads of a T5 batch
MAX_LEN = 7
EOS = 1
# Row 0 ends after 4 tokens, row 1 after 2, row 2 is longer than MAX_LEN (never reaches EOS).
TARGETS = jnp.array(
    [[8, 9, 10, 1, 0, 0, 0, 0, 0], [20, 1, 0, 0, 0, 0, 0, 0, 0], [30, 31, 32, 33, 34, 35, 36, 37, 1]], jnp.int32
)


def score(model: T5Model, params, targets):
    """score_tokens of `targets` [3, T] given ENC."""
    batch = {
        "encoder_input_tokens": ENC,
        "decoder_input_tokens": shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(jnp.float32),
    }
    return score_tokens(model, params, batch)


def make_params(seed: int = 0, eos_bias: float = 0.0):
    """(the model, random tiny params); `eos_bias` is added to the EOS logit of the first decoding step."""
    net = Transformer(CONFIG)
    variables = net.init({"params": jax.random.key(seed)}, ENC, jnp.zeros((3, MAX_LEN), int))
    params = nn.unbox(variables)["params"]
    hidden = net.apply(
        {"params": params},
        ENC,
        jnp.zeros((3, 1), int),
        method=(lambda m, e, d: m.decode(m.encode(e), e, d, return_hidden=True)[1]),
    )[:, 0]
    direction = jnp.mean(hidden, axis=0)  # hidden . direction / |direction|^2 is about 1
    kernel = params["decoder"]["logits_dense"]["kernel"]
    kernel = kernel.at[:, EOS].add(eos_bias * direction / jnp.sum(direction**2))
    params["decoder"]["logits_dense"]["kernel"] = kernel
    return T5Model(CONFIG), params


def train_params(steps: int = 40, head_scale: float = 0.4):
    """Tiny params that have memorised ENC -> TARGETS (teacher-forced adam on one batch).

    The LM head is then scaled by `head_scale`: the argmax (hence greedy output) is unchanged
    while the distributions become far from one-hot, so log-probs and entropies are non-trivial.
    """
    model, params = make_params(seed=0)
    optimizer = optax.adam(1e-2)
    weights = (TARGETS > 0).astype(jnp.float32)

    def loss_fn(p):
        logits = model.network.apply({"params": p}, ENC, shift_right(TARGETS))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @jax.jit
    def step(p, opt_state):
        grads = jax.grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    opt_state = optimizer.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    assert float(loss_fn(params)) < 0.05
    params["decoder"]["logits_dense"]["kernel"] *= head_scale
    return model, params


@pytest.fixture(scope="module")
def decoded():
    model, params = train_params()
    out = jax.jit(functools.partial(greedy_decode, model, max_decode_length=MAX_LEN, eos_id=EOS))(params, INPUTS)
    return model, params, out


def test_output_types_and_shapes(decoded):
    _, _, out = decoded
    assert isinstance(out, DecodeOutput)
    assert out.tokens.shape == (3, MAX_LEN) and out.tokens.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32 and out.entropies.shape == (3, MAX_LEN)
    assert out.lengths.shape == (3,) and out.lengths.dtype == jnp.int32
    assert out.mean_hidden.shape == (3, CONFIG.emb_dim)
    assert len(jax.tree_util.tree_leaves(out)) == 6  # a registered pytree


def test_decodes_memorised_targets_with_eos_handling(decoded):
    _, _, out = decoded
    np.testing.assert_array_equal(
        out.tokens, [[8, 9, 10, 1, 0, 0, 0], [20, 1, 0, 0, 0, 0, 0], [30, 31, 32, 33, 34, 35, 36]]
    )
    np.testing.assert_array_equal(out.lengths, [4, 2, 7])
    mask = np.asarray(out.tokens) > 0
    assert (np.asarray(out.logprobs)[~mask] == 0).all()
    assert (np.asarray(out.entropies)[~mask] == 0).all()


def test_logprobs_equal_teacher_forced_scores(decoded):
    model, params, out = decoded
    scored = score(model, params, out.tokens)
    assert_close(out.logprobs, scored, DEEP)  # cached decoding against one teacher-forced pass
    assert (np.asarray(out.logprobs)[np.asarray(out.tokens) > 0] < -0.1).all()


def test_greedy_tokens_are_argmax_and_entropies_match(decoded):
    model, params, out = decoded
    logits, hidden = model.network.apply(
        {"params": params},
        ENC,
        shift_right(out.tokens),
        method=(lambda m, e, d: m.decode(m.encode(e), e, d, return_hidden=True)),
    )
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs)).sum(-1)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b, length in enumerate(lengths):
        assert not near_ties(logits[b, :length, 1:]).any()  # so the argmax is the same in both programs
        np.testing.assert_array_equal(tokens[b, :length], logits[b, :length, 1:].argmax(-1) + 1)
        assert_close(out.entropies[b, :length], entropy[b, :length], DEEP)
        assert_close(out.mean_hidden[b], np.asarray(hidden)[b, :length].mean(0), DEEP)
        top2 = np.sort(probs[b, :length], axis=-1)[:, -2:]
        assert_close(out.margins[b, :length], top2[:, 1] - top2[:, 0], DEEP)
        assert (np.asarray(out.margins)[b, length:] == 0).all()
    assert (np.asarray(out.entropies) >= 0).all()
    assert np.asarray(out.entropies)[tokens > 0].min() > 0.5


def test_eager_equals_jit_and_all_rows_can_stop_at_once():
    model, params = make_params(seed=1, eos_bias=50.0)  # EOS is the first argmax
    eager = greedy_decode(model, params, INPUTS, MAX_LEN)
    np.testing.assert_array_equal(eager.tokens[:, 0], EOS)
    np.testing.assert_array_equal(eager.lengths, [1, 1, 1])
    assert (np.asarray(eager.tokens)[:, 1:] == 0).all()
    model, params = make_params(seed=2)
    eager = greedy_decode(model, params, INPUTS, MAX_LEN)
    jitted = jax.jit(greedy_decode, static_argnums=(0, 3))(model, params, INPUTS, MAX_LEN)
    np.testing.assert_array_equal(eager.tokens, jitted.tokens)
    assert_close(eager.logprobs, jitted.logprobs, DEEP)


def test_score_tokens_masks_padding_and_uses_shifted_inputs():
    model, params = make_params(seed=3)
    targets = jnp.array([[7, 8, 1, 0], [9, 1, 0, 0], [10, 11, 12, 1]], jnp.int32)
    scores = np.asarray(score(model, params, targets))
    assert (scores[np.asarray(targets) == 0] == 0).all()
    logits = model.network.apply(
        {"params": params}, ENC, jnp.array([[0, 7, 8, 1], [0, 9, 1, 0], [0, 10, 11, 12]], jnp.int32)
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    assert_close(scores[2, 3], logp[2, 3, 1], DEEP)
    assert_close(scores[0, 1], logp[0, 1, 8], DEEP)


def test_block_writes_at_row_positions_match_teacher_forcing_and_roll_back():
    """Rows at different cache positions score blocks in one call; moving a row's position back
    discards what was written after it."""
    model, params = make_params(seed=4)
    dec = shift_right(TARGETS)  # [3, 9]
    full = model.network.apply({"params": params}, ENC, dec)
    state, first = model.start_decoding(params, INPUTS, 12)
    np.testing.assert_array_equal(first, 0)  # T5 decoding starts from its BOS
    cache = model.set_positions(state, jnp.zeros(3, jnp.int32))
    feed = jax.jit(lambda c, block: (lambda out: (out[0], out[2]))(model.decode_block(params, c, block)))
    # Row 0 takes 4 tokens, row 1 takes 2 then 2 junk tokens, row 2 takes 3 (and one it will redo).
    logits, cache = feed(cache, jnp.stack([dec[0, :4], jnp.array([0, 20, 55, 56]), jnp.array([0, 30, 31, 50])]))
    assert_close(logits[0], full[0, :4], DEEP)
    assert_close(logits[1, :2], full[1, :2], DEEP)
    assert_close(logits[2, :3], full[2, :3], DEEP)
    rolled = model.set_positions(cache, jnp.array([4, 2, 3]))  # roll rows 1 and 2 back
    logits, after = feed(rolled, jnp.stack([dec[0, 4:8], dec[1, 2:6], dec[2, 3:7]]))
    assert_close(logits[0], full[0, 4:8], DEEP)
    assert_close(logits[1], full[1, 2:6], DEEP)
    assert_close(logits[2], full[2, 3:7], DEEP)
    np.testing.assert_array_equal(after["cache"]["decoder"]["layers_1"]["self_attention"]["cache_index"], [8, 6, 7])
    # Without the rollback row 1 attends to its junk tokens.
    stale = feed(cache, jnp.stack([dec[0, 4:8], dec[1, 4:8], dec[2, 4:8]]))[0]
    assert np.abs(np.asarray(stale[1] - full[1, 4:8])).max() > 1e-2


def test_sampling_is_seeded_and_temperature_zero_is_greedy(decoded):
    model, params, greedy = decoded
    sample = jax.jit(sample_decode, static_argnums=(0, 4, 5, 6))
    hot = Sampler(temperature=1.5)
    a = sample(model, params, INPUTS, jax.random.key(0), MAX_LEN, EOS, hot)
    b = sample(model, params, INPUTS, jax.random.key(0), MAX_LEN, EOS, hot)
    c = sample(model, params, INPUTS, jax.random.key(1), MAX_LEN, EOS, hot)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy.tokens)
    assert_close(a.logprobs, score(model, params, a.tokens), DEEP)
    for sampler in (Sampler(temperature=0.0), Sampler(temperature=1e-4)):
        cold = sample(model, params, INPUTS, jax.random.key(2), MAX_LEN, EOS, sampler)
        np.testing.assert_array_equal(cold.tokens, greedy.tokens)
        assert_close(cold.logprobs, greedy.logprobs, DEEP)


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    probs = jnp.array([[0.0, 0.1, 0.4, 0.2, 0.3], [0.05, 0.05, 0.3, 0.3, 0.3]])
    logp = jnp.log(probs)
    kept = lambda **kw: np.isfinite(np.asarray(filtered_logits(logp, Sampler(**kw))))
    np.testing.assert_array_equal(kept(top_k=2), [[0, 0, 1, 0, 1], [0, 0, 1, 1, 1]])  # ties kept
    np.testing.assert_array_equal(kept(top_p=0.6), [[0, 0, 1, 0, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.75), [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.01), [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_allclose(sampling_probs(logp, Sampler(temperature=0.0)), [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]])
    suppressed = lambda **kw: np.isfinite(np.asarray(filtered_logits(logp, Sampler(**kw), suppressed=2)))
    np.testing.assert_array_equal(suppressed(top_k=2), [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]])  # T5's token 0
    with pytest.raises(ConfigError, match="top_p"):
        Sampler(top_p=0.0)


def test_beam_of_one_is_greedy_and_scores_equal_teacher_forced_scores(decoded):
    model, params, greedy = decoded
    search = jax.jit(beam_search, static_argnums=(0, 3, 4, 5, 6))
    one = search(model, params, INPUTS, MAX_LEN, 1, 0.0, EOS)
    np.testing.assert_array_equal(one.best().tokens, greedy.tokens)
    assert_close(one.best().logprobs, greedy.logprobs, DEEP)
    model, params = make_params(seed=5, eos_bias=6.0)  # EOS likely early: hypotheses of many lengths
    alpha = 2.0
    out = search(model, params, INPUTS, MAX_LEN, 4, alpha, EOS)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    scored = np.stack([score(model, params, out.tokens[:, j]) for j in range(4)], axis=1)
    assert_close(out.logprobs, scored, DEEP)
    assert_close(out.scores, scored.sum(-1) / length_penalty(lengths, alpha), DEEP)
    assert (np.diff(np.asarray(out.scores), axis=1) <= 1e-6).all()  # best first
    assert (lengths == (tokens > 0).sum(-1)).all()
    assert all(len({tuple(beam) for beam in row}) == 4 for row in tokens)  # distinct hypotheses
    ended = tokens[np.arange(3)[:, None], np.arange(4), lengths - 1]
    assert ((ended == EOS) | (lengths == MAX_LEN)).all()
    assert len(np.unique(lengths)) > 2, lengths


def test_decoding_method_from_gin(decoded):
    model, params, greedy = decoded
    import gin

    gin.clear_config()
    try:
        gin.parse_config(["decoding.method = 'beam'", "decoding.beam_size = 1", "decoding.length_penalty = 0.0"])
        config = DecodingConfig()
    finally:
        gin.clear_config()
    assert config.method == "beam"
    out = make_decoder(config, model, MAX_LEN, EOS)(params, INPUTS, config.rng(0))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    with pytest.raises(ConfigError, match="decoding.method"):
        DecodingConfig(method="nucleus")
