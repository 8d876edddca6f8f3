"""The cascade_eval job: decode a split with one large and several small models, write the
per-example records (examples.jsonl, and validation_examples.jsonl when the validation split is
decoded) with the analysis plan (cascade_config.json), then the curves, summaries and plots of
`cascade.analysis` (DESIGN.md section 1). `python -m cat_jax.cascade_analyse OUTPUT_DIR` redoes the
analysis from those files alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from cat_jax import data as data_lib
from cat_jax import evaluation, metrics, model_tokens, models, partitioning
from cat_jax.cascade import analysis, report, store
from cat_jax.cascade.agreement import is_free_text
from cat_jax.cascade.plan import ALL_RULES, CONFIG, LARGE, AnalysisConfig, Options, metric_ref
from cat_jax.cascade.records import ModelOutputs, SplitRecords
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import ConfigError
from cat_jax.evaluation import Split, load_split, score_texts
from cat_jax.frozen_model import check_cascade_models, load_frozen_model, read_model_info
from cat_jax.inference import cascade_dataset

log = logging.getLogger("cat_jax")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One model's greedy outputs on one split and the forward FLOPs of each example [N]; for the
    large model when post_hoc_embed needs it, each input's mean encoder hidden state at the planned
    depth [N, emb] and the FLOPs of those encoder layers [N]."""

    predictions: evaluation.Predictions
    flops: np.ndarray
    embedding: np.ndarray | None = None
    embedding_flops: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CascadeEvalResult:
    """Where the outputs went: the directory and every file written into it."""

    output_dir: str
    files: list[str]


def example_flops(model: models.Model, input_lengths: np.ndarray, decoded_lengths: np.ndarray) -> np.ndarray:
    """Forward FLOPs [N] at each example's input length in the model's own batch and its decoded length."""
    return np.array([model.forward_flops(int(li), int(lt)) for li, lt in zip(input_lengths, decoded_lengths)])


def embedding_depth(options: Options, large_info: Mapping[str, Any]) -> int:
    """The layers post_hoc_embed's embedding of the inputs runs (the encoder's of an
    encoder-decoder, the decoder's over the prompt): options.embed_layer, by default all of the large
    model's (its run_info); ConfigError beyond them."""
    layers = models.from_run_info(large_info).input_layers
    depth = layers if options.embed_layer is None else options.embed_layer
    if depth > layers:
        raise ConfigError(
            f"run_cascade_eval.embed_layer={depth}, but the large model's inputs pass {layers} layers: "
            f"pick one in [0, {layers}] (None: all)."
        )
    return depth


def decode_model(
    name: str,
    model_dir: str,
    splits: Sequence[Split],
    dataset: DatasetConfig,
    task_vocab: Any,
    mesh: Any,
    rules: Any,
    embed_depth: int | None = None,
) -> dict[str, Decoded]:
    """Restores one model and greedy-decodes every split with it, in its own tokens (the task's
    arrays when it was trained with the task's vocabulary, else the split's text tokenized by its
    MODEL_DIR's vocabulary; `cat_jax.model_tokens`): split name -> Decoded; with embed_depth, also
    each input's mean hidden state after that many layers. FLOPs count the model's own tokens."""
    frozen = load_frozen_model(model_dir, mesh=mesh, rules=rules)
    rules = frozen.rules
    vocab, same = model_tokens.model_vocabulary(model_dir, frozen.info, task_vocab)
    out = {}
    for split in splits:
        arrays = split.arrays if same else model_tokens.tokenize_split(split.arrays, vocab)
        start = time.perf_counter()
        preds = evaluation.predict(
            frozen.model,
            frozen.params,
            arrays,
            vocab,
            dataset.batch_size,
            mesh,
            rules,
            dataset.task_feature_lengths["targets"],
        )
        log.info(
            "Decoded %d %s examples with model %r (step %d of %s) in %.1f s",
            len(arrays),
            split.name,
            name,
            frozen.step,
            model_dir,
            time.perf_counter() - start,
        )
        input_lengths = frozen.model.input_lengths(frozen.model.make_batch(arrays.features, vocab))
        embedding = embedding_flops = None
        if embed_depth is not None:
            embedding = evaluation.mean_input_hidden(
                frozen.model, frozen.params, arrays, vocab, dataset.batch_size, mesh, rules, embed_depth
            )
            embedding_flops = frozen.model.embedding_flops(input_lengths.astype(np.float64), embed_depth)
        out[split.name] = Decoded(
            preds, example_flops(frozen.model, input_lengths, preds.lengths), embedding, embedding_flops
        )
    return out


