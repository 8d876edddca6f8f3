"""The vocabulary every cat_jax task tokenizes with, chosen by gin.

`get_vocabulary()` returns seqio's ByteVocabulary by default, or a SentencePieceVocabulary with
`--gin.get_vocabulary.kind='sentencepiece'` and
`--gin.get_vocabulary.sentencepiece_model_path='/path/spm.model'` (plus
`--gin.get_vocabulary.extra_ids=100` for T5's sentinel ids), a Hugging Face checkpoint's tokenizer
(`tokenizer.json` or `tokenizer.model` with its `tokenizer_config.json`, ...) with
`--gin.get_vocabulary.kind='hf_tokenizer'` and `--gin.get_vocabulary.hf_tokenizer_dir=/path/to/checkpoint`,
or the vocabulary a MODEL_DIR stores (an imported Hugging Face / T5X checkpoint, or any cat_jax run)
with `--gin.get_vocabulary.from_model_dir=/path/to/model_dir`.

`HFTokenizerVocabulary` is `cat_jax.hf_tokenizer.HFTokenizerVocabulary` as a seqio.Vocabulary: seqio
tokenizes a feature with `encode` (no special tokens, as transformers'
`tokenizer(text, add_special_tokens=False)`) through `tf.numpy_function`, and a feature's `add_eos`
appends `eos_id`; the prompt's own special tokens (`prompt_prefix_ids`, `prompt_suffix_ids`: e.g.
Llama's BOS) are the decoder-only feature converter's to add.

Tasks are registered when `tasks` is imported, which may happen before gin bindings are parsed, so
their output features hold `VOCABULARY`, a `LazyVocabulary` that calls `get_vocabulary()` on each use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from cat_jax import hf_tokenizer, vocabulary_store
from cat_jax.errors import ConfigError

KINDS = ("byte", "sentencepiece", "hf_tokenizer")


class HFTokenizerVocabulary(hf_tokenizer.HFTokenizerVocabulary, seqio.Vocabulary):
    """A Hugging Face checkpoint's tokenizer for seqio tasks: `cat_jax.hf_tokenizer`'s class (every
    id, `encode`, `decode` and the identity are its own) with seqio's TensorFlow half."""

    @property
    def _base_vocab_size(self) -> int:
        return self.vocab_size

    def _encode(self, s: str) -> Sequence[int]:
        return self.encode(s)

    def _decode(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """int32 [length] ids of a scalar string (tokenized in Python by `tokenizers`)."""
        if s.shape.rank != 0:
            raise ValueError(
                f"HFTokenizerVocabulary.encode_tf tokenizes one string (a scalar), got shape "
                f"{s.shape}; map it over the dataset's examples."
            )
        ids = tf.numpy_function(lambda text: np.asarray(self.encode(text), np.int32), [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return self.decode_tf(ids)

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Text of each row of `ids` [..., length] (as `decode`: up to the first stop id)."""

        def rows(batch: np.ndarray) -> np.ndarray:
            flat = batch.reshape(-1, batch.shape[-1])
            return np.array([self.decode(row).encode("utf-8") for row in flat], dtype=object).reshape(batch.shape[:-1])

        text = tf.numpy_function(rows, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text


@functools.lru_cache(maxsize=None)
def _build(
    kind: str,
    sentencepiece_model_path: str | None,
    extra_ids: int,
    hf_tokenizer_dir: str | None = None,
    hf_files: tuple[str, ...] | None = None,
) -> seqio.Vocabulary:
    if kind == "byte":
        return seqio.ByteVocabulary(extra_ids=extra_ids)
    if kind == "hf_tokenizer":
        if not hf_tokenizer_dir:
            raise ConfigError(
                "get_vocabulary(kind='hf_tokenizer') needs the checkpoint's directory: add "
                "--gin.get_vocabulary.hf_tokenizer_dir='/path/to/checkpoint' (it holds tokenizer.json or "
                "tokenizer.model and tokenizer_config.json)."
            )
        if not os.path.isdir(hf_tokenizer_dir):
            raise ConfigError(
                f"get_vocabulary.hf_tokenizer_dir={hf_tokenizer_dir!r} is not a directory; point it "
                "at a Hugging Face checkpoint's local directory."
            )
        return HFTokenizerVocabulary(hf_tokenizer_dir, files=hf_files)
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


def _from_model_dir(model_dir: str) -> tuple:
    """`_build`'s arguments for the vocabulary a MODEL_DIR stores."""
    record = vocabulary_store.stored_record(model_dir)
    if record is None:
        raise ConfigError(
            f"get_vocabulary.from_model_dir={model_dir!r}: it holds no {vocabulary_store.RUN_INFO} with "
            "vocabulary files. Point it at a MODEL_DIR written by cat_jax.train or "
            "cat_jax.import_checkpoint."
        )
    if record["kind"] == "byte":
        return "byte", None, int(record.get("extra_ids", 0))
    if record["kind"] == "hf_tokenizer":
        return "hf_tokenizer", None, 0, model_dir, tuple(record["files"])
    return "sentencepiece", os.path.join(model_dir, record["file"]), int(record.get("extra_ids", 0))


_DEFAULT_MODEL_DIR: list[str] = []


def default_to_model_dir(model_dir: str) -> None:
    """Make `get_vocabulary()` return `model_dir`'s vocabulary when gin binds none of its parameters
    (eval, infer and cascade_eval default to the vocabulary of the model they restore)."""
    if gin.get_bindings(get_vocabulary):
        return
    if vocabulary_store.stored_record(model_dir):
        _DEFAULT_MODEL_DIR[:] = [os.path.abspath(model_dir)]


@gin.configurable
def get_vocabulary(
    kind: str = "byte",
    sentencepiece_model_path: str | None = None,
    extra_ids: int = 0,
    from_model_dir: str | None = None,
    hf_tokenizer_dir: str | None = None,
) -> seqio.Vocabulary:
    """Returns the configured vocabulary (one shared instance per configuration).

    `from_model_dir` takes the vocabulary a MODEL_DIR stores (and wins over the other parameters);
    `hf_tokenizer_dir` is a Hugging Face checkpoint's directory for kind 'hf_tokenizer'.
    """
    from_model_dir = from_model_dir or (_DEFAULT_MODEL_DIR[0] if _DEFAULT_MODEL_DIR else None)
    if from_model_dir:
        return _build(*_from_model_dir(os.path.abspath(from_model_dir)))
    if kind not in KINDS:
        raise ConfigError(f"get_vocabulary: unknown kind {kind!r}; choose one of {KINDS}.")
    return _build(
        kind,
        sentencepiece_model_path,
        int(extra_ids),
        os.path.abspath(os.path.expanduser(hf_tokenizer_dir)) if hf_tokenizer_dir else None,
    )


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
