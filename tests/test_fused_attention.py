"""`attention_impl="dot_product"` (jax.nn.dot_product_attention, XLA on CPU) against the einsum path:
logits and gradients of both families with padding, grouped heads and sliding windows, cached
decoding (blocks and per-row positions), the combinations it refuses, and run_infos written before
the field existed."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tolerances import BFLOAT16, DEEP, assert_close

from cat_jax import models
from cat_jax.data import packing
from cat_jax.data.arrays import ExampleArrays
from cat_jax.errors import ConfigError
from cat_jax.models import attention
from cat_jax.models.decoder import DecoderConfig
from cat_jax.models.t5 import T5Config

T5_TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
)
# Grouped heads (4 query heads over 2 key/value heads), Qwen's biases and q/k norms, Gemma 2's
# sandwich norms and scalar, a sliding window on even layers; no score soft-capping.
DECODER_TINY = DecoderConfig(
    vocab_size=64,
    emb_dim=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=40,
    qkv_bias=True,
    qk_norm=True,
    sandwich_norms=True,
    query_pre_attn_scalar=12.0,
    sliding_window=3,
    sliding_window_layers="even",
)


def t5_batch() -> dict[str, np.ndarray]:
    """Two rows, right-padded inputs and targets (token 0)."""
    enc = np.array([[5, 9, 12, 7, 1, 0, 0, 0], [3, 4, 1, 0, 0, 0, 0, 0]], np.int32)
    targets = np.array([[8, 9, 10, 11, 1, 0], [20, 21, 1, 0, 0, 0]], np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }


def decoder_batch() -> dict[str, np.ndarray]:
    """Two rows: left-padded prompts of 4 and 2 tokens, completions of 5 and 3 (EOS = 1)."""
    targets = np.array([[8, 9, 10, 11, 1, 0], [20, 21, 1, 0, 0, 0]], np.int32)
    return {
        "prompt_tokens": np.array([[2, 5, 6, 7, 8], [0, 0, 0, 3, 4]], np.int32),
        "prompt_mask": np.array([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], np.int32),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (np.cumsum(targets == 1, axis=1) - (targets == 1) == 0).astype(np.float32),
    }


CASES = {
    "t5": (T5_TINY, t5_batch),
    "decoder": (DECODER_TINY, decoder_batch),
}


@pytest.fixture
def fused_calls(monkeypatch) -> list[tuple]:
    """Records the shapes of every call of the fused function (proves the path is taken)."""
    calls: list[tuple] = []
    original = attention.dot_product_attention

    def recording(query, key, value, **kwargs):
        calls.append((query.shape, key.shape))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr("cat_jax.models.t5.layers.dot_product_attention", recording)
    monkeypatch.setattr("cat_jax.models.decoder.layers.dot_product_attention", recording)
    return calls


def _pair(config, dtype: str = "float32"):
    """(einsum model, dot_product model, shared parameters)."""
    einsum = models.build(config.replace(dtype=dtype))
    fused = models.build(config.replace(dtype=dtype, attention_impl="dot_product"))
    return einsum, fused, nn.meta.unbox(einsum.init_params(jax.random.key(1)))


def _loss(model, params, batch):
    """Weighted cross-entropy of the teacher-forced logits (its gradient reaches every parameter)."""
    logits = model.logits(params, batch).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * batch["decoder_loss_weights"]) / jnp.sum(batch["decoder_loss_weights"])


@pytest.mark.slow  # 15 s a family on 2 cores; the fast tier keeps the cached and packed comparisons
@pytest.mark.parametrize("family", sorted(CASES))
def test_logits_and_gradients_equal_the_einsum_path(family, fused_calls):
    config, make = CASES[family]
    einsum, fused, params = _pair(config)
    batch = make()
    want = jax.jit(einsum.logits)(params, batch)
    assert not fused_calls
    got = jax.jit(fused.logits)(params, batch)
    assert fused_calls, "the dot_product model never called the fused attention"
    assert_close(got, want, DEEP, "logits")
    grads_want = jax.jit(jax.grad(lambda p: _loss(einsum, p, batch)))(params)
    grads_got = jax.jit(jax.grad(lambda p: _loss(fused, p, batch)))(params)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(grads_want))
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads_got):
        assert_close(leaf, flat_want[path], DEEP, jax.tree_util.keystr(path))


def packed_rows() -> dict[str, np.ndarray]:
    """Three examples packed into two rows ([0, 1] and [2]): `cat_jax.data.packing`'s arrays."""
    rows_in = [[5, 9, 12, 7, 1], [3, 4, 1], [6, 7, 8, 1]]
    rows_t = [[8, 9, 1], [20, 21, 22, 1], [30, 1]]
    enc, targets = np.zeros((3, 10), np.int32), np.zeros((3, 8), np.int32)
    for i, (a, b) in enumerate(zip(rows_in, rows_t)):
        enc[i, : len(a)], targets[i, : len(b)] = a, b
    arrays = ExampleArrays(
        features={
            "encoder_input_tokens": enc,
            "decoder_input_tokens": np.zeros_like(targets),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.float32),
        },
        ids=np.array(["a", "b", "c"]),
        task_names=np.full(3, "t"),
        inputs_text=np.full(3, ""),
        targets_text=np.full(3, ""),
        input_lengths=np.array([len(r) for r in rows_in], np.int32),
        target_lengths=np.array([len(r) for r in rows_t], np.int32),
        extras=np.full(3, "{}"),
    )
    return packing.pack_rows(arrays, [[0, 1], [2]])


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_packed_logits_equal_the_einsum_path(family, fused_calls):
    """Segment masks and per-segment positions reach the fused path as they reach the einsums."""
    config = CASES[family][0]
    einsum, fused, params = _pair(config)
    vocab = types.SimpleNamespace(eos_id=1, prompt_prefix_ids=(2,), prompt_suffix_ids=())
    batch = einsum.make_batch(packed_rows(), vocab)
    want = jax.jit(einsum.logits)(params, batch)
    got = jax.jit(fused.logits)(params, batch)
    assert fused_calls
    real = batch["decoder_loss_weights"] > 0
    assert_close(np.asarray(got)[real], np.asarray(want)[real], DEEP)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_bfloat16_logits_close_to_the_einsum_path(family):
    config, make = CASES[family]
    einsum, fused, params = _pair(config, "bfloat16")
    batch = make()
    want = jax.jit(einsum.logits)(params, batch).astype(jnp.float32)
    assert_close(jax.jit(fused.logits)(params, batch).astype(jnp.float32), want, BFLOAT16)


