"""Batched prediction over a split, and the tasks' seqio metrics on the predictions.

Used by the trainer's periodic evaluation and by the eval, infer and cascade_eval binaries, for a
model of any family (`cat_jax.models`): each batch of examples becomes the model's batch
(`Model.make_batch`), of which decoding reads the model's DECODING_INPUTS. Each process feeds its own
rows of every batch; the decoded outputs are gathered on every process. The decoding method
(greedy, sampling, beam search) is gin's `decoding` configurable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from cat_jax import data as data_lib
from cat_jax import metrics, partitioning
from cat_jax.decoding import DecodingConfig, make_decoder
from cat_jax.errors import ConfigError
from cat_jax.models import Model


@dataclasses.dataclass
class Predictions:
    """Decoded outputs for every example of an ExampleArrays, in its order."""

    tokens: np.ndarray  # [N, T] int32, 0 after EOS
    logprobs: np.ndarray  # [N, T] float32, 0 after EOS
    entropies: np.ndarray  # [N, T] float32, 0 after EOS
    lengths: np.ndarray  # [N] int32, generated tokens including EOS
    mean_hidden: np.ndarray  # [N, d] float32
    margins: np.ndarray  # [N, T] float32, top-1 minus top-2 probability, 0 after EOS
    texts: list[str]  # detokenized predictions


def _process_rows(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """Block `index` of `count` equal blocks of rows: this process's share of a global batch."""
    return {k: np.split(v, count)[index] for k, v in batch.items()}


def predict(
    model: Model,
    params: Any,
    arrays: data_lib.ExampleArrays,
    vocab,
    batch_size: int,
    mesh: Mesh,
    rules,
    max_decode_length: int,
    decoding: DecodingConfig | None = None,
) -> Predictions:
    """Decode every example (jit-compiled, key/value cache, batch split over the mesh, the
    activations constrained by `rules`) with `decoding`, by default gin's `decoding`
    configurable (greedy unless bound).

    Every process calls this with the same arguments (the same `arrays`, in the same order); each
    feeds only its block of rows of each batch and every process gets all predictions back.
    """
    decoding = DecodingConfig() if decoding is None else decoding
    decode = _jitted_decoder(decoding, model, max_decode_length, vocab.eos_id)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for out, real in map_batches(
        lambda inputs, i: decode(params, inputs, decoding.rng(i)), model, arrays, vocab, batch_size, mesh, rules
    ):
        for name in ("tokens", "logprobs", "entropies", "lengths", "mean_hidden", "margins"):
            parts[name].append(np.asarray(getattr(out, name))[real])
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    texts = [detokenize(vocab, row, length) for row, length in zip(merged["tokens"], merged["lengths"])]
    return Predictions(texts=texts, **merged)


def map_batches(
    call: Callable[[Mapping[str, jax.Array], int], Any],
    model: Model,
    arrays: data_lib.ExampleArrays,
    vocab,
    batch_size: int,
    mesh: Mesh,
    rules,
) -> Iterator[tuple[Any, np.ndarray]]:
    """(call(the model's decoding inputs on the mesh, batch index) on the host, real rows [B]) for
    every batch; each process feeds its block of rows and every process gets the whole batch's
    output."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards or batch_size % jax.process_count():
        raise ConfigError(
            f"Eval batch size {batch_size} must be divisible by the {shards} data shards "
            f"and {jax.process_count()} processes; pick a multiple of "
            f"{np.lcm(shards, jax.process_count())}."
        )
    sharding = partitioning.batch_sharding(mesh, rules)
    index, count = partitioning.process_batch_slice(sharding, batch_size)
    for batch_index, (batch, real) in enumerate(data_lib.eval_batches(arrays, batch_size)):
        local = _process_rows(model.decoding_inputs(model.make_batch(batch, vocab)), index, count)
        inputs = partitioning.global_batch(local, sharding, batch_size)
        with partitioning.activation_sharding(mesh, rules):
            out = call(inputs, batch_index)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        yield jax.device_get(out), real


def mean_input_hidden(
    model: Model, params: Any, arrays: data_lib.ExampleArrays, vocab, batch_size: int, mesh: Mesh, rules, depth: int
) -> np.ndarray:
    """Each example's `Model.input_embedding` after the first `depth` layers: [N, d] float32
    (batched and sharded as `predict`)."""
    pool = _jitted_input_embedding(model, depth)
    return np.concatenate(
        [
            np.asarray(out)[real]
            for out, real in map_batches(
                lambda inputs, i: pool(params, inputs), model, arrays, vocab, batch_size, mesh, rules
            )
        ]
    )


@functools.lru_cache(maxsize=4)
def _jitted_input_embedding(model: Model, depth: int) -> Any:
    return jax.jit(lambda params, inputs: model.input_embedding(params, inputs, depth))


@functools.lru_cache(maxsize=16)
def _jitted_decoder(decoding: DecodingConfig, model: Model, max_decode_length: int, eos_id: int) -> Any:
    """One jitted decoder per (method, model, length, EOS): periodic evaluation compiles once."""
    return make_decoder(decoding, model, max_decode_length, eos_id)


def detokenize(vocab, tokens: np.ndarray, length: int | None = None) -> str:
    """The text of one row of decoded tokens: its first `length` tokens (all by default), cut at
    EOS. Padding after the row's end is never read (id 0 is a real token of many vocabularies)."""
    ids = [int(t) for t in (tokens if length is None else tokens[: int(length)])]
    if vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    return vocab.decode(ids)


