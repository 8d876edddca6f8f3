"""Learned post-hoc deferral (Gupta et al. 2024): an MLP fitted on validation records predicts that
the large model wins.

Features: the small model's token log-prob quantiles, output length and mean final decoder
embedding (`post_hoc`), and for `post_hoc_embed` also the large model's intermediate representation
of the input (records' `embedding`). Scores on test come from an MLP fitted on all of validation.
Scores on validation are cross-fitted: validation is cut into `folds` seeded folds (stratified by the
label) and each example is scored by an MLP fitted on the other folds, so validation numbers (and
budgets calibrated on them) are out of sample.
"""

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
    """Size and full-batch training schedule of the one-hidden-layer MLP, and the folds of its
    cross-fitting on validation."""

    hidden_units: int = 32
    steps: int = 500
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    folds: int = 5  # cross-fitting on validation (the fold assignment is seeded by `seed`)


@dataclasses.dataclass(frozen=True)
class PostHocModel:
    """A fitted MLP with the feature standardisation of its training set (mean, scale: [F])."""

    params: Params
    mean: np.ndarray
    scale: np.ndarray


def features(outputs: ModelOutputs, embedding: np.ndarray | None = None) -> np.ndarray:
    """Deferral features [N, F]: log-prob quantiles (QUANTILES), output length, mean hidden [d], and
    `embedding` [N, e] when given (the large model's representation of the inputs).

    F = len(QUANTILES) + 1 + d + e (d = 0 without hidden). An empty output has all quantiles 0.
    """
    quantiles = np.array(
        [np.quantile(lp, QUANTILES) if lp.size else np.zeros(len(QUANTILES)) for lp in outputs.logprobs]
    ).reshape(len(outputs), len(QUANTILES))
    length = np.array([lp.size for lp in outputs.logprobs], dtype=np.float64)[:, None]
    parts = [quantiles, length]
    if outputs.hidden is not None:
        parts.append(outputs.hidden)
    if embedding is not None:
        parts.append(np.asarray(embedding, dtype=np.float64).reshape(len(outputs), -1))
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


def fold_indices(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The rows of labels y [N] cut into `folds` folds, stratified: the rows of each label, in an
    order seeded by `seed`, are dealt round-robin, so every fold (and every training set of the
    others) holds the validation's share of each label to within one example."""
    n = len(y)
    if folds < 2 or n < folds:
        raise ValueError(
            f"cross-fitting needs 2 <= folds <= examples; got folds={folds} for {n} validation "
            "examples. Decode more validation examples or set run_cascade_eval.posthoc_folds lower."
        )
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(y[order], kind="stable")]
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % folds
    return [np.flatnonzero(fold_of == k) for k in range(folds)]


def fitted_scores(
    x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, config: PostHocConfig = PostHocConfig()
) -> np.ndarray:
    """Scores [M] = -P(large better) of features x_score [M, F], the MLP fitted on x_fit, y_fit."""
    return -predict(fit(x_fit, y_fit, config), x_score)


def cross_fitted_scores(x: np.ndarray, y: np.ndarray, config: PostHocConfig = PostHocConfig()) -> np.ndarray:
    """Out-of-fold scores [N] of features x [N, F] and labels y [N]: each example's from an MLP
    fitted on the other `config.folds` - 1 folds (`fold_indices`)."""
    scores = np.empty(len(x))
    for held_out in fold_indices(y, config.folds, config.seed):
        kept = np.setdiff1d(np.arange(len(x)), held_out)
        scores[held_out] = fitted_scores(x[kept], y[kept], x[held_out], config)
    return scores
