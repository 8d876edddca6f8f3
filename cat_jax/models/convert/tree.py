"""Parameter trees as flat `{"encoder/layers_0/mlp/wo/kernel": array}` dicts, and the check that a
converted tree is exactly the one a model config needs (names and shapes), for every family."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