def task_metrics(arrays: data_lib.ExampleArrays, texts: list[str]) -> dict[str, dict[str, float]]:
    """Each task's seqio predict metrics on its own examples' postprocessed predictions."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(arrays.task_names):
        by_task[name].append(i)
    results = {}
    for name, rows in sorted(by_task.items()):
        task = data_lib.get_task_or_mixture(name)
        targets, preds = [], []
        for i in rows:
            example = arrays.example(i)
            targets.append(task.postprocess_fn(arrays.targets_text[i], example=example, is_target=True))
            preds.append(task.postprocess_fn(texts[i], example=example, is_target=False))
        metrics: dict[str, float] = {}
        for fn in task.predict_metric_fns:
            metrics.update({k: float(v) for k, v in fn(targets, preds).items()})
        results[name] = metrics
    return results


def evaluate(
    model: Model,
    params: Any,
    arrays: data_lib.ExampleArrays,
    vocab,
    batch_size: int,
    mesh: Mesh,
    rules,
    max_decode_length: int,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from predictions on `arrays` (gin's `decoding` method)."""
    preds = predict(model, params, arrays, vocab, batch_size, mesh, rules, max_decode_length)
    return task_metrics(arrays, preds.texts)


def flatten(metrics: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{task}/{name}": value for task, m in metrics.items() for name, value in m.items()}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's examples, their postprocessed targets and the rows of each task."""

    name: str
    arrays: data_lib.ExampleArrays
    targets: list[Any]
    task_rows: dict[str, np.ndarray]


def load_split(dataset: Any, split: str) -> Split:
    """A split of the dataset (a DatasetConfig) with its targets postprocessed by each example's task."""
    arrays = data_lib.load_split(
        dataset.mixture_or_task_name, split, dict(dataset.task_feature_lengths), max_examples=dataset.max_examples
    )
    names = list(dict.fromkeys(arrays.task_names.tolist()))
    tasks = {name: data_lib.get_task_or_mixture(name) for name in names}
    targets = [
        tasks[t].postprocess_fn(arrays.targets_text[i], example=arrays.example(i), is_target=True)
        for i, t in enumerate(arrays.task_names)
    ]
    rows = {name: np.flatnonzero(arrays.task_names == name) for name in names}
    return Split(split, arrays, targets, rows)


def score_texts(split: Split, texts: Sequence[str]) -> tuple[list[Any], np.ndarray]:
    """Predictions [N] postprocessed by each example's task, and their per-example quality [N]."""
    arrays = split.arrays
    tasks = {name: data_lib.get_task_or_mixture(name) for name in split.task_rows}
    processed = [
        tasks[t].postprocess_fn(texts[i], example=arrays.example(i), is_target=False)
        for i, t in enumerate(arrays.task_names)
    ]
    quality = np.zeros(len(arrays))
    for name, rows in split.task_rows.items():
        per_example = metrics.get_quality(name).per_example
        quality[rows] = per_example([split.targets[i] for i in rows], [processed[i] for i in rows])
    return processed, quality
