"""Vocabularies without TensorFlow or seqio: what the trainer, eval and infer need from one.

A run needs four things from its vocabulary: `eos_id`, `vocab_size`, `decode(ids) -> text`, and an
identity that `model_dir.vocab_info` records in `run_info.json`. `ByteVocabulary` and
`SentencePieceVocabulary` here reproduce seqio's classes of the same names for exactly these
(decode included: seqio's `Vocabulary.decode` clean-up, then the byte / SentencePiece decoding), so
a model trained on live seqio data and one trained on exported data are interchangeable. A Hugging
Face checkpoint's tokenizer is `cat_jax.hf_tokenizer.HFTokenizerVocabulary` (and its seqio face
`tasks.vocab.HFTokenizerVocabulary`).

`describe(vocab)` turns a seqio (or these) vocabulary into the JSON description an export manifest
holds; `from_description(desc, directory)` builds the TensorFlow-free vocabulary back. `identity`
is the part of the description that says whether two vocabularies tokenize alike: the class name,
the size and, for SentencePiece, the SHA-256 of the serialized model the tokenizer runs (not its
path, which differs between a live run and the copy beside an export); for a Hugging Face
tokenizer, its class and the SHA-256 of its normalised files and settings (`tokenizer_sha256`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

PAD_ID = 0
BYTE_SPECIAL_TOKENS = 3  # 0=PAD, 1=EOS, 2=UNK
BYTE_SIZE = 256


def resolve(vocab: Any) -> Any:
    """The concrete vocabulary behind a lazy one (tasks.vocab.LazyVocabulary has `.resolved`)."""
    for _ in range(8):
        inner = getattr(vocab, "resolved", None)
        if inner is None:
            return vocab
        vocab = inner() if callable(inner) and not hasattr(inner, "vocab_size") else inner
    return vocab


class _Base:
    """seqio.Vocabulary's pure-Python half: sizes, special ids and `decode`."""

    def __init__(self, extra_ids: int = 0):
        self._extra_ids = int(extra_ids or 0)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def extra_ids(self) -> int:
        return self._extra_ids

    @property
    def _base_vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self._base_vocab_size + self._extra_ids

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; ids past the base vocabulary read as UNK (as seqio)."""
        clean = [int(i) for i in ids]
        if self.unk_id is not None:
            clean = [self.unk_id if i >= self._base_vocab_size else i for i in clean]
        if self.eos_id is not None and self.eos_id in clean:
            clean = clean[: clean.index(self.eos_id) + 1]
        return self._decode(clean)


class ByteVocabulary(_Base):
    """seqio.ByteVocabulary (UTF-8 bytes + 3; 0=PAD, 1=EOS, 2=UNK) without TensorFlow."""

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    @property
    def _base_vocab_size(self) -> int:
        return BYTE_SPECIAL_TOKENS + BYTE_SIZE

    def encode(self, s: str | bytes) -> list[int]:
        s = s.decode() if isinstance(s, bytes) else s
        return [b + BYTE_SPECIAL_TOKENS for b in s.encode("utf-8")]

    def _decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - BYTE_SPECIAL_TOKENS for i in ids if BYTE_SPECIAL_TOKENS <= i < BYTE_SPECIAL_TOKENS + BYTE_SIZE)
        return data.decode("utf-8", errors="ignore")

    def __repr__(self) -> str:
        return f"cat_jax.vocabularies.ByteVocabulary(extra_ids={self._extra_ids})"


def add_extra_ids(model: bytes, extra_ids: int) -> bytes:
    """The serialized SentencePiece model with `extra_ids` sentinel pieces appended as seqio adds
    them: "▁<extra_id_{i}>", USER_DEFINED, score 0, in reverse order (extra_id_0 is the last id)."""
    if not extra_ids:
        return model
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    for i in reversed(range(extra_ids)):
        proto.pieces.add(
            piece=f"\u2581<extra_id_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        )
    return proto.SerializeToString()


class SentencePieceVocabulary(_Base):
    """seqio.SentencePieceVocabulary through the `sentencepiece` package alone.

    `sentencepiece_model_file` is a SentencePiece model; `extra_ids` sentinels are added to it as
    seqio adds them (`add_extra_ids`), so `(file, extra_ids)` tokenizes and hashes exactly like
    `seqio.SentencePieceVocabulary(file, extra_ids)`. An export holds the model with its extra ids
    (and normalizer overrides) already applied, read back with extra_ids=0. vocab_size is the piece
    count, as in seqio.
    """

    def __init__(self, sentencepiece_model_file: str, extra_ids: int = 0):
        import sentencepiece  # pylint: disable=import-outside-toplevel

        super().__init__(extra_ids=0)
        self._path = str(sentencepiece_model_file)
        self._added_extra_ids = int(extra_ids or 0)
        with open(self._path, "rb") as f:
            self._model = add_extra_ids(f.read(), self._added_extra_ids)
        self.tokenizer = sentencepiece.SentencePieceProcessor()
        self.tokenizer.LoadFromSerializedProto(self._model)

    @property
    def sentencepiece_model_file(self) -> str:
        return self._path

    @property
    def added_extra_ids(self) -> int:
        """The extra ids added to the model file's pieces (seqio's `extra_ids` argument)."""
        return self._added_extra_ids

    @property
    def sp_model(self) -> bytes:
        return self._model

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id()

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id()

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_id()

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.GetPieceSize()

    @property
    def vocab_size(self) -> int:
        return self._base_vocab_size

    def encode(self, s: str) -> list[int]:
        return list(self.tokenizer.EncodeAsIds(s))

    def _decode(self, ids: Sequence[int]) -> str:
        unk, size = self.tokenizer.unk_id(), self.tokenizer.GetPieceSize()
        return self.tokenizer.DecodeIds([unk if i >= size else int(i) for i in ids])

    def __repr__(self) -> str:
        return f"cat_jax.vocabularies.SentencePieceVocabulary({self._path!r})"


HF_TOKENIZER = "HFTokenizerVocabulary"


def _kind(vocab: Any) -> str:
    if getattr(vocab, "tokenizer_sha256", None):  # cat_jax.hf_tokenizer's class or its seqio face
        return HF_TOKENIZER
    name = type(vocab).__name__
    if name in ("ByteVocabulary", "SentencePieceVocabulary"):
        return name
    for base in type(vocab).__mro__:  # a subclass of seqio's classes
        if base.__name__ in ("ByteVocabulary", "SentencePieceVocabulary"):
            return base.__name__
    return name


def sentencepiece_model_bytes(vocab: Any) -> bytes:
    """The serialized model a SentencePiece vocabulary's tokenizer runs (seqio's `sp_model`)."""
    model = getattr(vocab, "sp_model", None)
    if model:
        return model
    with open(vocab.sentencepiece_model_file, "rb") as f:
        return f.read()


def identity(vocab: Any) -> dict[str, Any]:
    """What says two vocabularies tokenize alike: class, size and (SentencePiece) model hash.

    Equal for seqio's vocabulary of a live run and the TensorFlow-free one of its export.
    """
    vocab = resolve(vocab)
    kind = _kind(vocab)
    info: dict[str, Any] = {"class": kind, "size": int(vocab.vocab_size)}
    if kind == HF_TOKENIZER:
        info.update(tokenizer_class=vocab.tokenizer_class, tokenizer_sha256=vocab.tokenizer_sha256)
    if kind == "SentencePieceVocabulary":
        info["sentencepiece_sha256"] = hashlib.sha256(sentencepiece_model_bytes(vocab)).hexdigest()
    return info


def identity_of_model(model: bytes) -> dict[str, Any]:
    """`identity` of the SentencePiece vocabulary whose serialized model is `model`."""
    import sentencepiece  # pylint: disable=import-outside-toplevel

    tokenizer = sentencepiece.SentencePieceProcessor()
    tokenizer.LoadFromSerializedProto(model)
    return {
        "class": "SentencePieceVocabulary",
        "size": int(tokenizer.GetPieceSize()),
        "sentencepiece_sha256": hashlib.sha256(model).hexdigest(),
    }


def describe(vocab: Any, directory: str | None = None) -> dict[str, Any]:
    """The JSON description of an export manifest; with `directory`, a SentencePiece model is
    written there (as `sentencepiece.<sha16>.model`), or a Hugging Face tokenizer's files (into
    `hf_tokenizer.<sha16>/`), and named in the description."""
    vocab = resolve(vocab)
    desc = identity(vocab)
    kind = desc["class"]
    if kind not in ("ByteVocabulary", "SentencePieceVocabulary", HF_TOKENIZER):
        raise ValueError(
            f"Cannot export vocabulary {type(vocab).__name__}: a TensorFlow-free host can rebuild only "
            f"ByteVocabulary, SentencePieceVocabulary and {HF_TOKENIZER} (see tasks/vocab.py)."
        )
    desc.update(eos_id=vocab.eos_id, pad_id=vocab.pad_id, unk_id=vocab.unk_id, extra_ids=int(vocab.extra_ids or 0))
    if kind == HF_TOKENIZER:
        desc.update(
            bos_id=vocab.bos_id,
            stop_ids=list(vocab.stop_ids),
            prompt_prefix_ids=list(vocab.prompt_prefix_ids),
            prompt_suffix_ids=list(vocab.prompt_suffix_ids),
            source_dir=vocab.directory,
            tokenizer_dir=f"hf_tokenizer.{desc['tokenizer_sha256'][:16]}",
            tokenizer_files=list(vocab.files),
        )
        if directory is not None:
            target = os.path.join(directory, desc["tokenizer_dir"])
            os.makedirs(target, exist_ok=True)
            vocab.write_files(target)
    if kind == "SentencePieceVocabulary":
        desc["sentencepiece_model"] = f"sentencepiece.{desc['sentencepiece_sha256'][:16]}.model"
        source = getattr(vocab, "sentencepiece_model_file", None)
        if source:
            desc["source_model_file"] = str(source)
        if directory is not None:
            path = os.path.join(directory, desc["sentencepiece_model"])
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(sentencepiece_model_bytes(vocab))
            os.replace(tmp, path)
    return desc


def from_description(desc: dict[str, Any], directory: str) -> Any:
    """The TensorFlow-free vocabulary of a manifest description (its files under `directory`)."""
    kind = desc["class"]
    if kind == "ByteVocabulary":
        vocab: Any = ByteVocabulary(extra_ids=desc.get("extra_ids", 0))
    elif kind == "SentencePieceVocabulary":
        path = os.path.join(directory, desc["sentencepiece_model"])
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"The exported SentencePiece model {path} is missing; export the split again with "
                "python -m cat_jax.export_task (it writes the model beside the arrays)."
            )
        vocab = SentencePieceVocabulary(path)
    elif kind == HF_TOKENIZER:
        from cat_jax import hf_tokenizer  # pylint: disable=import-outside-toplevel

        path = os.path.join(directory, desc["tokenizer_dir"])
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"The exported tokenizer files {path} are missing; export the split again with "
                "python -m cat_jax.export_task (it writes them beside the arrays)."
            )
        vocab = hf_tokenizer.HFTokenizerVocabulary(path, files=desc["tokenizer_files"])
    else:
        raise ValueError(
            f"Unknown exported vocabulary class {kind!r}; expected ByteVocabulary, "
            f"SentencePieceVocabulary or {HF_TOKENIZER}."
        )
    got = describe(vocab)
    want = {
        k: desc[k]
        for k in ("class", "size", "eos_id", "pad_id", "unk_id", "sentencepiece_sha256", "tokenizer_sha256")
        if k in desc
    }
    if {k: got.get(k) for k in want} != want:
        raise ValueError(
            f"The vocabulary rebuilt from {directory} is {got}, but the manifest says {desc}; "
            "the export is damaged: export it again."
        )
    return vocab
