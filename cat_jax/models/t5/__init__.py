"""The T5 family: T5 v1.0 / v1.1, Flan-T5, mT5 and gated-SiLU encoder-decoders (Flax linen, logical
axes).

    config.py    T5Config (shapes, MLP activation, tied logits, layer-norm epsilon)
    layers.py    RMSNorm, embedding, MLP, relative position bias, attention with its cache
    network.py   Transformer: encoder, decoder, the hidden states after k encoder layers
    flops.py     analytic FLOPs: forward pass, encoder (or its first k layers), a block of decoded tokens
    model.py     T5Model: the family's side of the model contract (cat_jax.models.contract)
    convert/     Hugging Face (hf.py) and T5X (t5x.py) checkpoints
"""

from cat_jax.models.t5.config import T5Config
from cat_jax.models.t5.flops import decoder_flops, encoder_flops, encoder_layers_flops, forward_flops
from cat_jax.models.t5.model import T5Model
from cat_jax.models.t5.network import Transformer

__all__ = [
    "T5Config",
    "T5Model",
    "Transformer",
    "decoder_flops",
    "encoder_flops",
    "encoder_layers_flops",
    "forward_flops",
]
