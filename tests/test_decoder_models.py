"""The decoder-only network: config, parameters and logical axes, cached decoding against teacher
forcing (block writes, per-row positions, rollback, left padding, sliding windows), the hidden state
after layer k, bfloat16, FLOPs against the jaxpr's and XLA's count, fitted sharding rules and the
gin model files with the published parameter counts."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import gin
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tolerances import BFLOAT16, DEEP, assert_close

from cat_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    abstract_params,
    decode_block,
    decode_flops,
    fit_axis_rules,
    init_cache,
    init_params,
    prefill_flops,
    set_cache_index,
)
from cat_jax.partitioning import DEFAULT_LOGICAL_AXIS_RULES, LOGICAL_AXES

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "models" / "decoder"
TINY = DecoderConfig(vocab_size=64, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
# Every switch at once: Gemma 2's norms, caps, scalar and alternating windows, Qwen's biases and
# q/k norms, llama3 rope scaling, tied embeddings.
EVERYTHING = DecoderConfig(
    model_type="gemma2",
    vocab_size=64,
    emb_dim=24,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
    mlp_dim=40,
    activation="gelu_tanh",
    rope_theta=1000.0,
    rope_scaling="llama3",
    rope_scaling_factor=4.0,
    rope_original_max_position=64,
    norm_plus_one=True,
    scale_embeddings=True,
    qkv_bias=True,
    qk_norm=True,
    tie_embeddings=True,
    sandwich_norms=True,
    attn_logit_softcap=3.0,
    final_logit_softcap=6.0,
    query_pre_attn_scalar=7.0,
    sliding_window=3,
    sliding_window_layers="even",
)
# Three left-padded rows of 12 slots: 0, 2 and 4 leading pads.
TOKENS = np.array(
    [
        [5, 9, 12, 7, 3, 8, 11, 30, 31, 2, 6, 7],
        [0, 0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
        [0, 0, 0, 0, 40, 41, 42, 43, 44, 45, 46, 47],
    ],
    np.int32,
)
MASK = TOKENS > 0


def perturbed_params(config: DecoderConfig, seed: int = 0):
    """Initial parameters with every leaf moved by N(0, 0.3): zero-initialised biases and Gemma's
    (1 + w) norm scales would otherwise hide a switch that is ignored."""
    params = nn.unbox(init_params(config, jax.random.key(seed)))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, moved)


@pytest.fixture(scope="module")
def everything():
    return Decoder(EVERYTHING), perturbed_params(EVERYTHING)


def test_parameter_tree_and_logical_axes():
    boxed = init_params(EVERYTHING, jax.random.key(0))
    specs = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(
            nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    }
    params = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))}
    assert specs.keys() == params.keys()
    # per layer: 4 norms, q/k/v kernels and biases, q/k norms, out, gate/up/down; embedding, final norm
    assert len(params) == 3 * 16 + 2
    for path, value in params.items():
        assert value.dtype == jnp.float32 and len(specs[path]) == value.ndim, path
        assert set(specs[path]) <= set(LOGICAL_AXES), (path, specs[path])
    layer = "['layers_0']['attention']"
    assert params[f"{layer}['query']['kernel']"].shape == (24, 4, 10)
    assert specs[f"{layer}['key']['kernel']"] == jax.sharding.PartitionSpec("embed", "kv_heads", "kv")
    assert specs[f"{layer}['out']['kernel']"] == jax.sharding.PartitionSpec("heads", "kv", "embed")
    assert "['lm_head']['kernel']" not in params  # tied
    untied = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(abstract_params(TINY)[0])}
    assert "['lm_head']['kernel']" in untied and "['layers_0']['post_mlp_norm']['scale']" not in untied


@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_left_padding_leaves_real_tokens_logits_unchanged(everything):
    model, params = everything
    full = model.apply({"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK))
    for row in range(3):
        real = TOKENS[row][MASK[row]][None]
        alone = model.apply({"params": params}, jnp.asarray(real))
        assert_close(full[row][MASK[row]], alone[0], DEEP, err_msg=f"row {row}")
    # padded keys are invisible: other pad ids change nothing, unmasked they change the logits
    other_pads = jnp.asarray(np.where(MASK, TOKENS, 33))
    assert_close(model.apply({"params": params}, other_pads, jnp.asarray(MASK))[MASK], full[MASK], DEEP)
    unmasked = model.apply({"params": params}, other_pads)
    assert np.abs(np.asarray(unmasked - full))[MASK].max() > 1e-2


@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_cached_blocks_rollback_and_per_row_positions_equal_teacher_forcing(everything):
    model, params = everything
    full = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK)))
    cache = init_cache(model, params, 3, 12)
    # the left-padded prompt block, shared index 0 -> 5
    logits, cache = decode_block(model, params, cache, TOKENS[:, :5], MASK[:, :5])
    assert_close(np.asarray(logits)[MASK[:, :5]], full[:, :5][MASK[:, :5]], DEEP)
    # per-row indices, a block of 2
    cache = set_cache_index(cache, np.array([5, 5, 5]))
    logits, cache = decode_block(model, params, cache, TOKENS[:, 5:7])
    assert_close(logits, full[:, 5:7], DEEP)
    # a wrong draft of 3, rolled back, then the true block of 3
    _, cache = decode_block(model, params, cache, np.full((3, 3), 60, np.int32))
    assert cache["cache_state"]["cache_index"].tolist() == [10, 10, 10]
    cache = set_cache_index(cache, np.array([7, 7, 7]))
    logits, cache = decode_block(model, params, cache, TOKENS[:, 7:10])
    assert_close(logits, full[:, 7:10], DEEP)
    # rows at different slots: row 1 moves back one and rewrites slot 9
    cache = set_cache_index(cache, np.array([10, 9, 10]))
    logits, cache = decode_block(model, params, cache, TOKENS[[0, 1, 2], [10, 9, 10]][:, None])
    assert_close(logits[:, 0], full[[0, 1, 2], [10, 9, 10]], DEEP)
    assert cache["cache_state"]["cache_index"].tolist() == [11, 10, 11]


def test_sliding_window_decode_reads_only_the_window(everything):
    """Against the same model without windows the cached logits differ (the window masks), and the
    sliding layers' reads are the window: scoring one token costs window keys, not the cache."""
    model, params = everything
    windowless = Decoder(EVERYTHING.replace(sliding_window=None))
    full = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK)))
    other = np.asarray(windowless.apply({"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK)))
    assert np.abs(full - other)[:, 4:][MASK[:, 4:]].max() > 1e-2
    cache = init_cache(model, params, 3, 12)
    _, cache = decode_block(model, params, cache, TOKENS[:, :11], MASK[:, :11])
    logits, _ = decode_block(model, params, cache, TOKENS[:, 11:])
    assert_close(logits[:, 0], full[:, 11], DEEP)


def test_hidden_state_after_layer_k(everything):
    model, params = everything
    tokens, mask = jnp.asarray(TOKENS), jnp.asarray(MASK)
    _, hidden = model.apply({"params": params}, tokens, mask, return_hidden=True)
    last = model.apply({"params": params}, tokens, mask, layer=3, method=Decoder.hidden_after)
    final_norm = model.apply({"params": params}, last, method=lambda m, x: m.final_norm(x))
    assert_close(final_norm, hidden, DEEP)
    first = model.apply({"params": params}, tokens, mask, layer=1, method=Decoder.hidden_after)
    assert first.shape == (3, 12, 24) and np.abs(np.asarray(first - last)).max() > 1e-2
    embedded = model.apply({"params": params}, tokens, mask, layer=0, method=Decoder.hidden_after)
    table = params["embedder"]["embedding"]
    assert_close(embedded, np.asarray(table)[TOKENS] * 24**0.5, DEEP)  # Gemma's sqrt(d) scale
    with pytest.raises(ValueError, match="layer must be in"):
        model.apply({"params": params}, tokens, layer=4, method=Decoder.hidden_after)


def test_bfloat16_compute_close_to_float32(everything):
    _, params = everything
    logits32 = Decoder(EVERYTHING).apply({"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK))
    logits16 = Decoder(EVERYTHING.replace(dtype="bfloat16")).apply(
        {"params": params}, jnp.asarray(TOKENS), jnp.asarray(MASK)
    )
    assert logits16.dtype == jnp.bfloat16 and logits32.dtype == jnp.float32
    assert_close(np.asarray(logits16, np.float32)[MASK], np.asarray(logits32)[MASK], 5 * BFLOAT16)
    assert not np.array_equal(np.asarray(logits16, np.float32), np.asarray(logits32))


def test_config_round_trip_and_validation():
    assert DecoderConfig.from_dict(EVERYTHING.to_dict()) == EVERYTHING
    assert EVERYTHING.to_dict()["family"] == "decoder" and DecoderConfig.family == "decoder"
    assert [EVERYTHING.layer_window(i) for i in range(3)] == [3, None, 3]
    assert EVERYTHING.attention_scale == 7.0**-0.5 and TINY.attention_scale == 8**-0.5
    for changes, match in [
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(head_dim=7), "even"),
        (dict(activation="relu"), "activation"),
        (dict(model_type="gpt2"), "model_type"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rope_scaling="yarn"), "rope_scaling"),
        (dict(attn_logit_softcap=-1.0), "attn_logit_softcap"),
        (dict(dtype="float16"), "dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            TINY.replace(**changes)
    with pytest.raises(ValueError, match="Unknown DecoderConfig fields \\['emb'\\]"):
        DecoderConfig.from_dict({**TINY.to_dict(), "emb": 3})
    with pytest.raises(ValueError, match="not a DecoderConfig"):
        DecoderConfig.from_dict({**TINY.to_dict(), "family": "t5"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.emb_dim = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="vocab_size is None"):
        init_params(TINY.replace(vocab_size=None), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# FLOPs: the analytic count against the jaxpr's dot_generals and XLA's cost analysis.


def _count_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_matmul_flops(sub)
    return total


def _forward(config: DecoderConfig, length: int):
    model = Decoder(config)
    params = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0))))
    tokens = jnp.ones((1, length), jnp.int32)
    return (lambda p: model.apply({"params": p}, tokens)), params


@pytest.mark.parametrize(
    "config",
    [TINY, EVERYTHING, TINY.replace(num_kv_heads=1, tie_embeddings=True)],
    ids=["tiny", "everything", "multi_query_tied"],
)
def test_prefill_flops_equal_the_jaxpr_count(config):
    forward, params = _forward(config, 16)
    assert prefill_flops(config, 16) == pytest.approx(
        _count_matmul_flops(jax.make_jaxpr(forward)(params).jaxpr), rel=1e-9
    )


def test_prefill_flops_match_xla_cost_analysis():
    """XLA also counts the elementwise work (norms, rotary, softmax), a few percent at this size."""
    config = EVERYTHING.replace(vocab_size=512, emb_dim=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=1024)
    forward, params = _forward(config, 16)
    cost = jax.jit(forward).lower(params).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert abs(prefill_flops(config, 16) - xla) / xla < 0.10, (prefill_flops(config, 16), xla)


@pytest.mark.parametrize("context,block", [(9, 1), (6, 3), (1, 2)])
def test_decode_flops_count_a_cached_block_call(everything, context, block):
    """A block after `context` cached tokens, the cache exactly that long; EVERYTHING's window of
    3 bounds its sliding layers' keys (9+1 -> 3 keys, 6+3 -> 5, 1+2 -> all 3)."""
    model, _ = everything
    params = jax.eval_shape(lambda: nn.unbox(init_params(EVERYTHING, jax.random.key(0))))
    cache = jax.eval_shape(
        lambda p: set_cache_index(init_cache(model, p, 1, context + block), jnp.array([context])), params
    )
    call = lambda p, c: decode_block(model, p, c, jnp.ones((1, block), jnp.int32))[0]
    counted = _count_matmul_flops(jax.make_jaxpr(call)(params, cache).jaxpr)
    assert decode_flops(EVERYTHING, context, block) == pytest.approx(counted, rel=1e-9)
    windowless = EVERYTHING.replace(sliding_window=None)
    assert decode_flops(windowless, context, block) >= decode_flops(EVERYTHING, context, block)


def test_flops_formulas_by_hand():
    d, q, k, f, v = 32, 32, 16, 64, 64
    per_token = 4 * d * q + 4 * d * k + 6 * d * f
    assert prefill_flops(TINY, 5) == 2 * 5 * (per_token + 4 * 5 * q) + 2 * 5 * d * v
    assert decode_flops(TINY, 7, 1) == 2 * (per_token + 4 * 8 * q) + 2 * d * v
    mistral_like = TINY.replace(sliding_window=4)
    assert decode_flops(mistral_like, 100, 2) == 2 * 2 * (per_token + 4 * 5 * q) + 2 * 2 * d * v
    lengths = np.array([5, 9])
    np.testing.assert_array_equal(
        decode_flops(mistral_like, lengths, 1), [decode_flops(mistral_like, 5, 1), decode_flops(mistral_like, 9, 1)]
    )


# ---------------------------------------------------------------------------------------------
# Sharding rules fitted to a config and a mesh.


def test_fit_axis_rules_replicates_what_the_mesh_does_not_divide():
    qwen_half_b = DecoderConfig(
        vocab_size=151936, emb_dim=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864
    )
    rules = fit_axis_rules(qwen_half_b, {"data": 1, "fsdp": 2, "model": 4}, DEFAULT_LOGICAL_AXIS_RULES)
    assert rules[:2] == (("heads", None), ("kv_heads", None))
    assert rules[2:] == DEFAULT_LOGICAL_AXIS_RULES
    assert nn.logical_to_mesh_axes(("embed", "kv_heads", "kv"), rules) == jax.sharding.PartitionSpec("fsdp", None, None)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == jax.sharding.PartitionSpec("fsdp", "model")
    assert fit_axis_rules(qwen_half_b, {"model": 2}, DEFAULT_LOGICAL_AXIS_RULES) == DEFAULT_LOGICAL_AXIS_RULES
    odd = fit_axis_rules(qwen_half_b.replace(emb_dim=900), {"fsdp": 8}, DEFAULT_LOGICAL_AXIS_RULES)
    assert odd[0] == ("embed", None)


# ---------------------------------------------------------------------------------------------
# Gin model files: the published shapes and parameter counts.

PUBLISHED = {  # the parameter counts of the Hub checkpoints
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "llama3_1_8b": 8_030_261_248,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "gemma_2b": 2_506_172_416,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "mistral_7b": 7_241_732_096,
}
SIZED_BY_TASK = ("decoder_tiny", "decoder_demo_small", "decoder_demo_large")


def _gin_config(name: str) -> DecoderConfig:
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / f"{name}.gin"))
        return DecoderConfig()
    finally:
        gin.clear_config()


def _count(config: DecoderConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(config)[0]))


def test_every_decoder_model_file_is_tested():
    assert sorted(p.stem for p in GIN_DIR.glob("*.gin")) == sorted([*PUBLISHED, *SIZED_BY_TASK])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_model_files_have_the_published_parameter_count(name):
    config = _gin_config(name)
    assert _count(config) == PUBLISHED[name]
    assert f"Parameters: {PUBLISHED[name]:,}" in (GIN_DIR / f"{name}.gin").read_text()
    assert name.startswith(config.model_type)


@pytest.mark.parametrize("name", SIZED_BY_TASK)
def test_task_sized_model_files_state_their_parameter_counts(name):
    config = _gin_config(name)
    assert config.vocab_size is None
    text = " ".join(line.lstrip("# ") for line in (GIN_DIR / f"{name}.gin").read_text().splitlines())
    without, with_bytes = (
        int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:without|with the 259|in all)", text)[:2]
    )
    assert _count(config.replace(vocab_size=2)) - 2 * 2 * config.emb_dim == without
    assert _count(config.replace(vocab_size=259)) == with_bytes
