"""Temperature / top-k / top-p (nucleus) sampling, seeded and reproducible.

Step t of a decode draws from `jax.random.fold_in(rng, t)`, so the same rng gives the same tokens.
Temperature 0 is greedy decoding. A family's SUPPRESSED_TOKEN (T5's padding/BOS 0) is never drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cat_jax.decoding.greedy import DecodeOutput, Inputs, decode_loop, greedy_token, suppress
from cat_jax.errors import ConfigError
from cat_jax.models import Model


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a token is drawn from a next-token distribution.

    temperature: 0 is greedy (argmax), else the logits are divided by it; top_k: keep the k most
    likely tokens (0 keeps all); top_p: keep the smallest set of most likely tokens whose
    probability reaches top_p (1 keeps all). Tokens tied at a cut-off are all kept.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ConfigError(f"top_k must be an int >= 0 (0 keeps every token), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logp: jax.Array, sampler: Sampler, suppressed: int | None = None) -> jax.Array:
    """logp [b, vocab] -> tempered logits [b, vocab], -inf at `suppressed` and outside top-k / top-p."""
    logits = suppress(logp, suppressed) / sampler.temperature
    if sampler.top_k:
        kth = jax.lax.top_k(logits, sampler.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if sampler.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < sampler.top_p  # mass before a token < top_p
        cut = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cut, logits, -jnp.inf)
    return logits


def sampling_probs(logp: jax.Array, sampler: Sampler, suppressed: int | None = None) -> jax.Array:
    """The distribution [b, vocab] tokens are drawn from: one-hot at the greedy token when
    temperature is 0, else softmax of `filtered_logits`."""
    if sampler.greedy:
        return jax.nn.one_hot(greedy_token(logp, suppressed), logp.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logp, sampler, suppressed), axis=-1)


def sample_token(logp: jax.Array, rng: jax.Array, sampler: Sampler, suppressed: int | None = None) -> jax.Array:
    """One token per row [b] int32 drawn from logp [b, vocab] under `sampler`."""
    if sampler.greedy:
        return greedy_token(logp, suppressed)
    return jax.random.categorical(rng, filtered_logits(logp, sampler, suppressed), axis=-1).astype(jnp.int32)


def sample_decode(
    model: Model,
    params: Any,
    inputs: Inputs,
    rng: jax.Array,
    max_decode_length: int,
    eos_id: int = 1,
    sampler: Sampler = Sampler(),
) -> DecodeOutput:
    """Sampled decoding of `inputs`; jit-able with model, lengths, ids and sampler static. The
    per-token scores are the untempered model's."""
    suppressed = model.SUPPRESSED_TOKEN
    return decode_loop(
        model,
        params,
        inputs,
        max_decode_length,
        eos_id,
        lambda logp, step: sample_token(logp, jax.random.fold_in(rng, step), sampler, suppressed),
    )
