"""Exported splits: a task's examples as plain files, read back without TensorFlow or seqio.

`python -m cat_jax.export_task` (the gin job is `cat_jax.data.export_split`; no gin configurable
lives here, so this module can be imported after gin's config is locked) writes, for each (name, split),
into EXPORT_DIR:

  <name>.<split>.npz    the split's `ExampleArrays` exactly as `load_split` builds them through seqio
                        (features, ids, task names, pretokenized texts, lengths, extras), plus
                        `postprocessed_targets`: each target after its task's postprocess_fn (JSON);
  <name>.<split>.json   the manifest: lengths, cap, example counts, the vocabulary (class, size,
                        eos/pad/unk ids; SentencePiece: the model file and its SHA-256), the
                        mixture rates, and per task the postprocess_fn, metric fns and cascade
                        quality functions as importable names (`module:qualname`);
  sentencepiece.<sha16>.model   a SentencePiece vocabulary's serialized model (if any).

With `--gin.data_source.exported_dir=EXPORT_DIR`, `cat_jax.data` serves every task look-up from
these files (`registry(dir)`): `load_split` reads the .npz, `get_vocabulary_of` rebuilds the
vocabulary with `cat_jax.vocabularies`, `mixture_rates` reads the manifest, and
`get_task_or_mixture` returns an `ExportedTask` whose `postprocess_fn` / `predict_metric_fns` the
evaluation calls as it calls seqio's.

Metrics on a host without TensorFlow: a function whose module imports seqio (tasks/ does) cannot be
imported there. Targets then come from `postprocessed_targets` (identical to seqio's), predictions
are postprocessed by `cat_jax.metrics.normalize` (whitespace collapsed, as the offline tasks do),
and a metric fn that cannot be imported is replaced by the task's cascade quality
(`{"quality": ...}`, see cat_jax.metrics.get_quality) or, without one, exact match. Each
substitution is logged once per task. The offline tasks' metric fns live in cat_jax.metrics, so
their eval metrics are the same as live.
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cat_jax import data as data_lib
from cat_jax import metrics, vocabularies
from cat_jax.errors import UnknownTaskError
from cat_jax.gin_utils import ConfigError

log = logging.getLogger(__name__)

FORMAT = "cat_jax.exported_split/1"
POSTPROCESSED_TARGETS = "postprocessed_targets"


class ExportedDataError(ConfigError):
    """An exported split that is missing or does not match the run; the message has the command."""


def npz_path(directory: str, name: str, split: str) -> str:
    return os.path.join(directory, f"{name}.{split}.npz")


def manifest_path(directory: str, name: str, split: str) -> str:
    return os.path.join(directory, f"{name}.{split}.json")


def export_command(name: str, split: str, lengths: Mapping[str, int], directory: str,
                   max_examples: int | None = None) -> str:
    cmd = (f"python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin "
           f"--gin.MIXTURE_OR_TASK_NAME={name} --gin.SPLIT={split} "
           f"--gin.TASK_FEATURE_LENGTHS=\"{dict(lengths)}\" --gin.EXPORT_DIR={directory}")
    if max_examples is not None:
        cmd += f" --gin.MAX_EXAMPLES={max_examples}"
    return cmd


# ---------------------------------------------------------------------------------------------
# Importable names of functions.

def qualified_name(fn: Any) -> str | None:
    """`module:qualname` of a module-level function that imports back as itself, else None."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qual or "<" in qual or module == "__main__":
        return None
    name = f"{module}:{qual}"
    try:
        return name if resolve_name(name) is fn else None
    except Exception:  # pylint: disable=broad-except
        return None


def resolve_name(name: str) -> Any:
    """The object a `module:qualname` names (imports the module; ImportError where it cannot)."""
    module, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _try_resolve(name: str | None) -> tuple[Any, str | None]:
    """(object, None) or (None, why not)."""
    if name is None:
        return None, "it is not a module-level function, so the export could not name it"
    try:
        return resolve_name(name), None
    except Exception as e:  # pylint: disable=broad-except
        return None, f"{type(e).__name__}: {e}"


