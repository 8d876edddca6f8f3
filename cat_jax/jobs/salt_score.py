"""The SALT_DS scoring job behind `python -m cat_jax.salt_score`: every sequence of a train split
scored by the small model (`selection.sequence_scores`), in batches, resumable.

Scores are written to OUTPUT_DIR in chunks of `chunk_batches` batches (each chunk a file, written
atomically, listed in progress.json), so a killed job re-run with the same command scores only
what is missing. When every chunk is there it writes `scores.npz` (task_names, ids, scores, keyed
by example so the training run can match them whatever its order) and `scores.json` (the model,
its step, k, the dataset, the score quantiles); the chunks are then removed. A training run
selects its band from these files (`DataSelection`), so changing the band needs no re-scoring.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping

import gin
import jax
import numpy as np

from cat_jax import data as data_lib
from cat_jax import partitioning, runtime
from cat_jax.errors import ConfigError
from cat_jax.frozen_model import check_vocabulary, load_frozen_model
from cat_jax.salt.selection import META_FILE, SCORES_FILE, sequence_scores

log = logging.getLogger("cat_jax")

PROGRESS = "progress.json"
CHUNKS = "chunks"


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    write(tmp)
    os.replace(tmp, path)


def _write_npy(path: str, save, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            save(f, **arrays)

    _write_atomic(path, write)


def _write_json(path: str, value) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)

    _write_atomic(path, write)


def _job_identity(
    model_dir: str, step: int, top_k: int, dataset: dict, num_examples: int, batch_size: int, chunk_batches: int
) -> dict:
    return {
        "model_dir": model_dir,
        "step": step,
        "top_k": top_k,
        "dataset": dataset,
        "num_examples": num_examples,
        "batch_size": batch_size,
        "chunk_batches": chunk_batches,
    }


def _check_progress(output_dir: str, identity: dict) -> list[int]:
    """The chunks a previous run of this same job finished; refuses another job's directory."""
    path = os.path.join(output_dir, PROGRESS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        progress = json.load(f)
    if progress["job"] != identity:
        raise ConfigError(
            f"{output_dir} holds the progress of another scoring job:\n  {progress['job']}\n"
            f"this one is\n  {identity}\nUse another OUTPUT_DIR, or remove that one."
        )
    return [c for c in progress["done"] if os.path.exists(_chunk_path(output_dir, c))]


def _finished(output_dir: str, identity: dict) -> dict | None:
    """The meta of this job's finished scores in output_dir, None when there are none; refuses
    another job's."""
    path = os.path.join(output_dir, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if {k: meta.get(k) for k in identity} != identity:
        raise ConfigError(f"{output_dir} holds the scores of another job ({path}); use another OUTPUT_DIR.")
    return meta


def _chunk_path(output_dir: str, chunk: int) -> str:
    return os.path.join(output_dir, CHUNKS, f"chunk-{chunk:06d}.npy")


def _scorer(model, mesh, rules, top_k: int):
    sharding = partitioning.batch_sharding(mesh, rules)

    def score(params, batch):
        logits = model.logits(params, batch)
        return sequence_scores(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], top_k)

    return jax.jit(score, out_shardings=partitioning.replicated(mesh)), sharding


@gin.configurable
def salt_score(
    *,
    model_dir: str = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    split: str = "train",
    max_examples: int | None = None,
    top_k: int = 10,
    batch_size: int = 64,
    chunk_batches: int = 20,
    step: int | None = None,
    max_chunks_per_run: int | None = None,
) -> dict:
    """Score every sequence of the split with the model in `model_dir`; returns scores.json's content
    (or, when `max_chunks_per_run` stopped it first, {"chunks_done": n, "chunks": total}).

    The dataset fields must be the training run's (the same task, split, lengths and MAX_EXAMPLES),
    or the run refuses the scores. `top_k` is SALT_DS's k. `max_chunks_per_run` stops this
    invocation after scoring that many chunks (for jobs in fixed time slots); the same command goes on.
    """
    if top_k < 1:
        raise ConfigError(f"salt_score.top_k must be >= 1; got {top_k}.")
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
    dataset = {
        "mixture_or_task_name": mixture_or_task_name,
        "split": split,
        "task_feature_lengths": {k: int(v) for k, v in dict(task_feature_lengths).items()},
        "max_examples": max_examples,
    }
    frozen = load_frozen_model(model_dir, mesh=mesh, rules=rules, step=step)
    vocab = data_lib.get_vocabulary_of(mixture_or_task_name)
    check_vocabulary(model_dir, frozen.info, frozen.config, vocab, role="scoring model")
    arrays = data_lib.load_split(
        mixture_or_task_name, split, dataset["task_feature_lengths"], max_examples=max_examples
    )
    identity = _job_identity(model_dir, frozen.step, top_k, dataset, len(arrays), batch_size, chunk_batches)
    finished = _finished(output_dir, identity)
    if finished is not None:
        log.info("%s already holds these scores (%s): nothing to do.", output_dir, META_FILE)
        return finished
    os.makedirs(os.path.join(output_dir, CHUNKS), exist_ok=True)
    done = _check_progress(output_dir, identity)
    rows_per_chunk = batch_size * chunk_batches
    num_chunks = -(-len(arrays) // rows_per_chunk)
    log.info(
        "SALT_DS scoring %s/%s (%d sequences) with step %d of %s, top-%d, in %d chunks of %d; %d done already.",
        mixture_or_task_name,
        split,
        len(arrays),
        frozen.step,
        model_dir,
        top_k,
        num_chunks,
        rows_per_chunk,
        len(done),
    )
    rules = frozen.rules
    score, sharding = _scorer(frozen.model, mesh, rules, top_k)
    index, count = partitioning.process_batch_slice(sharding, batch_size)
    start, scored, this_run = time.perf_counter(), 0, 0
    for chunk in range(num_chunks):
        if chunk in done:
            continue
        if max_chunks_per_run is not None and this_run >= max_chunks_per_run:
            log.info(
                "max_chunks_per_run=%d reached: %d of %d chunks scored; the same command goes on.",
                max_chunks_per_run,
                len(done),
                num_chunks,
            )
            return {"chunks_done": len(done), "chunks": num_chunks}
        this_run += 1
        part = arrays.take(np.arange(chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, len(arrays))))
        out = []
        for batch, real in data_lib.eval_batches(part, batch_size):
            local = {k: np.split(v, count)[index] for k, v in frozen.model.make_batch(batch, vocab).items()}
            with partitioning.activation_sharding(mesh, rules):
                values = score(frozen.params, partitioning.global_batch(local, sharding, batch_size))
            out.append(np.asarray(jax.device_get(values))[real])
        done.append(chunk)
        if runtime.is_lead():
            _write_npy(_chunk_path(output_dir, chunk), np.save, arr=np.concatenate(out))
            _write_json(os.path.join(output_dir, PROGRESS), {"job": identity, "done": sorted(done)})
        scored += len(part)
        rate = scored / (time.perf_counter() - start)
        left = len(arrays) - min(len(done) * rows_per_chunk, len(arrays))
        log.info("scored chunk %d/%d: %.0f sequences/s, ETA %.0fs", len(done), num_chunks, rate, left / rate)
    runtime.sync("cat_jax_salt_scores_done")
    if not runtime.is_lead():
        return {}
    scores = np.concatenate([np.load(_chunk_path(output_dir, c)) for c in range(num_chunks)])
    _write_npy(
        os.path.join(output_dir, SCORES_FILE),
        np.savez,
        task_names=arrays.task_names.astype(str),
        ids=arrays.ids.astype(str),
        scores=scores,
    )
    finite = scores[np.isfinite(scores)]
    quantiles = np.quantile(finite, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist() if len(finite) else []
    meta = {
        **identity,
        "num_unlearnable": int(len(scores) - len(finite)),
        "quantiles_0_25_50_75_100": [round(q, 6) for q in quantiles],
    }
    _write_json(os.path.join(output_dir, META_FILE), meta)
    shutil.rmtree(os.path.join(output_dir, CHUNKS))
    os.remove(os.path.join(output_dir, PROGRESS))
    log.info(
        "Wrote %s: %d sequences, %d with no token in the top-%d (never selected); score quantiles %s.",
        os.path.join(output_dir, SCORES_FILE),
        len(scores),
        meta["num_unlearnable"],
        top_k,
        meta["quantiles_0_25_50_75_100"],
    )
    return meta
