"""The live seqio pipeline as a data source: registered tasks and mixtures, tokenized by their
vocabulary, trimmed and converted once into `ExampleArrays` (seqio and TensorFlow are imported
when first needed, so importing this module costs nothing on a host without them).

Tokenized splits are cached on disk by default (`load_split.cache_dir`, default
`$CAT_JAX_CACHE_DIR` or `~/.cache/cat_jax/data`), keyed by the task or mixture, split, lengths,
every task's vocabulary and a fingerprint of the code that defines each task (the files of its
source function and preprocessors, or its TFDS dataset's name and version): editing a task's
module invalidates its cache. A task whose fingerprint cannot be taken (defined in `__main__`, say)
is cached only when `cache_dir` is given explicitly; `cache_dir=None` turns caching off. A cache
file that cannot be read (damaged on disk) is discarded, logged, and the split tokenized again.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from cat_jax import vocabularies
from cat_jax.data.arrays import MODEL_FEATURES, ExampleArrays, sampled_ids
from cat_jax.data.source import AUTO, DataSource
from cat_jax.errors import ConfigError, UnknownTaskError

log = logging.getLogger(__name__)

_META_FEATURES = {"id": "ids", "inputs_pretokenized": "inputs_text", "targets_pretokenized": "targets_text"}
_CACHE_FORMAT = 4  # 4: MAX_EXAMPLES a uniform sample; keyed by task fingerprints
_LOAD_BATCH = 1024
_STREAM_BATCH = 256


def default_cache_dir() -> str:
    """`$CAT_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cat_jax/data`, else `~/.cache/cat_jax/data`."""
    explicit = os.environ.get("CAT_JAX_CACHE_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cat_jax", "data")


def import_seqio() -> Any:
    """seqio (and with it TensorFlow), or an error that names the TensorFlow-free way."""
    try:
        import seqio  # pylint: disable=import-outside-toplevel
        import tensorflow  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"The live seqio pipeline needs seqio and TensorFlow, which cannot be imported here ({e}). "
            "On a host without them, read exported files instead: export the splits where seqio is "
            "installed with `python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin "
            "--gin.MIXTURE_OR_TASK_NAME=... --gin.SPLIT=... --gin.TASK_FEATURE_LENGTHS=... "
            "--gin.EXPORT_DIR=DIR`, then add --gin.data_source.exported_dir=DIR."
        ) from e
    return seqio


def _file_stamp(module_name: str | None) -> str | None:
    module = sys.modules.get(module_name or "")
    path = getattr(module, "__file__", None)
    if module_name in (None, "__main__") or not path or not os.path.exists(path):
        return None
    stat = os.stat(path)
    return f"{module_name}:{stat.st_size}:{stat.st_mtime_ns}"


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def task_fingerprint(task: Any) -> str | None:
    """What identifies a task's data: its TFDS dataset, or the files of its source function and
    preprocessors (None when one of them lives nowhere on disk, e.g. in `__main__`)."""
    parts = [type(task.source).__name__]
    tfds = getattr(task.source, "tfds_dataset", None)
    if tfds is not None:
        parts.append(f"tfds:{getattr(tfds, 'name', tfds)}")
    fns = [getattr(task.source, "_dataset_fn", None), *getattr(task, "preprocessors", ())]
    for fn in fns:
        if fn is None:
            continue
        stamp = _file_stamp(getattr(_unwrap(fn), "__module__", None))
        if stamp is None:
            return None
        parts.append(stamp)
    return "|".join(parts)


class SeqioSource(DataSource):
    """Tasks and mixtures of seqio's registries (importing `tasks` registers cat_jax's)."""

    kind = "seqio"

    def describe(self) -> str:
        return "seqio"

    def default_vocabulary_from(self, model_dir: str) -> None:
        import_seqio()
        from tasks import vocab  # pylint: disable=import-outside-toplevel

        vocab.default_to_model_dir(model_dir)

    def names(self) -> list[str]:
        seqio = import_seqio()
        importlib.import_module("tasks")
        return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))

    def provider(self, name: str) -> Any:
        seqio = import_seqio()
        names = self.names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownTaskError(
                f"Unknown task or mixture {name!r}.{hint} List every registered one with `python -m tasks`."
            )
        return seqio.get_mixture_or_task(name)

    def vocabulary(self, name: str) -> Any:
        vocabs = {
            id(t.output_features["targets"].vocabulary): t.output_features["targets"].vocabulary
            for t in self.leaf_tasks(name)
        }
        if len(vocabs) != 1:
            raise ConfigError(
                f"The tasks of {name!r} use {len(vocabs)} different vocabularies; cat_jax "
                f"needs one vocabulary per model."
            )
        return vocabularies.resolve(next(iter(vocabs.values())))

    def load_split(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        max_examples: int | None = None,
        cache_dir: str | None = AUTO,
    ) -> ExampleArrays:
        """The split's examples; with `max_examples`, a task whose source gives ids is filtered to
        the sampled ids before preprocessing (the caller's `sample_per_task` then keeps exactly
        those), any other task is preprocessed whole."""
        tasks = self.leaf_tasks(name)
        for task in tasks:
            if split not in task.splits:
                raise ConfigError(
                    f"Task {task.name!r} has no split {split!r}; it has {list(task.splits)}. Choose one "
                    f"of those (SPLIT / train.eval_split / run_cascade_eval.validation_split), or add the "
                    f"split to the task's source."
                )
        path = self._cache_path(cache_dir, name, split, lengths, tasks, max_examples)
        if path is not None and os.path.exists(path):
            try:
                arrays = ExampleArrays.load(path)
            except Exception as e:  # pylint: disable=broad-except  # a damaged file: zip, npy or field errors
                log.warning(
                    "The tokenized cache %s of %s/%s cannot be read (%s: %s); discarded it, tokenizing again.",
                    path,
                    name,
                    split,
                    type(e).__name__,
                    e,
                )
                with contextlib.suppress(FileNotFoundError):  # another process removed it first
                    os.remove(path)
            else:
                log.info(
                    "Loaded %s/%s from the tokenized cache %s (set load_split.cache_dir=None to re-tokenize).",
                    name,
                    split,
                    path,
                )
                return arrays
        log.info(
            "Tokenizing %s/%s through seqio%s.", name, split, f" (cached in {os.path.dirname(path)})" if path else ""
        )
        arrays = ExampleArrays.concatenate([_load_task(task, split, lengths, max_examples) for task in tasks])
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            arrays.save(path)
        return arrays

    def _cache_path(
        self,
        cache_dir: str | None,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        tasks: Sequence[Any],
        max_examples: int | None,
    ) -> str | None:
        if cache_dir is None:
            return None
        fingerprints = {t.name: task_fingerprint(t) for t in tasks}
        if cache_dir == AUTO:
            if any(f is None for f in fingerprints.values()):
                return None
            cache_dir = default_cache_dir()
        key = json.dumps(
            {
                "format": _CACHE_FORMAT,
                "name": name,
                "split": split,
                "lengths": dict(sorted(lengths.items())),
                "max_examples": max_examples,
                "tasks": fingerprints,
                "sizes": {t.name: _size(t, split) for t in tasks},
                "vocabularies": {
                    t.name: {f: _vocabulary_key(v.vocabulary) for f, v in t.output_features.items()} for t in tasks
                },
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return os.path.join(os.path.expanduser(cache_dir), f"{name}.{split}.{digest}.npz")


def _vocabulary_key(vocabulary: Any) -> str:
    return json.dumps(vocabularies.identity(vocabulary), sort_keys=True)


def _examples(task: Any, split: str, max_examples: int | None) -> Any:
    """The task's preprocessed, untrimmed examples (seqio's Task.get_dataset without trimming or
    shuffling). With `max_examples` and ids in the source, the source is read once in large
    batches and only the sampled ids are preprocessed (a source whose examples do not batch is
    preprocessed whole, and sampled afterwards)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    source = task.source.get_dataset(split=split, shuffle=False)
    whole = lambda: task.get_dataset(
        sequence_length=None,
        split=split,
        shuffle=False,  # noqa: E731
        use_cached=False,
        num_epochs=1,
        trim_output_features=False,
    )
    if max_examples is None or "id" not in source.element_spec:
        return whole()
    try:
        batches = list(source.batch(_LOAD_BATCH * 8).as_numpy_iterator())
    except (tf.errors.InvalidArgumentError, ValueError, TypeError):
        return whole()
    if not batches:
        return whole()
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    ids = np.array([i.decode("utf-8") for i in joined["id"]], dtype=str)
    keep = np.isin(ids, sorted(sampled_ids(task.name, ids, max_examples)))
    ds = tf.data.Dataset.from_tensor_slices({k: v[keep] for k, v in joined.items()})
    ds = task.preprocess_precache(ds)
    return task.preprocess_postcache(ds, sequence_length=None)


