"""T5 model: shapes, logical partitioning, cached decoding, dtypes, learning, FLOPs, gin files."""

from __future__ import annotations

import dataclasses
import pathlib

import gin
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from tolerances import DEEP, assert_close

from cat_jax.models.t5 import T5Config, Transformer, decoder_flops, encoder_flops, encoder_layers_flops, forward_flops
from cat_jax.models.t5.layers import relative_position_bucket

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
LOGICAL_AXES = {"embed", "mlp", "heads", "kv", "joined_kv", "vocab", "relpos_buckets"}
TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
)
ENC = jnp.array([[5, 9, 12, 7, 1, 0, 0, 0], [3, 4, 1, 0, 0, 0, 0, 0]], jnp.int32)
DEC = jnp.array([[0, 8, 9, 10, 11, 1], [0, 20, 21, 1, 0, 0]], jnp.int32)


def init_params(config: T5Config, enc: jax.Array = ENC, dec: jax.Array = DEC, seed: int = 0):
    variables = Transformer(config).init({"params": jax.random.key(seed)}, enc, dec)
    return nn.unbox(variables)["params"]


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY)


def test_output_shapes(tiny_params):
    model = Transformer(TINY)
    variables = {"params": tiny_params}
    encoded = model.apply(variables, ENC, method=Transformer.encode)
    assert encoded.shape == (2, 8, 32)
    logits, hidden = model.apply(variables, encoded, ENC, DEC, return_hidden=True, method=Transformer.decode)
    assert logits.shape == (2, 6, 64) and hidden.shape == (2, 6, 32)
    full = model.apply(variables, ENC, DEC)
    assert_close(full, logits, DEEP)  # encode+decode as two programs against one
    assert np.isfinite(np.asarray(full)).all()


def test_every_param_has_logical_partition_spec():
    variables = Transformer(TINY).init({"params": jax.random.key(0)}, ENC, DEC)
    specs = nn.get_partition_spec(variables)["params"]
    params = nn.unbox(variables)["params"]
    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_specs = dict(
        jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    )
    assert flat_params.keys() == flat_specs.keys()
    # 9 per encoder layer, 14 per decoder layer, 2 relpos tables, 2 final norms, embedding, head.
    assert len(flat_params) == 2 * 9 + 2 * 14 + 2 + 2 + 1 + 1
    for path, param in flat_params.items():
        spec = flat_specs[path]
        assert param.dtype == jnp.float32
        assert len(spec) == param.ndim, (path, spec)
        assert set(spec) <= LOGICAL_AXES, (path, spec)
    assert flat_specs[next(p for p in flat_specs if "logits_dense" in str(p))] == jax.sharding.PartitionSpec(
        "embed", "vocab"
    )


def test_shared_relpos_table_and_untied_head(tiny_params):
    assert tiny_params["encoder"]["relpos_bias"]["rel_embedding"].shape == (4, 32)
    assert tiny_params["decoder"]["relpos_bias"]["rel_embedding"].shape == (4, 32)
    assert "relpos_bias" not in tiny_params["encoder"]["layers_0"]["attention"]
    assert tiny_params["token_embedder"]["embedding"].shape == (64, 32)
    assert tiny_params["decoder"]["logits_dense"]["kernel"].shape == (32, 64)


def test_relative_position_bucket_matches_t5_values():
    rel = jnp.array([-200, -20, -3, -1, 0, 1, 3, 20, 200])
    bi = relative_position_bucket(rel, True, 32, 128)
    causal = relative_position_bucket(rel, False, 32, 128)
    # Bidirectional: future keys (rel > 0) use buckets 16..31, exact up to offset 7.
    np.testing.assert_array_equal(bi, [15, 10, 3, 1, 0, 17, 19, 26, 31])
    np.testing.assert_array_equal(causal, [31, 17, 3, 1, 0, 0, 0, 0, 0])


def test_cached_decoding_matches_teacher_forcing(tiny_params):
    model = Transformer(TINY)
    variables = {"params": tiny_params}
    encoded = model.apply(variables, ENC, method=Transformer.encode)
    full = model.apply(variables, encoded, ENC, DEC, method=Transformer.decode)
    _, cache_vars = model.apply(
        variables, encoded, ENC, jnp.zeros_like(DEC), decode=True, mutable=["cache"], method=Transformer.decode
    )
    cache = cache_vars["cache"]
    steps = []
    for t in range(DEC.shape[1]):
        logits, cache_vars = model.apply(
            {"params": tiny_params, "cache": cache},
            encoded,
            ENC,
            DEC[:, t : t + 1],
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )
        cache = cache_vars["cache"]
        steps.append(logits[:, 0])
    assert_close(np.stack(steps, axis=1), full, DEEP)  # one token at a time against the whole block
    assert int(cache["decoder"]["layers_0"]["self_attention"]["cache_index"]) == DEC.shape[1]


