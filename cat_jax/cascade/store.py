"""Per-example records on disk, as cascade_eval writes them and `cascade_analyse` reads them back.

`<split file>.jsonl` holds one line per model and example (models in order, examples in split
order): model, id, task, input, target and prediction (the raw texts), scored_target and
scored_prediction (after the task's postprocessing: what the metric compared), token_logprobs,
token_entropies and token_margins of the generated tokens, quality, flops and embedding_flops (the
cost of the model's recorded input embedding, null without one). Token values are written at
float32 precision, the decoder's, in their shortest exact form, so reading them back gives the very
numbers the run analysed; quality and the FLOPs are float64, also exact.
`<split file>_hidden.npz` holds each model's mean final decoder embedding [N, d] (float32), the
post-hoc rule's features, under model0, model1, ... in the order of the models in the JSONL file,
and a model's input embedding [N, e] (float32; post_hoc_embed's features) under model<k>_embedding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cat_jax.cascade.records import ModelOutputs, SplitRecords

EXAMPLES = "examples.jsonl"
VALIDATION_EXAMPLES = "validation_examples.jsonl"


@dataclasses.dataclass(frozen=True)
class SplitTexts:
    """The raw texts behind one split's records: example ids, inputs and targets [N], and each
    model's raw predictions (display name -> [N])."""

    example_ids: Sequence[str]
    inputs: Sequence[str]
    targets: Sequence[str]
    predictions: Mapping[str, Sequence[str]]


def hidden_path(path: str) -> str:
    """examples.jsonl -> examples_hidden.npz."""
    return os.path.splitext(path)[0] + "_hidden.npz"


def _float32_list(values: np.ndarray) -> list[float]:
    """Shortest decimal forms of float32 values; np.float32(float(s)) gives the value back exactly."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32)]


def write_split(path: str, records: SplitRecords, texts: SplitTexts) -> list[str]:
    """Writes `path` (JSONL) and its hidden-state file, when the records have hidden states; returns
    the paths written."""
    hidden = {}
    with open(path, "w") as f:
        for k, (name, out) in enumerate(records.models.items()):
            for i in range(len(records)):
                f.write(
                    json.dumps(
                        {
                            "model": name,
                            "id": str(texts.example_ids[i]),
                            "task": records.tasks[i],
                            "input": str(texts.inputs[i]),
                            "target": str(texts.targets[i]),
                            "prediction": texts.predictions[name][i],
                            "scored_target": out.targets[i],
                            "scored_prediction": out.predictions[i],
                            "token_logprobs": _float32_list(out.logprobs[i]),
                            "token_entropies": _float32_list(out.entropies[i]),
                            "token_margins": None if out.margins is None else _float32_list(out.margins[i]),
                            "quality": float(out.quality[i]),
                            "flops": float(out.flops[i]),
                            "embedding_flops": None if out.embedding_flops is None else float(out.embedding_flops[i]),
                        }
                    )
                    + "\n"
                )
            if out.hidden is not None:
                hidden[f"model{k}"] = out.hidden.astype(np.float32)
            if out.embedding is not None:
                hidden[f"model{k}_embedding"] = out.embedding.astype(np.float32)
    if not hidden:
        return [path]
    np.savez(hidden_path(path), **hidden)
    return [path, hidden_path(path)]


def _tokens(rows: list[dict[str, Any]], field: str) -> list[np.ndarray] | None:
    if any(r[field] is None for r in rows):
        return None
    return [np.asarray(r[field], dtype=np.float32).astype(np.float64) for r in rows]


def read_split(path: str, name: str) -> SplitRecords:
    """The SplitRecords that `write_split` wrote to `path`, for the split called `name`."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            by_model.setdefault(row["model"], []).append(row)
    if not by_model:
        raise ValueError(f"{path} holds no records.")
    hidden_file = hidden_path(path)
    hidden = dict(np.load(hidden_file)) if os.path.exists(hidden_file) else {}
    models = {}
    for k, (model, rows) in enumerate(by_model.items()):
        embedding = hidden.get(f"model{k}_embedding")
        models[model] = ModelOutputs(
            ids=[f"{r['task']}/{r['id']}" for r in rows],
            predictions=[r["scored_prediction"] for r in rows],
            targets=[r["scored_target"] for r in rows],
            logprobs=_tokens(rows, "token_logprobs"),
            entropies=_tokens(rows, "token_entropies"),
            margins=_tokens(rows, "token_margins"),
            quality=[r["quality"] for r in rows],
            flops=[r["flops"] for r in rows],
            hidden=hidden[f"model{k}"].astype(np.float64) if f"model{k}" in hidden else None,
            embedding=None if embedding is None else embedding.astype(np.float64),
            embedding_flops=None if embedding is None else [r["embedding_flops"] for r in rows],
        )
    return SplitRecords(name, [r["task"] for r in next(iter(by_model.values()))], models)
