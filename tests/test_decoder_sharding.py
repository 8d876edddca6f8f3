"""The decoder sharded equals the decoder on one device: logits, a masked cross-entropy loss and its
gradients on 8 forced CPU devices over data, fsdp and model meshes (asymmetric, so swapped axes
fail), with the rules fitted to the config (2 key/value heads on a 4-way `model` axis are
replicated)."""

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
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
from cat_jax import partitioning
from cat_jax.models.decoder import Decoder, DecoderConfig, fit_axis_rules, init_params

cfg = DecoderConfig(model_type="gemma2", vocab_size=128, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
                    sandwich_norms=True, attn_logit_softcap=5.0, final_logit_softcap=10.0, sliding_window=4,
                    sliding_window_layers="even", qkv_bias=True, qk_norm=True)
model = Decoder(cfg)
rng = np.random.default_rng(0)
B, L = 8, 12
tokens = rng.integers(1, 128, (B, L)).astype(np.int32)
mask = np.ones((B, L), bool)
mask[::2, :3] = False  # left-padded rows
weights = mask[:, 1:].astype(np.float32)

boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
specs = nn.get_partition_spec(boxed)
params0 = nn.unbox(init_params(cfg, jax.random.key(0)))
params0 = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params0)


def loss_fn(params, tokens, mask):
    logits = model.apply({"params": params}, tokens, mask).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(ce * weights) / jnp.sum(weights), logits


out = {}
for name, shape in [("single", [("data", 1), ("fsdp", 1), ("model", 1)]),
                    ("data2_model4", [("data", 2), ("fsdp", 1), ("model", 4)]),
                    ("fsdp4_model2", [("data", 1), ("fsdp", 4), ("model", 2)]),
                    ("data8", [("data", 8), ("fsdp", 1), ("model", 1)])]:
    n = int(np.prod([s for _, s in shape]))
    mesh = partitioning.make_mesh(shape, devices=jax.devices()[:n])
    rules = fit_axis_rules(cfg, dict(mesh.shape), partitioning.logical_axis_rules())
    shardings = partitioning.tree_shardings(mesh, specs, rules)
    params = jax.device_put(params0, shardings)
    batch = partitioning.batch_sharding(mesh, rules)
    args = (params, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    with partitioning.activation_sharding(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                       out_shardings=((partitioning.replicated(mesh), None), shardings))
        (loss, logits), grads = step(*args)
        hlo = jax.jit(loss_fn).lower(*args).as_text()
    paths = lambda tree, f: {jax.tree_util.keystr(k): f(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    out[name] = {
        "loss": float(loss), "logits": np.asarray(logits).tolist(),
        "grads": paths(grads, lambda v: np.asarray(v).tolist()), "specs": paths(params, lambda v: str(v.sharding.spec)),
        "logits_spec": [str(a) for a in logits.sharding.spec], "constraints": hlo.count("sharding_constraint"),
        "rules": [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])] for r in rules[:3]],
    }
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("mesh", ["data2_model4", "fsdp4_model2", "data8"])
def test_sharded_logits_loss_and_grads_equal_one_device(results, mesh):
    ref, got = results["single"], results[mesh]
    # One device against a sharded program: reductions split across devices (tests/tolerances.py).
    assert_close(got["loss"], ref["loss"], DEEP)
    assert_close(np.array(got["logits"]), np.array(ref["logits"]), DEEP)
    assert got["grads"].keys() == ref["grads"].keys()
    for key, value in ref["grads"].items():
        assert np.abs(value).max() > 0, key  # every parameter takes part
        assert_close(np.array(got["grads"][key]), np.array(value), DEEP, err_msg=key)


def test_parameters_and_activations_are_split_as_the_fitted_rules_say(results):
    model4 = results["data2_model4"]
    assert model4["rules"][0] == ["kv_heads", None]  # 2 key/value heads do not split 4 ways
    assert results["fsdp4_model2"]["rules"][0] != ["kv_heads", None]  # they split 2 ways
    assert model4["specs"]["['layers_0']['attention']['query']['kernel']"] == "P('fsdp', 'model', None)"
    assert model4["specs"]["['layers_0']['attention']['key']['kernel']"] == "P('fsdp', None, None)"
    fsdp = results["fsdp4_model2"]["specs"]
    assert fsdp["['layers_0']['attention']['key']['kernel']"] == "P('fsdp', 'model', None)"
    assert fsdp["['layers_0']['mlp']['gate']['kernel']"] == "P('fsdp', 'model')"
    for mesh in ("data2_model4", "fsdp4_model2"):
        assert results[mesh]["logits_spec"][2] == "model" and results[mesh]["constraints"] > 10
