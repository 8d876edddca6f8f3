"""Sharded equals unsharded, and activation sharding takes effect: the train step's loss,
gradients and update, the logits' shardings, the step's HLO and its per-device temporary memory,
on 8 forced CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from tolerances import DEEP, assert_close

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow


SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from cat_jax import partitioning
from cat_jax.models.t5 import T5Config, T5Model
from cat_jax.objectives.token_loss import LossOptions, token_loss
from cat_jax.optimizers import make_optimizer
from cat_jax.train_state import state_shardings, init_train_state
from cat_jax.train_step import compile_train_step, make_train_step

cfg = T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
               num_encoder_layers=2, num_decoder_layers=2)
model = T5Model(cfg)
model_loss = token_loss(model, LossOptions())
rng = np.random.default_rng(0)
B, LI, LT = 8, 12, 10
tgt = rng.integers(2, 128, (B, LT)).astype(np.int32)
tgt[:, -3:] = 0
batch = {"encoder_input_tokens": rng.integers(2, 128, (B, LI)).astype(np.int32),
         "decoder_target_tokens": tgt,
         "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], 1),
         "decoder_loss_weights": (tgt > 0).astype(np.float32)}
tx, schedule = make_optimizer(10)
teacher = T5Model(cfg.replace(emb_dim=48, dtype="bfloat16"))


def teacher_params():
    return jax.jit(lambda k: nn.meta.unbox(teacher.init_params(k)))(jax.random.key(1))


def cat_step(mesh, rules, compile_memory):
    # The compiled CAT-distill step (the trainer's compile path): sharding constraints in its HLO
    # and XLA's per-device temporary bytes.
    big = T5Model(cfg.replace(vocab_size=2048))
    big_teacher = T5Model(cfg.replace(vocab_size=2048, emb_dim=48, dtype="bfloat16"))
    abstract, shardings = state_shardings(big, tx, mesh, rules)
    t_abstract, t_specs = big_teacher.abstract_params()
    t_abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), t_abstract)
    shapes = {k: jax.ShapeDtypeStruct((16,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    step = make_train_step(token_loss(big, LossOptions(mask="small_or_large", alpha=0.5)), tx, schedule,
                           big_teacher.logits)
    args = (step, abstract, shardings, shapes, partitioning.batch_sharding(mesh, rules), t_abstract,
            partitioning.tree_shardings(mesh, t_specs, rules), mesh)
    with partitioning.activation_sharding(mesh, rules):
        hlo = jax.jit(step).lower(abstract, shapes, t_abstract).as_text()
    out = {"hlo_constraints": hlo.count("sharding_constraint")}
    if compile_memory:
        out["cat_temp_bytes"] = compile_train_step(*args, rules).memory["temp_size_in_bytes"]
    return out


out = {}
MEMORY_MESHES = ("data2", "data2_model4")  # the CAT step compiled for its memory
single = partitioning.make_mesh([("data", 1), ("fsdp", 1), ("model", 1)], devices=jax.devices()[:1])
_, single_shardings = state_shardings(model, tx, single, partitioning.logical_axis_rules())
state0 = init_train_state(model, tx, 0, single_shardings)
t_params0 = teacher_params()
_, t_specs = teacher.abstract_params()
for name, shape in [("single", [("data", 1), ("fsdp", 1), ("model", 1)]),
                    ("data2", [("data", 2), ("fsdp", 1), ("model", 1)]),
                    ("data2_model4", [("data", 2), ("fsdp", 1), ("model", 4)]),
                    ("fsdp4_model2", [("data", 1), ("fsdp", 4), ("model", 2)])]:
    n = 1
    for _, s in shape: n *= s
    mesh = partitioning.make_mesh(shape, devices=jax.devices()[:n])
    rules = partitioning.logical_axis_rules()
    abstract, shardings = state_shardings(model, tx, mesh, rules)
    state = jax.device_put(state0, shardings)  # the same values, placed by this mesh's rules
    t_params = jax.device_put(t_params0, partitioning.tree_shardings(mesh, t_specs, rules))
    bs = partitioning.batch_sharding(mesh, rules)
    gb = partitioning.global_batch(batch, bs)
    def probe(params, t_params, b):
        loss, grads = jax.value_and_grad(lambda p: model_loss(p, b, None, None, 0)[0])(params)
        return loss, grads, model.logits(params, b), teacher.logits(t_params, b)
    if name == "data2":  # compiled for its CAT-step memory only (the baseline of the model split)
        out[name] = cat_step(mesh, rules, True)
        continue
    with partitioning.activation_sharding(mesh, rules):
        loss, grads, logits, teacher_logits = jax.jit(
            probe, in_shardings=(shardings.params, None, bs),
            out_shardings=(partitioning.replicated(mesh), shardings.params, None, None))(state.params, t_params, gb)
        step = jax.jit(make_train_step(model_loss, tx, schedule), in_shardings=(shardings, bs, None),
                       out_shardings=(shardings, partitioning.replicated(mesh)))
        new_state, metrics = step(state, gb, None)
    flat = {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    leaves = jax.tree_util.tree_leaves_with_path
    new = {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in leaves(new_state.params)}
    specs = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in leaves(state.params)}
    out[name] = {"loss": float(loss), "grads": flat, "params_after": new,
                 "param_bytes": partitioning.per_device_bytes(state.params), "specs": specs,
                 "logits_spec": list(logits.sharding.spec), "teacher_logits_spec": list(teacher_logits.sharding.spec),
                 **cat_step(mesh, rules, name in MEMORY_MESHES)}
print("RESULT" + json.dumps(out))
"""


