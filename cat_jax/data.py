"""seqio task or mixture -> fixed-shape numpy arrays -> deterministic batches.

Only `get_task_or_mixture`, `mixture_rates`, `get_vocabulary_of` and `load_split` touch seqio /
TensorFlow, and they import them when called: `ExampleArrays` (with its .npz export), `TrainBatches`
and `eval_batches` are plain numpy.

The gin switch `data_source.exported_dir='/path'` makes those four read the files that
`python -m cat_jax.export_task` wrote there instead (`cat_jax.exported`): the arrays, the
vocabulary, the mixture rates and the tasks' metrics, all without importing TensorFlow or seqio, with
the same arrays and therefore the same batches as the live pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gin
import numpy as np

log = logging.getLogger(__name__)

MODEL_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
TEXT_FIELDS = ("ids", "task_names", "inputs_text", "targets_text", "extras")
LENGTH_FIELDS = ("input_lengths", "target_lengths")
_META_FEATURES = {"id": "ids", "inputs_pretokenized": "inputs_text", "targets_pretokenized": "targets_text"}
_CACHE_FORMAT = 3  # 3: offline tasks in hash order (caches of 2 hold the old order)
_LOAD_BATCH = 1024


@dataclasses.dataclass
class ExampleArrays:
    """Examples as fixed-shape arrays plus per-example metadata (all of length N).

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
        return {"id": str(self.ids[i]), "inputs_pretokenized": str(self.inputs_text[i]),
                "targets_pretokenized": str(self.targets_text[i]), **json.loads(str(self.extras[i]))}

    @property
    def num_truncated_inputs(self) -> int:
        """Examples whose inputs were longer than the encoder length."""
        return int(np.sum(self.input_lengths > self.features["encoder_input_tokens"].shape[1]))

    @property
    def num_truncated_targets(self) -> int:
        """Examples whose targets were longer than the decoder length."""
        return int(np.sum(self.target_lengths > self.features["decoder_target_tokens"].shape[1]))

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


@gin.configurable
def data_source(exported_dir: str | None = None) -> str | None:
    """Where examples come from: None (default) = the live seqio pipeline; a directory = the files
    `python -m cat_jax.export_task` wrote there (`--gin.data_source.exported_dir=/path`).

    It switches every task look-up together (arrays, vocabulary, mixture rates, metrics), which is
    why it is its own configurable rather than a parameter of `load_split`.
    """
    return exported_dir


def exported_dir() -> str | None:
    """The configured export directory, or None for live seqio."""
    path = data_source()
    return os.path.abspath(os.path.expanduser(path)) if path else None


@gin.configurable
def export_split(mixture_or_task_name: str = gin.REQUIRED, split: Any = gin.REQUIRED,
                 task_feature_lengths: Mapping[str, int] = gin.REQUIRED, export_dir: str = gin.REQUIRED,
                 max_examples: int | None = None) -> list[dict[str, Any]]:
    """The job of `python -m cat_jax.export_task`: each split (a name or a list) of the task or
    mixture, through the live seqio pipeline, into `export_dir` (see `cat_jax.exported`).

    `max_examples` caps each task like `DatasetConfig.max_examples`; runs on the export may ask for
    that cap or a smaller one (the first examples of each task, as seqio gives them).
    """
    from cat_jax import exported  # pylint: disable=import-outside-toplevel

    return exported.export_splits(mixture_or_task_name, split, task_feature_lengths, export_dir,
                                  max_examples)


def _exported_registry() -> Any:
    from cat_jax import exported  # pylint: disable=import-outside-toplevel

    path = exported_dir()
    return None if path is None else exported.registry(path)


def _import_seqio() -> Any:
    """seqio (and with it TensorFlow), or an error that names the TensorFlow-free way."""
    try:
        import seqio  # pylint: disable=import-outside-toplevel
        import tensorflow  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
    except ImportError as e:
        from cat_jax.gin_utils import ConfigError  # pylint: disable=import-outside-toplevel
        raise ConfigError(
            f"The live seqio pipeline needs seqio and TensorFlow, which cannot be imported here ({e}). "
            "On a host without them, read exported files instead: export the splits where seqio is "
            "installed with `python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin "
            "--gin.MIXTURE_OR_TASK_NAME=... --gin.SPLIT=... --gin.TASK_FEATURE_LENGTHS=... "
            "--gin.EXPORT_DIR=DIR`, then add --gin.data_source.exported_dir=DIR.") from e
    return seqio