def _size(task: Any, split: str) -> int | None:
    """The number of examples the task's source reports for the split, or None if it cannot say."""
    try:
        return task.source.num_input_examples(split)
    except Exception:  # pylint: disable=broad-except  # sources that do not know
        return None


def _extra_keys(task: Any, ds: Any) -> list[str]:
    """The task's other scalar string features (kept as `extras`); an error if a needed one is missing."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    missing = [k for k in _META_FEATURES if k not in ds.element_spec]
    if missing:
        raise ConfigError(
            f"Task {task.name!r} lacks the features {missing} that cat_jax needs "
            "(see docs/ARCHITECTURE.md, Data contract)."
        )
    return sorted(
        k for k, v in ds.element_spec.items() if v.dtype == tf.string and v.shape.rank == 0 and k not in _META_FEATURES
    )


def examples_with_metadata(
    task: Any, split: str, max_examples: int | None = None, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """The task's preprocessed examples one by one, untrimmed, from example `skip` on: `id`,
    `inputs` / `targets` (int32 token ids, EOS included), `inputs_text` / `targets_text` and
    `extras` (the other string features, as JSON), streamed from tf.data (for streaming exports)."""
    ds = _examples(task, split, max_examples)
    extra_keys = _extra_keys(task, ds)
    keys = ("id", "inputs_pretokenized", "targets_pretokenized", *extra_keys)
    ds = ds.map(lambda ex: {k: ex[k] for k in ("inputs", "targets", *keys)})
    for batch in ds.skip(skip).ragged_batch(_STREAM_BATCH).prefetch(2).as_numpy_iterator():
        # numpy gives a ragged batch as an object array of rows, or 2-D when the rows are equally long
        tokens = {k: [np.asarray(row, np.int32) for row in batch[k]] for k in ("inputs", "targets")}
        strings = {k: [v.decode("utf-8") for v in batch[k]] for k in keys}
        for i, ident in enumerate(strings["id"]):
            yield {
                "id": ident,
                "inputs": tokens["inputs"][i],
                "targets": tokens["targets"][i],
                "inputs_text": strings["inputs_pretokenized"][i],
                "targets_text": strings["targets_pretokenized"][i],
                "extras": json.dumps({k: strings[k][i] for k in extra_keys}),
            }


def _load_task(task: Any, split: str, lengths: Mapping[str, int], max_examples: int | None) -> ExampleArrays:
    """One task's split: untrimmed seqio examples, trimmed here (EOS kept), then converted."""
    seqio = import_seqio()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    eos = {
        k: task.output_features[k].vocabulary.eos_id if task.output_features[k].add_eos else None
        for k in ("inputs", "targets")
    }
    ds = _examples(task, split, max_examples)
    extra_keys = _extra_keys(task, ds)

    def trim(tokens: tf.Tensor, length: int, eos_id: int | None) -> tf.Tensor:
        # Like seqio's append_eos_after_trim: a truncated sequence still ends in EOS.
        if eos_id is None:
            return tokens[:length]
        return tf.cond(
            tf.size(tokens) > length, lambda: tf.concat([tokens[: length - 1], [eos_id]], axis=0), lambda: tokens
        )

    def prepare(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {k: trim(ex[k], lengths[k], eos[k]) for k in ("inputs", "targets")}
        out.update({f"{k}_length": tf.reshape(tf.size(ex[k]), [1]) for k in ("inputs", "targets")})
        out.update({k: tf.reshape(ex[k], [1]) for k in (*_META_FEATURES, *extra_keys)})
        return out

    spec = seqio.FeatureConverter.FeatureSpec
    passthrough = {k: spec(dtype=tf.string, rank=1) for k in (*_META_FEATURES, *extra_keys)}
    passthrough.update({f"{k}_length": spec(dtype=tf.int32, rank=1) for k in ("inputs", "targets")})
    converter = seqio.EncDecFeatureConverter(pack=False, passthrough_features=passthrough)
    ds = converter(ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE), {**lengths, **dict.fromkeys(passthrough, 1)})
    batches = list(ds.batch(_LOAD_BATCH).as_numpy_iterator())
    if not batches:
        raise ConfigError(f"Task {task.name!r} split {split!r} yielded no examples.")
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    text = {
        field: np.array([s.decode("utf-8") for s in joined[k][:, 0]], dtype=str) for k, field in _META_FEATURES.items()
    }
    extras = np.array(
        [json.dumps({k: joined[k][i, 0].decode("utf-8") for k in extra_keys}) for i in range(len(text["ids"]))],
        dtype=str,
    )
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
