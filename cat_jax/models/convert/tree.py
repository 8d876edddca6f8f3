"""Parameter trees as flat `{"encoder/layers_0/mlp/wo/kernel": array}` dicts, the check that a
converted tree is exactly the one a model config needs (names and shapes), for every family, and
the two layouts of a stack of layers: per layer (`layers_{i}/...`, the converters' and the Hub's)
and scanned (`layers/...` with a leading layers axis; `stack_layers` / `unstack_layers`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax.errors import ConversionError
from cat_jax.models import contract

_SHOWN = 12


def flatten(
    tree: Mapping[str, Any], prefix: str = "", is_leaf: Callable[[Any], bool] = lambda _: False
) -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested dict (a mapping for which `is_leaf` says True is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and not is_leaf(value):
            out.update(flatten(value, path + "/", is_leaf))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every parameter the model of `config` has (nothing is allocated)."""
    abstract, _ = contract.build(config).abstract_params()
    return {path: tuple(leaf.shape) for path, leaf in flatten(abstract).items()}


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_names_and_shapes(
    config: Any,
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    source_name: Callable[[str], str | None] | None = None,
) -> None:
    """Raise ConversionError listing the missing, unexpected and mis-shaped parameters.

    `shapes`: {our path: shape} the source provides; `source_name(path)` is the source's name of
    one of our paths, for the message.
    """
    want = expected_shapes(config)

    def name(path: str) -> str:
        theirs = source_name(path) if source_name else None
        return f"{theirs} ({path})" if theirs and theirs != path else path

    missing = [name(p) for p in want if p not in shapes]
    extra = [name(p) for p in shapes if p not in want]
    wrong = [
        f"{name(p)}: {tuple(shapes[p])} where the config needs {want[p]}"
        for p in want
        if p in shapes and tuple(shapes[p]) != want[p]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"tensors the model has no place for: {_listing(extra)}")
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if problems:
        raise ConversionError(
            f"{where} does not fit the model its config describes ({config}):\n  "
            + "\n  ".join(problems)
            + "\nCheck that the checkpoint is complete and that its config matches its tensors."
        )


def as_float32(array: Any) -> np.ndarray:
    """A float32 numpy array of any array-like (bfloat16 and float16 included); no copy when it
    already is one."""
    return np.asarray(array, dtype=np.float32)


_LAYER = re.compile(r"layers_(\d+)")


def _stack(xs: list[Any]) -> Any:
    return jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack([np.asarray(x) for x in xs])


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """A nested parameter tree in the scanned layout (`scan_layers=True`): every dict's
    `layers_0 ... layers_{n-1}` become one `layers` whose leaves are the layers' leaves stacked on a
    new leading axis (numpy arrays stay numpy, jax arrays stay jax). The inverse of `unstack_layers`."""
    out: dict[str, Any] = {}
    numbered = sorted((int(m.group(1)), k) for k in params if (m := _LAYER.fullmatch(k)))
    if numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))) or "layers" in params:
            raise ConversionError(
                f"Cannot stack layers {[k for _, k in numbered]}: expected layers_0 ... layers_{len(numbered) - 1} "
                "and no `layers` beside them."
            )
        out["layers"] = jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *[params[k] for _, k in numbered])
    for key, value in params.items():
        if key in out or _LAYER.fullmatch(key):
            continue
        out[key] = stack_layers(value) if isinstance(value, Mapping) else value
    return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """A nested parameter tree in the per-layer layout (`scan_layers=False`, the Hub's and T5X's):
    every dict's `layers` (leaves with a leading layers axis) become `layers_0 ... layers_{n-1}`.
    The inverse of `stack_layers`."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "layers" and isinstance(value, Mapping):
            count = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(value)}
            if len(count) != 1:
                raise ConversionError(f"Cannot unstack `layers`: its leaves have different leading sizes {count}.")
            for i in range(count.pop()):
                out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
        else:
            out[key] = unstack_layers(value) if isinstance(value, Mapping) else value
    return out
