"""The vocabulary every cat_jax task tokenizes with, chosen by gin.

`get_vocabulary()` returns seqio's ByteVocabulary by default, or a SentencePieceVocabulary with
`--gin.get_vocabulary.kind='sentencepiece'` and
`--gin.get_vocabulary.sentencepiece_model_path='/path/spm.model'`.

Tasks are registered when `tasks` is imported, which may happen before gin bindings are parsed, so
their output features hold `VOCABULARY`, a `LazyVocabulary` that calls `get_vocabulary()` on each use.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import gin
import seqio
import tensorflow as tf

KINDS = ("byte", "sentencepiece")


@functools.lru_cache(maxsize=None)
def _build(kind: str, sentencepiece_model_path: str | None) -> seqio.Vocabulary:
    if kind == "byte":
        return seqio.ByteVocabulary()
    if not sentencepiece_model_path:
        raise ValueError(
            "get_vocabulary(kind='sentencepiece') needs a model file: add "
            "--gin.get_vocabulary.sentencepiece_model_path='/path/to/spm.model'."
        )
    if not tf.io.gfile.exists(sentencepiece_model_path):  # local paths and gs:// alike
        raise FileNotFoundError(
            f"SentencePiece model {sentencepiece_model_path!r} does not exist; fix "
            "get_vocabulary.sentencepiece_model_path."
        )
    return seqio.SentencePieceVocabulary(sentencepiece_model_path)


@gin.configurable
def get_vocabulary(
    kind: str = "byte", sentencepiece_model_path: str | None = None
) -> seqio.Vocabulary:
    """Returns the configured vocabulary (one shared instance per configuration)."""
    if kind not in KINDS:
        raise ValueError(f"get_vocabulary: unknown kind {kind!r}; choose one of {KINDS}.")
    return _build(kind, sentencepiece_model_path)


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