def to_records(split: Split, decoded: Decoded) -> ModelOutputs:
    """One model's records on a split (ids "<task>/<id>"), quality from each task's per-example metric."""
    arrays, preds = split.arrays, decoded.predictions
    texts, quality = score_texts(split, preds.texts)
    lengths = preds.lengths
    return ModelOutputs(
        ids=[f"{t}/{i}" for t, i in zip(arrays.task_names, arrays.ids)],
        predictions=texts,
        targets=split.targets,
        quality=quality,
        flops=decoded.flops,
        logprobs=[preds.logprobs[i, :n] for i, n in enumerate(lengths)],
        entropies=[preds.entropies[i, :n] for i, n in enumerate(lengths)],
        margins=[preds.margins[i, :n] for i, n in enumerate(lengths)],
        hidden=preds.mean_hidden,
        embedding=decoded.embedding,
        embedding_flops=decoded.embedding_flops,
    )


def split_records(split: Split, decoded: Mapping[str, Decoded]) -> tuple[SplitRecords, store.SplitTexts]:
    """Every model's records on a split (display name -> ModelOutputs), and the raw texts behind them."""
    arrays = split.arrays
    records = SplitRecords(
        split.name, arrays.task_names.tolist(), {name: to_records(split, out) for name, out in decoded.items()}
    )
    texts = store.SplitTexts(
        example_ids=[str(i) for i in arrays.ids],
        inputs=[str(t) for t in arrays.inputs_text],
        targets=[str(t) for t in arrays.targets_text],
        predictions={name: out.predictions.texts for name, out in decoded.items()},
    )
    return records, texts


