"""A FLAN-style instruction mixture: several datasets, each rendered through several templates.

Every (dataset, template) pair is its own seqio task `flan_<dataset>_t<k>` (splits train,
validation), and `flan_style_mix` mixes them all:

- `flan_boolq_t0..t2`  (TFDS super_glue/boolq)   answer "no" / "yes"
- `flan_rte_t0..t2`    (TFDS super_glue/rte)     answer "yes" / "no"
- `flan_cb_t0..t2`     (TFDS super_glue/cb)      answer "yes" / "no" / "it is not possible to tell"
- `flan_copa_t0..t2`   (TFDS super_glue/copa)    answer the text of the more plausible alternative
- `flan_wmt19_de_en_t0..t2` (TFDS wmt19_translate/de-en)  answer the English translation

Classification templates list the answer options in the prompt ("OPTIONS:\\n- yes\\n- no"), as
FLAN does. Ids include the template through the task name, e.g. "flan_boolq_t1:train:17"
(SuperGLUE idx; WMT19 uses TFDS's record id as in `tasks.wmt`), so the same source example under
two templates has two distinct ids.

Mixing: examples-proportional with FLAN's cap, split evenly over a dataset's templates: the rate of
`flan_<dataset>_t<k>` is min(train examples of the dataset, FLAN_EXAMPLE_CAP) / (number of its
templates). The rates need the TFDS metadata (computed when training on the mixture, not at import).

Metrics: accuracy (and macro F1 for CB) on the answer strings, BLEU for translation; cascades
score examples by exact match (and translation pools by corpus BLEU).

Vocabulary: `tasks.vocab.VOCABULARY` (bytes by default). The intended vocabulary for these
benchmarks is the standard T5 SentencePiece model; on a TPU VM::

    --gin.get_vocabulary.kind='sentencepiece'
    --gin.get_vocabulary.sentencepiece_model_path='gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'

(see `tasks.superglue` about gs:// paths and get_vocabulary's existence check).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

from cat_jax import metrics
from tasks import superglue, wmt
from tasks.superglue import Example, TfdsSource, add_task, idx_key, label_text, render, tfds_id_key

SPLITS = ("train", "validation")
FLAN_EXAMPLE_CAP = 3000
MIXTURE_NAME = "flan_style_mix"


@dataclasses.dataclass(frozen=True)
class FlanDataset:
    """A dataset rendered through instruction templates.

    `answers`: the target string of each ClassLabel id (None: `target_fn` builds the target).
    Templates are str.format strings over the example's string features (plus `options`, the
    answers as "- a\\n- b" lines, for classification).
    """

    name: str
    tfds_name: str
    templates: tuple[str, ...]
    metric_fns: tuple[Callable[..., dict[str, float]], ...]
    answers: tuple[str, ...] | None = None
    target_fn: Callable[[Example], tf.Tensor] | None = None
    key_fn: Callable[[Example], tf.Tensor] = idx_key
    use_tfds_id: bool = False
    corpus: Callable[..., float] | None = None

    def task_names(self) -> list[str]:
        return [f"flan_{self.name}_t{k}" for k in range(len(self.templates))]


def _options(answers: Sequence[str]) -> str:
    return "\n".join(f"- {a}" for a in answers)


def _copa_target(ex: Example) -> tf.Tensor:
    return tf.where(tf.equal(ex["label"], 0), ex["choice1"], ex["choice2"])


def _wmt_target(ex: Example) -> tf.Tensor:
    return ex["en"]


YES_NO = ("yes", "no")
DATASETS = (
    FlanDataset(
        name="boolq",
        tfds_name=superglue.tfds_name("boolq"),
        answers=("no", "yes"),
        metric_fns=(metrics.accuracy,),
        templates=(
            "{passage}\n\nCan we conclude that {question}?\n\nOPTIONS:\n{options}",
            "{passage}\n\nIs it true that {question}?\n\nOPTIONS:\n{options}",
            "Read the text and answer the question.\n\n{passage}\n\nQuestion: {question}?\n\nOPTIONS:\n{options}",
        ),
    ),
    FlanDataset(
        name="rte",
        tfds_name=superglue.tfds_name("rte"),
        answers=YES_NO,
        metric_fns=(metrics.accuracy,),
        templates=(
            '{premise}\n\nBased on the paragraph above can we conclude that "{hypothesis}"?\n\nOPTIONS:\n{options}',
            "{premise}\n\nCan we draw the following conclusion?\n{hypothesis}\n\nOPTIONS:\n{options}",
            "Determine if the sentence is true based on the text below:\n{hypothesis}\n\n{premise}\n"
            "OPTIONS:\n{options}",
        ),
    ),
    FlanDataset(
        name="cb",
        tfds_name=superglue.tfds_name("cb"),
        answers=("yes", "no", "it is not possible to tell"),
        metric_fns=(metrics.accuracy, metrics.macro_f1),
        templates=(
            '{premise}\n\nBased on the paragraph above can we conclude that "{hypothesis}"?\n\nOPTIONS:\n{options}',
            "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?\n\n"
            "OPTIONS:\n{options}",
            '{premise}\nQuestion: Does this imply that "{hypothesis}"?\n\nOPTIONS:\n{options}',
        ),
    ),
    FlanDataset(
        name="copa",
        tfds_name=superglue.tfds_name("copa"),
        target_fn=_copa_target,
        metric_fns=(metrics.accuracy,),
        templates=(
            "{premise} What is the {question}?\n\nOPTIONS:\n- {choice1}\n- {choice2}",
            'Here is a premise: "{premise}"\n\nWhat is the {question}?\n\nOPTIONS:\n- {choice1}\n- {choice2}',
            "Choose the more plausible {question} of this sentence:\n{premise}\n\nOPTIONS:\n- {choice1}\n- {choice2}",
        ),
    ),
    FlanDataset(
        name="wmt19_de_en",
        tfds_name=wmt.WMT19_TFDS_NAME,
        target_fn=_wmt_target,
        key_fn=tfds_id_key,
        use_tfds_id=True,
        metric_fns=(metrics.bleu,),
        corpus=metrics.corpus_bleu,
        templates=(
            "Translate to English:\n\n{de}",
            "{de}\n\nTranslate this to English?",
            'How is "{de}" said in English?',
        ),
    ),
)


def _to_text(dataset: FlanDataset, template: str) -> Callable[[Example], dict[str, tf.Tensor]]:
    def to_text(ex: Example) -> dict[str, tf.Tensor]:
        fields = {k: v for k, v in ex.items() if isinstance(v, tf.Tensor) and v.dtype == tf.string}
        if dataset.answers is not None:
            fields["options"] = tf.constant(_options(dataset.answers))
            target = label_text(ex["label"], dataset.answers)
        else:
            assert dataset.target_fn is not None, f"{dataset.name}: give answers or target_fn"
            target = dataset.target_fn(ex)
        return {"inputs": render(template, fields), "targets": target}

    return to_text


def flan_rate(task: seqio.Task, num_templates: int) -> float:
    """min(train examples, FLAN_EXAMPLE_CAP) / num_templates (needs the TFDS metadata)."""
    size = task.num_input_examples("train")
    if size is None:
        raise ValueError(
            f"{MIXTURE_NAME}: the rate of {task.name} needs the size of its train split; "
            "prepare the TFDS dataset first (tfds build, or read the task once)."
        )
    return min(float(size), float(FLAN_EXAMPLE_CAP)) / num_templates


def _register() -> list[tuple[str, Callable[[seqio.Task], float]]]:
    entries = []
    for dataset in DATASETS:
        rate = functools.partial(flan_rate, num_templates=len(dataset.templates))
        for name, template in zip(dataset.task_names(), dataset.templates):
            source = TfdsSource(name, dataset.tfds_name, SPLITS, dataset.key_fn, use_tfds_id=dataset.use_tfds_id)
            add_task(name, source, _to_text(dataset, template), dataset.metric_fns)
            metrics.register_quality(name, metrics.exact_match_scores, dataset.corpus)
            entries.append((name, rate))
    seqio.MixtureRegistry.add(MIXTURE_NAME, entries)
    return entries


FLAN_TASKS = tuple(name for dataset in DATASETS for name in dataset.task_names())
_register()
