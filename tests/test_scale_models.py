"""Rematerialisation policies and scanned layers, both families: the same losses, gradients,
logits, decoding and input embeddings as the plain per-layer model; the two parameter layouts
convert both ways; a scanned checkpoint exports to the Hub's layout and imports back."""

from __future__ import annotations

import functools
import json
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import linen as nn
from safetensors.numpy import load_file
from tolerances import DEEP, SHALLOW, assert_close

from cat_jax import models, partitioning
from cat_jax.checkpoints import save_host_state
from cat_jax.decoding import greedy_decode
from cat_jax.errors import ConfigError
from cat_jax.jobs import export_checkpoint as exporter
from cat_jax.jobs import import_checkpoint as importer
from cat_jax.jobs import train as train_job
from cat_jax.models.convert import tree
from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.models.t5.config import T5Config
from cat_jax.objectives.token_loss import LossOptions, token_loss

T5_TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=3, num_decoder_layers=2
)
# Qwen3-style switches (biases, q/k norms) and a sliding window on every layer (Mistral).
DECODER_TINY = DecoderConfig(
    model_type="qwen3",
    vocab_size=64,
    emb_dim=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    qkv_bias=True,
    qk_norm=True,
    sliding_window=4,
)
CONFIGS = {"t5": T5_TINY, "decoder": DECODER_TINY}
EXAMPLES = {
    "encoder_input_tokens": np.array([[5, 9, 12, 7, 1, 0, 0, 0], [3, 4, 1, 0, 0, 0, 0, 0]], np.int32),
    "decoder_input_tokens": np.array([[0, 8, 9, 10, 11, 1], [0, 20, 21, 1, 0, 0]], np.int32),
    "decoder_target_tokens": np.array([[8, 9, 10, 11, 1, 0], [20, 21, 1, 0, 0, 0]], np.int32),
    "decoder_loss_weights": np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], np.float32),
}


class _Vocab:
    """What the decoder family's make_batch reads of a vocabulary."""

    eos_id = 1
    prompt_prefix_ids = (2,)
    prompt_suffix_ids = ()


def _batch(model: models.Model) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in model.make_batch(EXAMPLES, _Vocab()).items()}


@functools.lru_cache(maxsize=None)
def _params(config) -> dict:
    """Initial parameters (per-layer layout) with every leaf moved by N(0, 0.3), so that no layer
    is near the identity and a mixed-up layer order shows."""

    def make():
        params = nn.meta.unbox(models.build(config).init_params(jax.random.key(0)))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree_util.tree_unflatten(
            treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        )

    return jax.jit(make)()


def _loss_and_grads(model: models.Model, params, batch, rng=None):
    """The CAT loss (the small-or-large mask against fixed teacher logits, right on the even
    positions) and its gradients."""
    targets = batch["decoder_target_tokens"]
    right = jax.nn.one_hot(targets, model.vocab_size) * 10.0 * (jnp.arange(targets.shape[1]) % 2 == 0)[:, None]
    teacher = jax.random.normal(jax.random.key(7), targets.shape + (model.vocab_size,)) + right
    loss_fn = token_loss(model, LossOptions(mask="small_or_large", alpha=0.5))

    def loss(p):
        return loss_fn(p, batch, rng, teacher, 0)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


# ---- rematerialisation ----------------------------------------------------------------------------


# Slow tier: two compiled backward passes per case (15-20 s each on 2 cores); the fast tier keeps
# the run_info and gin checks of the policy.
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dot"])
@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_remat_loss_and_gradients_equal_no_remat(family, policy):
    config = CONFIGS[family]
    params = _params(config)
    plain = models.build(config)
    batch = _batch(plain)
    want_loss, want_grads = _loss_and_grads(plain, params, batch)
    got_loss, got_grads = _loss_and_grads(models.build(config.replace(remat_policy=policy)), params, batch)
    assert_close(got_loss, want_loss, SHALLOW)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree_util.tree_leaves(want_grads)):
        assert_close(got, want, DEEP, jax.tree_util.keystr(path))
    assert float(jnp.max(jnp.abs(want_grads["token_embedder" if family == "t5" else "embedder"]["embedding"]))) > 0