@gin.configurable
def run_cascade_eval(
    *,
    large_model_dir: str = gin.REQUIRED,
    small_model_dirs: Mapping[str, str] = gin.REQUIRED,
    dataset: DatasetConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    rules: Sequence[str] = ALL_RULES,
    quantiles: Sequence[float] = (0.0, 0.1, 0.25, 0.5),
    validation_split: str = "validation",
    plot_rule: str = "chow_average",
    num_thresholds: int | None = None,
    seed: int = 0,
    tiers: Sequence[Sequence[str] | str] = (),
    tier_rules: Sequence[str] | None = None,
    tier_thresholds: int | None = 21,
    target_deferral_rate: float | None = None,
    target_relative_flops: float | None = None,
    posthoc_folds: int = 5,
    embed_layer: int | None = None,
) -> CascadeEvalResult:
    """Decodes `dataset` with the large model and every small model (display name -> MODEL_DIR),
    sweeps each deferral rule and writes records, curves, summaries and plots into output_dir.

    plot_rule: the curve label (e.g. chow_quantile_0.1) of the by-model plots. tiers: a k-tier
    cascade, tiers of display names ('large' for the large model) in order, e.g. [['ce'], ['cat',
    'distill'], ['large']]; tier_rules: one rule per boundary (default chow_average after one model,
    abc after an ensemble); tier_thresholds: thresholds per boundary in the joint grid (None: every
    distinct score). target_deferral_rate / target_relative_flops: budgets whose thresholds are
    picked on validation_split and reported on test. The learned rules (post_hoc, post_hoc_embed)
    are fitted on validation_split too, and cross-fitted on it in posthoc_folds folds; it is decoded
    when a learned rule or a budget needs it. embed_layer: the large model's encoder layers whose
    mean output post_hoc_embed reads (None: all of them).
    """
    small_model_dirs = dict(small_model_dirs)
    if not small_model_dirs or LARGE in small_model_dirs:
        raise ConfigError(
            f"run_cascade_eval.small_model_dirs={small_model_dirs} must name one or more "
            f"small models other than {LARGE!r}, e.g. {{'ce': '/tmp/cat_jax/small_ce'}}."
        )
    model_dirs = {LARGE: large_model_dir, **small_model_dirs}
    options = Options(
        rules=rules,
        quantiles=quantiles,
        num_thresholds=num_thresholds,
        seed=seed,
        plot_rule=plot_rule,
        tiers=tiers,
        tier_rules=tier_rules,
        tier_thresholds=tier_thresholds,
        target_deferral_rate=target_deferral_rate,
        target_relative_flops=target_relative_flops,
        posthoc_folds=posthoc_folds,
        embed_layer=embed_layer,
    )
    config = plan_job(dataset, model_dirs, options, validation_split)
    check_cascade_models(model_dirs, LARGE, shared_vocabulary=False)
    dataset = cascade_dataset(dataset, large_model_dir, "cascade_eval")
    config = dataclasses.replace(config, mixture_name=dataset.mixture_or_task_name)
    depth = None
    if config.needs_embeddings():
        depth = embedding_depth(config.options, read_model_info(large_model_dir))
        config = dataclasses.replace(config, options=dataclasses.replace(config.options, embed_layer=depth))

    mesh, mesh_rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
    vocab = data_lib.get_vocabulary_of(dataset.mixture_or_task_name)
    splits = [load_split(dataset, dataset.split)]
    if config.validation_split not in (None, dataset.split):
        splits.append(load_split(dataset, config.validation_split))
    if config.validation_split is not None:
        config.check_folds({task: len(rows) for task, rows in splits[-1].task_rows.items()})
    decoded = {
        name: decode_model(name, d, splits, dataset, vocab, mesh, mesh_rules, depth if name == LARGE else None)
        for name, d in model_dirs.items()
    }
    if jax.process_index() != 0:
        return CascadeEvalResult(output_dir, [])

    quality = {task: metrics.get_quality(task) for task in splits[0].task_rows}
    corpus = {task: q.corpus for task, q in quality.items()}
    config = dataclasses.replace(
        config,
        corpus_metrics={task: metric_ref(fn) for task, fn in corpus.items()},
        free_text={task: is_free_text(q) for task, q in quality.items()},
    )
    files, by_split = write_records(output_dir, config, splits, decoded)
    test = by_split[dataset.split]
    result = analysis.analyse(config, test, by_split.get(config.validation_split), corpus)
    files += report.write_outputs(output_dir, config, result, len(test))
    return CascadeEvalResult(output_dir, files)


def plan_job(
    dataset: DatasetConfig, model_dirs: Mapping[str, str], options: Options, validation_split: str
) -> AnalysisConfig:
    """The analysis plan, checked (ConfigError before anything runs); its validation_split is None
    when neither a learned rule nor a budget needs the validation split."""
    config = AnalysisConfig(
        dataset.mixture_or_task_name, dataset.split, validation_split, dict(model_dirs), options, {}
    )
    config.check()
    if not config.needs_validation():
        return dataclasses.replace(config, validation_split=None)
    if validation_split == dataset.split:
        log.warning("The learned rules and budgets are fitted on the split %r they are evaluated on.", validation_split)
    return config


def write_records(
    output_dir: str, config: AnalysisConfig, splits: Sequence[Split], decoded: Mapping[str, Mapping[str, Decoded]]
) -> tuple[list[str], dict[str, SplitRecords]]:
    """Writes cascade_config.json, examples.jsonl (the first split) and validation_examples.jsonl
    (a second one); returns the files written and split name -> records."""
    os.makedirs(output_dir, exist_ok=True)
    files = [os.path.join(output_dir, CONFIG)]
    pathlib.Path(files[0]).write_text(config.to_json())
    by_split = {}
    for split, file in zip(splits, (store.EXAMPLES, store.VALIDATION_EXAMPLES)):
        records, texts = split_records(split, {name: out[split.name] for name, out in decoded.items()})
        files += store.write_split(os.path.join(output_dir, file), records, texts)
        by_split[split.name] = records
    return files, by_split