def test_bfloat16_compute_close_to_float32(tiny_params):
    bf16 = TINY.replace(dtype="bfloat16")
    bf16_params = init_params(bf16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_params))
    logits32 = Transformer(TINY).apply({"params": tiny_params}, ENC, DEC)
    logits16 = Transformer(bf16).apply({"params": tiny_params}, ENC, DEC)
    assert logits16.dtype == jnp.bfloat16 and logits32.dtype == jnp.float32
    diff = np.abs(np.asarray(logits16, np.float32) - np.asarray(logits32))
    assert diff.max() < 0.1 * np.abs(np.asarray(logits32)).max()
    assert not np.array_equal(np.asarray(logits16, np.float32), np.asarray(logits32))


@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_dropout_is_off_by_default_and_random_when_enabled(tiny_params):
    model = Transformer(TINY.replace(dropout_rate=0.3))
    variables = {"params": tiny_params}
    apply = jax.jit(model.apply, static_argnames="enable_dropout")
    base = apply(variables, ENC, DEC)
    assert_close(base, Transformer(TINY).apply(variables, ENC, DEC), DEEP)  # jitted against eager
    a = apply(variables, ENC, DEC, enable_dropout=True, rngs={"dropout": jax.random.key(1)})
    b = apply(variables, ENC, DEC, enable_dropout=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(a - b)).max() > 1e-3


@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_tiny_model_memorises_one_batch():
    enc = jnp.array([[5, 9, 12, 7, 1, 0], [3, 4, 1, 0, 0, 0], [30, 31, 32, 33, 34, 1], [40, 2, 41, 1, 0, 0]], jnp.int32)
    targets = jnp.array([[8, 9, 10, 11, 1], [20, 21, 1, 0, 0], [50, 51, 52, 1, 0], [60, 61, 62, 63, 1]], jnp.int32)
    dec = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    weights = (targets > 0).astype(jnp.float32)
    model = Transformer(TINY)
    params = init_params(TINY, enc, dec)
    optimizer = optax.adam(1e-2)

    def loss_fn(p):
        logits = model.apply({"params": p}, enc, dec).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @jax.jit
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)
    first = None
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 3.0  # about log(64) at initialisation
    assert float(loss_fn(params)) < 0.05


def _xla_flops(config: T5Config, input_length: int, target_length: int) -> float:
    model = Transformer(config)
    enc = jnp.ones((1, input_length), jnp.int32)
    dec = jnp.ones((1, target_length), jnp.int32)
    params = jax.eval_shape(lambda: init_params(config, enc, dec))
    fwd = lambda p, e, d: model.apply({"params": p}, e, d)
    cost = jax.jit(fwd).lower(params, enc, dec).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _jaxpr_matmul_flops(config: T5Config, input_length: int, target_length: int) -> float:
    """2 * (output size) * (contracted size), summed over every dot_general of the forward."""
    model = Transformer(config)
    enc = jnp.ones((1, input_length), jnp.int32)
    dec = jnp.ones((1, target_length), jnp.int32)
    params = jax.eval_shape(lambda: init_params(config, enc, dec))
    return _count_matmul_flops(jax.make_jaxpr(lambda p: model.apply({"params": p}, enc, dec))(params).jaxpr)


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


def test_decoder_flops_count_a_cached_block_call():
    """Scoring 3 tokens after 5 cached ones (a cache exactly that long) in one call."""
    from cat_jax.models.t5 import T5Model

    li, context, block = 16, 5, 3
    model = T5Model(TINY)
    enc = jnp.ones((1, li), jnp.int32)
    params = jax.eval_shape(lambda: init_params(TINY, enc, DEC[:1]))
    state = jax.eval_shape(
        lambda p: model.set_positions(
            model.start_decoding(p, {"encoder_input_tokens": enc}, context + block)[0], jnp.array([context])
        ),
        params,
    )
    call = lambda p, s: model.decode_block(p, s, jnp.ones((1, block), jnp.int32))[0]
    counted = _count_matmul_flops(jax.make_jaxpr(call)(params, state).jaxpr)
    assert decoder_flops(TINY, li, context, block) == pytest.approx(counted, rel=1e-9)
    assert forward_flops(TINY, li, 8) == encoder_flops(TINY, li) + decoder_flops(TINY, li, 0, 8)


