"""T5-family encoder-decoders (Flax linen, logical axes), their config, FLOPs and model contract.

    config.py           T5Config (shapes, MLP activation, tied logits, layer-norm epsilon)
    layers.py, t5.py    the network
    flops.py            analytic FLOPs: forward pass, encoder (or its first layers), a block of cached decoder tokens
    encoder_decoder.py  the model contract the trainer and the cascade code call: init, logits, loss
    convert/            Hugging Face and T5X checkpoints in, Hugging Face out
"""

from cat_jax.models.config import T5Config
from cat_jax.models.encoder_decoder import EncoderDecoderModel, LossOptions
from cat_jax.models.flops import decoder_flops, encoder_flops, encoder_layers_flops, forward_flops
from cat_jax.models.t5 import Transformer

__all__ = ["EncoderDecoderModel", "LossOptions", "T5Config", "Transformer", "decoder_flops", "encoder_flops",
           "encoder_layers_flops", "forward_flops"]
