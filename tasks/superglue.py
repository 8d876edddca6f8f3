"""SuperGLUE as text-to-text seqio tasks (T5 style), read through TensorFlow Datasets.

Tasks (TFDS `super_glue/<name>:1.0.2`; splits train, validation, test):

- `superglue_boolq`: "boolq question: Q passage: P" -> False / True
- `superglue_cb`: "cb premise: P hypothesis: H" -> entailment / contradiction / neutral
- `superglue_copa`: "copa premise: P choice1: A choice2: B question: cause" -> choice1 / choice2
- `superglue_rte`: "rte premise: P hypothesis: H" -> entailment / not_entailment
- `superglue_wic`: "wic sentence1: S1 sentence2: S2 word: W" -> False / True
- `superglue_wsc`: "wsc text: ... *pronoun* ... pronoun: X candidate: Y" -> False / True
- `superglue_multirc`: "multirc question: Q answer: A paragraph: P" -> False / True
- `superglue_record`: "record query: Q entities: E1, E2 passage: P" -> the masked entity

Fields come in the TFDS builder's feature order (T5 sorts them alphabetically; the content is the
same). The label strings are the builder's class names. The test splits are unlabelled (TFDS label
-1): their targets are "<unk>", as in T5; use them only to produce leaderboard predictions.

Ids are `<task>:<split>:<TFDS idx>`, e.g. "superglue_boolq:train:17"; MultiRC's idx dict becomes
"p<paragraph>-q<question>-a<answer>" and ReCoRD's "p<passage>-q<query>".

Metrics (percentages): accuracy for BoolQ, COPA, RTE, WiC, WSC; accuracy and macro F1 for CB;
MultiRC question-level exact match and answer-level F1 ("f1a"); ReCoRD SQuAD-style exact match and
token F1, max over the gold answers (see `cat_jax.metrics` for the simplifications). Cascades score
every example by exact match (`metrics.register_quality`): label match, or for ReCoRD a match with
any gold answer.

Simplifications against T5: ReCoRD has one example per query whose target is the first gold answer
(T5 repeats a query once per gold answer); the other answers travel in the string feature
`answers` (joined by `ANSWER_SEPARATOR`) and are all accepted at evaluation. WSC is the original
`wsc` config framed as classification: the pronoun (span2) is starred in the text when its word
index is valid.

Vocabulary: the tasks use `tasks.vocab.VOCABULARY` (bytes by default). The intended vocabulary for
these benchmarks is the standard T5 SentencePiece model (`T5_SENTENCEPIECE_MODEL`,
gs://t5-data/vocabs/cc_all.32000/sentencepiece.model, 32k pieces + 100 extra ids); on a TPU VM::

    --gin.get_vocabulary.kind='sentencepiece'
    --gin.get_vocabulary.sentencepiece_model_path='gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'

(`get_vocabulary` currently checks the path with os.path.exists, which is False for gs:// paths;
until it uses tf.io.gfile, copy the model to local disk first, e.g.
`gsutil cp gs://t5-data/vocabs/cc_all.32000/sentencepiece.model /tmp/t5_spm.model`, and give that.)

Registration downloads nothing. Reading a task needs the TFDS data: prepared in the TFDS data
directory, or downloaded on first read where the host can reach the internet.

`TfdsSource`, `render` and `label_text` are shared with `tasks.wmt` and `tasks.flan`.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from cat_jax import metrics
from tasks.vocab import VOCABULARY

SUPERGLUE_VERSION = "1.0.2"
T5_SENTENCEPIECE_MODEL = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
SPLITS = ("train", "validation", "test")
UNKNOWN_LABEL = "<unk>"
ANSWER_SEPARATOR = " ||| "

Example = dict[str, tf.Tensor]
KeyFn = Callable[[Example], tf.Tensor]

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}


# --- shared helpers -----------------------------------------------------------------------------


class _LoaderWithTfdsId(seqio.utils.LazyTfdsLoader):
    """A LazyTfdsLoader whose reads also return TFDS's `tfds_id` ("<file>__<index>")."""

    @property
    def read_config(self):
        return dataclasses.replace(super().read_config, add_tfds_id=True)


