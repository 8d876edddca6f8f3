"""The speculative_eval job: decode a split with the large model alone, each drafter alone, and
speculative cascades of every drafter under every rule over a sweep of alpha and gamma; write
every point's quality, relative FLOPs, relative latency and acceptance rate, summaries and plots.

Latency is wall-clock time over the whole split (compiled, batches run one after another, each
finished before the next starts) relative to the large model decoding the same split alone on the
same devices; FLOPs come from the analytic model (`cost.py`). Quality is the task's metric (mean
per-example score, or the corpus metric such as BLEU), per task and over a mixture pooled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import data as data_lib
from cat_jax import evaluation, metrics, model_tokens, partitioning
from cat_jax.cascade.plan import LARGE
from cat_jax.cascade.speculative import cost, report
from cat_jax.cascade.speculative.rules import ALPHA_EXTREMES, RULES, SWEEP_SPANS, rule_id
from cat_jax.data.config import DatasetConfig
from cat_jax.decoding import DecodingConfig, Sampler, make_decoder
from cat_jax.decoding.speculative import SpeculativeOutput, speculative_decode
from cat_jax.errors import ConfigError
from cat_jax.evaluation import Split, load_split, score_texts
from cat_jax.frozen_model import FrozenModel, check_cascade_models, load_frozen_model
from cat_jax.inference import cascade_dataset
from cat_jax.models import Model

log = logging.getLogger("cat_jax")

Batches = list[tuple[dict[str, jax.Array], np.ndarray]]  # (decoding inputs on the mesh, real rows [B])


@dataclasses.dataclass(frozen=True)
class Run:
    """One decoding of the split: texts [N], token ids [N] (EOS included), lengths [N], FLOPs [N],
    seconds for all batches, and for speculative runs the large-model calls (rounds) [N] and
    accepted drafts [N]."""

    texts: list[str]
    token_ids: list[list[int]]
    lengths: np.ndarray
    flops: np.ndarray
    seconds: float
    rounds: np.ndarray | None = None
    accepted: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SpeculativeEvalResult:
    output_dir: str
    files: list[str]


def alpha_grid(rule: str, num_alphas: int, alphas: Mapping[str, Sequence[float]]) -> list[float]:
    """The alphas swept for `rule`: alphas[rule] if given, else num_alphas evenly spaced between
    its two extremes (the large model alone, the small model alone); for a rule with infinite
    extremes (OPT) those two with num_alphas - 2 evenly spaced inside its SWEEP_SPANS; [0.0] for
    lossless."""
    if rule == "lossless":
        return [0.0]
    if rule in alphas:
        return [float(a) for a in alphas[rule]]
    low, high = ALPHA_EXTREMES[rule]
    if rule in SWEEP_SPANS:
        inner = np.linspace(*SWEEP_SPANS[rule], num_alphas)[1:-1]
        return [float(low), *(float(a) for a in inner), float(high)]
    return [float(a) for a in np.linspace(low, high, num_alphas)]


def check_plan(
    rules: Sequence[str],
    gammas: Sequence[int],
    num_alphas: int,
    alphas: Mapping[str, Sequence[float]],
    small_model_dirs: Mapping[str, str],
    timing_repeats: int,
) -> None:
    """ConfigError naming the binding to fix, before anything is restored or decoded."""
    unknown = [r for r in rules if r not in RULES]
    if not rules or unknown:
        raise ConfigError(f"run_speculative_eval.rules={list(rules)}: name one or more of {', '.join(RULES)}.")
    if not gammas or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in gammas):
        raise ConfigError(f"run_speculative_eval.gammas={list(gammas)} must be a non-empty list of ints >= 1.")
    if num_alphas < 2:
        raise ConfigError(f"run_speculative_eval.num_alphas={num_alphas} must be >= 2 (both extremes).")
    if timing_repeats < 1:
        raise ConfigError(f"run_speculative_eval.timing_repeats={timing_repeats} must be >= 1.")
    extra = [r for r in alphas if r not in ALPHA_EXTREMES]
    if extra:
        raise ConfigError(f"run_speculative_eval.alphas names {extra}; rules with an alpha: {sorted(ALPHA_EXTREMES)}.")
    if not small_model_dirs or LARGE in small_model_dirs:
        raise ConfigError(
            f"run_speculative_eval.small_model_dirs={dict(small_model_dirs)} must name one or more "
            f"drafters other than {LARGE!r}, e.g. {{'ce': '/tmp/cat_jax/small_ce'}}."
        )
    if jax.process_count() != 1:
        raise ConfigError(f"speculative_eval times decoding on one host; got {jax.process_count()} processes.")


def make_batches(
    arrays: data_lib.ExampleArrays, model: Model, vocab: Any, batch_size: int, mesh: Any, rules: Any
) -> Batches:
    """Every batch of the split's arrays as the model's decoding inputs, placed on the mesh once."""
    sharding = partitioning.batch_sharding(mesh, rules)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ConfigError(f"BATCH_SIZE={batch_size} must be divisible by the {shards} data shards.")
    return [
        (
            {k: jax.device_put(v, sharding) for k, v in model.decoding_inputs(model.make_batch(batch, vocab)).items()},
            real,
        )
        for batch, real in data_lib.eval_batches(arrays, batch_size)
    ]


def timed(call: Callable[[Any, int], Any], batches: Batches, repeats: int) -> tuple[list[Any], float]:
    """Outputs of `call(inputs, batch_index)` on every batch (real rows, on the host) and the fastest
    of `repeats` timed passes over the split, after one untimed call that compiles."""
    jax.block_until_ready(call(batches[0][0], 0))
    best, outputs = float("inf"), []
    for _ in range(repeats):
        start, outputs = time.perf_counter(), []
        for index, (inputs, _) in enumerate(batches):
            outputs.append(jax.block_until_ready(call(inputs, index)))
        best = min(best, time.perf_counter() - start)
    host = [
        jax.tree_util.tree_map(lambda x, real=real: np.asarray(x)[real], jax.device_get(out))
        for out, (_, real) in zip(outputs, batches)
    ]
    return host, best


def _texts(vocab: Any, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [evaluation.detokenize(vocab, row, length) for row, length in zip(tokens, lengths)]


def _ids(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [[int(t) for t in row[:length]] for row, length in zip(tokens, lengths)]


def decode_alone(
    model: FrozenModel,
    input_lengths: np.ndarray,
    batches: Batches,
    vocab: Any,
    decoding: DecodingConfig,
    steps: int,
    repeats: int,
) -> Run:
    """One model decoding the split by itself (greedy, or sampling at the sweep's temperature);
    input_lengths [N]: the inputs' tokens in the model's batch (its FLOPs)."""
    decoder = make_decoder(decoding, model.model, steps, vocab.eos_id)
    outs, seconds = timed(lambda enc, i: decoder(model.params, enc, decoding.rng(i)), batches, repeats)
    tokens = np.concatenate([o.tokens for o in outs])
    lengths = np.concatenate([o.lengths for o in outs])
    flops = np.array([cost.decode_flops(model.model, int(li), int(lt)) for li, lt in zip(input_lengths, lengths)])
    return Run(_texts(vocab, tokens, lengths), _ids(tokens, lengths), lengths, flops, seconds)


def decode_speculative(
    spec: Callable[..., SpeculativeOutput],
    drafter: FrozenModel,
    large: FrozenModel,
    input_lengths: np.ndarray,
    batches: Batches,
    vocab: Any,
    *,
    rule: str,
    alpha: float,
    gamma: int,
    seed: int,
    repeats: int,
) -> Run:
    """The split decoded by `spec` (speculative_decode compiled for this drafter and gamma)."""
    key, index, a = jax.random.key(seed), jnp.int32(rule_id(rule)), jnp.float32(alpha)
    call = lambda inputs, i: spec(drafter.params, large.params, inputs, jax.random.fold_in(key, i), index, a)
    outs, seconds = timed(call, batches, repeats)
    cat = lambda name: np.concatenate([getattr(o, name) for o in outs])
    starts = cat("round_starts")
    flops = np.array(
        [
            cost.speculative_flops(drafter.model, large.model, int(li), row, gamma)
            for li, row in zip(input_lengths, starts)
        ]
    )
    tokens, lengths = cat("tokens"), cat("lengths")
    return Run(
        _texts(vocab, tokens, lengths), _ids(tokens, lengths), lengths, flops, seconds, cat("rounds"), cat("accepted")
    )


def group_quality(
    split: Split, processed: Sequence[Any], per_example: np.ndarray, group: str, rows: np.ndarray
) -> float:
    """The group's quality from postprocessed predictions [N] and their per-example scores [N]: its
    corpus metric (a task with one, e.g. BLEU) or the mean per-example score."""
    corpus = metrics.get_quality(group).corpus if group in split.task_rows else None
    if corpus is None:
        return float(per_example[rows].mean())
    return float(corpus([split.targets[i] for i in rows], [processed[i] for i in rows]))


def curve_groups(split: Split, mixture_name: str) -> dict[str, np.ndarray]:
    """Group name -> rows: each task, plus the mixture pooled when the dataset is not one task."""
    groups = dict(split.task_rows)
    if mixture_name not in groups:
        groups[mixture_name] = np.arange(len(split.arrays))
    return groups


def points_of(
    run: Run,
    large: Run,
    split: Split,
    scored: tuple[list[Any], np.ndarray],
    groups: Mapping[str, np.ndarray],
    *,
    drafter: str,
    rule: str,
    gamma: int,
    alpha: float | None,
) -> list[report.Point]:
    """One Point per group for one run of the split (rule 'alone': a model by itself); `scored`:
    `score_texts` of the run's texts."""
    processed, per_example = scored
    out = []
    for group, rows in groups.items():
        speculative = run.rounds is not None
        calls = run.rounds[rows].sum() if speculative else 0
        out.append(
            report.Point(
                group=group,
                drafter=drafter,
                rule=rule,
                gamma=gamma,
                alpha=alpha,
                quality=group_quality(split, processed, per_example, group, rows),
                relative_flops=float(run.flops[rows].sum() / large.flops[rows].sum()),
                relative_latency=run.seconds / large.seconds,
                ms_per_example=1e3 * run.seconds / len(run.texts),
                acceptance_rate=float(run.accepted[rows].sum() / (gamma * calls)) if speculative else None,
                tokens_per_large_call=float(run.lengths[rows].sum() / calls) if speculative else None,
            )
        )
    return out


def example_records(
    run: Run,
    split: Split,
    scored: tuple[list[Any], np.ndarray],
    *,
    drafter: str,
    rule: str,
    gamma: int,
    alpha: float | None,
) -> list[report.ExampleRecord]:
    """One record per example of one run of the split (rule 'alone': a model by itself); `scored`:
    `score_texts` of the run's texts."""
    _, quality = scored
    arrays, speculative = split.arrays, run.rounds is not None
    return [
        report.ExampleRecord(
            drafter=drafter,
            rule=rule,
            gamma=gamma,
            alpha=alpha,
            id=str(arrays.ids[i]),
            task=str(arrays.task_names[i]),
            prediction=run.texts[i],
            prediction_ids=run.token_ids[i],
            quality=float(quality[i]),
            flops=float(run.flops[i]),
            drafted=int(gamma * run.rounds[i]) if speculative else None,
            accepted=int(run.accepted[i]) if speculative else None,
            large_calls=int(run.rounds[i]) if speculative else None,
        )
        for i in range(len(arrays))
    ]


def _preamble(dataset: DatasetConfig, model_dirs: Mapping[str, str], num_examples: int, temperature: float) -> str:
    models = "".join(f"- {name}: `{d}`\n" for name, d in model_dirs.items())
    device = jax.devices()[0]
    return (
        f"# Speculative cascades: {dataset.mixture_or_task_name} / {dataset.split} ({num_examples} examples)\n\n"
        f"{models}\nTemperature {temperature:g} ({'greedy' if temperature == 0 else 'sampling'}), batch "
        f"{dataset.batch_size}, {jax.device_count()} x {device.platform}:{getattr(device, 'device_kind', '')}. "
        "Relative latency is wall-clock time over the split against the large model decoding it alone; "
        "relative FLOPs come from the analytic model; acceptance is the fraction of drafted tokens kept. "
        '"alpha to match large" is the fastest point whose quality reaches the large model\'s.\n'
    )


@gin.configurable
def run_speculative_eval(
    *,
    large_model_dir: str = gin.REQUIRED,
    small_model_dirs: Mapping[str, str] = gin.REQUIRED,
    dataset: DatasetConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    rules: Sequence[str] = RULES,
    gammas: Sequence[int] = (1, 3, 5),
    num_alphas: int = 5,
    alphas: Mapping[str, Sequence[float]] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    timing_repeats: int = 2,
) -> SpeculativeEvalResult:
    """Decodes `dataset` with the large model alone, each drafter (display name -> MODEL_DIR) alone,
    and every (drafter, gamma, rule, alpha); writes curves.csv/json, summary.json/md and PNGs.

    alphas: rule -> the alphas to sweep (else num_alphas between the rule's extremes). temperature
    0 decodes greedily; above 0 every model samples at that temperature (seed fixes the draws).
    timing_repeats: timed passes per run, the fastest kept.
    """
    small_model_dirs, alphas = dict(small_model_dirs), dict(alphas or {})
    check_plan(rules, gammas, num_alphas, alphas, small_model_dirs, timing_repeats)
    sampler = Sampler(temperature=temperature)
    check_cascade_models({LARGE: large_model_dir, **small_model_dirs}, LARGE)
    dataset = cascade_dataset(dataset, large_model_dir, "speculative_eval")
    mesh, mesh_rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
    split = load_split(dataset, dataset.split)
    groups = curve_groups(split, dataset.mixture_or_task_name)
    steps = dataset.task_feature_lengths["targets"]
    model_dirs = {LARGE: large_model_dir, **small_model_dirs}
    models = {name: load_frozen_model(d, mesh=mesh, rules=mesh_rules) for name, d in model_dirs.items()}
    families = {name: m.model.family for name, m in models.items()}
    if len(set(families.values())) > 1:
        raise ConfigError(
            f"speculative_eval drafts with one model and verifies with another on one batch: they must "
            f"be of one family (and share one vocabulary); got {families}."
        )
    # Every model shares the large one's vocabulary (check_cascade_models): the split in its tokens.
    task_vocab = data_lib.get_vocabulary_of(dataset.mixture_or_task_name)
    vocab, same = model_tokens.model_vocabulary(large_model_dir, models[LARGE].info, task_vocab)
    arrays = split.arrays if same else model_tokens.tokenize_split(split.arrays, vocab)
    large_model = models[LARGE].model
    input_lengths = large_model.input_lengths(large_model.make_batch(arrays.features, vocab))
    batches = make_batches(arrays, large_model, vocab, dataset.batch_size, mesh, mesh_rules)
    alone_decoding = DecodingConfig(
        method="greedy" if sampler.greedy else "sample", temperature=temperature, top_k=0, top_p=1.0, seed=seed
    )  # every field: none from gin's `decoding`
    runs = {
        name: decode_alone(m, input_lengths, batches, vocab, alone_decoding, steps, timing_repeats)
        for name, m in models.items()
    }
    large = runs[LARGE]
    log.info("Large model alone: %.3f s for %d examples", large.seconds, len(split.arrays))
    points, records = [], []
    for name, run in runs.items():
        scored = score_texts(split, run.texts)
        labels = dict(drafter=name, rule="alone", gamma=0, alpha=None)
        points += points_of(run, large, split, scored, groups, **labels)
        records += example_records(run, split, scored, **labels)
    for name in small_model_dirs:
        drafter = models[name]
        for gamma in gammas:
            spec = jax.jit(
                lambda sp, lp, inputs, rng, index, alpha, gamma=gamma: speculative_decode(
                    drafter.model,
                    sp,
                    models[LARGE].model,
                    lp,
                    inputs,
                    rng,
                    index,
                    alpha,
                    gamma=gamma,
                    max_decode_length=steps,
                    eos_id=vocab.eos_id,
                    sampler=sampler,
                )
            )
            for rule in dict.fromkeys(rules):
                for alpha in alpha_grid(rule, num_alphas, alphas):
                    run = decode_speculative(
                        spec,
                        drafter,
                        models[LARGE],
                        input_lengths,
                        batches,
                        vocab,
                        rule=rule,
                        alpha=alpha,
                        gamma=gamma,
                        seed=seed,
                        repeats=timing_repeats,
                    )
                    labels = dict(drafter=name, rule=rule, gamma=gamma, alpha=None if rule == "lossless" else alpha)
                    scored = score_texts(split, run.texts)
                    new = points_of(run, large, split, scored, groups, **labels)
                    points += new
                    records += example_records(run, split, scored, **labels)
                    log.info(
                        "%s gamma=%d %s alpha=%s: %.3f s (%.2fx the large model), acceptance %.3f",
                        name,
                        gamma,
                        rule,
                        new[0].alpha,
                        run.seconds,
                        new[0].relative_latency,
                        new[0].acceptance_rate,
                    )
    files = write_outputs(output_dir, points, split, dataset, model_dirs, temperature)
    report.write_examples(os.path.join(output_dir, report.EXAMPLES), records)
    log.info("Wrote %s", os.path.join(output_dir, report.EXAMPLES))
    return SpeculativeEvalResult(output_dir, [*files, os.path.join(output_dir, report.EXAMPLES)])


def write_outputs(
    output_dir: str,
    points: Sequence[report.Point],
    split: Split,
    dataset: DatasetConfig,
    model_dirs: Mapping[str, str],
    temperature: float,
) -> list[str]:
    """curves.csv/json, summary.json/md and the PNGs; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    path = {
        name: os.path.join(output_dir, name) for name in ("curves.csv", "curves.json", "summary.json", "summary.md")
    }
    report.write_points(path["curves.csv"], path["curves.json"], points)
    report.write_summaries(
        path["summary.json"],
        path["summary.md"],
        report.summarize(points),
        points,
        _preamble(dataset, model_dirs, len(split.arrays), temperature),
    )
    metric_names = {
        group: (
            "BLEU (sacrebleu)"
            if group in split.task_rows and metrics.get_quality(group).corpus
            else "mean per-example quality"
        )
        for group in dict.fromkeys(p.group for p in points)
    }
    files = [*path.values(), *report.plot_all(points, output_dir, metric_names)]
    for file in files:
        log.info("Wrote %s", file)
    return files
