#!/usr/bin/env bash
# Why does CAT-Xent trail CE at `make demo` scale? Per task: one large model, then per seed six
# paired students (same seed = same initialisation and data order), then one cascade evaluation
# of the six on the test split. Layout: <out>/<task>/large, <out>/<task>/seed<k>/<student>,
# <out>/<task>/seed<k>/cascade. Analysis (tables and plots into docs/results/cat_small_scale/):
#   python -m launch.experiments.cat_small_scale_analysis <out>
#
#   launch/experiments/cat_small_scale.sh --out /work/runs_catstudy [--seeds 0,1,2]
#       [--tasks cmudict_syllables,cmudict_g2p] [--dry-run]
#
# Students (demo_small, 400 steps at 3e-3, batch 32, float32, the run files' defaults otherwise):
#   ce           train_small_ce.gin                       cross-entropy on every token
#   distill      train_small_distill.gin                  alpha 0.5 distillation, no mask
#   cat          train_small_cat.gin                      CAT-Xent (mask small_or_large) from step 0
#   cat_warm     train_small_cat.gin, mask_start_step=W   CE for the first W=200 steps, then CAT-Xent
#                (a CE warm start inside the run: same optimizer state, schedule and data order)
#   cat_large    train_small_cat.gin, mask='large'        only tokens the large model gets right
#   cat_distill  train_small_cat_distill.gin              the mask, alpha 0.5 distillation
# Large model (demo_large, train_large.gin, seed = the first seed): 1600 steps. Tasks and lengths:
#   cmudict_syllables (the demo's task) inputs 32 / targets 4, 2048 test examples;
#   cmudict_g2p inputs 32 / targets 48 (the longest test target is 49 bytes with EOS), 512 examples.
# Each stage is skipped when its output exists (the final checkpoint, cascade/summary.json), so a
# re-run finishes an interrupted one. About 2 hours on 2 shared CPU cores (docs/RESULTS.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
usage() { sed -n '2,23p' "$0" >&2; exit 2; }
# shellcheck source=launch/experiments/common.sh
source "$root/launch/experiments/common.sh"

tasks="cmudict_syllables,cmudict_g2p"; seeds="0 1 2"; args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tasks) [[ $# -ge 2 ]] || usage; tasks="$2"; shift 2;;
    --seeds) [[ $# -ge 2 ]] || usage; seeds="${2//,/ }"; shift 2;;
    --scale) usage;;  # one scale: the CPU demo's shapes
    *) args+=("$1"); shift;;
  esac
done
parse_experiment_args "${args[@]}" --seeds "$seeds"
IFS=',' read -r -a task_list <<< "$tasks"

steps_large=1600; steps_small=400; warm_steps=200; batch=32
students=(ce distill cat cat_warm cat_large cat_distill)
py="${PYTHON:-$root/.venv/bin/python}"
cache="$out/data_cache"

task_settings() {  # sets lengths and examples for task $1
  case "$1" in
    cmudict_syllables) lengths="{'inputs': 32, 'targets': 4}"; examples=2048;;
    cmudict_g2p) lengths="{'inputs': 32, 'targets': 48}"; examples=512;;
    *) echo "cat_small_scale.sh: no settings for task '$1'; choose cmudict_syllables or cmudict_g2p." >&2; exit 2;;
  esac
}

student_args() {  # the run file and extra flags of student $1
  case "$1" in
    ce) echo "train_small_ce.gin";;
    distill) echo "train_small_distill.gin";;
    cat) echo "train_small_cat.gin";;
    cat_warm) echo "train_small_cat.gin --gin.LossOptions.mask_start_step=$warm_steps";;
    cat_large) echo "train_small_cat.gin --gin.LossOptions.mask='large'";;
    cat_distill) echo "train_small_cat_distill.gin";;
  esac
}

for task in "${task_list[@]}"; do task_settings "$task"; done  # refuse unknown tasks before any work
for task in "${task_list[@]}"; do
  task_settings "$task"
  common=(--gin.MIXTURE_OR_TASK_NAME="$task" "--gin.TASK_FEATURE_LENGTHS=$lengths"
          --gin.load_split.cache_dir="$cache")
  train=(--gin.BATCH_SIZE=$batch --gin.train.eval_period=0 "${common[@]}")
  large="$out/$task/large"
  if [[ -d "$large/$steps_large" ]]; then echo "done: $large"; else
    run "$py" -m cat_jax.train --gin_file=gin_configs/runs/train_large.gin --gin.MODEL_DIR="$large" \
      --gin.TRAIN_STEPS=$steps_large --gin.SEED="${seed_list[0]}" "${train[@]}"
  fi
  for seed in "${seed_list[@]}"; do
    dir="$out/$task/seed$seed"
    smalls="{"
    for student in "${students[@]}"; do
      read -r -a spec <<< "$(student_args "$student")"
      teacher=(); [[ $student == ce ]] || teacher=(--gin.TEACHER_MODEL_DIR="$large")
      smalls+="'$student': '$dir/$student', "
      if [[ -d "$dir/$student/$steps_small" ]]; then echo "done: $dir/$student"; continue; fi
      run "$py" -m cat_jax.train --gin_file="gin_configs/runs/${spec[0]}" "${spec[@]:1}" \
        --gin.MODEL_DIR="$dir/$student" --gin.TRAIN_STEPS=$steps_small --gin.SEED="$seed" "${teacher[@]}" "${train[@]}"
    done
    smalls="${smalls%, }}"
    if [[ -f "$dir/cascade/summary.json" ]]; then echo "done: $dir/cascade"; continue; fi
    run "$py" -m cat_jax.cascade_eval --gin_file=gin_configs/runs/cascade_eval.gin \
      --gin.LARGE_MODEL_DIR="$large" "--gin.SMALL_MODEL_DIRS=$smalls" --gin.OUTPUT_DIR="$dir/cascade" \
      --gin.MAX_EXAMPLES=$examples "--gin.run_cascade_eval.rules=['chow_average', 'oracle', 'random']" \
      "${common[@]}"
  done
done
