"""Per-example records of one model on one task: the input of every deferral rule and curve."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_SHOWN_IDS = 10


def _token_arrays(name: str, seqs: Sequence[Any], n: int) -> tuple[np.ndarray, ...]:
    """Converts N per-example token sequences to a tuple of float64 arrays [T_i]."""
    if len(seqs) != n:
        raise ValueError(f"{name} has {len(seqs)} entries but ids has {n}; give one per example.")
    arrays = tuple(np.asarray(s, dtype=np.float64) for s in seqs)
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}] has shape {a.shape}; expected one value per token [T].")
    return arrays


@dataclasses.dataclass(frozen=True)
class ModelOutputs:
    """One model's outputs on N examples of one task, every field in the same example order.

    ids: [N] unique example ids. predictions: [N] decoded strings. targets: [N] references (whatever
    the task metric takes). logprobs: N arrays [T_i], log p(y_hat_t | x, y_hat_<t) of each generated
    token. entropies: N arrays [T_i], entropy of each decoding step's distribution. quality: [N]
    per-example metric (exact match, accuracy, ...). flops: [N] forward FLOPs of each example.
    hidden: [N, d] mean final decoder embedding, or None. margins: N arrays [T_i], top-1 minus top-2
    probability at each step, or None. embedding: [N, e] the model's intermediate representation of
    each input (for T5 the mean encoder hidden state at a chosen depth; post_hoc_embed's features),
    or None; embedding_flops: [N] what computing it costs, given with embedding.
    """

    ids: Sequence[str]
    predictions: Sequence[str]
    targets: Sequence[Any]
    logprobs: Sequence[np.ndarray]
    entropies: Sequence[np.ndarray]
    quality: np.ndarray
    flops: np.ndarray
    hidden: np.ndarray | None = None
    margins: Sequence[np.ndarray] | None = None
    embedding: np.ndarray | None = None
    embedding_flops: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = tuple(str(i) for i in self.ids)
        n = len(ids)
        if len(set(ids)) != n:
            dupes = sorted(i for i, count in collections.Counter(ids).items() if count > 1)[:_SHOWN_IDS]
            raise ValueError(f"duplicate example ids {dupes}; ids must be unique within a task.")

        def set_(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)  # the dataclass is frozen; normalise once here

        set_("ids", ids)
        for field in ("predictions", "targets"):
            values = tuple(getattr(self, field))
            if len(values) != n:
                raise ValueError(f"{field} has {len(values)} entries but ids has {n}.")
            set_(field, values)
        for field in ("quality", "flops"):
            values = np.asarray(getattr(self, field), dtype=np.float64)
            if values.shape != (n,):
                raise ValueError(f"{field} has shape {values.shape}; expected [N] = ({n},).")
            set_(field, values)
        set_("logprobs", _token_arrays("logprobs", self.logprobs, n))
        for field in ("entropies", "margins"):
            if getattr(self, field) is None:
                continue
            arrays = _token_arrays(field, getattr(self, field), n)
            for i, (a, lp) in enumerate(zip(arrays, self.logprobs)):
                if a.shape != lp.shape:
                    raise ValueError(
                        f"{field}[{i}] has {a.size} tokens but logprobs[{i}] has {lp.size}; "
                        "both must describe the same generated tokens."
                    )
            set_(field, arrays)
        for field in ("hidden", "embedding"):
            if getattr(self, field) is not None:
                values = np.asarray(getattr(self, field), dtype=np.float64)
                if values.ndim != 2 or values.shape[0] != n:
                    raise ValueError(f"{field} has shape {values.shape}; expected [N, d] with N = {n}.")
                set_(field, values)
        if (self.embedding is None) != (self.embedding_flops is None):
            raise ValueError("embedding and embedding_flops come together: give both or neither.")
        if self.embedding_flops is not None:
            values = np.asarray(self.embedding_flops, dtype=np.float64)
            if values.shape != (n,):
                raise ValueError(f"embedding_flops has shape {values.shape}; expected [N] = ({n},).")
            set_("embedding_flops", values)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Sequence[int] | np.ndarray) -> ModelOutputs:
        """Returns the records at positions `index` [M], in that order."""
        index = np.asarray(index, dtype=np.int64)

        def pick(seq: Sequence[Any]) -> list[Any]:
            return [seq[i] for i in index]

        return ModelOutputs(
            ids=pick(self.ids),
            predictions=pick(self.predictions),
            targets=pick(self.targets),
            logprobs=pick(self.logprobs),
            entropies=pick(self.entropies),
            quality=self.quality[index],
            flops=self.flops[index],
            hidden=None if self.hidden is None else self.hidden[index],
            margins=None if self.margins is None else pick(self.margins),
            embedding=None if self.embedding is None else self.embedding[index],
            embedding_flops=None if self.embedding_flops is None else self.embedding_flops[index],
        )


def _format_ids(ids: set[str]) -> str:
    shown = sorted(ids)[:_SHOWN_IDS]
    more = f" and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
    return f"{shown}{more}"


def align(outputs: Mapping[str, ModelOutputs]) -> dict[str, ModelOutputs]:
    """Reorders every model's records into the example order of the first model.

    outputs: model name -> records on the same task. Raises ValueError naming the model and the ids
    it lacks or has in excess when the models did not see the same examples.
    """
    if not outputs:
        raise ValueError("align() needs at least one model's outputs.")
    (ref_name, ref), *_ = outputs.items()
    ref_ids = set(ref.ids)
    aligned = {}
    for name, out in outputs.items():
        missing, extra = ref_ids - set(out.ids), set(out.ids) - ref_ids
        if missing or extra:
            raise ValueError(
                f"model {name!r} does not cover the examples of model {ref_name!r}: "
                f"missing ids {_format_ids(missing)}, extra ids {_format_ids(extra)}. "
                "Decode the same task split with every model."
            )
        position = {example_id: i for i, example_id in enumerate(out.ids)}
        aligned[name] = out.take([position[i] for i in ref.ids])
    return aligned


def check_aligned(reference: ModelOutputs, *others: ModelOutputs) -> None:
    """Raises ValueError unless every record set lists the same ids in the same order."""
    for i, other in enumerate(others):
        if other.ids != reference.ids:
            raise ValueError(
                f"records #{i + 1} are not aligned with the reference records "
                f"({len(other)} vs {len(reference)} examples, or a different order); "
                "call cat_jax.cascade.records.align() first."
            )


@dataclasses.dataclass(frozen=True)
class SplitRecords:
    """Every model's records on one split, aligned, with the task of each example.

    name: the split ('test', 'validation'). tasks: [N] task name of each example. models: display
    name -> ModelOutputs, all listing the same ids in the same order.
    """

    name: str
    tasks: tuple[str, ...]
    models: dict[str, ModelOutputs]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        object.__setattr__(self, "models", dict(self.models))
        if not self.models:
            raise ValueError(f"split {self.name!r} has no model's records.")
        reference, *others = self.models.values()
        check_aligned(reference, *others)
        if len(self.tasks) != len(reference):
            raise ValueError(f"tasks has {len(self.tasks)} entries but the records have {len(reference)}.")

    def __len__(self) -> int:
        return len(self.tasks)

    def groups(self, mixture_name: str) -> dict[str, np.ndarray]:
        """Group name -> rows [M]: each task (in order of first appearance), plus every example
        pooled under `mixture_name` when that is not one of the tasks."""
        tasks = np.asarray(self.tasks, dtype=object)
        groups = {name: np.flatnonzero(tasks == name) for name in dict.fromkeys(self.tasks)}
        if mixture_name not in groups:
            groups[mixture_name] = np.arange(len(self))
        return groups
