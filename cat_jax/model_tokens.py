"""A split in a model's own tokens: how a cascade of models with different tokenizers (a T5 in front
of a decoder-only model with another vocabulary) decodes one split.

A split is loaded once, tokenized by its task's vocabulary. A model trained with that vocabulary
reads those arrays as they are; any other model reads the split's texts (`inputs_text`,
`targets_text`) tokenized by the vocabulary its MODEL_DIR stores, with the data layer's conventions
(`cat_jax.data.seqio_source`): EOS appended, a sequence longer than its length cut to its first
L - 1 tokens and EOS (seqio's append_eos_after_trim), right-padded with 0, `decoder_input_tokens`
the targets shifted right after a 0, loss weights 1 up to the targets' EOS, and the lengths before
truncation. Ids, tasks and texts stay the split's, so every model's records line up example by
example and are scored on their decoded text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from cat_jax import vocabularies, vocabulary_store
from cat_jax.data.arrays import ExampleArrays

log = logging.getLogger("cat_jax")


def model_vocabulary(model_dir: str, info: Mapping[str, Any], task_vocab: Any) -> tuple[Any, bool]:
    """(the vocabulary the model in `model_dir` was trained with, whether it is `task_vocab`): the
    task's own vocabulary object when their identities (run_info's `vocabulary`) agree, else the one
    the MODEL_DIR stores."""
    if info["vocabulary"] == vocabularies.identity(task_vocab):
        return task_vocab, True
    own = vocabulary_store.model_vocabulary(model_dir, dict(info))
    log.info(
        "%s was trained with vocabulary %s, the task's is %s: it reads the split's text in its own tokens.",
        model_dir,
        info["vocabulary"],
        vocabularies.identity(task_vocab),
    )
    return own, False


def token_rows(ids: list[list[int]], length: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, length] int32 right-padded with 0, [N] lengths before truncation) of token lists, each
    ending in `eos_id` (appended; a truncated one keeps its first length - 1 tokens and EOS)."""
    rows = np.zeros((len(ids), length), np.int32)
    full = np.zeros(len(ids), np.int32)
    for r, tokens in enumerate(ids):
        tokens = [*tokens, eos_id]
        full[r] = len(tokens)
        if len(tokens) > length:
            tokens = [*tokens[: length - 1], eos_id]
        rows[r, : len(tokens)] = tokens
    return rows, full


def tokenize_split(arrays: ExampleArrays, vocab: Any) -> ExampleArrays:
    """`arrays` (at its own input / target lengths) with its texts tokenized by `vocab`."""
    li = arrays.features["encoder_input_tokens"].shape[1]
    lt = arrays.features["decoder_target_tokens"].shape[1]
    inputs, input_lengths = token_rows([vocab.encode(str(t)) for t in arrays.inputs_text], li, vocab.eos_id)
    targets, target_lengths = token_rows([vocab.encode(str(t)) for t in arrays.targets_text], lt, vocab.eos_id)
    weights = (np.arange(lt)[None, :] < np.minimum(target_lengths, lt)[:, None]).astype(np.float32)
    features = {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }
    return ExampleArrays(
        features=features,
        ids=arrays.ids,
        task_names=arrays.task_names,
        inputs_text=arrays.inputs_text,
        targets_text=arrays.targets_text,
        input_lengths=input_lengths,
        target_lengths=target_lengths,
        extras=arrays.extras,
    )
