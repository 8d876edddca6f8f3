"""`make demo`: the main job at CPU scale, through the same command lines a user would type.

Stages (each skipped when its output already exists, so a re-run reuses finished work):
  1. train a large model with cross-entropy,
  2. train three small models against it: cross-entropy, distillation, cascade-aware (CAT),
  3. evaluate every model on the test split with the task's metrics,
  4. evaluate the cascades (large behind each small model) under every deferral rule, one 3-tier
     cascade (CE small -> CAT + distill ensemble deferring by agreement, ABC -> large) and a
     deferral-rate budget calibrated on validation: curves of quality against relative FLOPs,
     summary tables and PNG plots in `runs/demo/cascade/`,
  5. write `runs/demo/report.md`: the summary tables, which small model and rule win, the commands.
CAT_JAX_DEMO_DIR (default runs/demo, runs/demo_decoder for decoders), CAT_JAX_DEMO_TASK
(cmudict_syllables), CAT_JAX_DEMO_STEPS (400) and CAT_JAX_DEMO_EXAMPLES (512 test examples) change
where, on what and how long it runs;
CAT_JAX_DEMO_FAMILY picks the models: t5 (default: the encoder-decoder demo_large / demo_small) or
decoder (Llama-shaped decoder-only models of about the same cost, decoder_demo_large / _small), the
same stages and commands but for the model file each training adds.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

# family -> (its name in the report, {size: the gin model file training adds, None: the run file's own})
FAMILIES = {
    "t5": ("T5 (encoder-decoder)", {"large": None, "small": None}),
    "decoder": (
        "decoder-only (Llama-shaped)",
        {
            "large": "gin_configs/models/decoder/decoder_demo_large.gin",
            "small": "gin_configs/models/decoder/decoder_demo_small.gin",
        },
    ),
}


def family_from_env() -> str:
    """CAT_JAX_DEMO_FAMILY (default t5); SystemExit naming the choices for any other value."""
    family = os.environ.get("CAT_JAX_DEMO_FAMILY", "t5")
    if family not in FAMILIES:
        raise SystemExit(f"CAT_JAX_DEMO_FAMILY={family!r}: choose one of {sorted(FAMILIES)}.")
    return family


def model_args(family: str, size: str) -> list[str]:
    """The training flags that pick the family's `size` ('large' or 'small') model."""
    path = FAMILIES[family][1][size]
    return [] if path is None else [f"--gin_file={path}"]


FAMILY = family_from_env()
# Each family its own directory: the stages skip what a directory already holds.
DEMO_DIR = os.environ.get("CAT_JAX_DEMO_DIR", os.path.join("runs", "demo" if FAMILY == "t5" else f"demo_{FAMILY}"))
TASK = os.environ.get("CAT_JAX_DEMO_TASK", "cmudict_syllables")
STEPS = int(os.environ.get("CAT_JAX_DEMO_STEPS", 400))
LARGE_STEPS = 4 * STEPS  # train_large.gin's learning rate is a third of the students': more steps
EVAL_EXAMPLES = int(os.environ.get("CAT_JAX_DEMO_EXAMPLES", 512))
TASK_LENGTHS = {"cmudict_g2p": "{'inputs': 32, 'targets': 64}", "cmudict_syllables": "{'inputs': 32, 'targets': 4}"}
LENGTHS = TASK_LENGTHS.get(TASK, "{'inputs': 32, 'targets': 128}")
CACHE = os.path.join(DEMO_DIR, "data_cache")
STUDENTS = (("ce", "train_small_ce.gin"), ("distill", "train_small_distill.gin"), ("cat", "train_small_cat.gin"))
BOUNDS = ("oracle", "random")  # upper and lower bounds: reported, never the winner
REPORT_RULES = ("chow_average", "chow_quantile_0", "entropy_mean", "post_hoc", "post_hoc_embed", "oracle", "random")
TIERS = [["ce"], ["cat", "distill"], ["large"]]  # the 3-tier cascade: the middle tier defers by ABC
TARGET_DEFERRAL_RATE = 0.3
CAT_ROW_NOTE = (
    "The CAT row is CAT-Xent trained from scratch for {steps} steps with one seed (SEED 0 in every run); "
    "on the default task at 400 steps its gap to CE lies within the spread over 3 seeds, so read it as "
    'one draw, not as CAT\'s effect (docs/RESULTS.md, "CAT at small scale, explained").'
)
COMMON = [
    f"--gin.MIXTURE_OR_TASK_NAME={TASK}",
    f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
    f"--gin.load_split.cache_dir={CACHE}",
]


