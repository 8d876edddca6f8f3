"""Teacher-forced scoring of given target tokens: log p(target_t | x, target_<t)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cat_jax.models.t5 import Transformer


def shift_right(tokens: jax.Array) -> jax.Array:
    """tokens: [b, T] -> [b, T] with a 0 (BOS) prepended and the last token dropped."""
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def score_tokens(model: Transformer, params: Any, encoder_input_tokens: jax.Array,
                 target_tokens: jax.Array) -> jax.Array:
    """Teacher-forced log p(target_t | x, target_<t): [b, T] float32, 0 where the target is 0."""
    logits = model.apply({"params": params}, encoder_input_tokens, shift_right(target_tokens))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, target_tokens[..., None], axis=-1)[..., 0]
    return jnp.where(target_tokens > 0, token_logp, 0.0)
