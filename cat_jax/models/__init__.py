"""T5 v1.1 encoder-decoder (Flax linen, logical axes), its config and analytic FLOPs."""

from cat_jax.models.config import T5Config
from cat_jax.models.flops import forward_flops
from cat_jax.models.t5 import Transformer

__all__ = ["T5Config", "Transformer", "forward_flops"]