class TfdsSource(seqio.TfdsDataSource):
    """A TfdsDataSource that adds the string feature `id` = "<task>:<split>:<key_fn(example)>".

    `key_fn` maps a raw TFDS example to a string tensor unique within the split (the SuperGLUE idx);
    with `use_tfds_id` the example also carries TFDS's `tfds_id` for key_fn to use (datasets with
    no idx, e.g. WMT); it is dropped afterwards. Both are fixed by the prepared dataset, so ids do
    not depend on file shuffling or on the host's shard.
    """

    def __init__(self, task_name: str, tfds_name: str, splits: Sequence[str], key_fn: KeyFn, use_tfds_id: bool = False):
        super().__init__(tfds_name=tfds_name, splits=tuple(splits))
        self._task_name = task_name
        self._key_fn = key_fn
        self._loader_with_ids = _LoaderWithTfdsId(tfds_name, split_map={s: s for s in splits}) if use_tfds_id else None

    @property
    def tfds_dataset(self) -> seqio.utils.LazyTfdsLoader:
        return self._loader_with_ids or super().tfds_dataset

    def num_input_examples(self, split: str) -> int | None:
        """The split's size from the TFDS metadata; None while the dataset is not prepared (seqio
        then skips its in-memory caching; `tfds.testing.mock_data` has no split sizes either)."""
        try:
            return super().num_input_examples(split)
        except KeyError:
            return None

    def get_dataset(
        self,
        split: str | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        **kwargs: Any,
    ) -> tf.data.Dataset:
        split = split or "train"
        ds = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
        prefix = f"{self._task_name}:{split}:"

        def add_id(ex: Example) -> Example:
            ex = dict(ex)
            ex["id"] = tf.strings.join([prefix, self._key_fn(ex)])
            ex.pop("tfds_id", None)
            return ex

        return ds.map(add_id, num_parallel_calls=tf.data.AUTOTUNE)


def idx_key(ex: Example) -> tf.Tensor:
    """The integer `idx` of a SuperGLUE example as a string."""
    return tf.strings.as_string(ex["idx"])


def _nested_idx_key(*parts: tuple[str, str]) -> KeyFn:
    """Flattens an idx dict: parts (("p", "paragraph"), ("q", "question")) -> "p3-q5"."""

    def key(ex: Example) -> tf.Tensor:
        return tf.strings.join(
            [tf.strings.join([tag, tf.strings.as_string(ex["idx"][field])]) for tag, field in parts], separator="-"
        )

    return key


def tfds_id_key(ex: Example) -> tf.Tensor:
    """ "<shard>-of-<shards>:<index>" from TFDS's tfds_id ("name-split.tfrecord-00003-of-00016__42")."""
    shard_and_index = tf.strings.regex_replace(ex["tfds_id"], r"^.*\.tfrecord-", "")
    return tf.strings.regex_replace(shard_and_index, "__", ":")


