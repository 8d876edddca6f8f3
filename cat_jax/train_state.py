"""The train state and its sharded initialisation.

Everything that decides the future of a run lives in `TrainState` and so in its checkpoint:
parameters, optimizer state, step and RNG key. The data position is a pure function of the step
(`cat_jax.data.TrainBatches`), so the step restores it too.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from cat_jax import partitioning
from cat_jax.models import Model


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]: raw key data; the step's key is fold_in(key, step)


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def opt_state_shardings(opt_abstract: Any, params_abstract: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shard each optimizer slot like the parameter it mirrors (same path suffix and shape).

    Slots that mirror no parameter (counts, Adafactor's factored rows/columns) are replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(params_abstract), jax.tree_util.tree_leaves(param_shardings)
    ):
        by_path[_path_key(path)] = (leaf.shape, sharding)

    def pick(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return partitioning.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def state_shardings(model: Model, tx: optax.GradientTransformation, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, its NamedShardings) from the model's logical axis annotations."""
    params_abstract, param_specs = model.abstract_params()
    param_shardings = partitioning.tree_shardings(mesh, param_specs, rules)
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    rep = partitioning.replicated(mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params_abstract,
        opt_state=opt_abstract,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = TrainState(
        step=rep,
        params=param_shardings,
        opt_state=opt_state_shardings(opt_abstract, params_abstract, param_shardings, mesh),
        rng=rep,
    )
    return abstract, shardings


def init_train_state(
    model: Model, tx: optax.GradientTransformation, seed: int, shardings: TrainState, params: Any | None = None
) -> TrainState:
    """A fresh state, created directly in its shards (`params` given: start from those)."""
    init_key, run_key = jax.random.split(jax.random.key(seed))

    def from_params(p):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.key_data(run_key)
        )

    if params is not None:
        return jax.jit(from_params, out_shardings=shardings)(params)
    return jax.jit(lambda k: from_params(nn.meta.unbox(model.init_params(k))), out_shardings=shardings)(init_key)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the template a sharded restore fills in."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
