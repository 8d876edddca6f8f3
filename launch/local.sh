#!/usr/bin/env bash
# Run a cat_jax entry point on this machine from the checkout's venv (created by `make install` on
# first use), in the checkout's root so relative gin paths resolve.
#   launch/local.sh cat_jax.train --gin_file=gin_configs/runs/train_large.gin --gin.MODEL_DIR=/tmp/x --gin.TRAIN_STEPS=100
# --dry-run prints every command, one per line, and runs nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/launch/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh [--dry-run] [--env KEY=VALUE ...] [--] MODULE [ARGS...]
  --env KEY=VALUE   extra environment (repeatable), e.g. JAX_PLATFORMS=cpu
  --dry-run         print every command, one per line, and run nothing
EOF
  exit 2
}
die_usage() { echo "local.sh: $*" >&2; usage; }


dry=0
envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --env) [[ $# -ge 2 && "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env wants KEY=VALUE"
           envs+=("$2"); shift 2 ;;
    --env=*) set -- --env "${1#*=}" "${@:2}" ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done
check_module "$@"
module="$1"; shift

python="$root/.venv/bin/python"
steps=()
[[ -x "$python" ]] || steps+=("$(qa make -C "$root" install)")
cmd=("$python" -m "$module" "$@")
[[ ${#envs[@]} -eq 0 ]] || cmd=(env "${envs[@]}" "${cmd[@]}")
steps+=("cd $(q "$root") && $(qa "${cmd[@]}")")

if [[ $dry -eq 1 ]]; then printf '%s\n' "${steps[@]}"; exit 0; fi
[[ -x "$python" ]] || make -C "$root" install
cd "$root" && exec "${cmd[@]}"