def test_encoder_hidden_at_a_depth_and_its_flops(tiny_params):
    """encoder_hidden(depth) runs the first `depth` layers (all of them: `encode`'s output), and
    encoder_layers_flops counts exactly its matmuls."""
    model, variables, li = Transformer(TINY), {"params": tiny_params}, ENC.shape[1]
    full = model.apply(variables, ENC, method=Transformer.encode)
    np.testing.assert_array_equal(model.apply(variables, ENC, 2, method=Transformer.encoder_hidden), full)
    one = model.apply(variables, ENC, 1, method=Transformer.encoder_hidden)
    assert one.shape == full.shape and not np.allclose(one, full, atol=1e-3)
    for depth in (0, 1, 2):
        call = lambda p, depth=depth: model.apply({"params": p}, ENC, depth, method=Transformer.encoder_hidden)
        counted = _count_matmul_flops(jax.make_jaxpr(call)(tiny_params).jaxpr) / ENC.shape[0]  # per example
        assert encoder_layers_flops(TINY, li, depth) == pytest.approx(counted, rel=1e-9)
    d, a = TINY.emb_dim, TINY.num_heads * TINY.head_dim
    assert encoder_flops(TINY, li) == encoder_layers_flops(TINY, li, 2) + 2 * 4 * li * d * a
    with pytest.raises(ValueError, match=r"encoder depth 3 must lie in \[0, 2\]"):
        model.apply(variables, ENC, 3, method=Transformer.encoder_hidden)
    with pytest.raises(ValueError, match=r"num_layers=3 must lie in \[0, 2\]"):
        encoder_layers_flops(TINY, li, 3)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        T5Config(
            vocab_size=512,
            emb_dim=512,
            num_heads=6,
            head_dim=64,
            mlp_dim=1024,
            num_encoder_layers=8,
            num_decoder_layers=8,
        ),
        T5Config(
            vocab_size=64,
            emb_dim=32,
            num_heads=3,
            head_dim=8,
            mlp_dim=48,
            num_encoder_layers=2,
            num_decoder_layers=3,
            mlp_activation="relu",
            logits_via_embedding=True,
        ),
    ],
    ids=["tiny", "small", "v1_0_relu_tied"],
)
def test_forward_flops_matches_xla(config):
    analytic = forward_flops(config, 16, 8)
    assert analytic == pytest.approx(_jaxpr_matmul_flops(config, 16, 8), rel=1e-9)
    xla = _xla_flops(config, 16, 8)
    assert abs(analytic - xla) / xla < 0.10, (analytic, xla)


def test_forward_flops_scaling():
    base = forward_flops(TINY, 16, 8)
    # Encoder and decoder work is linear plus a quadratic attention term in each length.
    d, a, f, v = 32, 32, 64, 64
    assert forward_flops(TINY, 16, 9) - base == pytest.approx(
        2 * (12 * d * a + 6 * d * f + 4 * 16 * a + 4 * (2 * 8 + 1) * a) + 2 * d * v
    )
    assert forward_flops(TINY, 17, 8) - base == pytest.approx(
        2 * (8 * d * a + 6 * d * f + 4 * (2 * 16 + 1) * a) + 2 * (4 * 8 * a + 4 * d * a)
    )
    assert forward_flops(TINY, 32, 16) > 2 * base
    assert forward_flops(TINY.replace(vocab_size=128), 16, 8) - base == 2 * 8 * d * 64


def test_config_round_trip_and_validation():
    cfg = TINY.replace(dtype="bfloat16", dropout_rate=0.1)
    assert T5Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["dtype"] == "bfloat16" and cfg.compute_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        TINY.replace(dtype="float16")
    with pytest.raises(ValueError, match="emb_dim"):
        TINY.replace(emb_dim=0)
    with pytest.raises(ValueError, match="dropout_rate"):
        TINY.replace(dropout_rate=1.0)
    with pytest.raises(ValueError, match="Unknown T5Config fields \\['emb'\\]"):
        T5Config.from_dict({**TINY.to_dict(), "emb": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.emb_dim = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="vocab_size is None"):
        Transformer(TINY.replace(vocab_size=None)).init({"params": jax.random.key(0)}, ENC, DEC)


EXPECTED_SHAPES = {
    "tiny": (32, 4, 8, 64, 2, 2),
    "small": (512, 6, 64, 1024, 8, 8),
    "base": (768, 12, 64, 2048, 12, 12),
    "large": (1024, 16, 64, 2816, 24, 24),
    "xl": (2048, 32, 64, 5120, 24, 24),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_model_gin_file_builds_config(name):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(GIN_DIR))
        gin.parse_config_file(f"models/{name}.gin")
        cfg = T5Config()
    finally:
        gin.clear_config()
    assert cfg.vocab_size is None
    assert (
        cfg.emb_dim,
        cfg.num_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.num_encoder_layers,
        cfg.num_decoder_layers,
    ) == EXPECTED_SHAPES[name]
    text = (GIN_DIR / "models" / f"{name}.gin").read_text()
    assert text.startswith("#")
    assert not any(line.startswith("T5Config.vocab_size") for line in text.splitlines())


@pytest.mark.parametrize("name,vocab,expected", [("tiny", 64, 49_792 + 2 * 64 * 32), ("small", 32128, 76_961_152)])
def test_parameter_counts_in_gin_headers(name, vocab, expected):
    cfg = T5Config(
        vocab_size=vocab,
        **dict(
            zip(
                ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers"),
                EXPECTED_SHAPES[name],
            )
        ),
    )
    shapes = jax.eval_shape(lambda: init_params(cfg))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == expected