def _quote(arg: str) -> str:
    """Shell quoting that keeps gin's single-quoted literals readable."""
    if arg == shlex.quote(arg) or any(c in arg for c in '"$`\\'):
        return shlex.quote(arg)
    return f'"{arg}"'


class Stages:
    """Runs the stages in order, numbered, timed, and remembers their command lines."""

    def __init__(self, total: int):
        self.total, self.done, self.commands = total, 0, []
        self.start = time.time()

    def run(self, name: str, args: list[str], skip_if: str | None = None) -> None:
        self.done += 1
        printable = " ".join(_quote(a) for a in ["python", "-m"] + args)
        self.commands.append(printable)
        head = f"[{self.done}/{self.total}] {name}"
        if skip_if and os.path.exists(skip_if):
            print(f"\n=== {head}: already done ({skip_if}) ===", flush=True)
            return
        print(f"\n=== {head} (elapsed {time.time() - self.start:.0f}s) ===\n$ {printable}", flush=True)
        started = time.time()
        subprocess.run([sys.executable, "-m"] + args, check=True)
        print(f"=== {head}: done in {time.time() - started:.0f}s ===", flush=True)


def _train(
    stages: Stages, name: str, run_file: str, extra: list[str] = (), steps: int = STEPS, family: str = FAMILY
) -> str:
    model_dir = os.path.join(DEMO_DIR, name)
    stages.run(
        f"train {name}",
        [
            "cat_jax.train",
            f"--gin_file=gin_configs/runs/{run_file}",
            *model_args(family, "large" if run_file.startswith("train_large") else "small"),
            f"--gin.MODEL_DIR={model_dir}",
            f"--gin.TRAIN_STEPS={steps}",
            "--gin.BATCH_SIZE=32",
            "--gin.train.eval_period=0",
            *COMMON,
            *extra,
        ],
        skip_if=os.path.join(model_dir, str(steps)),
    )  # orbax's directory of the final step
    return model_dir


def _evaluate(stages: Stages, name: str, model_dir: str, steps: int = STEPS) -> dict:
    out = os.path.join(model_dir, "eval")
    result = os.path.join(out, f"metrics_test_step{steps}.json")
    stages.run(
        f"evaluate {name}",
        [
            "cat_jax.eval",
            "--gin_file=gin_configs/runs/eval.gin",
            f"--gin.CHECKPOINT_DIR={model_dir}",
            "--gin.SPLIT=test",
            f"--gin.MAX_EXAMPLES={EVAL_EXAMPLES}",
            f"--gin.OUTPUT_DIR={out}",
            *COMMON,
        ],
        skip_if=result,
    )
    with open(result) as f:
        return json.load(f)


def _cascade(stages: Stages, large: str, smalls: dict[str, str]) -> str:
    out = os.path.join(DEMO_DIR, "cascade")
    stages.run(
        "cascade evaluation (every deferral rule, a 3-tier cascade, a budget)",
        [
            "cat_jax.cascade_eval",
            "--gin_file=gin_configs/runs/cascade_eval.gin",
            f"--gin.LARGE_MODEL_DIR={large}",
            f"--gin.SMALL_MODEL_DIRS={smalls!r}",
            f"--gin.OUTPUT_DIR={out}",
            f"--gin.MAX_EXAMPLES={EVAL_EXAMPLES}",
            f"--gin.run_cascade_eval.tiers={TIERS!r}",
            f"--gin.TARGET_DEFERRAL_RATE={TARGET_DEFERRAL_RATE}",
            *COMMON,
        ],
        skip_if=os.path.join(out, "tier_summary.json"),
    )
    return out


def _fmt(value) -> str:
    return "never" if value is None else f"{value:.3f}"


