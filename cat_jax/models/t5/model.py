"""The T5 family's side of the model contract (`cat_jax.models.contract`).

Batches are seqio's encoder-decoder features: `encoder_input_tokens [b, Li]`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights [b, Lt]` (the targets
shifted right behind the decoder's BOS, 0). Token 0 is padding and BOS: decoding never emits it.
Packed training batches (`cat_jax.data.packing`) add `encoder_segment_ids`, `encoder_positions`,
`decoder_segment_ids`, `decoder_positions`; `logits` then keeps attention within each segment (decoding
never sees packed rows). Decoding encodes once; the state holds the encoder's output, its input tokens and the decoder's
key/value cache (cross-attention keys included), and the first token fed is BOS. A scanned
model's cache leaves are stacked [layers, b, ...]; the state holds them batch first [b, layers, ...]
(`stack.batch_first`), every layer's index per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax.data.packing import SEGMENT_FEATURES
from cat_jax.models import contract, stack
from cat_jax.models.t5 import flops
from cat_jax.models.t5.config import T5Config
from cat_jax.models.t5.network import Transformer

CACHE_INDEX = "cache_index"


@contract.register
class T5Model(contract.Model):
    """A T5-family encoder-decoder (`T5Config`)."""

    config: T5Config

    family: ClassVar[str] = "t5"
    config_class: ClassVar[type] = T5Config
    DECODING_INPUTS: ClassVar[tuple[str, ...]] = ("encoder_input_tokens",)
    SUPPRESSED_TOKEN: ClassVar[int | None] = 0

    @property
    def network(self) -> Transformer:
        return Transformer(self.config)

    @property
    def hidden_size(self) -> int:
        return self.config.emb_dim

    @property
    def input_layers(self) -> int:
        return self.config.num_encoder_layers

    def logical_sizes(self) -> dict[str, int]:
        c = self.config
        return {
            "vocab": c.vocab_size,
            "embed": c.emb_dim,
            "mlp": c.mlp_dim,
            "heads": c.num_heads,
            "kv": c.head_dim,
            "joined_kv": c.num_heads * c.head_dim,
            "relpos_buckets": c.relative_attention_num_buckets,
        }

    # ---- batches ------------------------------------------------------------------------------
    def batch_shapes(
        self, lengths: Mapping[str, int], batch_size: int, packed: bool = False
    ) -> dict[str, jax.ShapeDtypeStruct]:
        li, lt = lengths["inputs"], lengths["targets"]
        ints = lambda n: jax.ShapeDtypeStruct((batch_size, n), np.int32)
        shapes = {
            "encoder_input_tokens": ints(li),
            "decoder_input_tokens": ints(lt),
            "decoder_target_tokens": ints(lt),
            "decoder_loss_weights": jax.ShapeDtypeStruct((batch_size, lt), np.float32),
        }
        if packed:
            shapes.update({name: ints(li if name.startswith("encoder") else lt) for name in SEGMENT_FEATURES})
        return shapes

    def make_batch(self, examples: Mapping[str, np.ndarray], vocab: Any = None) -> dict[str, np.ndarray]:
        """The examples' arrays are already T5's features (packed ones with their segments)."""
        names = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
        if "encoder_segment_ids" in examples:
            names += SEGMENT_FEATURES
        return {name: examples[name] for name in names}

    def input_lengths(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """The encoder's tokens (EOS included; 0 is padding)."""
        return np.count_nonzero(np.asarray(batch["encoder_input_tokens"]), axis=1)

    # ---- parameters and teacher forcing -------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        ones = jnp.ones((1, 8), jnp.int32)
        return self.network.init({"params": rng}, ones, ones)["params"]

    def logits(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
        rngs = {"dropout": rng} if rng is not None else None
        packing = {name: batch[name] for name in SEGMENT_FEATURES} if "encoder_segment_ids" in batch else None
        return self.network.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            enable_dropout=rng is not None,
            packing=packing,
            rngs=rngs,
        )

    # ---- decoding -----------------------------------------------------------------------------
    def start_decoding(
        self, params: Any, inputs: Mapping[str, jax.Array], max_decode_length: int
    ) -> tuple[dict[str, Any], jax.Array]:
        net, enc = self.network, inputs["encoder_input_tokens"]
        encoded = net.apply({"params": params}, enc, method=Transformer.encode)
        dummy = jnp.zeros((enc.shape[0], max_decode_length), jnp.int32)
        _, variables = net.apply(
            {"params": params}, encoded, enc, dummy, decode=True, mutable=["cache"], method=Transformer.decode
        )
        state = {"encoded": encoded, "encoder_tokens": enc, "cache": variables["cache"]}
        first = jnp.zeros((enc.shape[0],), jnp.int32)
        if self.config.scan_layers:  # each layer's shared index [layers] -> per row [layers, b], then batch first
            cache = jax.tree_util.tree_map_with_path(
                lambda path, leaf: (
                    jnp.zeros(leaf.shape + first.shape, jnp.int32) if path[-1].key == CACHE_INDEX else leaf
                ),
                state["cache"],
            )
            state["cache"] = stack.batch_first(cache)
        return state, first

    def decode_block(
        self, params: Any, state: dict[str, Any], tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        scanned = self.config.scan_layers
        (logits, hidden), variables = self.network.apply(
            {"params": params, "cache": stack.layers_first(state["cache"]) if scanned else state["cache"]},
            state["encoded"],
            state["encoder_tokens"],
            tokens,
            decode=True,
            return_hidden=True,
            mutable=["cache"],
            method=Transformer.decode,
        )
        cache = stack.batch_first(variables["cache"]) if scanned else variables["cache"]
        return logits, hidden, {**state, "cache": cache}

    def set_positions(self, state: dict[str, Any], positions: jax.Array) -> dict[str, Any]:
        positions = jnp.asarray(positions, jnp.int32)
        if self.config.scan_layers:  # every layer's index [b, layers]
            index = lambda leaf: jnp.broadcast_to(positions[:, None], leaf.shape)
        else:
            index = lambda leaf: positions
        cache = jax.tree_util.tree_map_with_path(
            lambda path, leaf: index(leaf) if path[-1].key == CACHE_INDEX else leaf, state["cache"]
        )
        return {**state, "cache": cache}

    def input_embedding(self, params: Any, inputs: Mapping[str, jax.Array], depth: int) -> jax.Array:
        tokens = inputs["encoder_input_tokens"]
        hidden = self.network.apply({"params": params}, tokens, depth, method=Transformer.encoder_hidden)
        mask = (tokens > 0)[..., None].astype(jnp.float32)
        return jnp.sum(hidden.astype(jnp.float32) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

    # ---- FLOPs --------------------------------------------------------------------------------
    def forward_flops(self, input_length: Any, target_length: Any) -> Any:
        return flops.forward_flops(self.config, input_length, target_length)

    def prefill_flops(self, input_length: Any) -> Any:
        return flops.encoder_flops(self.config, input_length)

    def decode_flops(self, input_length: Any, context: Any, block: Any) -> Any:
        return flops.decoder_flops(self.config, input_length, context, block)

    def embedding_flops(self, input_length: Any, depth: int) -> Any:
        return flops.encoder_layers_flops(self.config, input_length, depth)
