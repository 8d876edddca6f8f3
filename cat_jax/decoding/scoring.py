"""Teacher-forced scoring of given target tokens: log p(target_t | x, target_<t)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from cat_jax.models import LOSS_WEIGHTS, TARGETS, Model


def shift_right(tokens: jax.Array) -> jax.Array:
    """tokens: [b, T] -> [b, T] with a 0 (BOS) prepended and the last token dropped."""
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def score_tokens(model: Model, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Teacher-forced log p(target_t | x, target_<t) of the batch's targets: [b, T] float32, 0 where
    the target's loss weight is 0."""
    logits = model.logits(params, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = batch[TARGETS]
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(batch[LOSS_WEIGHTS] > 0, token_logp, 0.0)
