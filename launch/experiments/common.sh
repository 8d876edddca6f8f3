# Shared by the experiment scripts (sourced, not run): their flags and the command runner.

# parse_experiment_args "$@": sets scale (default gpu), out (required), dry (0 or 1) and the array
# seed_list (default: 0 1); calls the script's usage() on anything else.
parse_experiment_args() {
  scale=gpu; out=""; dry=0
  local seeds="0 1"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --scale) scale="$2"; shift 2;;
      --out) out="$2"; shift 2;;
      --seeds) seeds="$2"; shift 2;;
      --dry-run) dry=1; shift;;
      *) usage;;
    esac
  done
  [[ -n "$out" ]] || usage
  read -r -a seed_list <<< "$seeds"
  [[ ${#seed_list[@]} -gt 0 ]] || usage
}

# Print a command, quoted, and run it from the repository root ($root) unless --dry-run.
run() {
  printf '%q ' "$@"; echo
  if [[ $dry -eq 0 ]]; then (cd "$root" && "$@"); fi
}