def _outcome(o: dict) -> str:
    return f"{o['deferral_rate']:.3f} / {o['relative_flops']:.3f} / {o['quality']:.3f}"


def _task_rows(cascade_dir: str, name: str) -> list[dict]:
    """The rows of TASK in a summary file of cascade_dir."""
    with open(os.path.join(cascade_dir, name)) as f:
        return [r for r in json.load(f) if r["task"] == TASK]


def _tier_lines(tiered: list[dict]) -> list[str]:
    """The k-tier cascade's frontier in numbers."""
    lines = [
        "",
        "## A 3-tier cascade",
        "",
        "Each example goes to the next tier when its rule's score falls below that boundary's threshold; "
        "an ensemble tier answers with its majority answer and defers when its members disagree (ABC). "
        "The curve is the Pareto frontier over the joint threshold grid; latency counts the ensemble's "
        "members once (they run in parallel).",
        "",
        "| cascade | rules | each tier alone (quality @ rel. FLOPs) | rel. FLOPs to match large "
        "| best quality @ rel. FLOPs (rel. latency) |",
        "|---|---|---|---|---|",
    ]
    for r in tiered:
        alone = ", ".join(f"{a['tier']} {a['quality']:.3f} @ {a['relative_flops']:.3f}" for a in r["tiers_alone"])
        lines.append(
            f"| {r['cascade']} | {r['rules']} | {alone} | {_fmt(r['relative_flops_to_match_last'])} | "
            f"{r['best_quality']:.3f} @ {r['best_relative_flops']:.3f} ({r['best_relative_latency']:.3f}) |"
        )
    return lines


def _calibration_lines(rows: list[dict], tiered: list[dict]) -> list[str]:
    """The budget's validation and test outcomes for the report's rules and the k-tier cascade."""
    lines = [
        "",
        f"## Budget calibration: deferral rate {TARGET_DEFERRAL_RATE}",
        "",
        "Thresholds picked on the validation split (the largest deferral rate within the budget; for the "
        "3-tier cascade, the best validation quality within it), then applied to test: the gap is what "
        "a budget set on one sample of traffic realises on another. The learned rules (post_hoc, "
        "post_hoc_embed) are fitted on validation and score it out of fold (cross-fitted), so their "
        "validation numbers are out of sample too.",
        "",
        "| cascade | rule | validation: rate / rel. FLOPs / quality | test: rate / rel. FLOPs / quality |",
        "|---|---|---|---|",
    ]
    named = [(r["small_model"], r["rule"], r) for r in rows if r["rule"] in REPORT_RULES]
    named += [(r["cascade"], r["rules"], r) for r in tiered]
    for name, rule, r in named:
        for c in r["calibration"]:
            lines.append(f"| {name} | {rule} | {_outcome(c['validation'])} | {_outcome(c['test'])} |")
    return lines


