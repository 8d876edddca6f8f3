"""Exported splits: a task's examples as plain files, read back without TensorFlow or seqio.

`python -m cat_jax.export_task` (`cat_jax.jobs.export_task`) writes, for each (name, split), into
EXPORT_DIR:

  <name>.<split>.npz    the split's `ExampleArrays` exactly as `load_split` builds them through seqio
                        (features, ids, task names, pretokenized texts, lengths, extras), plus
                        `postprocessed_targets`: each target after its task's postprocess_fn (JSON);
  <name>.<split>.json   the manifest (`cat_jax.data.manifest`): lengths, cap (an export with
                        MAX_EXAMPLES holds the uniform sample `cat_jax.data.arrays.sample_per_task`
                        takes), example counts, the vocabulary (class, size, eos/pad/unk ids;
                        SentencePiece: the model file and its SHA-256; a Hugging Face tokenizer: its
                        folder, files, SHA-256, bos / stop ids and the prompt's special ids), the
                        mixture rates, and per task the postprocess_fn, metric fns and cascade
                        quality functions as importable names (`module:qualname`);
  sentencepiece.<sha16>.model   a SentencePiece vocabulary's serialized model (if any);
  hf_tokenizer.<sha16>/         a Hugging Face tokenizer's files (tokenizer.json or tokenizer.model,
                                tokenizer_config.json, ...), if the tasks tokenize with one.

With `--gin.data_source.exported_dir=EXPORT_DIR`, `cat_jax.data` serves every task look-up from
these files (`ExportedSource`): `load_split` reads the .npz, `get_vocabulary_of` rebuilds the
vocabulary with `cat_jax.vocabularies`, `mixture_rates` reads the manifest, and
`get_task_or_mixture` returns an `ExportedTask` whose `postprocess_fn` / `predict_metric_fns` the
evaluation calls as it calls seqio's. All but the arrays come from the manifests as for every file
source (`cat_jax.data.file_source`, which also says how metrics work on a host without TensorFlow).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np

from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.file_source import FileSource
from cat_jax.errors import ExportedDataError

log = logging.getLogger(__name__)

FORMAT = "cat_jax.exported_split/2"  # 2: MAX_EXAMPLES keeps a uniform sample (1: the first examples)
POSTPROCESSED_TARGETS = "postprocessed_targets"


def npz_path(directory: str, name: str, split: str) -> str:
    return os.path.join(directory, f"{name}.{split}.npz")


def manifest_path(directory: str, name: str, split: str) -> str:
    return os.path.join(directory, f"{name}.{split}.json")


class ExportedSource(FileSource):
    """The .npz exports of a directory, held in memory."""

    kind = "exported"
    format = FORMAT
    pattern = "*.json"
    setting = "data_source.exported_dir"

    def _load_all_targets(self) -> None:
        """Every export's postprocessed targets into its tasks (for examples not loaded yet)."""
        for name, split in self.manifests:
            path = npz_path(self.directory, name, split)
            if not os.path.exists(path):
                continue
            with np.load(path, allow_pickle=False) as stored:
                if POSTPROCESSED_TARGETS not in stored.files:
                    continue
                post, ids, names = stored[POSTPROCESSED_TARGETS], stored["ids"], stored["task_names"]
            self._add_targets(ids, names, post)

    def load_split(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        max_examples: int | None = None,
        cache_dir: str | None = None,
    ) -> ExampleArrays:
        """The stored examples (a capped export: checked to hold `max_examples` per task)."""
        del cache_dir
        lengths = {k: int(v) for k, v in dict(lengths).items()}
        npz = npz_path(self.directory, name, split)
        command = self.export_command(name, split, lengths, max_examples)
        manifest = self.manifests.get((name, split))
        if manifest is None or not os.path.exists(npz):
            missing = npz if not os.path.exists(npz) else manifest_path(self.directory, name, split)
            raise ExportedDataError(
                f"No exported {name}/{split}: {missing} does not exist (data_source.exported_dir="
                f"{self.directory}). Write it where seqio is installed with:\n  {command}"
            )
        if manifest["task_feature_lengths"] != lengths:
            raise ExportedDataError(
                f"{npz} was exported with task_feature_lengths {manifest['task_feature_lengths']}, "
                f"but this run asks for {lengths}. Export it again with these lengths:\n  {command}"
            )
        cap = manifest["max_examples"]
        if cap is not None and (max_examples is None or max_examples > cap):
            cut = [t for t, n in manifest["num_examples_per_task"].items() if n >= cap]
            if cut:
                raise ExportedDataError(
                    f"{npz} was exported with max_examples={cap} per task, but this run asks for "
                    f"{max_examples if max_examples is not None else 'every example'} (tasks {cut} "
                    f"may have more). Export it again with that cap:\n  {command}"
                )
        log.info("Loading %s/%s from exported %s", name, split, npz)
        arrays = ExampleArrays.load(npz)
        with np.load(npz, allow_pickle=False) as stored:
            post = stored[POSTPROCESSED_TARGETS] if POSTPROCESSED_TARGETS in stored.files else None
        shapes = (arrays.features["encoder_input_tokens"].shape[1], arrays.features["decoder_target_tokens"].shape[1])
        if len(arrays) != manifest["num_examples"] or shapes != (lengths["inputs"], lengths["targets"]):
            raise ExportedDataError(
                f"{npz} does not match its manifest (examples or lengths); export it again:\n  {command}"
            )
        if post is not None:
            self._add_targets(arrays.ids, arrays.task_names, post)
        return arrays
