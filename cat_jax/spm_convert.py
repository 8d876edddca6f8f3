"""A SentencePiece BPE model as the `tokenizers` Tokenizer transformers converts it to.

A Hub folder that ships only `tokenizer.model` (Llama 2 / Mistral / Gemma style) is tokenized by
transformers through a fast tokenizer converted from it; `convert(model, style, ...)` builds the
same `tokenizers.Tokenizer`, so that every later step (added tokens, templates, decoding) is the
library's own, as in transformers. Written after transformers' `convert_slow_tokenizer.py`
(`SpmConverter`, `LlamaConverter`, `GemmaConverter`, `generate_merges`, v4.57); the post-processor
is left unset (the tokenizer class sets its BOS/EOS template afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence

from cat_jax.errors import ConfigError

SPACE = "\u2581"  # SentencePiece's whitespace marker
STYLES = ("llama", "gemma")
GEMMA_SPECIAL = frozenset({"<start_of_turn>", "<end_of_turn>"})  # user pieces Gemma marks special
_BPE = 2  # TrainerSpec.model_type
_CONTROL, _USER_DEFINED = 3, 4  # SentencePiece.Type


def merges_of(vocab: dict[str, int], scores: Sequence[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a scored piece into two known
    pieces, highest score first (ties: longer left, then longer right piece first; within a piece,
    by the ids of its halves)."""
    merges = []
    for piece, score in dict(scores).items():
        local = [
            (piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def convert(
    model: bytes,
    style: str,
    *,
    legacy: bool = True,
    add_prefix_space: bool = True,
    specials: tuple[str, str, str] = ("<pad>", "<eos>", "<bos>"),
):
    """The `tokenizers.Tokenizer` transformers builds from the SentencePiece `model`.

    style: "llama" (LlamaTokenizer: `legacy`, `add_prefix_space` as in its tokenizer_config) or
    "gemma" (GemmaTokenizer: ids 0, 1, 2 renamed to its `specials` (pad, eos, bos) tokens).
    """
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,  # pylint: disable=import-outside-toplevel
    )

    if style not in STYLES:
        raise ValueError(f"Unknown SentencePiece conversion style {style!r}; expected one of {STYLES}.")
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    if proto.trainer_spec.model_type != _BPE:
        raise ConfigError(
            "This tokenizer.model is not a BPE SentencePiece model; cat_jax converts the BPE models of "
            "Llama, Mistral and Gemma. Give the checkpoint's tokenizer.json instead."
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    if style == "llama":
        scores = [(piece, 0.0) for piece, _ in pieces[:3]] + pieces[3:]
    else:
        scores = [(token, 0.0) for token in specials] + pieces[3:]
        if "\t" not in vocab and "<0x09>" in vocab:  # older Gemma models lack the tab piece
            vocab["\t"] = vocab["<0x09>"]
            scores[vocab["<0x09>"]] = ("\t", 0.0)
    tokenizer = Tokenizer(
        models.BPE(
            {piece: i for i, (piece, _) in enumerate(scores)},
            merges_of(vocab, scores),
            unk_token=proto.trainer_spec.unk_piece,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    special_pieces = GEMMA_SPECIAL if style == "gemma" else frozenset()
    tokenizer.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=p.type == _CONTROL or p.piece in special_pieces)
            for p in proto.pieces
            if p.type in (_CONTROL, _USER_DEFINED)
        ]
    )
    unspace = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "gemma":
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tokenizer.decoder = decoders.Sequence(unspace)
        return tokenizer
    if legacy:
        tokenizer.normalizer = normalizers.Sequence(
            ([normalizers.Prepend(SPACE)] if add_prefix_space else []) + [normalizers.Replace(" ", SPACE)]
        )
    else:
        scheme = "first" if add_prefix_space else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
    tokenizer.decoder = decoders.Sequence(unspace + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    return tokenizer