MEMORY = ("data2", "data2_model4")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("mesh", ["data2_model4", "fsdp4_model2"])
def test_sharded_loss_and_grads_equal_single_device(results, mesh):
    ref, got = results["single"], results[mesh]
    # One device against a sharded program: reductions split across devices (tests/tolerances.py).
    assert_close(got["loss"], ref["loss"], DEEP)
    assert got["grads"].keys() == ref["grads"].keys()
    for k in ref["grads"]:
        g_ref = np.array(ref["grads"][k])
        assert_close(np.array(got["grads"][k]), g_ref, DEEP, err_msg=k)
        # Adam's first update is about lr * sign(g): where |g| is at rounding level its sign, and
        # so the update, is noise. Compare the updated parameters where the gradient is resolved.
        resolved = (g_ref == 0) | (np.abs(g_ref) > 1e-4 * np.abs(g_ref).max())
        assert resolved.mean() > 0.9, k
        assert_close(
            np.array(got["params_after"][k])[resolved], np.array(ref["params_after"][k])[resolved], DEEP, err_msg=k
        )


def test_parameters_are_split_as_the_mesh_says(results):
    single = results["single"]["param_bytes"]
    assert results["data2_model4"]["param_bytes"] < single
    assert results["fsdp4_model2"]["param_bytes"] < results["data2_model4"]["param_bytes"]
    specs = results["data2_model4"]["specs"]
    assert any("model" in s for s in specs.values())
    assert any("fsdp" in s for s in results["fsdp4_model2"]["specs"].values())


@pytest.mark.parametrize("mesh", ["data2_model4", "fsdp4_model2"])
def test_student_and_teacher_logits_are_batch_and_vocab_sharded(results, mesh):
    for key in ("logits_spec", "teacher_logits_spec"):
        spec = results[mesh][key]
        assert spec[0] in ("data", "fsdp", ["data", "fsdp"]) and spec[1] is None and spec[2] == "model", (key, spec)


def test_activation_constraints_are_in_the_compiled_step_and_cut_memory(results):
    assert all(results[m]["hlo_constraints"] > 10 for m in results)
    temp = {m: results[m]["cat_temp_bytes"] for m in MEMORY}
    # The CAT step's temporaries are dominated by [batch, length, vocab] logits and softmaxes of
    # both models: split 4 ways over `model`, they shrink with it.
    assert temp["data2_model4"] < 0.4 * temp["data2"], temp


def test_unknown_logical_axis_names_are_an_error():
    from cat_jax import partitioning
    from cat_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown logical axes \['vocabulary'\] / mesh axes \['tensor'\]"):
        partitioning.logical_axis_rules((("batch", "data"), ("vocabulary", "model"), ("mlp", "tensor")))


def test_a_restored_models_logits_function_carries_its_rules():
    """Traced outside `activation_sharding` (as a caller may), a FrozenModel's logits function
    constrains its activations exactly as it does inside: the rules travel with the function."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from cat_jax import partitioning
    from cat_jax.frozen_model import FrozenModel
    from cat_jax.models.t5 import T5Config, T5Model

    config = T5Config(
        vocab_size=128, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1
    )
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules()
    params = nn.unbox(T5Model(config).init_params(jax.random.key(0)))
    frozen = FrozenModel("unused", 0, T5Model(config), params, None, {}, mesh, rules)
    batch = {"encoder_input_tokens": jnp.ones((2, 8), jnp.int32), "decoder_input_tokens": jnp.ones((2, 8), jnp.int32)}

    def constraints(fn) -> list[str]:
        text = jax.jit(fn).lower(params, batch).as_text()
        return [line.split("=", 1)[1] for line in text.splitlines() if "sharding_constraint" in line]

    outside = constraints(frozen.logits_fn)
    with partitioning.activation_sharding(mesh, rules):
        inside = constraints(frozen.model.logits)
    assert len(inside) > 10 and outside == inside
    np.testing.assert_array_equal(
        np.asarray(frozen.logits_fn(params, batch)),  # eager calls work too
        np.asarray(jax.jit(frozen.model.logits)(params, batch)),
    )