def write_report(
    path: str, cascade_dir: str, results: dict[str, dict], commands: list[str], family: str = FAMILY
) -> str:
    """report.md: model metrics, the cascade table for a few rules, the winners, the commands."""
    rows, tiered = _task_rows(cascade_dir, "summary.json"), _task_rows(cascade_dir, "tier_summary.json")
    deployable = [r for r in rows if r["rule"] not in BOUNDS]
    best = max(deployable, key=lambda r: (r["auc"], -(r["relative_flops_to_match_large"] or 9e9)))
    matching = [r for r in deployable if r["relative_flops_to_match_large"] is not None]
    cheapest = min(matching, key=lambda r: r["relative_flops_to_match_large"]) if matching else None
    lines = [
        f"# cat_jax demo: {TASK}, {FAMILIES[family][0]} models",
        "",
        f"A large {FAMILIES[family][0]} model ({LARGE_STEPS} steps) and three small ones (CE, distillation, "
        f"CAT; {STEPS} steps each) trained on CPU, evaluated on {EVAL_EXAMPLES} test examples "
        f"(CAT_JAX_DEMO_FAMILY={family}).",
        "",
        "## Models",
        "",
        "| model | step | " + " | ".join(next(iter(results.values()))["metrics"][TASK]) + " |",
        "|---|---|" + "---|" * len(next(iter(results.values()))["metrics"][TASK]),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step']} | " + " | ".join(f"{v:.4f}" for v in r["metrics"][TASK].values()) + " |")
    lines += ["", CAT_ROW_NOTE.format(steps=STEPS)]
    lines += [
        "",
        "## Cascades",
        "",
        "Quality is the task's per-example score (0-1); relative FLOPs are the cascade's over the large model's; "
        "AUC-DF is the area under quality against deferral rate (higher is better), beside its gain over random "
        "deferral's (the straight line from small-only to large-only).",
        "",
        "| small model | rule | small-only | large-only | AUC-DF | gain vs random | rel. FLOPs to match large "
        "| best quality @ rel. FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rule"] in REPORT_RULES:
            lines.append(
                f"| {r['small_model']} | {r['rule']} | {r['small_only']:.3f} | {r['large_only']:.3f} | "
                f"{r['auc']:.4f} | {r['auc_df_gain']:+.4f} | {_fmt(r['relative_flops_to_match_large'])} | "
                f"{r['best_quality']:.3f} @ {r['best_relative_flops']:.3f} |"
            )
    lines += _tier_lines(tiered) + _calibration_lines(rows, tiered)
    lines += [
        "",
        "## Verdict",
        "",
        f"- Highest AUC (oracle and random are bounds, not rules one can deploy): small model "
        f"**{best['small_model']}** with rule **{best['rule']}** (AUC {best['auc']:.4f}).",
        (
            f"- Cheapest cascade that matches the large model: **{cheapest['small_model']}** + "
            f"**{cheapest['rule']}** at {cheapest['relative_flops_to_match_large']:.3f} x the large model's FLOPs."
            if cheapest
            else "- No non-oracle cascade reaches the large model's quality on this run."
        ),
        "",
        "All rules and tasks: `cascade/summary.md`, `cascade/curves.csv`; plots:",
        "",
    ]
    lines += [f"![{p}](cascade/{p})" for p in sorted(os.listdir(cascade_dir)) if p.endswith(".png")]
    lines += ["", "## Commands", "", "```bash", *commands, "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return best["small_model"] + "/" + best["rule"]


def main() -> None:
    os.makedirs(DEMO_DIR, exist_ok=True)
    stages = Stages(total=2 + 2 * len(STUDENTS) + 1)
    large = _train(stages, "large", "train_large.gin", steps=LARGE_STEPS)
    smalls = {
        name: _train(stages, f"small_{name}", run_file, [f"--gin.TEACHER_MODEL_DIR={large}"] if name != "ce" else [])
        for name, run_file in STUDENTS
    }
    results = {"large": _evaluate(stages, "large", large, steps=LARGE_STEPS)}
    results.update({f"small_{n}": _evaluate(stages, f"small_{n}", d) for n, d in smalls.items()})
    cascade = _cascade(stages, large, smalls)
    report = os.path.join(DEMO_DIR, "report.md")
    winner = write_report(report, cascade, results, stages.commands)
    with open(os.path.join(DEMO_DIR, "commands.sh"), "w") as f:
        f.write("#!/usr/bin/env bash\nset -e\n" + "\n".join(stages.commands) + "\n")
    print(f"\nTest-split metrics ({TASK}, {EVAL_EXAMPLES} examples):")
    for name, r in results.items():
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"][TASK].items())
        print(f"  {name:14s} step {r['step']:5d}  {metrics}")
    print(f"\nModels: {FAMILIES[FAMILY][0]} (CAT_JAX_DEMO_FAMILY={FAMILY}).")
    print(f"\nBest cascade by AUC (bounds excluded): {winner}. Done in {time.time() - stages.start:.0f}s.")
    print(f"Report:      {os.path.abspath(report)}")
    print(f"Plots/data:  {os.path.abspath(cascade)}/ (summary.md, curves.csv, *.png)")
    print(f"Checkpoints and TensorBoard/JSONL metrics: {os.path.abspath(DEMO_DIR)}/<model>/")
    print(f"Commands:    {os.path.abspath(os.path.join(DEMO_DIR, 'commands.sh'))}")
