"""Batched prediction over a split, and the tasks' seqio metrics on the predictions.

Used by the trainer's periodic evaluation and by the eval, infer and cascade_eval binaries. Each
process feeds its own rows of every batch; the decoded outputs are gathered on every process.
The decoding method (greedy, sampling, beam search) is gin's `decoding` configurable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cat_jax import data as data_lib
from cat_jax import partitioning
from cat_jax.decoding import DecodingConfig, make_decoder
from cat_jax.errors import ConfigError
from cat_jax.models.encoder_decoder import EncoderDecoderModel
from cat_jax.models.t5 import Transformer


@dataclasses.dataclass
class Predictions:
    """Decoded outputs for every example of an ExampleArrays, in its order."""
    tokens: np.ndarray        # [N, T] int32, 0 after EOS
    logprobs: np.ndarray      # [N, T] float32, 0 after EOS
    entropies: np.ndarray     # [N, T] float32, 0 after EOS
    lengths: np.ndarray       # [N] int32, generated tokens including EOS
    mean_hidden: np.ndarray   # [N, emb] float32
    margins: np.ndarray       # [N, T] float32, top-1 minus top-2 probability, 0 after EOS
    texts: list[str]          # detokenized predictions


def _process_rows(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """Block `index` of `count` equal blocks of rows: this process's share of a global batch."""
    return {k: np.split(v, count)[index] for k, v in batch.items()}


def predict(model: EncoderDecoderModel, params: Any, arrays: data_lib.ExampleArrays, vocab,
            batch_size: int, mesh: Mesh, rules, max_decode_length: int,
            decoding: DecodingConfig | None = None) -> Predictions:
    """Decode every example (jit-compiled, key/value cache, batch split over the mesh, the
    activations constrained by `rules`) with `decoding`, by default gin's `decoding`
    configurable (greedy unless bound).

    Every process calls this with the same arguments (the same `arrays`, in the same order); each
    feeds only its block of rows of each batch and every process gets all predictions back.
    """
    decoding = DecodingConfig() if decoding is None else decoding
    decode = _jitted_decoder(decoding, model.module, max_decode_length, vocab.eos_id)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for out, real in _map_batches(lambda enc, i: decode(params, enc, decoding.rng(i)), arrays, batch_size,
                                  mesh, rules):
        for name in ("tokens", "logprobs", "entropies", "lengths", "mean_hidden", "margins"):
            parts[name].append(np.asarray(getattr(out, name))[real])
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    texts = [detokenize(vocab, row) for row in merged["tokens"]]
    return Predictions(texts=texts, **merged)


def _map_batches(call: Callable[[jax.Array, int], Any], arrays: data_lib.ExampleArrays, batch_size: int,
                 mesh: Mesh, rules) -> Iterator[tuple[Any, np.ndarray]]:
    """(call(encoder inputs [B, Li] on the mesh, batch index) on the host, real rows [B]) for every
    batch; each process feeds its block of rows and every process gets the whole batch's output."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards or batch_size % jax.process_count():
        raise ConfigError(f"Eval batch size {batch_size} must be divisible by the {shards} data shards "
                         f"and {jax.process_count()} processes; pick a multiple of "
                         f"{np.lcm(shards, jax.process_count())}.")
    sharding = partitioning.batch_sharding(mesh, rules)
    index, count = partitioning.process_batch_slice(sharding, batch_size)
    for batch_index, (batch, real) in enumerate(data_lib.eval_batches(arrays, batch_size)):
        local = _process_rows({"e": batch["encoder_input_tokens"]}, index, count)
        enc = partitioning.global_batch(local, sharding, batch_size)["e"]
        with partitioning.activation_sharding(mesh, rules):
            out = call(enc, batch_index)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        yield jax.device_get(out), real


def mean_encoder_hidden(model: EncoderDecoderModel, params: Any, arrays: data_lib.ExampleArrays,
                        batch_size: int, mesh: Mesh, rules, depth: int) -> np.ndarray:
    """Each example's encoder hidden state after the first `depth` layers, averaged over its
    non-padding input tokens: [N, emb] float32 (batched and sharded as `predict`)."""
    pool = _jitted_mean_encoder_hidden(model.module, depth)
    return np.concatenate([np.asarray(out)[real] for out, real in
                           _map_batches(lambda enc, i: pool(params, enc), arrays, batch_size, mesh, rules)])


@functools.lru_cache(maxsize=4)
def _jitted_mean_encoder_hidden(module: Any, depth: int) -> Any:
    def pool(params: Any, tokens: jax.Array) -> jax.Array:
        hidden = module.apply({"params": params}, tokens, depth, method=Transformer.encoder_hidden)
        mask = (tokens > 0)[..., None].astype(jnp.float32)
        return (hidden.astype(jnp.float32) * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)

    return jax.jit(pool)


@functools.lru_cache(maxsize=16)
def _jitted_decoder(decoding: DecodingConfig, module: Any, max_decode_length: int, eos_id: int) -> Any:
    """One jitted decoder per (method, network, length, EOS): periodic evaluation compiles once."""
    return make_decoder(decoding, module, max_decode_length, eos_id)


def detokenize(vocab, tokens: np.ndarray) -> str:
    ids = [int(t) for t in tokens]
    if vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    return vocab.decode([t for t in ids if t != 0])


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


def evaluate(model: EncoderDecoderModel, params: Any, arrays: data_lib.ExampleArrays, vocab,
             batch_size: int, mesh: Mesh, rules, max_decode_length: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from predictions on `arrays` (gin's `decoding` method)."""
    preds = predict(model, params, arrays, vocab, batch_size, mesh, rules, max_decode_length)
    return task_metrics(arrays, preds.texts)


def flatten(metrics: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{task}/{name}": value for task, m in metrics.items() for name, value in m.items()}
