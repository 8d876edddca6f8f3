"""`python -m tasks`: the catalogue of registered tasks and mixtures (splits, metrics, module)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import seqio

import tasks


def _function_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", repr(fn))


def catalogue() -> list[str]:
    """One line per registered task, then one per mixture."""
    lines = ["Tasks:"]
    for name in sorted(seqio.TaskRegistry.names()):
        task = seqio.TaskRegistry.get(name)
        metric_names = ", ".join(_function_name(fn) for fn in task.metric_fns) or "-"
        lines.append(
            f"  {name}  splits: {', '.join(task.splits)}  metrics: {metric_names}  "
            f"module: {tasks.REGISTERED_BY.get(name, '(outside tasks)')}"
        )
    lines.append("Mixtures:")
    for name in sorted(seqio.MixtureRegistry.names()):
        mixture = seqio.MixtureRegistry.get(name)
        common = set.intersection(*(set(t.splits) for t in mixture.tasks))
        splits = [s for s in mixture.tasks[0].splits if s in common]
        lines.append(
            f"  {name}  tasks: {', '.join(t.name for t in mixture.tasks)}  splits: {', '.join(splits)}  "
            f"module: {tasks.REGISTERED_BY.get(name, '(outside tasks)')}"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(catalogue()))
