"""A JSONL file of prompts as a one-off task (`--gin.INPUT_FILE=FILE.jsonl`): no registration, no seqio.

Each line is a JSON object with a string `inputs` and, optionally, a string `targets` (other keys
are ignored; an optional `id` names the example, else its line number). The file is one task, named
after the file (`input_file:<stem>`), that serves every split name. It tokenizes with the
vocabulary of the MODEL_DIR the job restores (its stored files, `cat_jax.vocabulary_store`), as the
live tasks do with `get_vocabulary.from_model_dir`: inputs and targets without special tokens, each
ending in EOS, cut to TASK_FEATURE_LENGTHS keeping the EOS (seqio's `append_eos_after_trim`). A
decoder-only model then adds its tokenizer's prompt tokens (e.g. BOS) in `Model.make_batch`, so a
prompt reaches it as transformers' `tokenizer(prompt)` gives it.

The task's metric is exact match (`cat_jax.metrics.exact_match`, also its cascade quality). A file
without any `targets` has no metric: eval reports none and says so; infer writes an empty target.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cat_jax import metrics
from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.source import DataSource
from cat_jax.data.streaming import model_features
from cat_jax.errors import ConfigError, InputFileError, UnknownTaskError

log = logging.getLogger(__name__)

PREFIX = "input_file:"


def task_name(path: str) -> str:
    """The one task of an input file: `input_file:<file name without extension>`."""
    return PREFIX + os.path.splitext(os.path.basename(path))[0]


def read_lines(path: str) -> list[dict[str, str]]:
    """[{id, inputs, targets}] of a JSONL file; InputFileError naming the line and the fix otherwise."""
    fix = 'Each line must be a JSON object such as {"inputs": "the prompt", "targets": "the answer (optional)"}.'
    if not os.path.isfile(path):
        raise InputFileError(f"INPUT_FILE {path!r} does not exist. {fix}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"INPUT_FILE {path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{where} is not JSON ({e.msg}). {fix}") from None
            if not isinstance(record, dict):
                raise InputFileError(f"{where} is a JSON {type(record).__name__}, not an object. {fix}")
            if not isinstance(record.get("inputs"), str):
                raise InputFileError(f"{where} has no string 'inputs' (keys: {sorted(record)}). {fix}")
            targets = record.get("targets", "")
            if not isinstance(targets, str):
                raise InputFileError(f"{where}: 'targets' is a {type(targets).__name__}, not a string. {fix}")
            ident = str(record.get("id", number))
            if ident in seen:
                raise InputFileError(f"{where}: id {ident!r} occurs twice; ids must be unique (or leave them out).")
            seen.add(ident)
            rows.append(
                {"id": ident, "inputs": record["inputs"], "targets": targets, "has_targets": "targets" in record}
            )
    if not rows:
        raise InputFileError(f"INPUT_FILE {path} holds no examples (it is empty). {fix}")
    return rows


class InputFileTask:
    """What the jobs ask of a seqio Task, for an input file: its name, splits, postprocessing
    (none) and metrics (exact match, or none without targets)."""

    def __init__(self, name: str, has_targets: bool):
        self.name = name
        self.has_targets = has_targets
        self.predict_metric_fns = [metrics.exact_match] if has_targets else []

    def __repr__(self) -> str:
        return f"InputFileTask({self.name!r})"

    @property
    def splits(self) -> list[str]:
        return []

    def postprocess_fn(self, output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> Any:
        del example, is_target
        return output


class JsonlSource(DataSource):
    """The one task of a JSONL file (see the module docstring)."""

    kind = "input_file"

    def __init__(self, path: str):
        self.path = path
        self.rows = read_lines(path)
        self.has_targets = any(r["has_targets"] for r in self.rows)
        self.task = InputFileTask(task_name(path), self.has_targets)
        self.model_dir: str | None = None
        if self.has_targets:
            metrics.register_quality(self.task.name, metrics.exact_match_scores)
        else:
            log.info("%s has no 'targets': predictions only, no metrics.", path)

    @classmethod
    def open(cls, path: str) -> JsonlSource:
        """The source of `path` (one per file and modification time: it keeps the vocabulary set)."""
        path = os.path.abspath(os.path.expanduser(path))
        return _open(path, os.stat(path).st_mtime_ns if os.path.exists(path) else None)

    def describe(self) -> str:
        return f"input_file:{self.path}"

    @property
    def task_name(self) -> str:
        return self.task.name

    def _check_name(self, name: str) -> None:
        if name != self.task.name:
            raise UnknownTaskError(
                f"With INPUT_FILE={self.path} the one task is {self.task.name!r}, not {name!r}; leave "
                "MIXTURE_OR_TASK_NAME unset (None)."
            )

    def provider(self, name: str) -> InputFileTask:
        self._check_name(name)
        return self.task

    def default_vocabulary_from(self, model_dir: str) -> None:
        self.model_dir = model_dir

    def vocabulary(self, name: str) -> Any:
        from cat_jax import vocabulary_store  # pylint: disable=import-outside-toplevel

        self._check_name(name)
        if self.model_dir is None:
            raise ConfigError(
                f"INPUT_FILE={self.path} tokenizes with a restored model's vocabulary, and no job named a "
                "MODEL_DIR (INPUT_FILE serves eval, infer, cascade_eval and speculative_eval, not training)."
            )
        return vocabulary_store.model_vocabulary(self.model_dir)

    def load_split(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        max_examples: int | None = None,
        cache_dir: str | None = None,
    ) -> ExampleArrays:
        """Every line of the file, tokenized (the split's name is not read: the file is the split)."""
        del split, max_examples, cache_dir  # the caller samples
        vocab = self.vocabulary(name)
        eos = {"inputs": vocab.eos_id, "targets": vocab.eos_id}
        records = [
            {
                "inputs": np.asarray([*vocab.encode(r["inputs"]), vocab.eos_id], np.int32),
                "targets": np.asarray([*vocab.encode(r["targets"]), vocab.eos_id], np.int32),
            }
            for r in self.rows
        ]
        log.info("Loading %d examples of %s with %s's vocabulary", len(records), self.path, self.model_dir)
        n = len(records)
        return ExampleArrays(
            features=model_features(records, lengths, [eos] * n),
            ids=np.array([r["id"] for r in self.rows], dtype=str),
            task_names=np.full(n, self.task.name),
            inputs_text=np.array([r["inputs"] for r in self.rows], dtype=str),
            targets_text=np.array([r["targets"] for r in self.rows], dtype=str),
            input_lengths=np.array([len(r["inputs"]) for r in records], np.int32),
            target_lengths=np.array([len(r["targets"]) for r in records], np.int32),
            extras=np.full(n, "{}"),
        )

    def train_batches(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(f"INPUT_FILE={self.path} serves evaluation and inference, not training: register a task.")


@functools.lru_cache(maxsize=8)
def _open(path: str, mtime: int | None) -> JsonlSource:
    del mtime  # part of the cache key: an edited file is read again
    return JsonlSource(path)