def _describe_fn(fn: Any) -> str:
    """A readable name for a function (for messages), importable or not."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__name__)}"
    return name if inner is fn else f"partial({name})"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ---------------------------------------------------------------------------------------------
# Export (needs seqio and TensorFlow).

def _task_info(task: Any) -> dict[str, Any]:
    post = getattr(task, "postprocess_fn", None)
    if hasattr(task, "_postprocess_fn"):  # seqio.Task: `postprocess_fn` is a method around this one
        post = task._postprocess_fn  # pylint: disable=protected-access
    fns = list(getattr(task, "predict_metric_fns", None) or getattr(task, "metric_fns", []))
    info: dict[str, Any] = {
        "splits": list(task.splits),
        "postprocess_fn": qualified_name(post) if post is not None else None,
        "has_postprocess_fn": post is not None,
        "postprocess_fn_repr": _describe_fn(post),
        "metric_fns": [qualified_name(fn) for fn in fns],
        "metric_fn_reprs": [_describe_fn(fn) for fn in fns],
        "quality": None,
    }
    try:
        quality = metrics.get_quality(task.name)
    except ValueError:
        quality = None
    if quality is not None:
        info["quality"] = {"per_example": qualified_name(quality.per_example),
                           "corpus": qualified_name(quality.corpus) if quality.corpus else None}
    return info


def _postprocessed_targets(arrays: data_lib.ExampleArrays, tasks: Mapping[str, Any]) -> np.ndarray:
    out = []
    for i, name in enumerate(arrays.task_names.tolist()):
        post = getattr(tasks[name], "postprocess_fn", None)
        target = str(arrays.targets_text[i])
        value = post(target, example=arrays.example(i), is_target=True) if post is not None else target
        try:
            out.append(json.dumps(value, default=_json_default))
        except (TypeError, ValueError):
            out.append("null")  # read back as "not stored": normalised text is used instead
    return np.array(out, dtype=str)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def export_one(name: str, split: str, task_feature_lengths: Mapping[str, int], export_dir: str,
               max_examples: int | None = None) -> dict[str, Any]:
    """Export one split of a task or mixture through the live seqio pipeline; returns the manifest."""
    lengths = {k: int(v) for k, v in dict(task_feature_lengths).items()}
    export_dir = os.path.abspath(os.path.expanduser(export_dir))
    provider = data_lib.get_seqio_task_or_mixture(name)
    leaf = list(provider.tasks) if hasattr(provider, "tasks") else [provider]
    tasks = {t.name: t for t in leaf}
    arrays = data_lib.load_live_split(name, split, lengths, max_examples=max_examples)
    vocab = data_lib.seqio_vocabulary_of(name)
    os.makedirs(export_dir, exist_ok=True)
    rates = ({t.name: float(provider.get_rate(t)) for t in provider.tasks}
             if hasattr(provider, "tasks") else None)
    order = list(dict.fromkeys(arrays.task_names.tolist()))
    manifest = {
        "format": FORMAT,
        "name": name,
        "split": split,
        "kind": "mixture" if rates is not None else "task",
        "task_feature_lengths": lengths,
        "max_examples": max_examples,
        "num_examples": len(arrays),
        "num_examples_per_task": {t: int(np.sum(arrays.task_names == t)) for t in order},
        "truncated": {"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets},
        "vocabulary": vocabularies.describe(vocab, export_dir),
        "rates": rates,
        "task_order": [t.name for t in leaf],
        "tasks": {t.name: _task_info(t) for t in leaf},
        "arrays": os.path.basename(npz_path(export_dir, name, split)),
        "export_command": export_command(name, split, lengths, export_dir, max_examples),
    }
    arrays.save(npz_path(export_dir, name, split),
                extra={POSTPROCESSED_TARGETS: _postprocessed_targets(arrays, tasks)})
    _write_json(manifest_path(export_dir, name, split), manifest)
    log.info("Exported %s/%s: %d examples to %s", name, split, len(arrays), npz_path(export_dir, name, split))
    return manifest


def export_splits(mixture_or_task_name: str, split: str | Sequence[str],
                  task_feature_lengths: Mapping[str, int], export_dir: str,
                  max_examples: int | None = None) -> list[dict[str, Any]]:
    """Each split (one name or a list) of the task or mixture into `export_dir`: the manifests."""
    splits = [split] if isinstance(split, str) else list(split)
    return [export_one(mixture_or_task_name, s, task_feature_lengths, export_dir, max_examples)
            for s in splits]


# ---------------------------------------------------------------------------------------------
# Reading (plain numpy + json; no TensorFlow, no seqio).

class ExportedTask:
    """A task as its export describes it: what the trainer and the evaluation ask of a seqio Task."""

    def __init__(self, name: str, info: dict[str, Any], load_targets: Callable[[], None] | None = None):
        self.name = name
        self.info = info
        self.splits: list[str] = list(info.get("splits", []))
        self._targets: dict[str, str] = {}
        self._load_targets = load_targets  # reads every export's stored targets, on the first miss
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"ExportedTask({self.name!r})"

    def _warn(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + message, self.name, *args)

    def add_targets(self, ids: np.ndarray, postprocessed: np.ndarray) -> None:
        self._targets.update(zip(ids.tolist(), postprocessed.tolist()))

    @functools.cached_property
    def _postprocess(self) -> Callable[..., Any] | None:
        fn, why = _try_resolve(self.info.get("postprocess_fn"))
        if fn is None and self.info.get("has_postprocess_fn"):
            self._warn("postprocess", "postprocess_fn %s cannot be used here (%s); targets are the "
                       "postprocessed ones stored at export, predictions are whitespace-normalised "
                       "(cat_jax.metrics.normalize).", self.info.get("postprocess_fn_repr"), why)
        return fn

    def postprocess_fn(self, output: Any, example: Mapping[str, Any] | None = None,
                       is_target: bool = False) -> Any:
        """The task's postprocess_fn where importable; else the stored target / normalised text."""
        if not self.info.get("has_postprocess_fn"):
            return output
        fn = self._postprocess
        if fn is not None:
            return fn(output, example=example, is_target=is_target)
        if is_target and example is not None:
            key = str(example.get("id"))
            if key not in self._targets and self._load_targets is not None:
                load, self._load_targets = self._load_targets, None
                load()
            stored = self._targets.get(key)
            if stored is not None:
                value = json.loads(stored)
                if value is not None:
                    return value
        return metrics.normalize(output)

    @functools.cached_property
    def quality(self) -> metrics.Quality | None:
        """The task's cascade quality: registered, else rebuilt (and registered) from the manifest."""
        try:
            return metrics.get_quality(self.name)
        except ValueError:
            pass
        spec = self.info.get("quality")
        if not spec:
            return None
        per_example, why = _try_resolve(spec.get("per_example"))
        corpus, corpus_why = _try_resolve(spec["corpus"]) if spec.get("corpus") else (None, None)
        if per_example is None or corpus_why:
            self._warn("quality", "its cascade quality functions %s cannot be imported here (%s).",
                       spec, why or corpus_why)
            return None
        metrics.register_quality(self.name, per_example, corpus)
        return metrics.get_quality(self.name)

    @functools.cached_property
    def predict_metric_fns(self) -> list[Callable[..., dict[str, float]]]:
        """The task's metric fns where importable; stand-ins (logged) for the others."""
        fns, missing = [], []
        for name, shown in zip(self.info.get("metric_fns", []), self.info.get("metric_fn_reprs", [])):
            fn, why = _try_resolve(name)
            if fn is None:
                missing.append(f"{shown} ({why})")
            else:
                fns.append(fn)
        if missing:
            quality = self.quality
            if quality is not None:
                fns.append(lambda targets, predictions: {"quality": quality.score(targets, predictions)})
                self._warn("metrics", "metric fns %s cannot be imported here; reporting 'quality' "
                           "(the task's cascade quality) in their place.", missing)
            elif not fns:
                fns.append(metrics.exact_match)
                self._warn("metrics", "metric fns %s cannot be imported here and the task has no "
                           "cascade quality; reporting exact_match in their place.", missing)
        return fns

    @property
    def metric_fns(self) -> list[Callable[..., dict[str, float]]]:
        return self.predict_metric_fns


