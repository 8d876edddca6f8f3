"""Decoder checkpoints in and out, against an independent implementation: tiny random Hub
checkpoints of every supported model_type and the logits / greedy continuations transformers
(PyTorch) computed for them (tests/fixtures/hf_decoder, made by its make_fixtures.py; no torch
here)."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file
from tolerances import DEEP, assert_close, near_ties

from cat_jax.errors import ConversionError
from cat_jax.models.convert.tree import unflatten
from cat_jax.models.decoder import Decoder, convert, decode_block, init_cache

FIXTURES = REPO / "tests" / "fixtures" / "hf_decoder"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def hub_tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture(scope="module")
def imported():
    """name -> (config, flat params) of every fixture."""
    return {name: convert.import_hf(str(FIXTURES / name)) for name in MODEL_TYPES}


def _logits(config, params, ids, mask):
    return np.asarray(Decoder(config).apply({"params": unflatten(params)}, jnp.asarray(ids), jnp.asarray(mask, bool)))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_imported_logits_equal_transformers(imported, name, side):
    config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    mask = ref[f"{side}_mask"] > 0
    got = _logits(config, params, ref[f"{side}_ids"], mask)
    want = ref[f"{side}_logits"]
    assert float(want[mask].std(axis=-1).mean()) > 1.0  # far from uniform
    # float32 on both sides, summed in different orders by XLA and PyTorch: a deep comparison
    # (tests/tolerances.py), at the real tokens (outputs at padding are meaningless on both sides).
    assert_close(got[mask], want[mask], DEEP, err_msg=f"{name} {side}-padded")


def test_fixtures_cover_what_they_claim(imported):
    cfg = {name: c for name, (c, _) in imported.items()}
    for c in cfg.values():
        assert c.num_kv_heads < c.num_heads and c.head_dim != c.emb_dim // c.num_heads
    assert cfg["llama"].rope_scaling == "llama3" and not cfg["llama"].tie_embeddings
    assert cfg["mistral"].sliding_window == 5 and cfg["mistral"].sliding_window_layers == "all"
    assert len([f for f in os.listdir(FIXTURES / "mistral") if f.endswith(".safetensors")]) >= 2
    assert cfg["qwen2"].qkv_bias and cfg["qwen2"].tie_embeddings and cfg["qwen3"].qk_norm
    assert cfg["gemma"].activation == "gelu" and cfg["gemma"].norm_plus_one and cfg["gemma"].scale_embeddings
    g2 = cfg["gemma2"]
    assert g2.activation == "gelu_tanh" and g2.sandwich_norms and g2.sliding_window_layers == "even"
    caps = (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar, g2.sliding_window)
    assert caps == (2.0, 5.0, 10, 4)
    ref = np.load(FIXTURES / "gemma2" / "reference.npz")
    assert ref["left_ids"].shape[1] > 2 * g2.sliding_window
    for name in MODEL_TYPES:  # the tokenizers' BOS rules as the brands ship them
        ref = np.load(FIXTURES / name / "reference.npz")
        first_real = ref["right_ids"][:, 0]
        assert (first_real == ref["bos_id"]).all() == (not name.startswith("qwen")), name


def _perturbed(config, params):
    """Defects an importer could make, each as (what, config, params)."""
    out = [
        (
            f"{k} dropped",
            config,
            {**params, k: np.zeros_like(v) if k.endswith("bias") or config.norm_plus_one else np.ones_like(v)},
        )
        for k, v in sorted(params.items())
        if k.endswith(("/scale", "/bias"))
    ]
    switches = dict(
        rope_scaling="none",
        rms_norm_eps=config.rms_norm_eps * 1000,
        sliding_window=None,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        scale_embeddings=False,
        activation="gelu" if config.activation == "gelu_tanh" else "gelu_tanh",
    )
    for key, value in switches.items():
        if getattr(config, key) != value and not (key == "activation" and config.activation == "silu"):
            out.append((f"{key}={value}", config.replace(**{key: value}), params))
    return out


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2"])
def test_tolerance_catches_real_import_errors(imported, name):
    """DEEP holds for a correct import, yet rejects each single defect: a norm scale or bias left at
    its initial value, a switch of the config ignored."""
    config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    mask = ref["left_mask"] > 0
    cases = _perturbed(config, params)
    assert len(cases) > 6
    for what, cfg, p in cases:
        with pytest.raises(AssertionError, match="of the reference's scale"):
            assert_close(_logits(cfg, p, ref["left_ids"], mask)[mask], ref["left_logits"][mask], DEEP, err_msg=what)


def _greedy(config, params, ids, mask, steps, eos):
    """Greedy continuation of left-padded prompts through the cache: the prompt block, then one
    token per call; after EOS a row emits its EOS-padding (the fixture's pad id is read by the test)."""
    model = Decoder(config)
    tree = unflatten(params)
    cache = init_cache(model, tree, ids.shape[0], ids.shape[1] + steps)
    logits, cache = decode_block(model, tree, cache, jnp.asarray(ids), jnp.asarray(mask, bool))
    out, done = [], np.zeros(ids.shape[0], bool)
    for _ in range(steps):
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1)).astype(np.int32)
        out.append(np.where(done, -1, token))
        done |= token == eos
        logits, cache = decode_block(model, tree, cache, jnp.asarray(token[:, None]))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_greedy_continuations_equal_transformers_generate(imported, name):
    config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    want, ids, mask = ref["generate_output_ids"], ref["left_ids"], ref["left_mask"] > 0
    got = _greedy(config, params, ids, mask, want.shape[1], int(ref["eos_id"]))
    decided = got >= 0  # up to and including each row's EOS
    # Exact equality is well posed only without near-ties on the path (tests/tolerances.py).
    path_ids = np.concatenate([ids, np.where(decided, want, ref["pad_id"])], axis=1)
    path_mask = np.concatenate([mask, decided], axis=1)
    path = _logits(config, params, path_ids, path_mask)[:, ids.shape[1] - 1 : -1]
    assert not near_ties(path)[decided].any(), "the fixture's greedy path has a near-tie: remake it"
    np.testing.assert_array_equal(got[decided], want[decided])
    assert (want[~decided] == ref["pad_id"]).all()


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_import_then_export_reproduces_the_hub_tensors_bitwise(imported, name, tmp_path):
    config, params = imported[name]
    source = json.load(open(FIXTURES / name / "config.json"))
    extra = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}
    out = convert.export_hf(config, params, str(tmp_path / "hf"), extra_config=extra)
    want, got = hub_tensors(FIXTURES / name), hub_tensors(out)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    exported = json.load(open(os.path.join(out, "config.json")))
    for key, value in source.items():
        if key not in ("dtype", "transformers_version", "initializer_range", "use_cache", "max_window_layers"):
            assert exported.get(key, value) == value, key  # (absent: the model class's default)
    # export -> import is the identity, bitwise
    back_config, back = convert.import_hf(out)
    assert back_config == config and sorted(back) == sorted(params)
    for key, value in params.items():
        assert np.array_equal(back[key], value), key


