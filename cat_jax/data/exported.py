"""Exported splits: a task's examples as plain files, read back without TensorFlow or seqio.

`python -m cat_jax.export_task` (the gin job `cat_jax.data.export.export_split`; no gin configurable
lives here, so this module can be imported after gin's config is locked) writes, for each (name, split),
into EXPORT_DIR:

  <name>.<split>.npz    the split's `ExampleArrays` exactly as `load_split` builds them through seqio
                        (features, ids, task names, pretokenized texts, lengths, extras), plus
                        `postprocessed_targets`: each target after its task's postprocess_fn (JSON);
  <name>.<split>.json   the manifest: lengths, cap (an export with MAX_EXAMPLES holds the uniform
                        sample `cat_jax.data.arrays.sample_per_task` takes), example counts, the vocabulary (class, size,
                        eos/pad/unk ids; SentencePiece: the model file and its SHA-256; a Hugging
                        Face tokenizer: its folder, files, SHA-256, bos / stop ids and the prompt's
                        special ids), the mixture rates, and per task the postprocess_fn, metric fns
                        and cascade quality functions as importable names (`module:qualname`);
  sentencepiece.<sha16>.model   a SentencePiece vocabulary's serialized model (if any);
  hf_tokenizer.<sha16>/         a Hugging Face tokenizer's files (tokenizer.json or tokenizer.model,
                                tokenizer_config.json, ...), if the tasks tokenize with one.

With `--gin.data_source.exported_dir=EXPORT_DIR`, `cat_jax.data` serves every task look-up from
these files (`ExportedSource`): `load_split` reads the .npz, `get_vocabulary_of` rebuilds the
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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cat_jax import metrics, vocabularies
from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.source import DataSource
from cat_jax.errors import ExportedDataError, UnknownTaskError

log = logging.getLogger(__name__)

FORMAT = "cat_jax.exported_split/2"  # 2: MAX_EXAMPLES keeps a uniform sample (1: the first examples)
POSTPROCESSED_TARGETS = "postprocessed_targets"


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


def describe_fn(fn: Any) -> str:
    """A readable name for a function (for messages), importable or not."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__name__)}"
    return name if inner is fn else f"partial({name})"

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


class ExportedSource(DataSource):
    """Every manifest of an export directory: names -> tasks / mixtures, vocabularies, splits."""

    kind = "exported"

    def __init__(self, directory: str):
        self.directory = directory
        self.manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self.outdated: list[str] = []
        for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.json"))):
            try:
                with open(path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(
                    "cat_jax.exported_split/"):
                continue
            if manifest["format"] == FORMAT:
                self.manifests[(manifest["name"], manifest["split"])] = manifest
            else:
                self.outdated.append(os.path.basename(path))
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

    def describe(self) -> str:
        return f"exported:{self.directory}"

    def _unknown(self, name: str) -> UnknownTaskError:
        names = sorted(self.providers)
        outdated = (f" ({', '.join(self.outdated)} were written by an older cat_jax, format "
                    f"{FORMAT} is needed: export them again.)" if self.outdated else "")
        return UnknownTaskError(
            f"{name!r} is not exported in {self.directory} (data_source.exported_dir); it holds "
            f"{names or 'no exports'}.{outdated} Export it where seqio is installed with: python -m "
            f"cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin --gin.MIXTURE_OR_TASK_NAME={name} "
            f"--gin.SPLIT=<split(s)> --gin.TASK_FEATURE_LENGTHS=<lengths> --gin.EXPORT_DIR={self.directory}, "
            "or drop data_source.exported_dir to use seqio.")

    def provider(self, name: str) -> ExportedTask | ExportedMixture:
        if name not in self.providers:
            raise self._unknown(name)
        return self.providers[name]

    def vocabulary(self, name: str) -> Any:
        if name not in self._vocab_desc:
            raise self._unknown(name)
        return _vocabulary(self.directory, json.dumps(self._vocab_desc[name], sort_keys=True))

    def load_split(self, name: str, split: str, lengths: Mapping[str, int],
                   max_examples: int | None = None, cache_dir: str | None = None) -> ExampleArrays:
        """The stored examples (a capped export: checked to hold `max_examples` per task)."""
        del cache_dir
        task_feature_lengths = lengths
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
        arrays = ExampleArrays.load(npz)
        with np.load(npz, allow_pickle=False) as stored:
            post = stored[POSTPROCESSED_TARGETS] if POSTPROCESSED_TARGETS in stored.files else None
        shapes = (arrays.features["encoder_input_tokens"].shape[1], arrays.features["decoder_target_tokens"].shape[1])
        if len(arrays) != manifest["num_examples"] or shapes != (lengths["inputs"], lengths["targets"]):
            raise ExportedDataError(f"{npz} does not match its manifest (examples or lengths); export "
                                    f"it again:\n  {command}")
        if post is not None:
            self._add_targets(arrays.ids, arrays.task_names, post)
        return arrays


def vocabularies_key(desc: Mapping[str, Any]) -> tuple:
    return tuple(desc.get(k) for k in ("class", "size", "eos_id", "pad_id", "unk_id", "sentencepiece_sha256",
                                       "tokenizer_sha256"))


@functools.lru_cache(maxsize=None)
def _vocabulary(directory: str, desc_json: str) -> Any:
    return vocabularies.from_description(json.loads(desc_json), directory)


_REGISTRIES: dict[tuple[str, tuple], ExportedSource] = {}


def registry(directory: str) -> ExportedSource:
    """The source of an export directory (rebuilt when a manifest is added or rewritten)."""
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
        _REGISTRIES[key] = ExportedSource(directory)
    return _REGISTRIES[key]