def _registered_names() -> list[str]:
    seqio = _import_seqio()

    importlib.import_module("tasks")
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str) -> Any:
    """The registered seqio Task or Mixture; an unknown name lists close matches.

    With `data_source.exported_dir`, the exported stand-in (`cat_jax.exported.ExportedTask` /
    `ExportedMixture`: name, tasks, get_rate, postprocess_fn, predict_metric_fns).
    """
    registry = _exported_registry()
    if registry is not None:
        return registry.get(name)
    return get_seqio_task_or_mixture(name)


def get_seqio_task_or_mixture(name: str) -> Any:
    """The registered seqio Task or Mixture, whatever `data_source` says."""
    seqio = _import_seqio()

    names = _registered_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        from cat_jax.errors import UnknownTaskError  # pylint: disable=import-outside-toplevel
        raise UnknownTaskError(
            f"Unknown task or mixture {name!r}.{hint} "
            "List every registered one with `python -m tasks`."
        )
    return seqio.get_mixture_or_task(name)


def _leaf_tasks(name: str) -> list[Any]:
    provider = get_task_or_mixture(name)
    return list(provider.tasks) if hasattr(provider, "tasks") else [provider]


def _leaf_seqio_tasks(name: str) -> list[Any]:
    """The live seqio tasks of a name, whatever `data_source` says."""
    provider = get_seqio_task_or_mixture(name)
    return list(provider.tasks) if hasattr(provider, "tasks") else [provider]


def mixture_rates(name: str) -> dict[str, float] | None:
    """{task: rate} of a mixture (for TrainBatches), None for a single task."""
    provider = get_task_or_mixture(name)
    if not hasattr(provider, "tasks"):
        return None
    return {task.name: float(provider.get_rate(task)) for task in provider.tasks}


def get_vocabulary_of(name: str) -> Any:
    """The targets vocabulary of a task or mixture (its tasks must all share it).

    With `data_source.exported_dir`, the TensorFlow-free vocabulary its export describes.
    """
    registry = _exported_registry()
    if registry is not None:
        return registry.vocabulary(name)
    return seqio_vocabulary_of(name)


def seqio_vocabulary_of(name: str) -> Any:
    """`get_vocabulary_of` through seqio, whatever `data_source` says."""
    vocabs = {id(t.output_features["targets"].vocabulary): t.output_features["targets"].vocabulary
              for t in _leaf_seqio_tasks(name)}
    if len(vocabs) != 1:
        raise ValueError(f"The tasks of {name!r} use {len(vocabs)} different vocabularies; cat_jax "
                         f"needs one vocabulary per model.")
    vocab = next(iter(vocabs.values()))
    return getattr(vocab, "resolved", vocab)


def _vocabulary_key(vocabulary: Any) -> str:
    vocabulary = getattr(vocabulary, "resolved", vocabulary)
    model = getattr(vocabulary, "sentencepiece_model_file", "")
    return f"{type(vocabulary).__name__}:{vocabulary.vocab_size}:{model}"


