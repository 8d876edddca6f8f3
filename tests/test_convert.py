"""Checkpoints in and out, against an independent implementation: tiny random Hub checkpoints and
the logits / greedy outputs `transformers` (PyTorch) computed for them (tests/fixtures/hf_t5, made by
its make_fixtures.py), and T5X checkpoints written here the way t5x's checkpoints.py writes them."""

from __future__ import annotations

import json
import os
import shutil

import flax.serialization
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_module
from safetensors.numpy import load_file, save_file
from tolerances import DEEP, assert_close, near_ties

from cat_jax import model_dir as model_dir_lib
from cat_jax import vocabulary_store
from cat_jax.decoding import greedy_decode
from cat_jax.errors import ConversionError, ModelDirError
from cat_jax.jobs import export_checkpoint as exporter
from cat_jax.jobs import import_checkpoint as importer
from cat_jax.models.convert import tree
from cat_jax.models.t5 import T5Model, Transformer, forward_flops
from cat_jax.models.t5.convert import t5x

FIXTURES = REPO / "tests" / "fixtures" / "hf_t5"
VARIANTS = ("t5_v1_0", "t5_v1_1", "mt5", "gated_silu", "t5_v1_1_sharded")


def hub_tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every fixture variant imported once: name -> (model_dir, config, flat params)."""
    base = tmp_path_factory.mktemp("imported")
    out = {}
    for name in VARIANTS:
        target = base / name
        importer.import_checkpoint(source=str(FIXTURES / name), model_dir=str(target))
        config, _, params, step = exporter.read_params(str(target))
        assert step == 0
        out[name] = (target, config, params)
    return out


def _logits(config, params, encoder_ids, decoder_ids):
    model = Transformer(config)
    return np.asarray(
        model.apply({"params": tree.unflatten(params)}, jnp.asarray(encoder_ids), jnp.asarray(decoder_ids))
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_imported_logits_equal_transformers(imported, name):
    _, config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    got = _logits(config, params, ref["encoder_input_ids"], ref["decoder_input_ids"])
    assert got.shape == ref["logits"].shape
    assert float(np.std(ref["logits"])) > 0.5  # the fixture's logits are far from uniform
    # float32 on both sides, summed in different orders by XLA and PyTorch (and by another CPU's
    # kernels): a deep comparison (tests/tolerances.py).
    assert_close(got, ref["logits"], DEEP, err_msg=name)


def _perturbed(config, params):
    """The defects an importer could make, each as (what, config, params)."""
    out = [("layer_norm_epsilon x1000", config.replace(layer_norm_epsilon=config.layer_norm_epsilon * 1000), params)]
    for key in sorted(params):
        if key.endswith("/scale") or key.endswith("rel_embedding"):
            dropped = np.ones_like(params[key]) if key.endswith("/scale") else np.zeros_like(params[key])
            out.append((f"{key} dropped", config, {**params, key: dropped}))
    return out


@pytest.mark.parametrize("name", ["t5_v1_1", "mt5"])
def test_tolerance_catches_real_import_errors(imported, name):
    """DEEP holds across CPUs for a correct import, yet rejects every single defect: each norm
    scale dropped, each relative-attention table dropped, the epsilon off by 1000x."""
    _, config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    cases = _perturbed(config, params)
    assert len(cases) > 10
    for what, cfg, p in cases:
        with pytest.raises(AssertionError, match="of the reference's scale"):
            assert_close(
                _logits(cfg, p, ref["encoder_input_ids"], ref["decoder_input_ids"]), ref["logits"], DEEP, err_msg=what
            )


def test_variants_cover_what_they_claim(imported):
    cfg = {name: c for name, (_, c, _) in imported.items()}
    assert cfg["t5_v1_0"].mlp_activation == "relu" and cfg["t5_v1_0"].logits_via_embedding
    assert cfg["t5_v1_0"].num_decoder_layers != cfg["t5_v1_0"].num_encoder_layers
    assert cfg["t5_v1_1"].mlp_activation == "gated-gelu" and not cfg["t5_v1_1"].logits_via_embedding
    assert cfg["gated_silu"].mlp_activation == "gated-silu" and cfg["gated_silu"].layer_norm_epsilon == 1e-3
    assert cfg["t5_v1_1"].num_heads * cfg["t5_v1_1"].head_dim != cfg["t5_v1_1"].emb_dim
    assert json.load(open(FIXTURES / "mt5" / "config.json"))["model_type"] == "mt5"
    assert len([f for f in os.listdir(FIXTURES / "t5_v1_1_sharded") if f.endswith(".safetensors")]) >= 2
    tied = hub_tensors(FIXTURES / "t5_v1_0")
    assert "lm_head.weight" not in tied and "encoder.embed_tokens.weight" not in tied
    # relu MLPs count 4*d*f FLOPs per token, gated ones 6*d*f
    relu, gated = cfg["t5_v1_0"], cfg["t5_v1_0"].replace(mlp_activation="gated-gelu")
    d, f, layers = relu.emb_dim, relu.mlp_dim, relu.num_encoder_layers + relu.num_decoder_layers
    assert forward_flops(gated, 4, 4) - forward_flops(relu, 4, 4) == 2 * d * f * 4 * layers


@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_1", "mt5", "gated_silu"])
def test_greedy_decoding_equals_transformers_generate(imported, name):
    _, config, params = imported[name]
    ref = np.load(FIXTURES / name / "reference.npz")
    want = ref["generate_output_ids"]
    out = greedy_decode(
        T5Model(config),
        tree.unflatten(params),
        {"encoder_input_tokens": jnp.asarray(ref["generate_input_ids"])},
        max_decode_length=want.shape[1],
        eos_id=1,
    )
    # Exact equality is well posed only without near-ties on the path (tests/tolerances.py): token 0
    # is never generated, so the decision is among the others.
    decoder_inputs = np.concatenate([np.zeros_like(want[:, :1]), want[:, :-1]], axis=1)
    path = _logits(config, params, ref["generate_input_ids"], decoder_inputs)[..., 1:]
    assert not near_ties(path)[want > 0].any(), "the fixture's greedy path has a near-tie: remake it"
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.parametrize("name", VARIANTS)
def test_import_then_export_reproduces_the_hub_tensors_bitwise(imported, name, tmp_path):
    model_dir, config, params = imported[name]
    out = exporter.export_checkpoint(model_dir=str(model_dir), output_dir=str(tmp_path / "hf"))
    want, got = hub_tensors(FIXTURES / name), hub_tensors(out)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    exported_config = json.load(open(os.path.join(out, "config.json")))
    source_config = json.load(open(FIXTURES / name / "config.json"))
    for key in (
        "model_type",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_decoder_layers",
        "num_heads",
        "feed_forward_proj",
        "tie_word_embeddings",
        "layer_norm_epsilon",
        "vocab_size",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
    ):
        # (the Hub leaves tie_word_embeddings out where it is the default, True)
        assert exported_config[key] == source_config.get(key, True if key == "tie_word_embeddings" else None), key
    assert open(os.path.join(out, "spiece.model"), "rb").read() == open(FIXTURES / name / "spiece.model", "rb").read()
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["extra_ids"] == 4
    # export -> import is the identity, bitwise
    again = tmp_path / "again"
    importer.import_checkpoint(source=out, model_dir=str(again))
    _, _, back, _ = exporter.read_params(str(again))
    assert sorted(back) == sorted(params)
    for key, value in params.items():
        assert np.array_equal(back[key], value), key


def test_imported_vocabulary_is_the_tokenizer_with_its_extra_ids(imported):
    model_dir, config, _ = imported["t5_v1_1"]
    info = model_dir_lib.read_run_info(str(model_dir))
    assert info["vocabulary_files"] == {"kind": "sentencepiece", "file": "spiece.model", "extra_ids": 4}
    vocab = vocabulary_store.model_vocabulary(str(model_dir))
    assert vocab.vocab_size == 104 <= config.vocab_size == 128
    assert info["vocabulary"] == {**info["vocabulary"], "class": "SentencePieceVocabulary", "size": 104}
    assert info["imported_from"]["format"] == "hf"


# ---------------------------------------------------------------------------------------------
# T5X checkpoints, written as t5x/checkpoints.py writes them.


def _t5x_target(params: dict[str, np.ndarray]) -> dict:
    """cat_jax's flat params under T5X's names (its norms are `*_layer_norm`)."""
    back = {v: k for k, v in t5x._NORMS.items()}  # pylint: disable=protected-access
    return tree.unflatten({"/".join(back.get(p, p) for p in path.split("/")): v for path, v in params.items()})


def write_t5x_legacy(step_dir, params: dict[str, np.ndarray], gcs_spec_for: str) -> None:
    """checkpoint_<step>/checkpoint (msgpack) + zarr arrays via TensorStore, as t5x's Checkpointer:
    partitioned leaves become relative `file` specs (one as a GCS spec, as written to a bucket),
    small unpartitioned ones (the norms) are stored inline."""
    import tensorstore as ts

    os.makedirs(step_dir)
    target = tree.flatten(_t5x_target(params))
    written = {}
    for path, array in target.items():
        if path.endswith("/scale"):
            written[path] = array  # inline in the msgpack, as t5x does for unpartitioned leaves
            continue
        name = "target." + path.replace("/", ".")
        chunks = [array.shape[0] // 2 if array.shape[0] % 2 == 0 else array.shape[0], *array.shape[1:]]
        metadata = {"compressor": {"id": "gzip"}, "shape": list(array.shape), "chunks": chunks}
        spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": name}, "metadata": metadata}
        absolute = json.loads(json.dumps(spec))
        absolute["kvstore"]["path"] = os.path.join(step_dir, name)
        ts.open(absolute, create=True, open=True).result().write(array).result()
        if path == gcs_spec_for:  # written to a bucket: gcs driver, dummy bucket, relative path
            spec = {
                "driver": "zarr",
                "dtype": "float32",
                "metadata": metadata,
                "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": name},
            }
        written[path] = spec
    state = {"step": np.int32(1000), "param_states": {"token_embedder": {"embedding": {"v": np.zeros(3)}}}}
    contents = {"version": 3, "optimizer": {"target": tree.unflatten(written), "state": state}}
    (step_dir / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(contents))


def write_t5x_orbax(step_dir, params: dict[str, np.ndarray]) -> None:
    """checkpoint_<step>/state/ as t5x's OrbaxCheckpointManagerInterface: an OCDBT PyTree of
    {"target": params, "state": {"step": ..., "param_states": ...}}."""
    import orbax.checkpoint as ocp

    os.makedirs(step_dir)
    item = {
        "target": _t5x_target(params),
        "state": {"step": np.int32(1000), "param_states": {"v": np.ones(4, np.float32)}},
    }
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(str(step_dir / "state"), args=ocp.args.PyTreeSave(item))


@pytest.mark.parametrize("layout", ["legacy", "orbax"])
def test_t5x_checkpoints_import_to_the_same_parameters(imported, tmp_path, layout):
    _, config, params = imported["t5_v1_1"]
    root = tmp_path / "t5x_model"
    step_dir = root / "checkpoint_1000"
    os.makedirs(root)
    if layout == "legacy":
        write_t5x_legacy(step_dir, params, gcs_spec_for="decoder/logits_dense/kernel")
    else:
        write_t5x_orbax(step_dir, params)
    assert t5x.detect(str(root)) == f"t5x_{layout}"
    gin_file = tmp_path / "model.gin"
    gin_file.write_text(
        f"network.T5Config.mlp_activations = ('gelu', 'linear')\n"
        f"NUM_HEADS = {config.num_heads}\nnetwork.T5Config.num_heads = %NUM_HEADS\n"
    )
    target = tmp_path / "imported"
    importer.import_checkpoint(
        source=str(root),
        model_dir=str(target),
        t5x_gin_file=str(gin_file),
        sentencepiece_model=str(FIXTURES / "spiece.model"),
        extra_ids=4,
    )
    got_config, info, back, _ = exporter.read_params(str(target))
    assert info["imported_from"]["format"] == f"t5x_{layout}" and info["imported_from"]["t5x_step"] == 1000
    assert got_config.replace(relative_attention_max_distance=config.relative_attention_max_distance) == config
    assert sorted(back) == sorted(params)
    for key, value in params.items():
        assert np.array_equal(back[key], value), key
    assert (
        model_dir_lib.read_run_info(str(target))["vocabulary"]
        == model_dir_lib.read_run_info(str(imported["t5_v1_1"][0]))["vocabulary"]
    )


def test_t5x_without_a_vocabulary_is_refused(imported, tmp_path):
    write_t5x_orbax(tmp_path / "checkpoint_5", imported["t5_v1_1"][2])
    with pytest.raises(ConversionError, match="does not carry its vocabulary"):
        importer.import_checkpoint(source=str(tmp_path / "checkpoint_5"), model_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: a named error, nothing written.


def _copy_variant(tmp_path, name="t5_v1_1"):
    target = tmp_path / f"{name}_copy"
    shutil.copytree(FIXTURES / name, target)
    return target


def test_bad_sources_are_named_errors_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="no format cat_jax knows"):
        importer.import_checkpoint(source=str(unknown), model_dir=str(out))

    decoder_only = _copy_variant(tmp_path)
    cfg = json.load(open(decoder_only / "config.json"))
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (decoder_only / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="model_type='gpt2'"):
        importer.import_checkpoint(source=str(decoder_only), model_dir=str(out))

    missing = _copy_variant(tmp_path, "t5_v1_0")
    tensors = load_file(missing / "model.safetensors")
    del tensors["decoder.block.2.layer.2.DenseReluDense.wo.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ConversionError) as err:
        importer.import_checkpoint(source=str(missing), model_dir=str(out))
    assert "missing tensors: decoder.block.2.layer.2.DenseReluDense.wo.weight" in str(err.value)
    assert "encoder.block.0.layer.0.SelfAttention.extra.weight" in str(err.value)

    wrong = _copy_variant(tmp_path, "gated_silu")
    cfg = json.load(open(wrong / "config.json"))
    cfg["d_ff"] += 1
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="shape mismatches: .*DenseReluDense.wi_0.weight"):
        importer.import_checkpoint(source=str(wrong), model_dir=str(out))

    truncated = _copy_variant(tmp_path, "mt5")  # an interrupted download
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model.safetensors cannot be read as safetensors .*Download it again"):
        importer.import_checkpoint(source=str(truncated), model_dir=str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".import-" in p.name]


def test_the_binary_loads_its_run_file_when_no_gin_file_is_given(tmp_path):
    proc = run_module(
        "cat_jax.import_checkpoint", [f"--gin.SOURCE={FIXTURES / 't5_v1_0'}", f"--gin.MODEL_DIR={tmp_path / 'm'}"]
    )
    assert "No --gin_file given: using gin_configs/runs/import_checkpoint.gin" in proc.stderr
    assert json.loads(proc.stdout)["imported_from"]["source"] == str(FIXTURES / "t5_v1_0")
    assert (tmp_path / "m" / "run_info.json").exists()


def test_an_occupied_model_dir_is_refused_untouched(imported, tmp_path):
    model_dir = imported["t5_v1_0"][0]
    before = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(ModelDirError, match="already holds a cat_jax run"):
        importer.import_checkpoint(source=str(FIXTURES / "t5_v1_1"), model_dir=str(model_dir))
    assert sorted(p.name for p in model_dir.iterdir()) == before
    proc = run_module(
        "cat_jax.import_checkpoint",
        [
            "--gin_file=gin_configs/runs/import_checkpoint.gin",
            f"--gin.SOURCE={FIXTURES / 'mt5'}",
            f"--gin.MODEL_DIR={model_dir}",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "already holds" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# End to end: imported models fine-tuned, CAT-trained and cascaded with their own vocabulary.


def _model_gin(path, config) -> str:
    """A model gin file with the imported architecture (what gin_configs/models/flan_t5_*.gin are
    for the published sizes)."""
    fields = {k: v for k, v in config.to_dict().items() if k != "dtype"}
    path.write_text("import cat_jax.models\n" + "".join(f"T5Config.{k} = {v!r}\n" for k, v in fields.items()))
    return str(path)


@pytest.mark.slow  # 20-60 s of compiles and decoding on 2 cores: the full suite runs it
def test_imported_models_fine_tune_cat_train_and_cascade(tmp_path):
    from conftest import DATA_CACHE, TINY_TASK, train_args

    large_hub, small_hub = tmp_path / "large_hub", tmp_path / "small_hub"
    for name, target in (("t5_v1_1", large_hub), ("t5_v1_0", small_hub)):
        importer.import_checkpoint(source=str(FIXTURES / name), model_dir=str(target))
    vocab = [f"--gin.get_vocabulary.from_model_dir={large_hub}"]
    large_gin = _model_gin(tmp_path / "large.gin", exporter.read_params(str(large_hub))[0])
    small_gin = _model_gin(tmp_path / "small.gin", exporter.read_params(str(small_hub))[0])
    large, small = tmp_path / "large", tmp_path / "small_cat"
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_large.gin",
            large,
            20,
            f"--gin_file={large_gin}",
            f"--gin.train.initial_checkpoint_dir={large_hub}",
            *vocab,
        ),
    )
    assert f"Restore: parameters from {large_hub} (step 0)" in proc.stderr
    run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            small,
            20,
            f"--gin_file={small_gin}",
            f"--gin.train.initial_checkpoint_dir={small_hub}",
            f"--gin.TEACHER_MODEL_DIR={large}",
            *vocab,
        ),
    )
    info = model_dir_lib.read_run_info(str(small))
    assert info["teacher"]["model_dir"] == str(large) and info["vocabulary"]["class"] == "SentencePieceVocabulary"
    out = tmp_path / "cascade"
    run_module(
        "cat_jax.cascade_eval",
        [
            "--gin_file=gin_configs/runs/cascade_eval.gin",
            f"--gin.load_split.cache_dir='{DATA_CACHE}'",
            f"--gin.LARGE_MODEL_DIR={large}",
            f"--gin.SMALL_MODEL_DIRS={{'cat': '{small}', 'hub': '{small_hub}'}}",
            f"--gin.OUTPUT_DIR={out}",
            f"--gin.MIXTURE_OR_TASK_NAME={TINY_TASK}",
            "--gin.MAX_EXAMPLES=16",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
            "--gin.BATCH_SIZE=8",
            "--gin.run_cascade_eval.rules=['chow_average', 'oracle']",
            *vocab,
        ],
    )
    curves = (out / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("task,small_model,rule") and len(curves) > 4
    assert {line.split(",")[1] for line in curves[1:]} == {"cat", "hub"}
