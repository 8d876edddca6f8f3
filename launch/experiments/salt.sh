#!/usr/bin/env bash
# SALT on offline_mix: one small model trained with CE helps train the large one. The large model is
# trained with plain CE, with SALT (distillation from the small model for the first KD steps, then
# CE) and with SALT_DS (the same, its distillation phase on the sequences the small model scores as
# challenging yet learnable), two seeds each, evaluated on validation during training; then
# `python -m cat_jax.salt_report` writes quality against steps (PNG, table) and the steps each
# method needs to reach the CE baseline's final quality. Layout: <out>/small, <out>/scores,
# <out>/<method>_seed<k>, <out>/report.
#
#   launch/experiments/salt.sh --scale gpu --out /tmp/cat_jax/salt      # one H100/H200
#   launch/experiments/salt.sh --scale cpu --out runs/salt              # 2 CPU cores
#   add --dry-run to print the commands without running them; --seeds "0 1" (default).
#
# gpu: small-shaped small model (2000 steps), base-shaped large models (4000 steps, KD for the first
#      1000), bfloat16, batch 128, lengths 32/128, the whole train split, validation every 250 steps
#      on 256 examples per task: sized from the analytic FLOP count (6 large runs of ~5 minutes at
#      35% MFU), not measured.
# cpu: demo_small (300 steps) helping demo_large (400 steps, KD for the first 120), float32,
#      batch 32, lengths 32/64, the large models on 4096 train examples per task (MAX_EXAMPLES: the
#      split SALT_DS scores), validation every 40 steps on 64 examples per task: the pipeline at
#      smoke scale (~35 minutes on 2 cores); docs/RESULTS.md has one such run.
# Results: <out>/report/{summary.md,summary.json,curves.csv,quality_vs_steps.png}.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
usage() { sed -n '2,22p' "$0" >&2; exit 2; }
# shellcheck source=launch/experiments/common.sh
source "$root/launch/experiments/common.sh"
parse_experiment_args "$@"
case "$scale" in
  gpu) large=base; small=small; steps_large=4000; kd_steps=1000; steps_small=2000; batch=128; dtype=bfloat16
       lengths="{'inputs': 32, 'targets': 128}"; eval_period=250; eval_examples=256; max_examples=None;;
  cpu) large=demo_large; small=demo_small; steps_large=400; kd_steps=120; steps_small=300; batch=32; dtype=float32
       lengths="{'inputs': 32, 'targets': 64}"; eval_period=40; eval_examples=64; max_examples=4096;;
  *) usage;;
esac
py="${PYTHON:-$root/.venv/bin/python}"
data=(--gin.MIXTURE_OR_TASK_NAME=offline_mix "--gin.TASK_FEATURE_LENGTHS=$lengths" --gin.load_split.cache_dir="$out/data_cache")
common=("${data[@]}" "--gin.T5Config.dtype='$dtype'" --gin.BATCH_SIZE=$batch)
large_common=("${common[@]}" --gin_file="gin_configs/models/$large.gin" --gin.TRAIN_STEPS=$steps_large
              --gin.DatasetConfig.max_examples=$max_examples
              --gin.train.eval_period=$eval_period --gin.train.eval_max_examples=$eval_examples)
salt=(--gin.TEACHER_MODEL_DIR="$out/small" --gin.KD_STEPS=$kd_steps)
# The small model: the same one for every large run (its seed: the first seed).
run "$py" -m cat_jax.train --gin_file=gin_configs/runs/train_small_ce.gin --gin_file="gin_configs/models/$small.gin" \
  --gin.MODEL_DIR="$out/small" --gin.TRAIN_STEPS=$steps_small --gin.SEED="${seed_list[0]}" \
  --gin.train.eval_period=0 "${common[@]}"
# SALT_DS's scores of the train split, once (the runs pick their band from them).
run "$py" -m cat_jax.salt_score --gin_file=gin_configs/runs/salt_score.gin --gin.SMALL_MODEL_DIR="$out/small" \
  --gin.SCORES_DIR="$out/scores" --gin.MAX_EXAMPLES=$max_examples "${data[@]}"
groups=()
for method in ce salt salt_ds; do
  dirs=""
  for seed in "${seed_list[@]}"; do
    dir="$out/${method}_seed$seed"
    case "$method" in
      ce) extra=(--gin_file=gin_configs/runs/train_large.gin);;
      salt) extra=(--gin_file=gin_configs/runs/train_large_salt.gin "${salt[@]}");;
      salt_ds) extra=(--gin_file=gin_configs/runs/train_large_salt_ds.gin "${salt[@]}" --gin.SCORES_DIR="$out/scores");;
    esac
    run "$py" -m cat_jax.train "${extra[@]}" --gin.MODEL_DIR="$dir" --gin.SEED=$seed "${large_common[@]}"
    dirs+="$dir,"
  done
  groups+=("$method=${dirs%,}")
done
run "$py" -m cat_jax.salt_report --output_dir "$out/report" "${groups[@]}"
