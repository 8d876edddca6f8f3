#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI and has the project's environment (seqio, TensorFlow),
# what benchmarks/gpu.sh needs on the GPU host, which has neither:
#
#   benchmarks/gpu_prepare.sh [DIR]        (default <repo>/.gpu_bundle, which git ignores)
#
# DIR/wheels  gin-config and tensorboardX, at the versions this environment has, as wheels for
#             CPython 3.12 on x86-64 Linux (the GPU image's Python); gpu.sh installs them with
#             pip --no-index. The image has everything else the stages import.
# DIR/data    the experiment's task (offline_mix: train / validation / test, lengths 32/128, at
#             most 20000 examples per task and split) exported with `python -m cat_jax.export_task`
#             and recompressed (python benchmarks/gpu_experiment.py export); kept if already there.
#
# DIR must be ignored by git (the device tool carries it as an ignored path), and the working tree
# plus DIR must stay under the 64 MiB that travels: both are checked. Then, with DIR named in
# `carry`, run `bash benchmarks/gpu.sh "$OUT"` there (benchmarks/README.md has the exact call).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[[ $# -le 1 && "${1:-}" != -* ]] || { sed -n '2,17p' "$0" >&2; exit 2; }
dir="${1:-$root/.gpu_bundle}"
py="${PYTHON:-$root/.venv/bin/python}"
limit=$((64 * 1024 * 1024))
cd "$root"
mkdir -p "$dir/wheels"
dir="$(cd "$dir" && pwd)"

if ! git check-ignore -q "$dir/wheels"; then
  echo "gpu_prepare.sh: $dir is not ignored by git; use <repo>/.gpu_bundle or add it to .gitignore" >&2
  exit 2
fi

# The wheels: pure Python both, so one file each fits CPython 3.12 on x86-64.
rm -f "$dir"/wheels/*.whl
for dist in gin-config tensorboardX; do
  version="$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/wheels" "$dist==$version"
done

if compgen -G "$dir/data/offline_mix.*.npz" > /dev/null; then
  echo "gpu_prepare.sh: keeping the export in $dir/data (delete it to export again)"
else
  "$py" benchmarks/gpu_experiment.py export "$dir/data"
fi

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
bundle=$(du -sb "$dir" | cut -f1)
total=$((tree + bundle))
ls -l "$dir"/wheels "$dir"/data
echo "gpu_prepare.sh: working tree $((tree / 1024)) KiB + $dir $((bundle / 1024)) KiB" \
     "= $((total / 1024)) KiB of the $((limit / 1024)) KiB that travel"
if (( total >= limit )); then
  echo "gpu_prepare.sh: over the limit; export fewer examples (gpu_experiment.py GPU.export_cap)" >&2
  exit 1
fi
