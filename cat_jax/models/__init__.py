"""Model families behind one contract (`contract.py`): build a model from its config or from a
MODEL_DIR's run_info, and everything else through the `Model` it returns.

    contract.py  Model (what every family provides), register, build, from_run_info
    layers.py    building blocks the families share (logically partitioned Dense, parameters)
    t5/          the T5-family encoder-decoder (T5Config)
    decoder/     decoder-only models: Llama, Mistral, Qwen2/3, Gemma/Gemma 2 (DecoderConfig)
    convert/     checkpoints in and out of every family (Hugging Face, T5X), flat parameter trees
"""

from cat_jax.models import decoder, t5  # noqa: F401  (registers the families)
from cat_jax.models.contract import (
    DEFAULT_FAMILY,
    FAMILIES,
    LOSS_WEIGHTS,
    TARGETS,
    Model,
    build,
    config_from_run_info,
    family_class,
    family_of_run_info,
    from_run_info,
)

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "LOSS_WEIGHTS",
    "Model",
    "TARGETS",
    "build",
    "config_from_run_info",
    "family_class",
    "family_of_run_info",
    "from_run_info",
]