def _cache_path(cache_dir: str, name: str, split: str, lengths: Mapping[str, int],
                max_examples: int | None, tasks: Sequence[Any]) -> str:
    key = json.dumps({
        "format": _CACHE_FORMAT, "name": name, "split": split, "lengths": dict(sorted(lengths.items())),
        "max_examples": max_examples,
        "vocabularies": {t.name: {f: _vocabulary_key(v.vocabulary) for f, v in t.output_features.items()}
                         for t in tasks},
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{name}.{split}.{digest}.npz")


def _load_task(task: Any, split: str, lengths: Mapping[str, int], max_examples: int | None) -> ExampleArrays:
    """One task's split: untrimmed seqio examples, trimmed here (EOS kept), then converted."""
    import seqio  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if split not in task.splits:
        raise ValueError(f"Task {task.name!r} has no split {split!r}; it has {list(task.splits)}.")
    eos = {k: task.output_features[k].vocabulary.eos_id if task.output_features[k].add_eos else None
           for k in ("inputs", "targets")}
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False,
                          num_epochs=1, trim_output_features=False)
    missing = [k for k in _META_FEATURES if k not in ds.element_spec]
    if missing:
        raise ValueError(f"Task {task.name!r} lacks the features {missing} that cat_jax needs "
                         "(see docs/ARCHITECTURE.md, Data contract).")
    if max_examples is not None:
        ds = ds.take(max_examples)
    extra_keys = sorted(k for k, v in ds.element_spec.items()
                        if v.dtype == tf.string and v.shape.rank == 0 and k not in _META_FEATURES)

    def trim(tokens: tf.Tensor, length: int, eos_id: int | None) -> tf.Tensor:
        # Like seqio's append_eos_after_trim: a truncated sequence still ends in EOS.
        if eos_id is None:
            return tokens[:length]
        return tf.cond(tf.size(tokens) > length,
                       lambda: tf.concat([tokens[: length - 1], [eos_id]], axis=0), lambda: tokens)

    def prepare(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {k: trim(ex[k], lengths[k], eos[k]) for k in ("inputs", "targets")}
        out.update({f"{k}_length": tf.reshape(tf.size(ex[k]), [1]) for k in ("inputs", "targets")})
        out.update({k: tf.reshape(ex[k], [1]) for k in (*_META_FEATURES, *extra_keys)})
        return out

    spec = seqio.FeatureConverter.FeatureSpec
    passthrough = {k: spec(dtype=tf.string, rank=1) for k in (*_META_FEATURES, *extra_keys)}
    passthrough.update({f"{k}_length": spec(dtype=tf.int32, rank=1) for k in ("inputs", "targets")})
    converter = seqio.EncDecFeatureConverter(pack=False, passthrough_features=passthrough)
    ds = converter(ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE),
                   {**lengths, **dict.fromkeys(passthrough, 1)})
    batches = list(ds.batch(_LOAD_BATCH).as_numpy_iterator())
    if not batches:
        raise ValueError(f"Task {task.name!r} split {split!r} yielded no examples.")
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    text = {field: np.array([s.decode("utf-8") for s in joined[k][:, 0]], dtype=str)
            for k, field in _META_FEATURES.items()}
    extras = np.array([json.dumps({k: joined[k][i, 0].decode("utf-8") for k in extra_keys})
                       for i in range(len(text["ids"]))], dtype=str)
    features = {k: joined[k].astype(np.int32) for k in MODEL_FEATURES}
    features["decoder_loss_weights"] = features["decoder_loss_weights"].astype(np.float32)
    return ExampleArrays(
        features=features,
        task_names=np.full(len(text["ids"]), task.name),
        input_lengths=joined["inputs_length"][:, 0].astype(np.int32),
        target_lengths=joined["targets_length"][:, 0].astype(np.int32),
        extras=extras,
        **text,
    )


def _warn_truncation(name: str, split: str, arrays: ExampleArrays, lengths: Mapping[str, int]) -> None:
    truncated = {"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets}
    if any(truncated.values()):
        longest = {"inputs": int(arrays.input_lengths.max()), "targets": int(arrays.target_lengths.max())}
        log.warning(
            "%s/%s: %d of %d examples have inputs longer than %d tokens and %d targets longer than %d "
            "(EOS included); they were truncated. To keep them whole raise TASK_FEATURE_LENGTHS to %s.",
            name, split, truncated["inputs"], len(arrays), lengths["inputs"], truncated["targets"],
            lengths["targets"], longest,
        )


@gin.configurable(allowlist=["cache_dir"])
def load_split(
    mixture_or_task_name: str,
    split: str,
    task_feature_lengths: Mapping[str, int],
    max_examples: int | None = None,
    cache_dir: str | None = None,
) -> ExampleArrays:
    """Every example of a split in a fixed order (a mixture: each sub-task in turn).

    `task_feature_lengths` is {"inputs": Li, "targets": Lt}; longer examples are counted (and
    logged) before truncation. `max_examples` caps each task. With `cache_dir`, the arrays are
    saved there keyed by name, split, lengths, cap and vocabularies, and reused; delete the
    directory after changing a task's data.

    With `data_source.exported_dir`, the split is read from `<exported_dir>/<name>.<split>.npz`
    (no TensorFlow, no seqio; `cache_dir` is not used); a missing file, or one exported with other
    lengths or a smaller cap, is refused with the export command that fixes it.
    """
    if set(task_feature_lengths) != {"inputs", "targets"}:
        raise ValueError(f"task_feature_lengths needs exactly 'inputs' and 'targets'; got {dict(task_feature_lengths)}.")
    registry = _exported_registry()
    if registry is not None:
        arrays = registry.load_split(mixture_or_task_name, split, task_feature_lengths, max_examples)
        _warn_truncation(mixture_or_task_name, split, arrays, task_feature_lengths)
        return arrays
    return load_live_split(mixture_or_task_name, split, task_feature_lengths, max_examples, cache_dir)


def load_live_split(mixture_or_task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                    max_examples: int | None = None, cache_dir: str | None = None) -> ExampleArrays:
    """`load_split` through seqio, whatever `data_source` says (the export job reads this)."""
    if set(task_feature_lengths) != {"inputs", "targets"}:
        raise ValueError(f"task_feature_lengths needs exactly 'inputs' and 'targets'; got {dict(task_feature_lengths)}.")
    tasks = _leaf_seqio_tasks(mixture_or_task_name)
    path = None
    if cache_dir is not None:
        path = _cache_path(cache_dir, mixture_or_task_name, split, task_feature_lengths, max_examples, tasks)
        if os.path.exists(path):
            log.info("Loading %s/%s from cache %s", mixture_or_task_name, split, path)
            return ExampleArrays.load(path)
    arrays = ExampleArrays.concatenate(
        [_load_task(task, split, task_feature_lengths, max_examples) for task in tasks])
    _warn_truncation(mixture_or_task_name, split, arrays, task_feature_lengths)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        arrays.save(path)
    return arrays


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights`."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class TrainBatches:
    """Training batches as a pure function of (seed, step).

    The stream is a sequence of epochs of len(arrays) rows. Without rates an epoch is a seeded
    permutation of all rows. With rates ({task: rate}), an epoch takes from each task a count
    proportional to its rate, walking through that task's own seeded permutations (so a task's rows
    repeat only after all of them were used), and shuffles the lot.
    """

    def __init__(self, arrays: ExampleArrays, global_batch_size: int, seed: int,
                 rates: Mapping[str, float] | None = None):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive; got {global_batch_size}.")
        if len(arrays) == 0:
            raise ValueError("TrainBatches needs at least one example.")
        self.arrays = arrays
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch_size = len(arrays)
        self._groups: list[np.ndarray] = []
        self._counts = np.zeros(0, dtype=np.int64)
        if rates is not None:
            self._init_rates(rates)
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _init_rates(self, rates: Mapping[str, float]) -> None:
        present = sorted(set(self.arrays.task_names.tolist()))
        if set(rates) != set(present):
            raise ValueError(f"rates name the tasks {sorted(rates)} but the examples come from {present}; "
                             "give one rate per task (0 to leave a task out).")
        weights = np.array([float(rates[t]) for t in present])
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"rates must be >= 0 with a positive sum; got {dict(rates)}.")
        self._groups = [np.flatnonzero(self.arrays.task_names == t) for t in present]
        self._counts = _largest_remainder(self.epoch_size, weights)

    def _task_rows(self, group: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start + count) of task `group`'s endless stream of permutations."""
        rows = self._groups[group]
        n = len(rows)
        out = []
        for lap in range(start // n, (start + count - 1) // n + 1):
            perm = rows[np.random.default_rng([self.seed, 1 + group, lap]).permutation(n)]
            lo, hi = max(start - lap * n, 0), min(start + count - lap * n, n)
            out.append(perm[lo:hi])
        return np.concatenate(out)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The rows of one epoch, in order."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 2:  # keep the two latest: a batch usually spans at most two
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            rng = np.random.default_rng([self.seed, 0, epoch])
            if not self._groups:
                rows = rng.permutation(self.epoch_size)
            else:
                parts = [self._task_rows(g, epoch * int(c), int(c))
                         for g, c in enumerate(self._counts) if c > 0]
                rows = rng.permutation(np.concatenate(parts))
            self._epoch_cache[epoch] = rows
        return self._epoch_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Row indices of the global batch of `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}.")
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs = positions // self.epoch_size
        rows = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.epoch_rows(int(epoch))[positions[mask] % self.epoch_size]
        return rows

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the global batch: global_batch_size // process_count consecutive rows."""
        if process_count <= 0 or self.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"process_count {process_count}; choose a multiple of the host count.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count}).")
        per_host = self.global_batch_size // process_count
        rows = self.global_rows(step)[process_index * per_host:(process_index + 1) * per_host]
        return {k: v[rows] for k, v in self.arrays.features.items()}


def eval_batches(arrays: ExampleArrays, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every example once, in order; the last batch is padded with zero rows. Yields (batch, real-row mask)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    for start in range(0, len(arrays), batch_size):
        stop = min(start + batch_size, len(arrays))
        batch = {}
        for k, v in arrays.features.items():
            padded = np.zeros((batch_size,) + v.shape[1:], dtype=v.dtype)
            padded[: stop - start] = v[start:stop]
            batch[k] = padded
        yield batch, np.arange(batch_size) < stop - start
