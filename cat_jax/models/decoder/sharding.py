"""Fitting the logical-axis rules to a decoder's sizes on a given mesh.

The rules table (`cat_jax.partitioning.DEFAULT_LOGICAL_AXIS_RULES`) splits `heads`, `kv_heads`,
`mlp` and `vocab` over `model` and `embed` over `fsdp`. A mesh axis must divide the dimension it
splits (jax refuses uneven shardings), and published decoders have head counts no power of two
divides (Qwen2.5 0.5B: 14 query heads, 2 key/value heads; Gemma 2B: 1 key/value head), so for a
given config and mesh the dimensions an axis does not divide are replicated instead: the rules gain
a leading (name, None) entry for each of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.partitioning import LogicalRules


def logical_sizes(config: DecoderConfig) -> dict[str, int]:
    """The size of each logical axis the decoder's parameters carry."""
    return {
        "vocab": config.vocab_size,
        "embed": config.emb_dim,
        "mlp": config.mlp_dim,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "kv": config.head_dim,
    }


def fit_axis_rules(config: DecoderConfig, mesh_shape: Mapping[str, int], rules: LogicalRules) -> tuple:
    """`rules` with (name, None) put first for each logical axis of `config` that one of its rules
    would split over mesh axes (sizes from `mesh_shape`, e.g. `mesh.shape`) whose product does not
    divide the axis's size."""
    sizes = logical_sizes(config)
    replicated = []
    for name, target in rules:
        if name not in sizes or sizes[name] is None or name in replicated:
            continue
        axes = target if isinstance(target, (tuple, list)) else (target,)
        split = math.prod(mesh_shape.get(a, 1) for a in axes if a is not None)
        if sizes[name] % split:
            replicated.append(name)
    return tuple((name, None) for name in replicated) + tuple(rules)
