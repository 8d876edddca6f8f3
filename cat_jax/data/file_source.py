"""What the two file sources share: an export directory's manifests read back as tasks, mixtures
and vocabularies, without TensorFlow or seqio.

`FileSource` is the base of `cat_jax.data.exported.ExportedSource` (.npz files) and
`cat_jax.data.streaming.StreamingSource` (ArrayRecord shards): each names its manifests' format and
where they lie, and reads its examples; this module turns the manifests (`cat_jax.data.manifest`)
into the objects the trainer and the evaluation ask for:

  - `ExportedTask`: a task's `postprocess_fn`, `predict_metric_fns` and cascade quality, imported by
    the names the manifest stores where they can be;
  - `ExportedMixture`: a mixture's tasks and rates;
  - the vocabulary of a name, rebuilt with `cat_jax.vocabularies` (every export of a name must agree).

Metrics on a host without TensorFlow: a function whose module imports seqio (tasks/ does) cannot be
imported there. Targets then come from the postprocessed targets stored at export (identical to
seqio's), predictions are postprocessed by `cat_jax.metrics.normalize` (whitespace collapsed, as the
offline tasks do), and a metric fn that cannot be imported is replaced by the task's cascade quality
(`{"quality": ...}`, see cat_jax.metrics.get_quality) or, without one, exact match. Each substitution
is logged once per task. The offline tasks' metric fns live in cat_jax.metrics, so their eval metrics
are the same as live.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cat_jax import metrics, vocabularies
from cat_jax.data.manifest import export_command, resolve_name
from cat_jax.data.source import DataSource
from cat_jax.errors import ExportedDataError, UnknownTaskError

log = logging.getLogger(__name__)


def _try_resolve(name: str | None) -> tuple[Any, str | None]:
    """(object, None) or (None, why not)."""
    if name is None:
        return None, "it is not a module-level function, so the export could not name it"
    try:
        return resolve_name(name), None
    except Exception as e:  # pylint: disable=broad-except
        return None, f"{type(e).__name__}: {e}"


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
            self._warn(
                "postprocess",
                "postprocess_fn %s cannot be used here (%s); targets are the "
                "postprocessed ones stored at export, predictions are whitespace-normalised "
                "(cat_jax.metrics.normalize).",
                self.info.get("postprocess_fn_repr"),
                why,
            )
        return fn

    def postprocess_fn(self, output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> Any:
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
            self._warn(
                "quality", "its cascade quality functions %s cannot be imported here (%s).", spec, why or corpus_why
            )
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
                self._warn(
                    "metrics",
                    "metric fns %s cannot be imported here; reporting 'quality' "
                    "(the task's cascade quality) in their place.",
                    missing,
                )
            elif not fns:
                fns.append(metrics.exact_match)
                self._warn(
                    "metrics",
                    "metric fns %s cannot be imported here and the task has no "
                    "cascade quality; reporting exact_match in their place.",
                    missing,
                )
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


def vocabularies_key(desc: Mapping[str, Any]) -> tuple:
    """What must agree between two manifests' vocabulary descriptions of one name."""
    return tuple(
        desc.get(k) for k in ("class", "size", "eos_id", "pad_id", "unk_id", "sentencepiece_sha256", "tokenizer_sha256")
    )


@functools.lru_cache(maxsize=None)
def _vocabulary(directory: str, desc_json: str) -> Any:
    return vocabularies.from_description(json.loads(desc_json), directory)


