"""summary.md of a benchmarks/gpu.sh run: one table of every headline number beside its target
(met, or missed by how much), then how each stage ended and the errors.

    python benchmarks/gpu_summary.py OUT_DIR/results.jsonl [more results.jsonl ...] [--out summary.md]

Reads the JSON lines gpu.sh appended (each with its `stage`); with several files (a rerun of one
stage, say) the rows are read in order and, where two answer the same question, the last wins.
The targets (issue 6):

* train: our tokens/s >= 1.25x HuggingFace T5 under torch.compile, and MFU >= 45% (against the
  measured bf16 matmul peak), on `base`, or the largest size measured when `base` was not;
* cat_step: each teacher-using step <= the CE step + 1.1x the teacher's forward;
* decode: our greedy tokens/s >= 2x HuggingFace `generate` at batch 32.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TRAIN_RATIO_TARGET = 1.25
MFU_TARGET = 0.45
CAT_TARGET = 1.1
DECODE_RATIO_TARGET = 2.0
DECODE_TARGET_BATCH = 32
TARGET_SIZE = "base"

Row = dict[str, Any]
Line = tuple[str, str, str, str, str]  # stage, measurement, value, target, verdict


def read_rows(paths: Iterable[Path]) -> list[Row]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def last(rows: Sequence[Row], **match: Any) -> Row | None:
    """The last row whose fields equal `match` and that carries no error."""
    found = [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def ratio_verdict(value: float, target: float) -> str:
    if value >= target:
        return f"met (+{100 * (value / target - 1):.1f}% over the target)"
    return f"missed by {100 * (1 - value / target):.1f}%"


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def name(size: str) -> str:
    """A model size as the table shows it: a .gin path by its file name."""
    return Path(size).stem if str(size).endswith(".gin") else str(size)


def not_measured(why: str) -> str:
    return f"not measured ({why})"


def _hf_missing(rows: Sequence[Row]) -> bool:
    return any(r.get("benchmark") == "note" and r.get("hf_available") is False for r in rows)


# ----------------------------------------------------------------------------- per stage


def train_lines(rows: Sequence[Row]) -> list[Line]:
    lines: list[Line] = []
    peak = last(rows, benchmark="peak_matmul")
    if peak:
        nominal = peak.get("nominal_bf16_tflops")
        lines.append(
            (
                "train",
                "peak bf16 matmul (measured)",
                f"{peak['peak_tflops']:.4g} TFLOP/s"
                + (f" ({100 * peak['peak_tflops'] / nominal:.0f}% of the data sheet's {nominal})" if nominal else ""),
                "",
                "",
            )
        )
    steps = [
        r
        for r in rows
        if r.get("stage") == "train"
        and r.get("benchmark") == "train_throughput"
        and r.get("step") == "ce"
        and "error" not in r
    ]
    ours = {r["size"]: r for r in steps if r["impl"] == "ours"}
    for r in steps:
        lines.append(
            (
                "train",
                f"{r['impl']} {name(r['size'])}: tokens/s (CE step {fmt(r['step_ms'])} ms)",
                fmt(r["tokens_per_s"], 0),
                "",
                f"MFU {fmt(100 * r['mfu'])}%" if r.get("mfu") is not None else "",
            )
        )
    size = TARGET_SIZE if TARGET_SIZE in ours else max(ours, key=lambda s: ours[s].get("params", 0), default=None)
    if size is None:
        why = "no CE row of ours in the train stage"
        return lines + [
            ("train", "ours / HF+torch.compile tokens/s", "", f">= {TRAIN_RATIO_TARGET}x", not_measured(why)),
            ("train", "MFU", "", f">= {100 * MFU_TARGET:.0f}%", not_measured(why)),
        ]
    mine, label = ours[size], name(size)
    theirs = last([r for r in steps if r["size"] == size], impl="hf_compile")
    if theirs:
        value = mine["tokens_per_s"] / theirs["tokens_per_s"]
        lines.append(
            (
                "train",
                f"{label}: ours / HF+torch.compile tokens/s",
                f"{value:.2f}x",
                f">= {TRAIN_RATIO_TARGET}x",
                ratio_verdict(value, TRAIN_RATIO_TARGET),
            )
        )
    else:
        why = "torch / transformers not importable" if _hf_missing(rows) else "no hf_compile row"
        lines.append(
            ("train", f"{label}: ours / HF+torch.compile tokens/s", "", f">= {TRAIN_RATIO_TARGET}x", not_measured(why))
        )
    mfu = mine.get("mfu")
    if mfu is None:
        lines.append(
            ("train", f"{label}: MFU of our CE step", "", f">= {100 * MFU_TARGET:.0f}%", not_measured("no peak"))
        )
    else:
        nominal = mine.get("mfu_vs_nominal")
        value = f"{100 * mfu:.1f}%" + (f" ({100 * nominal:.1f}% of the data sheet's peak)" if nominal else "")
        verdict = (
            f"met (+{100 * (mfu - MFU_TARGET):.1f} points)"
            if mfu >= MFU_TARGET
            else f"missed by {100 * (MFU_TARGET - mfu):.1f} points"
        )
        lines.append(("train", f"{label}: MFU of our CE step", value, f">= {100 * MFU_TARGET:.0f}%", verdict))
    return lines


def cat_step_lines(rows: Sequence[Row]) -> list[Line]:
    lines: list[Line] = []
    stage = [
        r
        for r in rows
        if r.get("stage") == "cat_step" and r.get("benchmark") == "train_throughput" and "error" not in r
    ]
    ce = {r["size"]: r for r in stage if r.get("step") == "ce"}
    for size, r in ce.items():
        lines.append(
            (
                "cat_step",
                f"{name(size)}: CE step",
                f"{fmt(r['step_ms'])} ms; memory {fmt_bytes(r.get('memory_peak_bytes'))} per device",
                "",
                "",
            )
        )
    for r in stage:
        if r.get("step") == "teacher_forward":
            lines.append(("cat_step", f"{name(r['size'])}: teacher forward", f"{fmt(r['step_ms'])} ms", "", ""))
    for r in stage:
        if r.get("step") not in ("cat", "cat_distill"):
            continue
        budget, ms = r["cat_budget_ms"], r["step_ms"]
        verdict = (
            f"met ({fmt(budget - ms)} ms under)"
            if ms <= budget
            else f"missed by {fmt(ms - budget)} ms ({100 * (ms / budget - 1):.1f}% over)"
        )
        memory = r.get("memory_peak_bytes")
        ce_memory = ce.get(r["size"], {}).get("memory_peak_bytes")
        extra = (
            (f"; memory {fmt_bytes(memory)} per device" + (f" ({memory / ce_memory:.2f}x CE)" if ce_memory else ""))
            if memory
            else ""
        )
        lines.append(
            (
                "cat_step",
                f"{name(r['size'])}: {r['step']} step, teacher {name(r['teacher'])} "
                f"(teacher share {100 * r['teacher_share']:.0f}%)",
                f"{fmt(ms)} ms{extra}",
                f"<= CE {fmt(r['ce_step_ms'])} + {CAT_TARGET} x {fmt(r['teacher_forward_ms'])} = {fmt(budget)} ms",
                verdict,
            )
        )
    if not any(r.get("step") in ("cat", "cat_distill") for r in stage):
        lines.append(
            ("cat_step", "CAT step", "", f"<= CE + {CAT_TARGET} x teacher forward", not_measured("no cat row"))
        )
    return lines


def decode_lines(rows: Sequence[Row]) -> list[Line]:
    lines: list[Line] = []
    stage = [
        r for r in rows if r.get("stage") == "decode" and r.get("benchmark") == "decode_throughput" and "error" not in r
    ]
    keys = list(dict.fromkeys((r["size"], r["batch"]) for r in stage))
    for size, batch in keys:
        mine = last(stage, impl="ours", size=size, batch=batch)
        theirs = last(stage, impl="hf", size=size, batch=batch)
        value = (
            f"ours {fmt(mine['tokens_per_s'], 0) if mine else 'n/a'} / HF "
            f"{fmt(theirs['tokens_per_s'], 0) if theirs else 'n/a'} tokens/s"
        )
        if mine and theirs:
            r = mine["tokens_per_s"] / theirs["tokens_per_s"]
            value += f" = {r:.2f}x"
        target = f">= {DECODE_RATIO_TARGET}x" if batch == DECODE_TARGET_BATCH else ""
        verdict = ""
        if target:
            if mine and theirs:
                verdict = ratio_verdict(mine["tokens_per_s"] / theirs["tokens_per_s"], DECODE_RATIO_TARGET)
            else:
                verdict = not_measured("torch / transformers not importable" if _hf_missing(rows) else "no HF row")
        lines.append(("decode", f"{name(size)}, batch {batch}: greedy decoding", value, target, verdict))
    if not any(b == DECODE_TARGET_BATCH for _, b in keys):
        lines.append(
            (
                "decode",
                f"greedy decoding at batch {DECODE_TARGET_BATCH}",
                "",
                f">= {DECODE_RATIO_TARGET}x",
                not_measured(f"no batch-{DECODE_TARGET_BATCH} row"),
            )
        )
    return lines


def speculative_lines(rows: Sequence[Row]) -> list[Line]:
    lines: list[Line] = []
    stage = [r for r in rows if r.get("stage") == "speculative" and "error" not in r]
    for large in (r for r in stage if r.get("impl") == "large_greedy"):
        batch = large["batch"]
        spec = [r for r in stage if r.get("impl") == "speculative" and r["batch"] == batch]
        parts = [
            f"gamma {r['gamma']} {r['rule']}: {fmt(r['decode_ms'])} ms "
            f"({r['speedup_over_large_greedy']:.2f}x, acceptance {r['acceptance_rate']:.2f})"
            for r in spec
        ]
        lines.append(
            (
                "speculative",
                f"batch {batch}: large model alone {fmt(large['decode_ms'])} ms",
                "; ".join(parts) or "no speculative row",
                "",
                "",
            )
        )
    return lines


def experiment_lines(rows: Sequence[Row]) -> list[Line]:
    lines: list[Line] = []
    stage = [r for r in rows if r.get("stage") == "experiment" and "error" not in r]
    for r in stage:
        if r.get("benchmark") == "experiment_train":
            lines.append(
                (
                    "experiment",
                    f"train {r['model']} ({name(r['size'])}, {r['final_step']} steps)",
                    f"loss {fmt(r['loss'], 3)}, {fmt(r['seconds_with_start_up'])} s",
                    "",
                    "",
                )
            )
        elif r.get("benchmark") == "experiment_cascade":
            match = r.get("relative_flops_to_match_large")
            lines.append(
                (
                    "experiment",
                    f"{r['task']}: student {r['small_model']}, rule {r['rule']}",
                    f"AUC-DF {fmt(r['auc'], 4)} (gain {r['auc_df_gain']:+.4f}); small alone "
                    f"{fmt(r['small_only'], 3)}, large {fmt(r['large_only'], 3)}; rel. FLOPs to match "
                    f"large {fmt(match, 2) if match is not None else 'never'}",
                    "",
                    "",
                )
            )
    return lines


# ----------------------------------------------------------------------------- the file


def render(rows: Sequence[Row]) -> str:
    env = last(rows, benchmark="env") or {}
    head = ["# benchmarks/gpu.sh: summary", ""]
    if env:
        head += [
            f"{env.get('mode', '?')} run, {env.get('date', '?')}, on {env.get('gpu') or 'no GPU'}, "
            f"{env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}, commit {env.get('commit') or '?'}; "
            + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
            "",
        ]
    if env.get("mode") == "smoke":
        head += [
            "Smoke run: tiny shapes on CPU. The numbers only show that every stage runs; "
            "the targets are about one H100/H200 at T5 v1.1 shapes.",
            "",
        ]
    table = ["| stage | measurement | value | target | verdict |", "|---|---|---|---|---|"]
    ran = {r.get("stage") for r in rows}
    lines = [
        line
        for stage, lines_of in (
            ("train", train_lines),
            ("cat_step", cat_step_lines),
            ("decode", decode_lines),
            ("speculative", speculative_lines),
            ("experiment", experiment_lines),
        )
        if stage in ran
        for line in lines_of(rows)
    ]
    for line in lines:
        table.append("| " + " | ".join(cell.replace("|", "/") for cell in line) + " |")
    stages = ["", "## Stages", "", "| stage | status | seconds | cap (s) | note |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("benchmark") == "stage":
            stages.append(
                f"| {r['stage']} | {r['status']} | {fmt(r.get('seconds'))} | {fmt(r.get('cap_s'), 0)} "
                f"| {r.get('note', '')} |"
            )
    notes = [r for r in rows if r.get("benchmark") == "note"]
    errors = [r for r in rows if "error" in r or r.get("benchmark") == "error"]
    tail = []
    if notes:
        tail += ["", "## Notes", ""] + [f"- {r['stage']}: {r['message']}" for r in notes]
    if errors:
        tail += ["", "## Errors", ""]
        for r in errors:
            where = ", ".join(
                f"{k}={r[k]}" for k in ("benchmark", "impl", "size", "batch", "step", "model") if r.get(k) is not None
            )
            tail.append(f"- {r.get('stage')}: {where}: {r.get('error') or r.get('message')}")
    return "\n".join(head + table + stages + tail) + "\n"


def write(results: Sequence[Path], out: Path) -> None:
    out.write_text(render(read_rows(results)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results.jsonl files, in order")
    p.add_argument("--out", type=Path, default=None, help="default: summary.md beside the first file")
    a = p.parse_args(argv)
    write(a.results, a.out or a.results[0].with_name("summary.md"))


if __name__ == "__main__":
    main()