def render(template: str, fields: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """A str.format-style template ("q: {question}") filled with string tensors."""
    parts: list[Any] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if field is not None:
            if spec or conversion:
                raise ValueError(f"render: format specs are not supported ({template!r}).")
            if field not in fields:
                raise KeyError(f"render: template {template!r} names {field!r}; have {sorted(fields)}.")
            parts.append(fields[field])
    return tf.strings.join(parts) if parts else tf.constant("")


def label_text(label: tf.Tensor, names: Sequence[str]) -> tf.Tensor:
    """The name of a ClassLabel id; UNKNOWN_LABEL for TFDS's -1 (unlabelled test examples)."""
    label = tf.cast(label, tf.int32)
    name = tf.gather(tf.constant(list(names)), tf.maximum(label, 0))
    return tf.where(label < 0, tf.constant(UNKNOWN_LABEL), name)


def text_preprocessor(fn: Callable[[Example], Mapping[str, tf.Tensor]]) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A seqio preprocessor keeping `id` and the string features `fn` returns (inputs, targets, ...)."""

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: {"id": ex["id"], **fn(ex)}, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


PREPROCESSORS = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_text(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """Decoded text with whitespace collapsed (labels, translations)."""
    del example, is_target
    return metrics.normalize(_text(output))


def add_task(
    name: str,
    source: seqio.DataSource,
    to_text: Callable[[Example], Mapping[str, tf.Tensor]],
    metric_fns: Sequence[Callable[..., dict[str, float]]],
    postprocess_fn: Callable[..., Any] = postprocess_text,
) -> None:
    """Registers a text-to-text task: to_text(raw example) -> {inputs, targets, ...}, then tokenize."""
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[text_preprocessor(to_text), *PREPROCESSORS],
        output_features=OUTPUT_FEATURES,
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )


# --- SuperGLUE ----------------------------------------------------------------------------------

BINARY = ("False", "True")
LABELS = {
    "boolq": BINARY,
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "rte": ("entailment", "not_entailment"),
    "wic": BINARY,
    "wsc": BINARY,
    "multirc": BINARY,
}
TEMPLATES = {
    "boolq": "boolq question: {question} passage: {passage}",
    "cb": "cb premise: {premise} hypothesis: {hypothesis}",
    "copa": "copa premise: {premise} choice1: {choice1} choice2: {choice2} question: {question}",
    "rte": "rte premise: {premise} hypothesis: {hypothesis}",
    "wic": "wic sentence1: {sentence1} sentence2: {sentence2} word: {word}",
    "wsc": "wsc text: {text} pronoun: {span2_text} candidate: {span1_text}",
    "multirc": "multirc question: {question} answer: {answer} paragraph: {paragraph}",
    "record": "record query: {query} entities: {entities} passage: {passage}",
}


def tfds_name(benchmark: str) -> str:
    """The pinned TFDS name of a SuperGLUE benchmark, e.g. "super_glue/boolq:1.0.2"."""
    return f"super_glue/{benchmark}:{SUPERGLUE_VERSION}"


def _classification(benchmark: str) -> Callable[[Example], dict[str, tf.Tensor]]:
    template, names = TEMPLATES[benchmark], LABELS[benchmark]

    def to_text(ex: Example) -> dict[str, tf.Tensor]:
        fields = {k: v for k, v in ex.items() if isinstance(v, tf.Tensor) and v.dtype == tf.string}
        return {"inputs": render(template, fields), "targets": label_text(ex["label"], names)}

    return to_text


def star_word(text: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """The text with its index-th space-separated word wrapped in '*' (unchanged if out of range)."""
    words = tf.strings.split(text, sep=" ")
    index = tf.cast(index, tf.int32)
    valid = tf.logical_and(index >= 0, index < tf.size(words))
    safe = tf.clip_by_value(index, 0, tf.maximum(tf.size(words) - 1, 0))
    starred = tf.tensor_scatter_nd_update(words, [[safe]], [tf.strings.join(["*", tf.gather(words, safe), "*"])])
    return tf.cond(valid, lambda: tf.strings.reduce_join(starred, separator=" "), lambda: text)


def _wsc(ex: Example) -> dict[str, tf.Tensor]:
    fields = {
        "text": star_word(ex["text"], ex["span2_index"]),
        "span1_text": ex["span1_text"],
        "span2_text": ex["span2_text"],
    }
    return {"inputs": render(TEMPLATES["wsc"], fields), "targets": label_text(ex["label"], LABELS["wsc"])}


def _multirc(ex: Example) -> dict[str, tf.Tensor]:
    paragraph = tf.strings.regex_replace(ex["paragraph"], "<br>", " ")
    paragraph = tf.strings.regex_replace(paragraph, "<[^>]*>", "")
    fields = {"question": ex["question"], "answer": ex["answer"], "paragraph": paragraph}
    return {"inputs": render(TEMPLATES["multirc"], fields), "targets": label_text(ex["label"], LABELS["multirc"])}


def _record(ex: Example) -> dict[str, tf.Tensor]:
    passage = tf.strings.regex_replace(ex["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    fields = {
        "query": ex["query"],
        "passage": passage,
        "entities": tf.strings.reduce_join(ex["entities"], separator=", "),
    }
    answers = ex["answers"]
    first = tf.cond(tf.size(answers) > 0, lambda: answers[0], lambda: tf.constant(UNKNOWN_LABEL))
    return {
        "inputs": render(TEMPLATES["record"], fields),
        "targets": first,
        "answers": tf.strings.reduce_join(answers, separator=ANSWER_SEPARATOR),
    }


def multirc_group(example_id: str) -> str:
    """The question of a MultiRC example id ("superglue_multirc:validation:p3-q5-a2" -> "...p3-q5")."""
    return example_id.rsplit("-a", 1)[0]


def postprocess_multirc(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str | dict[str, str]:
    """Targets become {"group": question id, "value": label} for `metrics.multirc`; predictions text."""
    text = metrics.normalize(_text(output))
    if is_target and example is not None:
        return {"group": multirc_group(_text(example["id"])), "value": text}
    return text


def postprocess_record(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str | list[str]:
    """Targets become the list of gold answers (every one accepted); predictions normalised text."""
    if is_target and example is not None:
        answers = [a for a in _text(example.get("answers", "")).split(ANSWER_SEPARATOR) if a.strip()]
        return [metrics.normalize(a) for a in answers] or [metrics.normalize(_text(output))]
    return metrics.normalize(_text(output))


def _register() -> None:
    def key_for(benchmark: str) -> KeyFn:
        if benchmark == "multirc":
            return _nested_idx_key(("p", "paragraph"), ("q", "question"), ("a", "answer"))
        if benchmark == "record":
            return _nested_idx_key(("p", "passage"), ("q", "query"))
        return idx_key

    to_text = {name: _classification(name) for name in ("boolq", "cb", "copa", "rte", "wic")}
    to_text.update(wsc=_wsc, multirc=_multirc, record=_record)
    for benchmark, fn in to_text.items():
        name = f"superglue_{benchmark}"
        source = TfdsSource(name, tfds_name(benchmark), SPLITS, key_for(benchmark))
        if benchmark == "multirc":
            add_task(name, source, fn, [metrics.multirc], postprocess_multirc)
            metrics.register_quality(name, metrics.label_match_scores)
        elif benchmark == "record":
            add_task(name, source, fn, [metrics.squad], postprocess_record)
            metrics.register_quality(name, metrics.squad_exact_match_scores)
        else:
            metric_fns = [metrics.accuracy, metrics.macro_f1] if benchmark == "cb" else [metrics.accuracy]
            add_task(name, source, fn, metric_fns)
            metrics.register_quality(name, metrics.exact_match_scores)


SUPERGLUE_TASKS = tuple(f"superglue_{b}" for b in ("boolq", "cb", "copa", "rte", "wic", "wsc", "multirc", "record"))
_register()
