"""Learned post-hoc deferral: an MLP fitted on validation records predicts that the large model wins."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cat_jax.cascade.records import ModelOutputs, check_aligned

QUANTILES = (0.0, 0.1, 0.25, 0.5, 1.0)

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class PostHocConfig:
    """Size and full-batch training schedule of the one-hidden-layer MLP."""

    hidden_units: int = 32
    steps: int = 500
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PostHocModel:
    """A fitted MLP with the feature standardisation of its training set (mean, scale: [F])."""

    params: Params
    mean: np.ndarray
    scale: np.ndarray


def features(outputs: ModelOutputs) -> np.ndarray:
    """Deferral features [N, F]: log-prob quantiles (QUANTILES), output length, mean hidden [d].

    F = len(QUANTILES) + 1 + d (d = 0 without hidden). An empty output has all quantiles 0.
    """
    quantiles = np.array(
        [np.quantile(lp, QUANTILES) if lp.size else np.zeros(len(QUANTILES)) for lp in outputs.logprobs]
    ).reshape(len(outputs), len(QUANTILES))
    length = np.array([lp.size for lp in outputs.logprobs], dtype=np.float64)[:, None]
    parts = [quantiles, length]
    if outputs.hidden is not None:
        parts.append(outputs.hidden)
    return np.concatenate(parts, axis=1)


def targets(small: ModelOutputs, large: ModelOutputs) -> np.ndarray:
    """Labels [N]: 1.0 where the large model's quality beats the small model's, else 0.0."""
    check_aligned(small, large)
    return (large.quality > small.quality).astype(np.float64)


def _logits(params: Params, x: jax.Array) -> jax.Array:
    """x: [N, F] -> logits [N]."""
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(_logits(params, x), y).mean()


def _init(key: jax.Array, num_features: int, hidden_units: int) -> Params:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (num_features, hidden_units)) / np.sqrt(num_features),
        "b1": jnp.zeros(hidden_units),
        "w2": jax.random.normal(k2, (hidden_units,)) / np.sqrt(hidden_units),
        "b2": jnp.zeros(()),
    }


@functools.partial(jax.jit, static_argnames="config")
def _train(x: jax.Array, y: jax.Array, config: PostHocConfig) -> Params:
    """Full-batch AdamW on x [N, F], y [N] for config.steps steps."""
    params = _init(jax.random.key(config.seed), x.shape[1], config.hidden_units)
    opt = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=config.steps)
    return params


def fit(x: np.ndarray, y: np.ndarray, config: PostHocConfig = PostHocConfig()) -> PostHocModel:
    """Fits the MLP on standardised features x [N, F] and labels y [N] in {0, 1}."""
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"fit needs features [N, F] and labels [N] with N > 0; got {x.shape}, {y.shape}.")
    mean = x.mean(axis=0)
    scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    z = jnp.asarray((x - mean) / scale, dtype=jnp.float32)
    params = _train(z, jnp.asarray(y, dtype=jnp.float32), config)
    return PostHocModel(params=params, mean=mean, scale=scale)


def predict(model: PostHocModel, x: np.ndarray) -> np.ndarray:
    """P(large model better) [N] for features x [N, F]."""
    if x.ndim != 2 or x.shape[1] != model.mean.shape[0]:
        raise ValueError(
            f"features have shape {x.shape} but the model was fitted on {model.mean.shape[0]} features; "
            "give validation and test records the same fields (hidden on both or on neither)."
        )
    z = jnp.asarray((x - model.mean) / model.scale, dtype=jnp.float32)
    return np.asarray(jax.nn.sigmoid(_logits(model.params, z)), dtype=np.float64)


def post_hoc_scores(
    small_val: ModelOutputs,
    large_val: ModelOutputs,
    small_test: ModelOutputs,
    config: PostHocConfig = PostHocConfig(),
) -> np.ndarray:
    """Scores [N_test] = -P(large better), the MLP fitted on the validation records."""
    model = fit(features(small_val), targets(small_val, large_val), config)
    return -predict(model, features(small_test))
