"""The vocabulary every cat_jax task tokenizes with, chosen by gin.

`get_vocabulary()` returns seqio's ByteVocabulary by default, or a SentencePieceVocabulary with
`--gin.get_vocabulary.kind='sentencepiece'` and
`--gin.get_vocabulary.sentencepiece_model_path='/path/spm.model'` (plus
`--gin.get_vocabulary.extra_ids=100` for T5's sentinel ids), or the vocabulary a MODEL_DIR stores
(an imported Hugging Face / T5X checkpoint, or any cat_jax run) with
`--gin.get_vocabulary.from_model_dir=/path/to/model_dir`.

Tasks are registered when `tasks` is imported, which may happen before gin bindings are parsed, so
their output features hold `VOCABULARY`, a `LazyVocabulary` that calls `get_vocabulary()` on each use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence

import gin
import seqio
import tensorflow as tf

from cat_jax.errors import ConfigError

KINDS = ("byte", "sentencepiece")


@functools.lru_cache(maxsize=None)
def _build(kind: str, sentencepiece_model_path: str | None, extra_ids: int) -> seqio.Vocabulary:
    if kind == "byte":
        return seqio.ByteVocabulary(extra_ids=extra_ids)
    if not sentencepiece_model_path:
        raise ConfigError(
            "get_vocabulary(kind='sentencepiece') needs a model file: add "
            "--gin.get_vocabulary.sentencepiece_model_path='/path/to/spm.model'."
        )
    if not tf.io.gfile.exists(sentencepiece_model_path):  # local paths and gs:// alike
        raise ConfigError(
            f"SentencePiece model {sentencepiece_model_path!r} does not exist; fix "
            "get_vocabulary.sentencepiece_model_path."
        )
    return seqio.SentencePieceVocabulary(sentencepiece_model_path, extra_ids=extra_ids)


def _from_model_dir(model_dir: str) -> tuple[str, str | None, int]:
    from cat_jax import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel

    info = model_dir_lib.read_run_info(model_dir)
    record = (info or {}).get("vocabulary_files")
    if record is None:
        raise ConfigError(
            f"get_vocabulary.from_model_dir={model_dir!r}: it holds no {model_dir_lib.RUN_INFO} with "
            "vocabulary files. Point it at a MODEL_DIR written by cat_jax.train or "
            "cat_jax.import_checkpoint.")
    if record["kind"] == "byte":
        return "byte", None, int(record.get("extra_ids", 0))
    return "sentencepiece", os.path.join(model_dir, record["file"]), int(record.get("extra_ids", 0))


_DEFAULT_MODEL_DIR: list[str] = []


def default_to_model_dir(model_dir: str) -> None:
    """Make `get_vocabulary()` return `model_dir`'s vocabulary when gin binds none of its parameters
    (eval, infer and cascade_eval default to the vocabulary of the model they restore)."""
    if gin.get_bindings(get_vocabulary):
        return
    from cat_jax import model_dir as model_dir_lib  # pylint: disable=import-outside-toplevel

    if (model_dir_lib.read_run_info(model_dir) or {}).get("vocabulary_files"):
        _DEFAULT_MODEL_DIR[:] = [os.path.abspath(model_dir)]


@gin.configurable
def get_vocabulary(
    kind: str = "byte", sentencepiece_model_path: str | None = None, extra_ids: int = 0,
    from_model_dir: str | None = None,
) -> seqio.Vocabulary:
    """Returns the configured vocabulary (one shared instance per configuration).

    `from_model_dir` takes the kind, model file and extra ids a MODEL_DIR stores (and wins over
    the other parameters).
    """
    from_model_dir = from_model_dir or (_DEFAULT_MODEL_DIR[0] if _DEFAULT_MODEL_DIR else None)
    if from_model_dir:
        kind, sentencepiece_model_path, extra_ids = _from_model_dir(os.path.abspath(from_model_dir))
    if kind not in KINDS:
        raise ConfigError(f"get_vocabulary: unknown kind {kind!r}; choose one of {KINDS}.")
    return _build(kind, sentencepiece_model_path, int(extra_ids))


class LazyVocabulary(seqio.Vocabulary):
    """A seqio.Vocabulary that delegates every call to `get_vocabulary()` at the time of the call."""

    def __init__(self) -> None:
        super().__init__(extra_ids=0)

    @property
    def resolved(self) -> seqio.Vocabulary:
        """The vocabulary the current gin configuration selects."""
        return get_vocabulary()

    @property
    def eos_id(self) -> int | None:
        return self.resolved.eos_id

    @property
    def unk_id(self) -> int | None:
        return self.resolved.unk_id

    @property
    def pad_id(self) -> int:
        return self.resolved.pad_id

    @property
    def bos_id(self) -> int | None:
        return self.resolved.bos_id

    @property
    def extra_ids(self) -> int:
        return self.resolved.extra_ids

    @property
    def vocab_size(self) -> int:
        return self.resolved.vocab_size

    @property
    def _base_vocab_size(self) -> int:
        return self.resolved._base_vocab_size  # pylint: disable=protected-access

    def encode(self, s: Sequence[int] | str) -> Sequence[int]:
        return self.resolved.encode(s)

    def decode(self, ids: Iterable[int]) -> str:
        return self.resolved.decode(ids)

    def encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        return self.resolved.encode_tf(s)

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return self.resolved.decode_tf(ids)

    def _encode(self, s: str) -> Sequence[int]:
        return self.resolved.encode(s)

    def _decode(self, ids: Iterable[int]) -> str:
        return self.resolved.decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        return self.resolved.encode_tf(s)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return self.resolved.decode_tf(ids)

    def __repr__(self) -> str:
        return f"LazyVocabulary({self.resolved!r})"


VOCABULARY = LazyVocabulary()
