"""WMT translation tasks: WMT19 through TensorFlow Datasets, WMT22 from local sacrebleu text files.

WMT19 (TFDS `wmt19_translate/de-en:1.0.0`; splits train, validation = newstest2018):

- `wmt19_translate_de_en`: "translate German to English: <de>" -> "<en>"
- `wmt19_translate_en_de`: "translate English to German: <en>" -> "<de>"

  Ids are "<task>:<split>:<shard>-of-<shards>:<index>" from TFDS's `tfds_id` (the record's place in
  the prepared files), e.g. "wmt19_translate_de_en:validation:00000-of-00001:12". The TFDS train
  split is large (tens of millions of pairs, several GB to download and prepare).

WMT22 (general task test sets, read from plain text files; splits validation, test):

- `wmt22_<src>_<tgt>` for each pair in `WMT22_PAIRS`, e.g. `wmt22_de_en`:
  "translate German to English: <source line>" -> "<reference line>".

  The directory is the gin parameter `wmt22_files.wmt22_dir` (a local path or anything
  tf.io.gfile reads, e.g. gs://). Layout, one segment per line, source and reference line-aligned::

      <wmt22_dir>/<src>-<tgt>/<split>.<src>     source segments
      <wmt22_dir>/<src>-<tgt>/<split>.<tgt>     reference segments

  which is what sacrebleu prints, e.g. for the test split::

      sacrebleu -t wmt22 -l de-en --echo src > $DIR/de-en/test.de
      sacrebleu -t wmt22 -l de-en --echo ref > $DIR/de-en/test.en

  (`--echo ref` prints the first reference where a test set has several; `validation` is whatever
  dev set you put there, e.g. `-t wmt21`.) Ids are
  "<task>:<split>:<line number from 0>", e.g. "wmt22_de_en:test:12". Registration reads nothing;
  reading a task without the directory configured, or without the file, raises an error naming the
  file and the gin parameter.

Metrics: corpus BLEU (sacrebleu, `metrics.bleu`). Cascades score examples by exact match and
pooled predictions by corpus BLEU (`metrics.register_quality`).

Vocabulary: `tasks.vocab.VOCABULARY` (bytes by default). The intended vocabulary for these
benchmarks is the standard T5 SentencePiece model; on a TPU VM::

    --gin.get_vocabulary.kind='sentencepiece'
    --gin.get_vocabulary.sentencepiece_model_path='gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'

(see `tasks.superglue` about gs:// paths and get_vocabulary's existence check).
"""

from __future__ import annotations

import functools
import os

import gin
import seqio
import tensorflow as tf

from cat_jax import metrics
from tasks.superglue import Example, TfdsSource, add_task, render, tfds_id_key

WMT19_TFDS_NAME = "wmt19_translate/de-en:1.0.0"
WMT19_SPLITS = ("train", "validation")
WMT22_SPLITS = ("validation", "test")
WMT22_GIN_PARAMETER = "wmt22_files.wmt22_dir"
LANGUAGES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "fr": "French",
    "hr": "Croatian",
    "ja": "Japanese",
    "ru": "Russian",
    "uk": "Ukrainian",
    "zh": "Chinese",
}
WMT22_PAIRS = (
    ("cs", "en"),
    ("en", "cs"),
    ("de", "en"),
    ("en", "de"),
    ("ja", "en"),
    ("en", "ja"),
    ("ru", "en"),
    ("en", "ru"),
    ("uk", "en"),
    ("en", "uk"),
    ("zh", "en"),
    ("en", "zh"),
    ("en", "hr"),
    ("de", "fr"),
    ("fr", "de"),
    ("cs", "uk"),
    ("uk", "cs"),
)
TEMPLATE = "translate {source_language} to {target_language}: {source}"


def translate_template(src: str, tgt: str) -> str:
    """ "translate German to English: {source}" for ("de", "en")."""
    return TEMPLATE.format(source_language=LANGUAGES[src], target_language=LANGUAGES[tgt], source="{source}")


def _translation(src: str, tgt: str, source_key: str, target_key: str):
    template = translate_template(src, tgt)

    def to_text(ex: Example) -> dict[str, tf.Tensor]:
        return {"inputs": render(template, {"source": ex[source_key]}), "targets": ex[target_key]}

    return to_text


# --- WMT22 from local files ---------------------------------------------------------------------


