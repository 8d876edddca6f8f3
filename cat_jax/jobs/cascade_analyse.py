"""Re-analyse a cascade_eval output directory from its records, without decoding:

    python -m cat_jax.cascade_analyse DIR [--output_dir OUT] [--target_deferral_rate 0.3]
        [--target_relative_flops 0.5] [--rules chow_average,oracle] [--num_thresholds N]
        [--tier_thresholds N] [--plot_rule LABEL]

Reads DIR/cascade_config.json (the plan cascade_eval ran), DIR/examples.jsonl and, when the
validation split was decoded, DIR/validation_examples.jsonl (with their *_hidden.npz: decoder
states and, for post_hoc_embed, the large model's input embeddings), and writes
every curve, summary and plot again into OUT (default DIR), with the plan and any overrides given
here in OUT/cascade_config.json. Without overrides the numbers are cascade_eval's, byte for byte.
It needs no checkpoint, accelerator, seqio or TensorFlow (JAX on CPU fits the learned rules' MLPs); task
corpus metrics are imported by their recorded names (see cat_jax.cascade.plan).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys

from cat_jax.cascade import analysis, report, store
from cat_jax.cascade.plan import CONFIG, LARGE, AnalysisConfig, corpus_metrics
from cat_jax.cascade.records import SplitRecords
from cat_jax.errors import FRIENDLY, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a cascade_eval OUTPUT_DIR")
    parser.add_argument("--output_dir", default=None, help="where to write (default: DIR itself)")
    parser.add_argument("--target_deferral_rate", type=float, default=None)
    parser.add_argument("--target_relative_flops", type=float, default=None)
    parser.add_argument("--rules", default=None, help="comma-separated rules (default: the recorded ones)")
    parser.add_argument("--num_thresholds", type=int, default=None)
    parser.add_argument("--tier_thresholds", type=int, default=None)
    parser.add_argument("--plot_rule", default=None, help="the curve label of the by-model plots")
    return parser


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(
            f"{path} does not exist: point at the OUTPUT_DIR of a cascade_eval run that wrote "
            f"{CONFIG} and {store.EXAMPLES}."
        )
    return path


def _with_overrides(config: AnalysisConfig, args: argparse.Namespace) -> AnalysisConfig:
    given = {
        name: getattr(args, name)
        for name in ("target_deferral_rate", "target_relative_flops", "num_thresholds", "tier_thresholds", "plot_rule")
    }
    given = {name: value for name, value in given.items() if value is not None}
    if args.rules is not None:
        given["rules"] = tuple(r.strip() for r in args.rules.split(",") if r.strip())
    config = dataclasses.replace(config, options=dataclasses.replace(config.options, **given))
    if config.validation_split is None and config.needs_validation():
        raise ConfigError(
            "the learned rules and budget calibration need the validation split, which this run "
            "did not decode; run cascade_eval again with a budget (TARGET_DEFERRAL_RATE=...) or "
            "post_hoc."
        )
    return config


def _check_embeddings(config: AnalysisConfig, splits: list[SplitRecords]) -> None:
    if config.needs_embeddings() and any(s.models[LARGE].embedding is None for s in splits):
        raise ConfigError(
            "rule post_hoc_embed needs the large model's input embeddings, which this run did not "
            "record; run cascade_eval again with post_hoc_embed among run_cascade_eval.rules."
        )


def run(argv: list[str] | None = None) -> list[str]:
    """Re-analyses DIR as the flags say; returns the files written."""
    args = _parser().parse_args(argv)
    recorded = pathlib.Path(_existing(os.path.join(args.dir, CONFIG))).read_text()
    config = _with_overrides(AnalysisConfig.from_json(recorded), args)
    config.check()
    test = store.read_split(_existing(os.path.join(args.dir, store.EXAMPLES)), config.split)
    validation = None
    if config.validation_split == config.split:
        validation = test
    elif config.validation_split is not None:
        validation = store.read_split(
            _existing(os.path.join(args.dir, store.VALIDATION_EXAMPLES)), config.validation_split
        )
    _check_embeddings(config, [s for s in (test, validation) if s is not None])
    result = analysis.analyse(config, test, validation, corpus_metrics(config.corpus_metrics))
    output_dir = args.output_dir or args.dir
    files = report.write_outputs(output_dir, config, result, len(test))
    pathlib.Path(output_dir, CONFIG).write_text(config.to_json())
    return [*files, os.path.join(output_dir, CONFIG)]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        files = run(argv)
    except FRIENDLY as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {os.path.dirname(files[-1])}")
    return 0
