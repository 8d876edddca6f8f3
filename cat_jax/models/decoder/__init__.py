"""Decoder-only language models: Llama, Mistral, Qwen2 / Qwen3, Gemma / Gemma 2 as configurations of
one network (Flax linen, logical axes), their cache, FLOPs, sharding rules and checkpoints.

    config.py    DecoderConfig (family "decoder", the Hugging Face model_type, shapes and switches)
    layers.py    RMSNorm, rotary embeddings, grouped-query attention with its cache, gated MLP
    model.py     Decoder (teacher-forced logits, cached blocks, hidden state after layer k)
    cache.py     cached decoding: init_cache, decode_block, set_cache_index
    flops.py     prefill_flops, decode_flops, layers_flops
    family.py    DecoderModel: the family's side of the model contract (cat_jax.models.contract)
    sharding.py  fit_axis_rules: replicate the axes a mesh does not divide
    convert.py   Hugging Face checkpoints in (streamed) and out
"""

from cat_jax.models.decoder.cache import decode_block, init_cache, set_cache_index
from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.models.decoder.family import DecoderModel
from cat_jax.models.decoder.flops import decode_flops, layers_flops, prefill_flops
from cat_jax.models.decoder.model import Decoder, abstract_params, default_positions, init_params
from cat_jax.models.decoder.sharding import fit_axis_rules

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderModel",
    "abstract_params",
    "layers_flops",
    "decode_block",
    "decode_flops",
    "default_positions",
    "fit_axis_rules",
    "init_cache",
    "init_params",
    "prefill_flops",
    "set_cache_index",
]