@pytest.mark.parametrize("family", sorted(CASES))
def test_cached_decoding_equals_the_einsum_path(family, fused_calls):
    """start_decoding, one token, a block of three, then rows moved to their own positions."""
    config, make = CASES[family]
    einsum, fused, params = _pair(config)
    batch = make()
    feeds = [
        np.array([[4], [6]], np.int32),
        np.array([[7, 8, 9], [10, 11, 12]], np.int32),
        np.array([[13], [14]], np.int32),
    ]
    outputs = {}
    for name, model in (("einsum", einsum), ("dot_product", fused)):
        decode_block = jax.jit(model.decode_block)
        state, first = jax.jit(model.start_decoding, static_argnums=2)(params, model.decoding_inputs(batch), 8)
        logits = []
        for i, tokens in enumerate([first[:, None], *feeds]):
            if i == 3:
                state = model.set_positions(state, jnp.array([2, 4], jnp.int32))
            out, hidden, state = decode_block(params, state, jnp.asarray(tokens))
            logits += [out, hidden]
        outputs[name] = logits
    assert fused_calls
    for got, want in zip(outputs["dot_product"], outputs["einsum"]):
        assert_close(got, want, DEEP)


def test_refused_combinations_name_the_fix():
    with pytest.raises(ConfigError, match="dropout_rate=0.0 or attention_impl='einsum'"):
        T5_TINY.replace(dropout_rate=0.1, attention_impl="dot_product")
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        T5_TINY.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="cannot soft-cap attention scores.*attention_impl='einsum'"):
        DECODER_TINY.replace(attn_logit_softcap=50.0, attention_impl="dot_product")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        DECODER_TINY.replace(attention_impl="flash")
    # The final logits' soft-cap is not attention's: allowed.
    assert DECODER_TINY.replace(final_logit_softcap=30.0, attention_impl="dot_product").attention_impl == "dot_product"


@pytest.mark.parametrize("family", sorted(CASES))
def test_run_info_without_the_field_reads_as_einsum(family):
    config = CASES[family][0]
    recorded = config.to_dict()
    del recorded["attention_impl"]
    model = models.from_run_info({"model_family": family, "model_config": recorded})
    assert model.config.attention_impl == "einsum"
    assert model.config == config
    fused = models.from_run_info({"model_family": family, "model_config": recorded}, attention_impl="dot_product")
    assert fused.config.attention_impl == "dot_product"


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_resumed_run_may_switch_attention_impl_but_not_the_model(family, tmp_path):
    """attention_impl is an execution setting: resuming with the other one is logged into run_info's
    history and recorded as the run's; another model field is still refused."""
    from cat_jax import model_dir
    from cat_jax.errors import ModelDirError

    config = CASES[family][0]

    def info(cfg):
        return {
            "model_family": family,
            "model_config": cfg.to_dict(),
            "vocabulary": {"vocab_size": 48},
            "train_steps": 10,
        }

    model_dir.write_run_info(str(tmp_path), info(config))
    resumed = model_dir.check_resume(
        str(tmp_path), info(config.replace(attention_impl="dot_product")), allow_change=False
    )
    assert resumed["model_config"]["attention_impl"] == "dot_product"
    assert resumed["history"][-1]["execution_changes"] == [
        "model_config.attention_impl: 'einsum' (in MODEL_DIR) vs 'dot_product' (now)"
    ]
    assert "history" not in model_dir.check_resume(str(tmp_path), info(config), allow_change=False)
    with pytest.raises(ModelDirError, match="different model:\n  mlp_dim"):
        model_dir.check_resume(
            str(tmp_path),
            info(config.replace(attention_impl="dot_product", mlp_dim=2 * config.mlp_dim)),
            allow_change=True,
        )


def test_implementation_is_xla_here_and_cudnn_only_on_gpu_with_half_precision(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert attention.fused_implementation(jnp.bfloat16) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.fused_implementation(jnp.bfloat16) == "cudnn"
    assert attention.fused_implementation(jnp.float16) == "cudnn"
    assert attention.fused_implementation(jnp.float32) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention.fused_implementation(jnp.bfloat16) is None