@gin.configurable
def wmt22_files(wmt22_dir: str | None = None) -> str | None:
    """The WMT22 directory (gin: `wmt22_files.wmt22_dir`); None when not configured."""
    return wmt22_dir


def wmt22_path(src: str, tgt: str, split: str, lang: str, directory: str | None = None) -> str:
    """<directory>/<src>-<tgt>/<split>.<lang>; the directory defaults to the gin parameter."""
    directory = directory if directory is not None else wmt22_files()
    if not directory:
        raise ValueError(
            f"WMT22 task wmt22_{src}_{tgt} needs its data directory: add "
            f"--gin.{WMT22_GIN_PARAMETER}='/path/to/wmt22' holding {src}-{tgt}/{split}.{src} and "
            f"{src}-{tgt}/{split}.{tgt} (see tasks/wmt.py)."
        )
    return os.path.join(directory, f"{src}-{tgt}", f"{split}.{lang}")


def _read_lines(path: str, src: str, tgt: str) -> list[str]:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"WMT22 task wmt22_{src}_{tgt}: {path} does not exist. Point "
            f"--gin.{WMT22_GIN_PARAMETER} at a directory laid out as <dir>/{src}-{tgt}/<split>.{src} "
            f"and <dir>/{src}-{tgt}/<split>.{tgt} (e.g. `sacrebleu -t wmt22 -l {src}-{tgt} --echo src`)."
        )
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def read_wmt22(src: str, tgt: str, split: str, directory: str | None = None) -> list[tuple[str, str]]:
    """(source, reference) line pairs of a split; the directory defaults to the gin parameter."""
    sources = _read_lines(wmt22_path(src, tgt, split, src, directory), src, tgt)
    references = _read_lines(wmt22_path(src, tgt, split, tgt, directory), src, tgt)
    if len(sources) != len(references):
        raise ValueError(
            f"WMT22 {src}-{tgt} {split}: {len(sources)} source lines but {len(references)} reference "
            f"lines ({wmt22_path(src, tgt, split, src, directory)}); the files must be line-aligned."
        )
    if not sources:
        raise ValueError(f"WMT22 {src}-{tgt} {split}: {wmt22_path(src, tgt, split, src, directory)} is empty.")
    return list(zip(sources, references))


def _wmt22_dataset(src: str, tgt: str, split: str, shuffle_files: bool) -> tf.data.Dataset:
    del shuffle_files  # one small file pair; the task shuffles examples when asked
    rows = read_wmt22(src, tgt, split)
    return tf.data.Dataset.from_tensor_slices(
        {
            "id": tf.constant([f"wmt22_{src}_{tgt}:{split}:{i}" for i in range(len(rows))]),
            "source": tf.constant([s for s, _ in rows]),
            "reference": tf.constant([r for _, r in rows]),
        }
    )


class _Wmt22Source(seqio.FunctionDataSource):
    """Reads the files when a split is read (never at registration)."""

    def __init__(self, src: str, tgt: str):
        self._pair = (src, tgt)
        super().__init__(dataset_fn=functools.partial(_wmt22_dataset, src, tgt), splits=WMT22_SPLITS)

    def num_input_examples(self, split: str) -> int:
        return len(read_wmt22(*self._pair, split))


# --- registration -------------------------------------------------------------------------------


def _register() -> None:
    for src, tgt in (("de", "en"), ("en", "de")):
        name = f"wmt19_translate_{src}_{tgt}"
        source = TfdsSource(name, WMT19_TFDS_NAME, WMT19_SPLITS, tfds_id_key, use_tfds_id=True)
        add_task(name, source, _translation(src, tgt, src, tgt), [metrics.bleu])
        metrics.register_quality(name, metrics.exact_match_scores, metrics.corpus_bleu)
    for src, tgt in WMT22_PAIRS:
        name = f"wmt22_{src}_{tgt}"
        add_task(name, _Wmt22Source(src, tgt), _translation(src, tgt, "source", "reference"), [metrics.bleu])
        metrics.register_quality(name, metrics.exact_match_scores, metrics.corpus_bleu)


WMT19_TASKS = ("wmt19_translate_de_en", "wmt19_translate_en_de")
WMT22_TASKS = tuple(f"wmt22_{src}_{tgt}" for src, tgt in WMT22_PAIRS)
_register()
