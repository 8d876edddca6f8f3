"""The model contract: what every model family provides, and the one way to build a model.

Everything outside `cat_jax.models` (the trainer, the frozen teacher, eval and infer, the decoding
loops, cascade_eval, speculative_eval, SALT scoring, the benchmarks) reaches a model only through a
`Model` of this module; no module outside `models/` names a family's classes.

A family is a `Model` subclass registered with `register`: `models/t5/` (the T5-family
encoder-decoder) and `models/decoder/` (Llama, Mistral, Qwen2/3, Gemma/Gemma 2 as configurations of
one decoder). It provides:

- its **config** (a frozen, hashable dataclass with `to_dict` / `from_dict` / `replace` and a
  `family` class attribute), written to and read from run_info.json (`describe`, `from_run_info`);
- its **batch**: `make_batch` turns a batch of examples (the data layer's arrays: inputs and targets
  as `encoder_input_tokens [b, Li]` and `decoder_target_tokens [b, Lt]`, right-padded, each ending
  in EOS) into the family's features, `batch_shapes` gives their abstract shapes, and
  `DECODING_INPUTS` names the features decoding reads. Every family's batch carries `TARGETS` and
  `LOSS_WEIGHTS` [b, Lt], and `logits` returns [b, Lt, vocab] aligned with them, so every loss
  (cross-entropy, distillation, the CAT mask) is one function of (logits, teacher logits, targets,
  weights) whatever the family. Packed training rows (`cat_jax.data.packing`: several examples per
  row, with segment ids) give the family's packed batch (`batch_shapes(..., packed=True)`), whose
  logits keep each example's attention to itself; `packing_input_overhead` is what a family adds to
  each example's inputs there;
- **abstract parameters** with logical axis names (`init_params`, `abstract_params`) and the
  logical-axis rules fitted to a mesh (`fit_rules`: an axis a mesh axis does not divide is
  replicated);
- **decoding hooks**: `start_decoding` (encode, or prefill the prompt) returns a state and the
  first token to feed; `decode_block` feeds a block of g >= 1 tokens at each row's position
  (g = 1: one step of greedy decoding, sampling or beam search; g > 1: speculative verification);
  `set_positions` moves rows to their own positions (a rollback). Positions count the tokens fed
  since `start_decoding`, the first token included, in every family;
- `input_embedding`, the mean hidden state of the inputs after `depth` layers (post_hoc_embed's
  features), and `SUPPRESSED_TOKEN`, the id decoding never emits (T5's padding/BOS 0) or None;
- **FLOPs** per example at the input lengths of its own batch (`input_lengths`): `forward_flops`,
  the prompt's or encoder's pass (`prefill_flops`), a decoded block (`decode_flops`) and
  `input_embedding` (`embedding_flops`);
- its **checkpoint converters**, in the family's `convert` module, reached through
  `cat_jax.models.convert`.

`from_run_info` rebuilds any MODEL_DIR's model; run_info's `model_family` (absent in run_infos
written before the decoder family existed: those are T5) names the family.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np
from flax import linen as nn

log = logging.getLogger("cat_jax")

TARGETS = "decoder_target_tokens"
LOSS_WEIGHTS = "decoder_loss_weights"
DEFAULT_FAMILY = "t5"  # run_info.json written before families existed

Params = Any
DecodeState = Any


@dataclasses.dataclass(frozen=True)
class Model(abc.ABC):
    """One model of a family: its config and every operation the rest of cat_jax needs.

    Hashable (a static argument of jitted functions); holds no parameters.
    """

    config: Any

    family: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    DECODING_INPUTS: ClassVar[tuple[str, ...]] = ()
    SUPPRESSED_TOKEN: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if getattr(self.config, "vocab_size", None) is None:
            raise ValueError(
                f"{type(self.config).__name__}.vocab_size is unset; the trainer sets it from the task's vocabulary."
            )

    # ---- identity -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """run_info.json's entries for the model: its family and its config."""
        return {"model_family": self.family, "model_config": self.config.to_dict()}

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int:
        """Width of the hidden states `decode_block` and `input_embedding` return."""

    @property
    @abc.abstractmethod
    def input_layers(self) -> int:
        """Layers `input_embedding` can go through (its largest `depth`)."""

    # ---- batches ------------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_shapes(
        self, lengths: Mapping[str, int], batch_size: int, packed: bool = False
    ) -> dict[str, jax.ShapeDtypeStruct]:
        """The abstract batch of `batch_size` examples (`packed`: rows of packed examples,
        `cat_jax.data.packing`) at TASK_FEATURE_LENGTHS `lengths`."""

    @abc.abstractmethod
    def make_batch(self, examples: Mapping[str, np.ndarray], vocab: Any) -> dict[str, np.ndarray]:
        """The family's batch (numpy) from a batch of examples (see the module docstring)."""

    def packing_input_overhead(self, vocab: Any) -> int:
        """Tokens `make_batch` adds to each example's inputs in a packed row (`cat_jax.data.packing`)."""
        return 0

    def decoding_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The features of `batch` that decoding reads."""
        return {name: batch[name] for name in self.DECODING_INPUTS}

    @abc.abstractmethod
    def input_lengths(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """[b] int: the tokens of each row's inputs in the family's batch (the encoder's, or the
        prompt's with its special tokens): the `input_length` of the FLOPs methods."""

    # ---- parameters ---------------------------------------------------------------------------
    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Params:
        """Freshly initialised parameters, boxed with their logical axis names."""

    def abstract_params(self) -> tuple[Params, Any]:
        """(abstract unboxed parameters, their logical PartitionSpecs), nothing allocated."""
        boxed = jax.eval_shape(self.init_params, jax.random.key(0))
        return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)

    def logical_sizes(self) -> dict[str, int]:
        """The size of each logical axis the parameters and activations carry (for `fit_rules`)."""
        return {}

    def fit_rules(self, mesh_shape: Mapping[str, int], rules: tuple) -> tuple:
        """`rules` with (name, None) first for every logical axis whose rule would split it over mesh
        axes (sizes from `mesh_shape`, e.g. `mesh.shape`) that do not divide its size: jax refuses
        uneven shardings, so such an axis is replicated (logged once per axis)."""
        sizes = self.logical_sizes()
        replicated: list[str] = []
        for name, target in rules:
            if sizes.get(name) is None or name in replicated:
                continue
            axes = target if isinstance(target, (tuple, list)) else (target,)
            split = math.prod(mesh_shape.get(a, 1) for a in axes if a is not None)
            if sizes[name] % split:
                replicated.append(name)
        for name in replicated:
            log.info(
                "Logical axis %r (size %d) is not divisible by its mesh axes %s: replicated.",
                name,
                sizes[name],
                dict(rules).get(name),
            )
        return tuple((name, None) for name in replicated) + tuple(rules)

    # ---- teacher forcing ----------------------------------------------------------------------
    @abc.abstractmethod
    def logits(self, params: Params, batch: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [b, Lt, vocab] (compute dtype) aligned with batch[TARGETS];
        dropout only when `rng` is given."""

    # ---- decoding -----------------------------------------------------------------------------
    @abc.abstractmethod
    def start_decoding(
        self, params: Params, inputs: Mapping[str, jax.Array], max_decode_length: int
    ) -> tuple[DecodeState, jax.Array]:
        """(state, first tokens [b] int32) for decoding at most `max_decode_length` tokens per row.

        Every per-row leaf of the state has the batch as its leading axis (beam search reorders
        rows by indexing them).
        """

    @abc.abstractmethod
    def decode_block(
        self, params: Params, state: DecodeState, tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array, DecodeState]:
        """Feeds tokens [b, g] at each row's position: (logits [b, g, vocab], hidden [b, g, d], the
        state advanced by g). Row r's logits at j predict the token after tokens[r, :j + 1]."""

    @abc.abstractmethod
    def set_positions(self, state: DecodeState, positions: jax.Array) -> DecodeState:
        """The state with row r's next position set to positions[r] (tokens fed since the start)."""

    @abc.abstractmethod
    def input_embedding(self, params: Params, inputs: Mapping[str, jax.Array], depth: int) -> jax.Array:
        """[b, hidden_size] float32: the hidden states of the inputs after `depth` layers, averaged
        over the real input tokens."""

    # ---- FLOPs (2 per multiply-add, matmuls only; lengths may be numbers or numpy arrays) ------
    @abc.abstractmethod
    def forward_flops(self, input_length: Any, target_length: Any) -> Any:
        """One example's teacher-forced forward pass."""

    @abc.abstractmethod
    def prefill_flops(self, input_length: Any) -> Any:
        """What `start_decoding` computes for one example (the encoder, or the prompt's prefill)."""

    @abc.abstractmethod
    def decode_flops(self, input_length: Any, context: Any, block: Any) -> Any:
        """A block of `block` decoded tokens after `context` already fed ones, for one example."""

    @abc.abstractmethod
    def embedding_flops(self, input_length: Any, depth: int) -> Any:
        """`input_embedding` of one example."""


FAMILIES: dict[str, type[Model]] = {}


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: make a family known to `build` and `from_run_info`."""
    FAMILIES[cls.family] = cls
    return cls


def family_class(family: str) -> type[Model]:
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; known families: {sorted(FAMILIES)}.")
    return FAMILIES[family]


def build(config: Any) -> Model:
    """The Model of a family's config."""
    family = getattr(config, "family", None)
    if family is None:
        raise TypeError(
            f"{type(config).__name__} is not a model config (no `family`); known families: {sorted(FAMILIES)}."
        )
    return family_class(family)(config)


def family_of_run_info(info: Mapping[str, Any]) -> str:
    return info.get("model_family") or DEFAULT_FAMILY


def config_from_run_info(info: Mapping[str, Any]) -> Any:
    """The model config run_info.json records."""
    return family_class(family_of_run_info(info)).config_class.from_dict(info["model_config"])


def from_run_info(info: Mapping[str, Any], **changes: Any) -> Model:
    """The model run_info.json records (its config with `changes` applied, e.g. dtype=...)."""
    config = config_from_run_info(info)
    return build(config.replace(**changes) if changes else config)
