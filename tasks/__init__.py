"""seqio task registrations for cat_jax; importing this package registers every task and mixture.

`REGISTERED_BY` maps each task or mixture name to the module that registered it
(`python -m tasks` prints the catalogue).
"""

from __future__ import annotations

import importlib

import seqio

MODULES = ("tasks.offline", "tasks.superglue", "tasks.wmt", "tasks.flan", "tasks.synthetic")


def _registered_names() -> set[str]:
    return set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())


REGISTERED_BY: dict[str, str] = {}
for _module in MODULES:
    _before = _registered_names()
    importlib.import_module(_module)
    REGISTERED_BY.update(dict.fromkeys(sorted(_registered_names() - _before), _module))