def test_bfloat16_export_and_config_round_trip(imported, tmp_path):
    config, params = imported["gemma2"]
    out = convert.export_hf(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
    tensors = hub_tensors(out)
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    back_config, back = convert.import_hf(out)
    assert back_config == config
    emb = params["embedder/embedding"]
    assert_close(back["embedder/embedding"], emb, 2**-8)
    for name, (cfg, _) in imported.items():
        assert convert.config_from_hf(convert.config_to_hf(cfg), name) == cfg


# ---------------------------------------------------------------------------------------------
# Bad input: named errors.


def _copy(tmp_path, name):
    target = tmp_path / f"{name}_copy"
    shutil.copytree(FIXTURES / name, target)
    return target


def _edit_config(directory, **changes):
    cfg = json.load(open(directory / "config.json"))
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_types_and_features_are_named_errors(tmp_path):
    source = _copy(tmp_path, "llama")
    _edit_config(source, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match="model_type='gpt2'.*llama, mistral, qwen2, qwen3, gemma, gemma2"):
        convert.import_hf(str(source))
    for changes, match in [
        (dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(num_attention_heads=3), "valid llama shape"),
    ]:
        _edit_config(
            source,
            **{
                "model_type": "llama",
                "rope_scaling": None,
                "attention_bias": False,
                "hidden_act": "silu",
                "num_attention_heads": 4,
                **changes,
            },
        )
        with pytest.raises(ConversionError, match=match):
            convert.import_hf(str(source))
    mixed = _copy(tmp_path, "gemma2")
    _edit_config(mixed, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    with pytest.raises(ConversionError, match="mix sliding and global layers"):
        convert.import_hf(str(mixed))
    with pytest.raises(ConversionError, match="not a Hugging Face checkpoint"):
        convert.import_hf(str(tmp_path))


def test_missing_extra_and_misshapen_tensors_are_named_errors(tmp_path):
    missing = _copy(tmp_path, "qwen3")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    tensors["model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ConversionError) as err:
        convert.import_hf(str(missing))
    assert "missing tensors: model.layers.1.self_attn.k_norm.weight" in str(err.value)
    assert "no place for: model.layers.0.self_attn.rotary.weight" in str(err.value)

    wrong = _copy(tmp_path, "qwen2")
    _edit_config(wrong, intermediate_size=25)
    with pytest.raises(
        ConversionError,
        match=r"shape mismatches: .*mlp.down_proj.weight: \(16, 24\) where the "
        r"config needs \(16, 25\)",
    ):
        convert.import_hf(str(wrong))

    sharded = _copy(tmp_path, "mistral")
    os.remove(sorted(sharded.glob("model-*.safetensors"))[-1])
    with pytest.raises(ConversionError, match="shard files that do not exist"):
        convert.import_hf(str(sharded))

    tied = _copy(tmp_path, "gemma")
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, tied / "model.safetensors")
    with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
        convert.import_hf(str(tied))


def test_export_refuses_what_the_model_type_cannot_express(imported, tmp_path):
    config, params = imported["qwen3"]
    with pytest.raises(ConversionError, match="cannot express .*'qk_norm': True"):
        convert.export_hf(config.replace(model_type="llama"), params, str(tmp_path / "x"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert.export_hf(config, params, str(tmp_path / "full"))
    assert not (tmp_path / "x").exists()
