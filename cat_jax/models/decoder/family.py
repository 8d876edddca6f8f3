"""The decoder-only family's side of the model contract (`cat_jax.models.contract`).

One example is its prompt, then its completion, in one sequence; the loss counts only the
completion. A batch holds

    prompt_tokens  [b, Li] int32   the prompt as the tokenizer's `tokenizer(prompt)` gives it (its
                                   prefix, e.g. BOS, then the text's tokens, then its suffix),
                                   LEFT-padded, so every row's prompt ends at column Li - 1
    prompt_mask    [b, Li] int32   1 on the prompt's tokens, 0 on the padding
    decoder_target_tokens [b, Lt]  the completion, ending in EOS, right-padded
    decoder_loss_weights  [b, Lt]  1 up to and including the completion's EOS

and the network reads `prompt_tokens` followed by the completion's tokens but the last, whose
outputs from column Li - 1 on are the logits [b, Lt, vocab] of the completion. TASK_FEATURE_LENGTHS'
`inputs` bounds the prompt (special tokens included) and `targets` the completion (EOS included).

The examples come from the data layer as seqio's encoder-decoder arrays (inputs and targets each
tokenized without special tokens and ending in EOS); `make_batch` drops the inputs' EOS, adds the
tokenizer's prompt prefix and suffix, and finds each row's end from its EOS, never from padding
ids: id 0 is a real token of many decoder vocabularies (Llama 3's and Qwen's "!"). Masks and loss
weights come from lengths, so such tokens count.

Packed training batches (`cat_jax.data.packing`: several examples per row, with segment ids) become
one sequence per row of length Li + Lt - 1 holding each example's prompt and completion but its last
token, one after the other:

    packed_tokens, packed_segment_ids, packed_positions  [b, L] int32  the fed tokens, 1, 2, ... per
                                   example (0: padding) and each token's position within its example
    decoder_target_tokens, decoder_loss_weights  [b, L]  the next token at every slot, weighted on
                                   the completions only (as unpacked)

and `logits` [b, L, vocab] keeps attention within each example, so the losses equal the unpacked ones.
Each example's prompt adds `packing_input_overhead` tokens to its inputs (prefix and suffix, less the
dropped EOS): the training job has the data layer leave that room beside each example's inputs.

Decoding prefills every prompt but its last token into the cache; the first token fed is the
prompt's last, so that decoding's position n is the cache slot Li - 1 + n. A scanned model's
stacked cache leaves [layers, b, ...] are held batch first in the state (`stack.batch_first`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import vocabularies
from cat_jax.errors import ConfigError
from cat_jax.models import contract, stack
from cat_jax.models.decoder import flops
from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.models.decoder.model import Decoder, init_params
from cat_jax.models.decoder.sharding import logical_sizes

CACHE_INDEX = "cache_index"


def _last_index(rows: np.ndarray, value: int) -> np.ndarray:
    """[b] index of the last `value` in each row, or -1."""
    hit = rows == value
    last = rows.shape[1] - 1 - np.argmax(hit[:, ::-1], axis=1)
    return np.where(hit.any(axis=1), last, -1)


def _first_index(rows: np.ndarray, value: int) -> np.ndarray:
    """[b] index of the first `value` in each row, or -1."""
    hit = rows == value
    return np.where(hit.any(axis=1), np.argmax(hit, axis=1), -1)


def prompt_rows(
    inputs: np.ndarray, eos_id: int, prefix: tuple[int, ...], suffix: tuple[int, ...], length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, prompt_mask) [b, length]: each row's tokens before its last EOS (all its
    non-padding tokens when it has none), between `prefix` and `suffix`, left-padded; a prompt too
    long for `length` keeps its prefix, its first tokens and its suffix."""
    ends = _last_index(inputs, eos_id)
    counts = np.where(ends >= 0, ends, np.count_nonzero(inputs, axis=1))
    room = length - len(prefix) - len(suffix)
    if room < 0:
        raise ValueError(
            f"The prompt's special tokens ({len(prefix) + len(suffix)}) do not fit "
            f"TASK_FEATURE_LENGTHS['inputs'] = {length}."
        )
    tokens = np.zeros((inputs.shape[0], length), np.int32)
    mask = np.zeros((inputs.shape[0], length), np.int32)
    for r, count in enumerate(counts):
        row = [*prefix, *inputs[r, : min(int(count), room)].tolist(), *suffix]
        tokens[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    return tokens, mask


def completion_weights(targets: np.ndarray, eos_id: int, weights: np.ndarray) -> np.ndarray:
    """[b, Lt] float32: 1 up to and including each row's first EOS (rows without one keep `weights`)."""
    ends = _first_index(targets, eos_id)
    by_eos = (np.arange(targets.shape[1])[None, :] <= ends[:, None]).astype(np.float32)
    return np.where((ends >= 0)[:, None], by_eos, weights).astype(np.float32)


PACKED_FEATURES = ("packed_tokens", "packed_segment_ids", "packed_positions")


def packed_sequences(
    examples: Mapping[str, np.ndarray], eos_id: int, prefix: tuple[int, ...], suffix: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """The decoder's packed batch (see the module docstring) from packed encoder-decoder rows
    (`encoder_segment_ids`, `decoder_segment_ids`): each segment's prompt as `prompt_rows` makes it,
    then its completion, its loss weights as `completion_weights` gives them."""
    inputs, in_segments = np.asarray(examples["encoder_input_tokens"]), np.asarray(examples["encoder_segment_ids"])
    targets = np.asarray(examples["decoder_target_tokens"], np.int32)
    t_segments = np.asarray(examples["decoder_segment_ids"])
    data_weights = np.asarray(examples["decoder_loss_weights"], np.float32)
    rows, li = inputs.shape
    length = li + targets.shape[1] - 1
    out = {name: np.zeros((rows, length), np.int32) for name in (*PACKED_FEATURES, contract.TARGETS)}
    out[contract.LOSS_WEIGHTS] = np.zeros((rows, length), np.float32)
    for r in range(rows):
        at = 0
        for segment in np.unique(t_segments[r][t_segments[r] > 0]):
            prompt_row = inputs[r][in_segments[r] == segment]
            tokens, mask = prompt_rows(prompt_row[None], eos_id, prefix, suffix, li)
            prompt = tokens[0][mask[0] > 0]
            completion = targets[r][t_segments[r] == segment]
            weights = completion_weights(completion[None], eos_id, data_weights[r][t_segments[r] == segment][None])[0]
            sequence = np.concatenate([prompt, completion])
            fed = len(sequence) - 1
            if at + fed > length:
                raise ConfigError(
                    f"A packed row's prompts and completions need more than {length} tokens: each prompt adds "
                    f"{len(prefix) + len(suffix) - 1} special tokens, but the rows were packed leaving less room "
                    "(pack with this model's packing_input_overhead)."
                )
            out["packed_tokens"][r, at : at + fed] = sequence[:-1]
            out["packed_segment_ids"][r, at : at + fed] = segment
            out["packed_positions"][r, at : at + fed] = np.arange(fed)
            out[contract.TARGETS][r, at : at + fed] = sequence[1:]
            out[contract.LOSS_WEIGHTS][r, at + len(prompt) - 1 : at + fed] = weights
            at += fed
    return out


@contract.register
class DecoderModel(contract.Model):
    """A decoder-only language model (`DecoderConfig`): Llama, Mistral, Qwen2/3, Gemma/Gemma 2."""

    config: DecoderConfig

    family: ClassVar[str] = "decoder"
    config_class: ClassVar[type] = DecoderConfig
    DECODING_INPUTS: ClassVar[tuple[str, ...]] = ("prompt_tokens", "prompt_mask")
    SUPPRESSED_TOKEN: ClassVar[int | None] = None

    @property
    def network(self) -> Decoder:
        return Decoder(self.config)

    @property
    def hidden_size(self) -> int:
        return self.config.emb_dim

    @property
    def input_layers(self) -> int:
        return self.config.num_layers

    def logical_sizes(self) -> dict[str, int]:
        return logical_sizes(self.config)

    # ---- batches ------------------------------------------------------------------------------
    def batch_shapes(
        self, lengths: Mapping[str, int], batch_size: int, packed: bool = False
    ) -> dict[str, jax.ShapeDtypeStruct]:
        li, lt = lengths["inputs"], lengths["targets"]
        ints = lambda n: jax.ShapeDtypeStruct((batch_size, n), np.int32)
        if packed:
            names = (*PACKED_FEATURES, contract.TARGETS)
            return {
                **{name: ints(li + lt - 1) for name in names},
                contract.LOSS_WEIGHTS: jax.ShapeDtypeStruct((batch_size, li + lt - 1), np.float32),
            }
        return {
            "prompt_tokens": ints(li),
            "prompt_mask": ints(li),
            "decoder_target_tokens": ints(lt),
            "decoder_loss_weights": jax.ShapeDtypeStruct((batch_size, lt), np.float32),
        }

    def packing_input_overhead(self, vocab: Any) -> int:
        """Tokens a prompt adds to its example's inputs (prefix and suffix, less the dropped EOS)."""
        vocab = vocabularies.resolve(vocab)
        specials = len(getattr(vocab, "prompt_prefix_ids", ())) + len(getattr(vocab, "prompt_suffix_ids", ()))
        return max(specials - 1, 0)

    def make_batch(self, examples: Mapping[str, np.ndarray], vocab: Any) -> dict[str, np.ndarray]:
        vocab = vocabularies.resolve(vocab)
        prefix = tuple(getattr(vocab, "prompt_prefix_ids", ()))
        suffix = tuple(getattr(vocab, "prompt_suffix_ids", ()))
        if "encoder_segment_ids" in examples:
            return packed_sequences(examples, vocab.eos_id, prefix, suffix)
        inputs = np.asarray(examples["encoder_input_tokens"])
        targets = np.asarray(examples["decoder_target_tokens"], np.int32)
        prompt, mask = prompt_rows(inputs, vocab.eos_id, prefix, suffix, inputs.shape[1])
        weights = completion_weights(targets, vocab.eos_id, np.asarray(examples["decoder_loss_weights"]))
        return {
            "prompt_tokens": prompt,
            "prompt_mask": mask,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": weights,
        }

    def input_lengths(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """The prompt's tokens, its special tokens included."""
        return np.sum(np.asarray(batch["prompt_mask"]) > 0, axis=1)

    # ---- parameters and teacher forcing -------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        return init_params(self.config, rng)

    def _sequence(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        prompt, targets = batch["prompt_tokens"], batch["decoder_target_tokens"]
        tokens = jnp.concatenate([prompt, targets[:, :-1]], axis=1)
        mask = jnp.concatenate([batch["prompt_mask"] > 0, jnp.ones(targets[:, :-1].shape, bool)], axis=1)
        return tokens, mask

    def logits(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
        if "packed_tokens" in batch:
            segments = batch["packed_segment_ids"]
            return self.network.apply(
                {"params": params},
                batch["packed_tokens"],
                segments > 0,
                batch["packed_positions"],
                segment_ids=segments,
            )
        tokens, mask = self._sequence(batch)
        return self.network.apply({"params": params}, tokens, mask, logits_from=batch["prompt_tokens"].shape[1] - 1)

    # ---- decoding -----------------------------------------------------------------------------
    def start_decoding(
        self, params: Any, inputs: Mapping[str, jax.Array], max_decode_length: int
    ) -> tuple[dict[str, Any], jax.Array]:
        prompt, mask = inputs["prompt_tokens"], inputs["prompt_mask"] > 0
        batch, length = prompt.shape
        net = self.network
        dummy = jnp.zeros((batch, length - 1 + max_decode_length), jnp.int32)
        _, variables = net.apply({"params": params}, dummy, decode=True, mutable=["cache"])
        cache = variables["cache"]
        if length > 1:
            _, variables = net.apply(
                {"params": params, "cache": cache}, prompt[:, :-1], mask[:, :-1], decode=True, mutable=["cache"]
            )
            cache = variables["cache"]
        if self.config.scan_layers:
            cache = stack.batch_first(cache)
        state = {"cache": cache, "offset": jnp.asarray(length - 1, jnp.int32)}
        return state, prompt[:, -1].astype(jnp.int32)

    def decode_block(
        self, params: Any, state: dict[str, Any], tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        scanned = self.config.scan_layers
        cache = stack.layers_first(state["cache"]) if scanned else state["cache"]
        (logits, hidden), variables = self.network.apply(
            {"params": params, "cache": cache}, tokens, decode=True, return_hidden=True, mutable=["cache"]
        )
        cache = stack.batch_first(variables["cache"]) if scanned else variables["cache"]
        return logits, hidden, {**state, "cache": cache}

    def set_positions(self, state: dict[str, Any], positions: jax.Array) -> dict[str, Any]:
        index = state["offset"] + jnp.asarray(positions, jnp.int32)
        cache = jax.tree_util.tree_map_with_path(
            lambda path, leaf: index if path[-1].key == CACHE_INDEX else leaf, state["cache"]
        )
        return {**state, "cache": cache}

    def input_embedding(self, params: Any, inputs: Mapping[str, jax.Array], depth: int) -> jax.Array:
        mask = inputs["prompt_mask"] > 0
        hidden = self.network.apply(
            {"params": params}, inputs["prompt_tokens"], mask, layer=depth, method=Decoder.hidden_after
        )
        weights = mask[..., None].astype(jnp.float32)
        return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

    # ---- FLOPs --------------------------------------------------------------------------------
    def forward_flops(self, input_length: Any, target_length: Any) -> Any:
        """The prompt and the completion but its last token through every layer, and the LM head on
        the completion's `target_length` positions."""
        fed = np.maximum(np.asarray(input_length) + np.asarray(target_length) - 1, 1)
        head = 2 * self.config.emb_dim * self.config.vocab_size
        total = flops.layers_flops(self.config, fed, self.config.num_layers) + head * np.asarray(target_length)
        return float(total) if np.ndim(total) == 0 else total

    def prefill_flops(self, input_length: Any) -> Any:
        """The prompt but its last token written into the cache (`start_decoding`)."""
        return flops.decode_flops(self.config, 0, np.maximum(np.asarray(input_length) - 1, 0))

    def decode_flops(self, input_length: Any, context: Any, block: Any) -> Any:
        return flops.decode_flops(self.config, np.maximum(np.asarray(input_length) - 1, 0) + context, block)

    def embedding_flops(self, input_length: Any, depth: int) -> Any:
        return flops.layers_flops(self.config, input_length, depth)