@pytest.mark.slow
def test_remat_with_dropout_recomputes_the_same_masks():
    """Dropout inside a rematerialised layer draws the same masks when it is recomputed."""
    config = T5_TINY.replace(dropout_rate=0.2)
    params = _params(config)
    plain = models.build(config)
    batch, rng = _batch(plain), jax.random.key(3)
    want_loss, want_grads = _loss_and_grads(plain, params, batch, rng)
    got_loss, got_grads = _loss_and_grads(models.build(config.replace(remat_policy="full")), params, batch, rng)
    assert_close(got_loss, want_loss, SHALLOW)
    assert_close(
        got_grads["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
        want_grads["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
        DEEP,
    )
    no_dropout, _ = _loss_and_grads(plain, params, batch)
    assert abs(float(no_dropout) - float(want_loss)) > 1e-3  # dropout was on


@pytest.mark.slow
def test_remat_saves_less_in_the_compiled_step():
    """XLA's temporary bytes of the gradient step: full < save_dot < none on a model whose
    activations dominate (the numbers benchmarks/scale_memory.py reports at scale)."""
    config = DECODER_TINY.replace(num_layers=4, emb_dim=64, mlp_dim=512)
    examples = {k: np.repeat(v, 8, axis=0) for k, v in EXAMPLES.items()}
    temp = {}
    for policy in ("none", "save_dot", "full"):
        model = models.build(config.replace(remat_policy=policy))
        batch = {k: jnp.asarray(v) for k, v in model.make_batch(examples, _Vocab()).items()}
        params = jax.eval_shape(lambda: _params(config))
        grad = jax.jit(jax.grad(lambda p, b, m=model: m.logits(p, b).astype(jnp.float32).sum()))
        temp[policy] = grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["save_dot"] < temp["none"], temp


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_remat_policy_is_a_run_setting_not_recorded_in_run_info(family):
    config = CONFIGS[family].replace(remat_policy="full")
    recorded = models.build(config).describe()
    assert "remat_policy" not in recorded["model_config"]
    assert recorded["model_config"]["scan_layers"] is False
    # A teacher or eval job rebuilds the model from run_info: no remat, the same values.
    again = models.from_run_info(recorded)
    assert again.config == CONFIGS[family]
    # run_infos written before the fields existed describe the plain model.
    old = {k: v for k, v in recorded["model_config"].items() if k != "scan_layers"}
    assert models.config_from_run_info({**recorded, "model_config": old}) == CONFIGS[family]


def test_remat_and_scan_are_gin_settings_and_are_checked():
    gin.clear_config()
    try:
        gin.parse_config(["T5Config.remat_policy = 'save_dot'", "DecoderConfig.scan_layers = True"])
        t5 = T5Config(emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16, num_encoder_layers=1, num_decoder_layers=1)
        decoder = DecoderConfig(emb_dim=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)
    finally:
        gin.clear_config()
    assert t5.remat_policy == "save_dot" and decoder.scan_layers is True
    with pytest.raises(ConfigError, match="remat_policy must be one of"):
        T5_TINY.replace(remat_policy="dots")
    with pytest.raises(ValueError, match="remat_policy must be one of"):  # DecoderConfig's checks raise ValueError
        DECODER_TINY.replace(remat_policy="minimal")
    with pytest.raises(ConfigError, match="scan_layers=False"):  # Gemma 2: windows on the even layers only
        DECODER_TINY.replace(sliding_window_layers="even", scan_layers=True)


# ---- scanned layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5", "decoder"])
@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_stack_then_unstack_is_the_identity_and_fits_the_scanned_model(family):
    config = CONFIGS[family]
    params = _params(config)
    stacked = tree.stack_layers(params)
    layers = config.num_layers if family == "decoder" else config.num_encoder_layers
    scanned_model = models.build(config.replace(scan_layers=True))
    abstract, specs = scanned_model.abstract_params()
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(abstract)
    for got, want in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(abstract)):
        assert got.shape == want.shape
    stack_specs = specs["layers"] if family == "decoder" else specs["encoder"]["layers"]
    for spec in jax.tree_util.tree_leaves(stack_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
        assert spec[0] == "layers" and set(spec) <= set(partitioning.LOGICAL_AXES), spec
    assert dict(partitioning.DEFAULT_LOGICAL_AXIS_RULES)["layers"] is None  # replicated
    first = stacked["layers"] if family == "decoder" else stacked["encoder"]["layers"]
    assert jax.tree_util.tree_leaves(first)[0].shape[0] == layers
    back = tree.unstack_layers(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(got, want)
    # numpy trees (the converters') stay numpy
    host = tree.stack_layers(jax.tree_util.tree_map(np.asarray, params))
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(host))


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_scanned_logits_equal_the_per_layer_logits(family):
    """The fast tier's check of the scanned stack (the slow test below covers the rest)."""
    config = CONFIGS[family]
    params = _params(config)
    plain, scanned = models.build(config), models.build(config.replace(scan_layers=True))
    batch = _batch(plain)
    assert_close(jax.jit(scanned.logits)(tree.stack_layers(params), batch), jax.jit(plain.logits)(params, batch), DEEP)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_scanned_model_equals_the_per_layer_model(family):
    """Logits, CAT loss and gradients, greedy decoding, a rollback, input embeddings at every
    depth and FLOPs: the scanned model with stacked parameters against the per-layer one."""
    config = CONFIGS[family]
    params = _params(config)
    plain, scanned = models.build(config), models.build(config.replace(scan_layers=True, remat_policy="full"))
    stacked = tree.stack_layers(params)
    batch = _batch(plain)

    assert_close(jax.jit(scanned.logits)(stacked, batch), jax.jit(plain.logits)(params, batch), DEEP)
    want_loss, want_grads = _loss_and_grads(plain, params, batch)
    got_loss, got_grads = _loss_and_grads(scanned, stacked, batch)
    assert_close(got_loss, want_loss, SHALLOW)
    unstacked = tree.unstack_layers(got_grads)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(unstacked), jax.tree_util.tree_leaves(want_grads)):
        assert_close(got, want, DEEP, jax.tree_util.keystr(path))

    inputs = plain.decoding_inputs(batch)
    greedy = jax.jit(greedy_decode, static_argnums=(0, 3, 4))
    want = greedy(plain, params, inputs, 6, 1)
    got = greedy(scanned, stacked, inputs, 6, 1)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert_close(got.logprobs, want.logprobs, DEEP)
    assert len(set(np.asarray(want.tokens).ravel().tolist())) > 2  # not a constant output

    # Two tokens, a rollback of row 0 by one, and the same token again: the same logits as fed once.
    def fed_twice(model, params):
        state, first = model.start_decoding(params, inputs, 4)
        tokens = jnp.stack([first, jnp.full_like(first, 5)], axis=1)
        _, _, state = model.decode_block(params, state, tokens)
        state = model.set_positions(state, jnp.array([1, 2], jnp.int32))
        return model.decode_block(params, state, tokens[:, 1:])[:2]

    logits, hidden = jax.jit(fed_twice, static_argnums=0)(scanned, stacked)
    plain_logits, plain_hidden = jax.jit(fed_twice, static_argnums=0)(plain, params)
    assert_close(logits, plain_logits, DEEP)
    assert_close(hidden, plain_hidden, DEEP)

    embed = jax.jit(lambda model, params, depth: model.input_embedding(params, inputs, depth), static_argnums=(0, 2))
    for depth in range(plain.input_layers + 1):
        assert_close(embed(scanned, stacked, depth), embed(plain, params, depth), DEEP, str(depth))
    assert scanned.forward_flops(8, 6) == plain.forward_flops(8, 6)
    assert scanned.embedding_flops(8, 1) == plain.embedding_flops(8, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny T5 v1.1 Hub fixture imported (per layer), and the same parameters written as a
    scanned MODEL_DIR: (per-layer dir, scanned dir, config, flat params)."""
    base = tmp_path_factory.mktemp("scale")
    plain = base / "imported"
    importer.import_checkpoint(source=str(REPO / "tests" / "fixtures" / "hf_t5" / "t5_v1_1"), model_dir=str(plain))
    config, info, flat, _ = exporter.read_params(str(plain))
    scanned = base / "scanned"
    scanned.mkdir()
    save_host_state(str(scanned), 0, {"params": tree.stack_layers(tree.unflatten(flat))}, {})
    info["model_config"]["scan_layers"] = True
    (scanned / "run_info.json").write_text(json.dumps(info))
    shutil.copyfile(plain / "spiece.model", scanned / "spiece.model")
    return plain, scanned, config, flat


def test_scanned_checkpoint_exports_to_the_hub_and_imports_back_equal(checkpoints, tmp_path):
    """A scanned MODEL_DIR exports the Hub's tensors bitwise (as its per-layer twin does) and
    imports back (per layer) to the same parameters."""
    plain, scanned, config, flat = checkpoints
    out = exporter.export_checkpoint(model_dir=str(scanned), output_dir=str(tmp_path / "hf"))
    want = exporter.export_checkpoint(model_dir=str(plain), output_dir=str(tmp_path / "hf_plain"))
    got_tensors, want_tensors = load_file(f"{out}/model.safetensors"), load_file(f"{want}/model.safetensors")
    assert sorted(got_tensors) == sorted(want_tensors)
    for key, value in want_tensors.items():
        np.testing.assert_array_equal(got_tensors[key], value, key)
    importer.import_checkpoint(source=out, model_dir=str(tmp_path / "again"))
    again_config, _, again, _ = exporter.read_params(str(tmp_path / "again"))
    assert again_config == config and sorted(again) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(again[key], value, key)


@pytest.mark.parametrize("scan", [True, False])
def test_initial_checkpoint_restores_into_either_layout(checkpoints, scan):
    """Fine-tuning (train.initial_checkpoint_dir) a checkpoint of either layout with a model of
    either layout gets the same parameters, restacked where the layouts differ."""
    plain, scanned, config, flat = checkpoints
    model = models.build(config.replace(scan_layers=scan))
    mesh = partitioning.make_mesh([("data", 1)], devices=jax.devices()[:1])
    abstract, specs = model.abstract_params()
    shardings = partitioning.tree_shardings(mesh, specs, partitioning.logical_axis_rules())
    want = tree.unflatten(flat)
    want = tree.stack_layers(want) if scan else want
    for directory in (plain, scanned):
        params, _ = train_job.initial_params(str(directory), model, abstract, shardings)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
        for got, value in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(got), value)
        assert jax.tree_util.tree_leaves(params)[0].sharding == jax.tree_util.tree_leaves(shardings)[0]
