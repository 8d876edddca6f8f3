#!/usr/bin/env bash
# Run a cat_jax entry point on this machine from the checkout's venv (created by `make install`).
#   launch/local.sh cat_jax.train --gin_file=gin_configs/runs/train_large.gin --gin.MODEL_DIR=/tmp/x --gin.TRAIN_STEPS=100
# --dry-run prints the command instead of running it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
[[ $# -ge 1 ]] || { echo "usage: $0 [--dry-run] MODULE [ARGS...]" >&2; exit 2; }
module="$1"; shift
cmd=("$root/.venv/bin/python" -m "$module" "$@")
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
[[ -x "$root/.venv/bin/python" ]] || make -C "$root" install
cd "$root" && exec "${cmd[@]}"