def _read_manifest(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`; None where it cannot be read or is not an object."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


_OPEN: dict[tuple[type, str], tuple[tuple, FileSource]] = {}


class FileSource(DataSource):
    """Every manifest of an export directory: names -> tasks / mixtures, vocabularies, splits.

    A subclass sets `kind` (the provenance prefix), `format` (the manifests it reads; others of the
    same family are reported as outdated), `pattern` (where its manifests lie, relative to the
    directory), `setting` (the gin setting that selects it) and `streaming` (which export command
    writes it), and reads its examples (`load_split`).
    """

    format: str = ""
    pattern: str = ""
    setting: str = ""
    streaming: bool = False

    @classmethod
    def open(cls, directory: str) -> FileSource:
        """The source of `directory`, rebuilt when one of its manifests is added or rewritten."""
        directory = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(directory):
            raise ExportedDataError(
                f"{cls.setting}={directory!r} is not a directory. Export there first, where seqio is installed: "
                + export_command("...", "...", directory, "...", streaming=cls.streaming)
            )
        signature = tuple((p, os.stat(p).st_mtime_ns) for p in cls._manifest_paths(directory))
        held = _OPEN.get((cls, directory))
        if held is None or held[0] != signature:
            held = _OPEN[(cls, directory)] = (signature, cls(directory))
        return held[1]

    @classmethod
    def _manifest_paths(cls, directory: str) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(directory), cls.pattern)))

    def __init__(self, directory: str):
        self.directory = directory
        self.manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self.outdated: list[str] = []
        family = self.format.rsplit("/", 1)[0] + "/"
        for path in self._manifest_paths(directory):
            manifest = _read_manifest(path)
            if manifest is None or not str(manifest.get("format", "")).startswith(family):
                continue
            if manifest["format"] == self.format:
                self.manifests[(manifest["name"], manifest["split"])] = manifest
            else:
                self.outdated.append(os.path.relpath(path, directory))
        self.tasks: dict[str, ExportedTask] = {}
        self.providers: dict[str, ExportedTask | ExportedMixture] = {}
        self._vocab_desc: dict[str, dict[str, Any]] = {}
        for (name, _), manifest in sorted(self.manifests.items()):
            for task_name in manifest["task_order"]:
                self.tasks.setdefault(
                    task_name, ExportedTask(task_name, manifest["tasks"][task_name], self._load_all_targets)
                )
                self._set_vocabulary(task_name, manifest)
            self._set_vocabulary(name, manifest)
            if manifest["rates"] is not None:
                self.providers[name] = ExportedMixture(
                    name, [self.tasks[t] for t in manifest["task_order"]], manifest["rates"]
                )
        for task_name, task in self.tasks.items():
            self.providers.setdefault(task_name, task)
        for task in self.tasks.values():
            _ = task.quality  # registered for cascade evaluation (metrics.get_quality)

    def _load_all_targets(self) -> None:
        """Every stored postprocessed target into its task, for a task asked for the target of an
        example this source has not loaded (a source that stores them only with the examples it
        loads has nothing to add)."""

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
                f"{desc}); export every split again with the same vocabulary."
            )

    def describe(self) -> str:
        return f"{self.kind}:{self.directory}"

    def export_command(
        self, name: str, split: str, lengths: Mapping[str, int] | str | None = None, max_examples: int | None = None
    ) -> str:
        """The command that writes (name, split) into this directory."""
        return export_command(name, split, self.directory, lengths, max_examples, streaming=self.streaming)

    def _unknown(self, name: str, split: str | None = None) -> UnknownTaskError:
        what = f"{name}/{split}" if split else repr(name)
        held = sorted(f"{n}/{s}" for n, s in self.manifests)
        outdated = (
            f" ({', '.join(self.outdated)} were written by an older cat_jax, format "
            f"{self.format} is needed: export them again.)"
            if self.outdated
            else ""
        )
        command = self.export_command(name, split or "<split(s)>", "<lengths>")
        return UnknownTaskError(
            f"{what} is not exported in {self.directory} ({self.setting}); it holds {held or 'no exports'}."
            f"{outdated} Export it where seqio is installed with: {command}, or drop {self.setting} to "
            "use seqio."
        )

    def provider(self, name: str) -> ExportedTask | ExportedMixture:
        if name not in self.providers:
            raise self._unknown(name)
        return self.providers[name]

    def vocabulary(self, name: str) -> Any:
        if name not in self._vocab_desc:
            raise self._unknown(name)
        return _vocabulary(self.directory, json.dumps(self._vocab_desc[name], sort_keys=True))

    def manifest(self, name: str, split: str) -> dict[str, Any]:
        """The manifest of (name, split); UnknownTaskError naming the export command without one."""
        manifest = self.manifests.get((name, split))
        if manifest is None:
            raise self._unknown(name, split)
        return manifest
