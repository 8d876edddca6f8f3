"""`ExampleArrays`: a split as fixed-shape numpy arrays plus per-example metadata (plain numpy).

A leaf of the data package: no seqio, no TensorFlow, no gin. `sample_per_task` is how MAX_EXAMPLES
picks examples: a uniform sample of each task, the same on every host and for every data source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

MODEL_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
TEXT_FIELDS = ("ids", "task_names", "inputs_text", "targets_text", "extras")
LENGTH_FIELDS = ("input_lengths", "target_lengths")
# MAX_EXAMPLES keeps the examples with the smallest hash of (SAMPLE_SEED, task, id): a uniform
# sample of each task, the same for every source, host and storage order.
SAMPLE_SEED = 0


@dataclasses.dataclass
class ExampleArrays:
    """Examples as fixed-shape arrays plus per-example metadata (all of length N).

    `features` holds MODEL_FEATURES: `encoder_input_tokens [N, Li]`, `decoder_input_tokens`,
    `decoder_target_tokens` `[N, Lt]` (int32) and `decoder_loss_weights [N, Lt]` (float32).
    `input_lengths` / `target_lengths` are the token counts (EOS included) before truncation.
    `extras` holds, as JSON, a task's other string features (e.g. g2p's `alternatives`) that its
    postprocessor reads from the example.
    """

    features: dict[str, np.ndarray]
    ids: np.ndarray
    task_names: np.ndarray
    inputs_text: np.ndarray
    targets_text: np.ndarray
    input_lengths: np.ndarray
    target_lengths: np.ndarray
    extras: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, i: int) -> dict[str, str]:
        """Example i's string features, as a task's postprocess_fn expects them."""
        return {
            "id": str(self.ids[i]),
            "inputs_pretokenized": str(self.inputs_text[i]),
            "targets_pretokenized": str(self.targets_text[i]),
            **json.loads(str(self.extras[i])),
        }

    @property
    def num_truncated_inputs(self) -> int:
        """Examples whose inputs were longer than the encoder length."""
        return int(np.sum(self.input_lengths > self.features["encoder_input_tokens"].shape[1]))

    @property
    def num_truncated_targets(self) -> int:
        """Examples whose targets were longer than the decoder length."""
        return int(np.sum(self.target_lengths > self.features["decoder_target_tokens"].shape[1]))

    def task_order(self) -> list[str]:
        """The tasks of the examples, in order of first appearance."""
        return list(dict.fromkeys(self.task_names.tolist()))

    def take(self, indices: Sequence[int] | np.ndarray) -> ExampleArrays:
        """The examples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ExampleArrays(
            features={k: v[indices] for k, v in self.features.items()},
            **{f: getattr(self, f)[indices] for f in TEXT_FIELDS + LENGTH_FIELDS},
        )

    @classmethod
    def concatenate(cls, parts: Sequence[ExampleArrays]) -> ExampleArrays:
        """The examples of every part, one part after the other."""
        return cls(
            features={k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in TEXT_FIELDS + LENGTH_FIELDS},
        )

    def save(self, path: str, extra: Mapping[str, np.ndarray] | None = None) -> None:
        """Writes one .npz (atomically: a temporary file renamed into place).

        `extra` arrays are stored beside the fields under their own names (`load` ignores them).
        """
        arrays = {f"feature/{k}": v for k, v in self.features.items()}
        arrays.update({f: getattr(self, f) for f in TEXT_FIELDS + LENGTH_FIELDS})
        clash = set(extra or {}) & set(arrays)
        if clash:
            raise ValueError(f"extra arrays {sorted(clash)} clash with ExampleArrays fields.")
        arrays.update(extra or {})
        tmp = f"{path}.tmp.{uuid.uuid4().hex}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> ExampleArrays:
        """Reads a .npz written by `save` (plain numpy; no TensorFlow needed)."""
        with np.load(path, allow_pickle=False) as data:
            features = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("feature/")}
            return cls(features=features, **{f: data[f] for f in TEXT_FIELDS + LENGTH_FIELDS})


def sample_keys(task_names: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per example [N] from (seed, task, id): the order `sample_per_task` uses."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}\0{t}\0{i}".encode()).digest()[:8], "big")
            for t, i in zip(task_names.tolist(), ids.tolist())
        ],
        dtype=np.uint64,
    )


def sampled_ids(task: str, ids: Sequence[str], max_examples: int, seed: int = SAMPLE_SEED) -> set[str]:
    """The ids `sample_per_task` keeps among one task's `ids` (a source can filter by them before
    the expensive preprocessing)."""
    ids = np.asarray(list(ids), dtype=str)
    if len(ids) <= max_examples:
        return set(ids.tolist())
    keys = sample_keys(np.full(len(ids), task), ids, seed)
    return set(ids[np.argsort(keys, kind="stable")[:max_examples]].tolist())


def sample_per_task(arrays: ExampleArrays, max_examples: int, seed: int = SAMPLE_SEED) -> ExampleArrays:
    """A uniform sample of at most `max_examples` examples of each task, in the original order.

    The examples with the smallest `sample_keys` are kept: a hash of (seed, task, id), so the sample
    does not depend on how the split is stored or ordered, a smaller sample is a subset of a larger
    one, and an export capped at N examples serves every run that asks for N or fewer.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1; got {max_examples}.")
    keys = sample_keys(arrays.task_names, arrays.ids, seed)
    keep = []
    for task in arrays.task_order():
        rows = np.flatnonzero(arrays.task_names == task)
        if len(rows) > max_examples:
            rows = np.sort(rows[np.argsort(keys[rows], kind="stable")[:max_examples]])
        keep.append(rows)
    return arrays.take(np.concatenate(keep))