class ExportedMixture:
    """A mixture as its export describes it: its tasks and their rates."""

    def __init__(self, name: str, tasks: list[ExportedTask], rates: Mapping[str, float]):
        self.name, self.tasks, self.rates = name, tasks, dict(rates)

    def __repr__(self) -> str:
        return f"ExportedMixture({self.name!r}, {[t.name for t in self.tasks]})"

    def get_rate(self, task: Any) -> float:
        return float(self.rates[getattr(task, "name", task)])


class Registry:
    """Every manifest of an export directory: names -> tasks / mixtures, vocabularies, splits."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifests: dict[tuple[str, str], dict[str, Any]] = {}
        for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.json"))):
            try:
                with open(path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
                self.manifests[(manifest["name"], manifest["split"])] = manifest
        self.tasks: dict[str, ExportedTask] = {}
        self.providers: dict[str, ExportedTask | ExportedMixture] = {}
        self._vocab_desc: dict[str, dict[str, Any]] = {}
        for (name, _), manifest in sorted(self.manifests.items()):
            for task_name in manifest["task_order"]:
                self.tasks.setdefault(task_name, ExportedTask(task_name, manifest["tasks"][task_name],
                                                              self._load_all_targets))
                self._set_vocabulary(task_name, manifest)
            self._set_vocabulary(name, manifest)
            if manifest["rates"] is not None:
                self.providers[name] = ExportedMixture(
                    name, [self.tasks[t] for t in manifest["task_order"]], manifest["rates"])
        for task_name, task in self.tasks.items():
            self.providers.setdefault(task_name, task)
        for task in self.tasks.values():
            _ = task.quality  # registered for cascade evaluation (metrics.get_quality)

    def _load_all_targets(self) -> None:
        """Every export's postprocessed targets into its tasks (for examples not loaded yet)."""
        for (name, split) in self.manifests:
            path = npz_path(self.directory, name, split)
            if not os.path.exists(path):
                continue
            with np.load(path, allow_pickle=False) as stored:
                if POSTPROCESSED_TARGETS not in stored.files:
                    continue
                post, ids, names = stored[POSTPROCESSED_TARGETS], stored["ids"], stored["task_names"]
            self._add_targets(ids, names, post)

    def _add_targets(self, ids: np.ndarray, names: np.ndarray, post: np.ndarray) -> None:
        for task_name in dict.fromkeys(names.tolist()):
            rows = names == task_name
            if task_name in self.tasks:
                self.tasks[task_name].add_targets(ids[rows], post[rows])

    def _set_vocabulary(self, name: str, manifest: dict[str, Any]) -> None:
        desc = manifest["vocabulary"]
        old = self._vocab_desc.setdefault(name, desc)
        if vocabularies_key(old) != vocabularies_key(desc):
            raise ExportedDataError(
                f"The exports of {name!r} in {self.directory} disagree on the vocabulary ({old} vs "
                f"{desc}); export every split again with the same vocabulary.")

    def _unknown(self, name: str) -> UnknownTaskError:
        names = sorted(self.providers)
        return UnknownTaskError(
            f"{name!r} is not exported in {self.directory} (data_source.exported_dir); it holds "
            f"{names or 'no exports'}. Export it where seqio is installed with: python -m "
            f"cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin --gin.MIXTURE_OR_TASK_NAME={name} "
            f"--gin.SPLIT=<split(s)> --gin.TASK_FEATURE_LENGTHS=<lengths> --gin.EXPORT_DIR={self.directory}, "
            "or drop data_source.exported_dir to use seqio.")

    def get(self, name: str) -> ExportedTask | ExportedMixture:
        if name not in self.providers:
            raise self._unknown(name)
        return self.providers[name]

    def vocabulary(self, name: str) -> Any:
        if name not in self._vocab_desc:
            raise self._unknown(name)
        return _vocabulary(self.directory, json.dumps(self._vocab_desc[name], sort_keys=True))

    def load_split(self, name: str, split: str, task_feature_lengths: Mapping[str, int],
                   max_examples: int | None = None) -> data_lib.ExampleArrays:
        lengths = {k: int(v) for k, v in dict(task_feature_lengths).items()}
        npz = npz_path(self.directory, name, split)
        command = export_command(name, split, lengths, self.directory, max_examples)
        manifest = self.manifests.get((name, split))
        if manifest is None or not os.path.exists(npz):
            missing = npz if not os.path.exists(npz) else manifest_path(self.directory, name, split)
            raise ExportedDataError(
                f"No exported {name}/{split}: {missing} does not exist (data_source.exported_dir="
                f"{self.directory}). Write it where seqio is installed with:\n  {command}")
        if manifest["task_feature_lengths"] != lengths:
            raise ExportedDataError(
                f"{npz} was exported with task_feature_lengths {manifest['task_feature_lengths']}, "
                f"but this run asks for {lengths}. Export it again with these lengths:\n  {command}")
        cap = manifest["max_examples"]
        if cap is not None and (max_examples is None or max_examples > cap):
            cut = [t for t, n in manifest["num_examples_per_task"].items() if n >= cap]
            if cut:
                raise ExportedDataError(
                    f"{npz} was exported with max_examples={cap} per task, but this run asks for "
                    f"{max_examples if max_examples is not None else 'every example'} (tasks {cut} "
                    f"may have more). Export it again with that cap:\n  {command}")
        log.info("Loading %s/%s from exported %s", name, split, npz)
        arrays = data_lib.ExampleArrays.load(npz)
        with np.load(npz, allow_pickle=False) as stored:
            post = stored[POSTPROCESSED_TARGETS] if POSTPROCESSED_TARGETS in stored.files else None
        shapes = (arrays.features["encoder_input_tokens"].shape[1], arrays.features["decoder_target_tokens"].shape[1])
        if len(arrays) != manifest["num_examples"] or shapes != (lengths["inputs"], lengths["targets"]):
            raise ExportedDataError(f"{npz} does not match its manifest (examples or lengths); export "
                                    f"it again:\n  {command}")
        if post is not None:
            self._add_targets(arrays.ids, arrays.task_names, post)
        if max_examples is not None and (cap is None or max_examples < cap):
            arrays = _first_per_task(arrays, max_examples)
        return arrays


