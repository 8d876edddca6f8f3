"""The decoding method of eval, infer and cascade_eval, chosen by gin (`decoding.method = 'beam'`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import gin
import jax

from cat_jax.decoding.beam import beam_search
from cat_jax.decoding.greedy import DecodeOutput, greedy_decode
from cat_jax.decoding.sampling import Sampler, sample_decode
from cat_jax.errors import ConfigError
from cat_jax.models import Model

METHODS = ("greedy", "sample", "beam")
# decoder(params, inputs (the model's DECODING_INPUTS), rng) -> DecodeOutput
DecodeFn = Callable[[Any, Any, jax.Array], DecodeOutput]


@gin.configurable("decoding")
@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """method: greedy | sample (temperature, top_k, top_p; `seed` fixes the draws) | beam
    (beam_size, length_penalty: T5X's alpha; the best hypothesis is returned)."""

    method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 4
    length_penalty: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"decoding.method={self.method!r} is not one of {METHODS}.")
        Sampler(self.temperature, self.top_k, self.top_p)  # validates

    def rng(self, batch_index: int) -> jax.Array:
        """The key of one batch's draws: the same seed and batch give the same samples."""
        return jax.random.fold_in(jax.random.key(self.seed), batch_index)


def make_decoder(config: DecodingConfig, model: Model, max_decode_length: int, eos_id: int) -> DecodeFn:
    """The jit-compiled decoder of `config` for `model`."""
    if config.method == "greedy":
        fn = lambda params, inputs, rng: greedy_decode(model, params, inputs, max_decode_length, eos_id)
    elif config.method == "sample":
        sampler = Sampler(config.temperature, config.top_k, config.top_p)
        fn = functools.partial(
            sample_decode, model, max_decode_length=max_decode_length, eos_id=eos_id, sampler=sampler
        )
    else:
        fn = lambda params, inputs, rng: beam_search(
            model, params, inputs, max_decode_length, config.beam_size, config.length_penalty, eos_id
        ).best()
    return jax.jit(fn)
