#!/usr/bin/env bash
# The CAT experiment on offline_mix: a large model, then small students trained with CE,
# distillation, CAT and CAT-distill against it (two seeds each), then cascade evaluation of every
# student under every deferral rule on the test split. Layout: <out>/large, <out>/seed<k>/small_*,
# <out>/seed<k>/cascade.
#
#   launch/experiments/offline_cascade.sh --scale gpu --out /tmp/cat_jax/offline_cascade   # one H100/H200
#   launch/experiments/offline_cascade.sh --scale cpu --out runs/offline_cascade           # 2 CPU cores
#   launch/experiments/offline_cascade.sh --scale cpu --family decoder --out runs/offline_cascade_decoder
#   add --dry-run to print the commands without running them.
# --family t5 (default) or decoder: decoder-only models (Llama-shaped decoder_demo_large /
#   decoder_demo_small, about the T5 demo shapes' cost), at cpu scale.
#
# gpu: base-shaped large model (4000 steps), small-shaped students (2000 steps), bfloat16, batch 128,
#      2000 test examples per task: sized for 30 minutes on one H100 from a FLOP estimate, not yet
#      measured (docs/RESULTS.md).
# cpu: demo_large / demo_small shapes, float32, batch 32, 600 / 300 steps, 128 test examples per
#      task: the same pipeline at smoke scale (~42 minutes for two seeds on 2 cores); its numbers
#      say little about CAT (docs/RESULTS.md has one such run).
# Results: <out>/seed<k>/cascade/{summary.md,curves.csv,*.png}; compare seeds with
#   python -m cat_jax.cascade_compare <out>/seed*/cascade   (prints AUC mean and spread per student)
# At scale (a TPU VM with the data in a bucket): export the splits once for streaming, onto the
#   mounted bucket (ArrayRecord reads local or mounted paths, e.g. gcsfuse at /mnt/bucket):
#     python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin \
#       --gin.export_split.format="'array_record'" --gin.MIXTURE_OR_TASK_NAME=<task or mixture> \
#       --gin.SPLIT="['train', 'validation', 'test']" --gin.EXPORT_DIR=/mnt/bucket/stream
#   then give every train / eval / cascade_eval command --gin.data_source.streaming_dir=/mnt/bucket/stream.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
usage() { sed -n '2,21p' "$0" >&2; exit 2; }
# shellcheck source=launch/experiments/common.sh
source "$root/launch/experiments/common.sh"
family=t5; rest=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --family && $# -gt 1 ]]; then family="$2"; shift 2; else rest+=("$1"); shift; fi
done
parse_experiment_args ${rest[@]+"${rest[@]}"}
case "$scale" in
  gpu) large=base; small=small; steps_large=4000; steps_small=2000; batch=128; dtype=bfloat16
       lengths="{'inputs': 32, 'targets': 128}"; examples=2000;;
  cpu) large=demo_large; small=demo_small; steps_large=600; steps_small=300; batch=32; dtype=float32
       lengths="{'inputs': 32, 'targets': 128}"; examples=128;;
  *) usage;;
esac
case "$family/$scale" in
  t5/*) models=gin_configs/models; config=T5Config;;
  decoder/cpu) models=gin_configs/models/decoder; config=DecoderConfig; large=decoder_$large; small=decoder_$small;;
  *) usage;;
esac
py="${PYTHON:-$root/.venv/bin/python}"
common=(--gin.MIXTURE_OR_TASK_NAME=offline_mix "--gin.TASK_FEATURE_LENGTHS=$lengths"
        "--gin.$config.dtype='$dtype'" --gin.load_split.cache_dir="$out/data_cache")
# One large model (seed = the first seed); the students and their cascades once per seed, so the
# spread over seeds is the students' (initialisation and data order) against a fixed large model.
run "$py" -m cat_jax.train --gin_file=gin_configs/runs/train_large.gin --gin_file="$models/$large.gin" \
  --gin.MODEL_DIR="$out/large" --gin.TRAIN_STEPS=$steps_large --gin.BATCH_SIZE=$batch --gin.SEED="${seed_list[0]}" \
  "${common[@]}"
for seed in "${seed_list[@]}"; do
  dir="$out/seed$seed"
  smalls="{"
  for student in ce distill cat cat_distill; do
    teacher=(); [[ $student == ce ]] || teacher=(--gin.TEACHER_MODEL_DIR="$out/large")
    run "$py" -m cat_jax.train --gin_file="gin_configs/runs/train_small_$student.gin" \
      --gin_file="$models/$small.gin" --gin.MODEL_DIR="$dir/small_$student" \
      --gin.TRAIN_STEPS=$steps_small --gin.BATCH_SIZE=$batch --gin.SEED=$seed "${teacher[@]}" "${common[@]}"
    smalls+="'$student': '$dir/small_$student', "
  done
  smalls="${smalls%, }}"
  run "$py" -m cat_jax.cascade_eval --gin_file=gin_configs/runs/cascade_eval.gin \
    --gin.LARGE_MODEL_DIR="$out/large" "--gin.SMALL_MODEL_DIRS=$smalls" --gin.OUTPUT_DIR="$dir/cascade" \
    --gin.MAX_EXAMPLES=$examples "${common[@]}"
done