def vocabularies_key(desc: Mapping[str, Any]) -> tuple:
    return tuple(desc.get(k) for k in ("class", "size", "eos_id", "pad_id", "unk_id", "sentencepiece_sha256"))


def _first_per_task(arrays: data_lib.ExampleArrays, cap: int) -> data_lib.ExampleArrays:
    """The first `cap` examples of each task, in order (what seqio's `take(cap)` per task gives)."""
    rows = [np.flatnonzero(arrays.task_names == t)[:cap] for t in dict.fromkeys(arrays.task_names.tolist())]
    return arrays.take(np.concatenate(rows))


@functools.lru_cache(maxsize=None)
def _vocabulary(directory: str, desc_json: str) -> Any:
    return vocabularies.from_description(json.loads(desc_json), directory)


_REGISTRIES: dict[tuple[str, tuple], Registry] = {}


def registry(directory: str) -> Registry:
    """The registry of an export directory (rebuilt when a manifest is added or rewritten)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise ExportedDataError(
            f"data_source.exported_dir={directory!r} is not a directory. Export there first, where "
            f"seqio is installed: python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin "
            f"--gin.MIXTURE_OR_TASK_NAME=... --gin.SPLIT=... --gin.EXPORT_DIR={directory}")
    signature = tuple((p, os.stat(p).st_mtime_ns)
                      for p in sorted(glob.glob(os.path.join(glob.escape(directory), "*.json"))))
    key = (directory, signature)
    if key not in _REGISTRIES:
        for old in [k for k in _REGISTRIES if k[0] == directory]:
            del _REGISTRIES[old]
        _REGISTRIES[key] = Registry(directory)
    return _REGISTRIES[key]
