#!/usr/bin/env bash
# One command that measures everything on one H100/H200 (the GPU image: jax with CUDA, flax, optax,
# orbax, torch, transformers; no network), within 9 minutes:
#
#   benchmarks/gpu.sh [--smoke] [--stages=train,cat_step,decode,speculative,experiment] OUT_DIR
#
# 1. Makes gin-config and tensorboardX importable: from the current environment when they are there
#    (always so with --smoke), else from the wheels benchmarks/gpu_prepare.sh put in
#    $CAT_JAX_GPU_BUNDLE/wheels (pip --no-index: never the network), installed into $WORK/site.
# 2. Runs the stages in order (benchmarks/gpu_run.py), each under its own time cap: train (peak
#    bf16 matmul; T5 v1.1 base and small train steps, ours vs HuggingFace eager and torch.compile),
#    cat_step (CAT-Xent and CAT-distill, small student with a base teacher, vs CE; per-device memory),
#    decode (greedy, batch 32 / 1 / 256, ours vs generate), speculative (small drafter, base
#    verifier, gamma 1/3/5, batch 1/8/32), experiment (only with time left: the CAT experiment on the
#    data gpu_prepare.sh exported).
# 3. Appends one JSON line per measurement to OUT_DIR/results.jsonl as it goes, logs to
#    OUT_DIR/gpu.log, rewrites OUT_DIR/summary.md after every stage; the experiment's curves and
#    summary go to OUT_DIR/experiment.tar.gz. Checkpoints and caches stay in $WORK.
#
# --smoke: every stage on CPU with tiny shapes (about 3 CPU-minutes; caps 8 minutes), the rehearsal.
# --stages: a subset, e.g. to rerun one stage that failed (its rows go to a fresh OUT_DIR).
# Environment: CAT_JAX_GPU_BUNDLE (default <repo>/.gpu_bundle), CAT_JAX_GPU_WORK (default
# ${TMPDIR:-/tmp}/cat_jax_gpu), CAT_JAX_GPU_CAP_SCALE (multiplies every stage's cap, and so the
# budget: the sum of the caps of the stages asked for, 520 s for all), PYTHON (default
# <repo>/.venv/bin/python if present, else python3).
# Exit status: 0 when every stage asked for ended ok (the experiment may be skipped for time).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
usage() { sed -n '2,26p' "$0" >&2; exit 2; }

smoke=(); stages=(); out=""
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=(--smoke);;
    --stages=*) stages=("$arg");;
    -h|--help) usage;;
    -*) echo "gpu.sh: unknown option $arg" >&2; usage;;
    *) [[ -z "$out" ]] || usage; out="$arg";;
  esac
done
[[ -n "$out" ]] || usage

bundle="${CAT_JAX_GPU_BUNDLE:-$root/.gpu_bundle}"
work="${CAT_JAX_GPU_WORK:-${TMPDIR:-/tmp}/cat_jax_gpu}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
mkdir -p "$out" "$work"

# What the image lacks that the stages import: gin (every model file) and tensorboardX (training's
# metric writers). Everything else they need is in the image; cat_jax runs from this checkout.
needs="import gin, tensorboardX"
if ! "$py" -c "$needs" 2>/dev/null; then
  if [[ ${#smoke[@]} -gt 0 ]]; then
    echo "gpu.sh --smoke: $py cannot import gin and tensorboardX; run it with the project's environment" >&2
    exit 2
  fi
  shopt -s nullglob
  wheels=("$bundle"/wheels/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "gpu.sh: $py lacks gin-config / tensorboardX and $bundle/wheels has no wheels;" \
         "run benchmarks/gpu_prepare.sh $bundle where pip reaches PyPI, and carry $bundle" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "${wheels[@]}"
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "$needs"
fi

cd "$root"
exec "$py" benchmarks/gpu_run.py "${smoke[@]}" "${stages[@]}" --cap-scale="${CAT_JAX_GPU_CAP_SCALE:-1}" \
  --bundle "$bundle" --work "$work" "$out"
