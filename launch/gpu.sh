#!/usr/bin/env bash
# Run a cat_jax entry point on this host's GPUs: one process that drives every visible GPU
# (JAX puts all local GPUs in one process; the mesh spans them).
#
#   launch/gpu.sh --install -- cat_jax.train --gin_file=gin_configs/runs/train_large.gin \
#     --gin.MODEL_DIR=/data/cat_jax/large --gin.TRAIN_STEPS=10000
#
# Environment it sets (a value already in the environment wins):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90  JAX preallocates 90% of each GPU (its default is 75%)
#   TF_FORCE_GPU_ALLOW_GROWTH=true       TensorFlow (seqio's input pipeline) takes GPU memory lazily
#   NCCL_DEBUG=WARN                      NCCL reports only problems
#   PYTHONUNBUFFERED=1                   logs appear as they are written
# --install first makes the venv (`make install`) and adds jax[cuda12] (at the installed JAX's
# version) when JAX's CUDA plugin is missing. --coordinator/--num-processes/--process-id make this host one process of a multi-host
# job (what launch/slurm_gpu.sbatch does under SLURM). --dry-run prints every command, one per
# line, and runs nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/launch/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/gpu.sh [options] [--] MODULE [ARGS...]
  --gpus LIST            GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90)
  --install              create the venv if needed and install jax[cuda12] if missing
  --python PY            interpreter to run (default: the checkout's .venv/bin/python)
  --env KEY=VALUE        extra environment (repeatable)
  --coordinator H:P      multi-host: CAT_JAX_COORDINATOR (host:port of process 0)
  --num-processes N      multi-host: CAT_JAX_NUM_PROCESSES
  --process-id I         multi-host: CAT_JAX_PROCESS_ID of this host
  --dry-run              print every command, one per line, and run nothing
EOF
  exit 2
}
die_usage() { echo "gpu.sh: $*" >&2; usage; }


gpus="" mem_fraction="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}" install=0 python="" dry=0
coordinator="" num_processes="" process_id=""
envs=()
need() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) need "$@"; [[ "$2" =~ ^[0-9]+(,[0-9]+)*$ ]] || die_usage "--gpus wants a list like 0,1,2,3"
            gpus="$2"; shift 2 ;;
    --mem-fraction) need "$@"; [[ "$2" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die_usage "--mem-fraction wants a number in (0, 1]"
            mem_fraction="$2"; shift 2 ;;
    --python) need "$@"; python="$2"; shift 2 ;;
    --env) need "$@"; [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env wants KEY=VALUE, got '$2'"
           envs+=("$2"); shift 2 ;;
    --coordinator) need "$@"; [[ "$2" =~ ^[^:]+:[0-9]+$ ]] || die_usage "--coordinator wants host:port"
           coordinator="$2"; shift 2 ;;
    --num-processes) need "$@"; [[ "$2" =~ ^[1-9][0-9]*$ ]] || die_usage "--num-processes wants a positive integer"
           num_processes="$2"; shift 2 ;;
    --process-id) need "$@"; [[ "$2" =~ ^[0-9]+$ ]] || die_usage "--process-id wants an integer"
           process_id="$2"; shift 2 ;;
    --gpus=*|--mem-fraction=*|--python=*|--env=*|--coordinator=*|--num-processes=*|--process-id=*)
           flag="${1%%=*}"; set -- "$flag" "${1#*=}" "${@:2}" ;;
    --install) install=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done
check_module "$@"
module="$1"; shift
if [[ -n "$coordinator$num_processes$process_id" ]]; then
  [[ -n "$coordinator" && -n "$num_processes" && -n "$process_id" ]] \
    || die_usage "--coordinator, --num-processes and --process-id go together"
  (( process_id < num_processes )) || die_usage "--process-id must be below --num-processes"
fi
[[ -n "$python" ]] || python="$root/.venv/bin/python"

steps=()
if [[ $install -eq 1 ]]; then
  [[ "$python" != "$root/.venv/bin/python" ]] || steps+=("$(qa make -C "$root" install)")
  # The CUDA plugin at the version of the JAX already installed (the one the project was tested with).
  steps+=("$(qa "$python" -c 'import jax_cuda12_plugin') > /dev/null 2>&1 || $(qa "$python" -m pip install -q) \"jax[cuda12]==\$($(qa "$python" -c 'import jax; print(jax.__version__)'))\"")
fi
env_words=(XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction"
           TF_FORCE_GPU_ALLOW_GROWTH="${TF_FORCE_GPU_ALLOW_GROWTH:-true}"
           NCCL_DEBUG="${NCCL_DEBUG:-WARN}" PYTHONUNBUFFERED=1)
[[ -z "$gpus" ]] || env_words+=(CUDA_VISIBLE_DEVICES="$gpus")
[[ -z "$coordinator" ]] || env_words+=(CAT_JAX_COORDINATOR="$coordinator"
  CAT_JAX_NUM_PROCESSES="$num_processes" CAT_JAX_PROCESS_ID="$process_id")
env_words+=("${envs[@]}")
steps+=("cd $(q "$root") && $(qa env "${env_words[@]}" "$python" -m "$module" "$@")")

if [[ $dry -eq 1 ]]; then printf '%s\n' "${steps[@]}"; exit 0; fi
for step in "${steps[@]}"; do
  echo "+ $step" >&2
  bash -o pipefail -c "$step"
done
