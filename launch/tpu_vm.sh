#!/usr/bin/env bash
# Run a cat_jax entry point on every worker of a Cloud TPU VM (one host or a multi-host slice).
#
#   launch/tpu_vm.sh --name my-v4 --zone us-central2-b --accelerator v4-32 --create -- \
#     cat_jax.train --gin_file=gin_configs/runs/train_large.gin --gin.MODEL_DIR=gs://bucket/large \
#     --gin.TRAIN_STEPS=10000
#
# Steps (each is one shell command; --dry-run prints them, one per line, and runs nothing):
#   1. reuse the TPU VM NAME, or create it when --create is given and it does not exist;
#   2. pack this checkout (tracked and untracked, not ignored files) and copy it to every worker;
#   3. on every worker: unpack into REMOTE_DIR, create REMOTE_DIR/.venv, pip install -e . 'jax[tpu]';
#   4. on every worker: start `python -m MODULE ARGS --gin.initialize.auto=True` in the background
#      (nohup), its output in REMOTE_DIR/LOG and its exit status in REMOTE_DIR/LOG.rc;
#   5. stream worker 0's LOG until the job ends; exit with worker 0's exit status.
# Interrupting step 5 leaves the job running; follow it again with --follow-only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/launch/lib.sh"

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] [--] MODULE [ARGS...]
  --name NAME            TPU VM (or slice) name                                  (required)
  --zone ZONE            its zone, e.g. us-central2-b                             (required)
  --project PROJECT      Google Cloud project (default: gcloud's configured one)
  --create               create the TPU VM if it does not exist (needs --accelerator)
  --accelerator TYPE     accelerator type for --create, e.g. v4-8, v4-32, v5litepod-16
  --version VERSION      TPU software version for --create (default tpu-ubuntu2204-base)
  --spot                 create a Spot TPU VM
  --internal-ip          ssh/scp through internal IPs (from a VM in the same network)
  --remote-dir DIR       checkout directory on the workers, relative to $HOME (default cat_jax)
  --python PY            interpreter that creates the workers' venv (default python3)
  --env KEY=VALUE        extra environment for the job (repeatable), e.g. TFDS_DATA_DIR=gs://...
  --log PATH             log file, relative to REMOTE_DIR (default logs/MODULE-TIMESTAMP.log)
  --no-install           skip copying and installing (steps 2-3): the workers are set up already
  --no-follow            start the job and return (skip step 5)
  --follow-only          only stream worker 0's --log (steps 1-4 skipped); needs --log
  --dry-run              print every command, one per line, and run nothing
The job gets --gin.initialize.auto=True so all workers join one JAX runtime.
EOF
  exit 2
}
die_usage() { echo "tpu_vm.sh: $*" >&2; usage; }

# A whole remote command as one double-quoted word (readable: its own quotes stay as they are).
dq() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//\$/\\\$}"; s="${s//\`/\\\`}"; printf '"%s"' "$s"; }

name="" zone="" project="" create=0 accelerator="" version="tpu-ubuntu2204-base" spot=0
internal_ip=0 remote_dir="cat_jax" python="python3" log="" install=1 follow=1 follow_only=0 dry=0
envs=()
need() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; name="$2"; shift 2 ;;
    --zone) need "$@"; zone="$2"; shift 2 ;;
    --project) need "$@"; project="$2"; shift 2 ;;
    --accelerator) need "$@"; accelerator="$2"; shift 2 ;;
    --version) need "$@"; version="$2"; shift 2 ;;
    --remote-dir) need "$@"; remote_dir="$2"; shift 2 ;;
    --python) need "$@"; python="$2"; shift 2 ;;
    --log) need "$@"; log="$2"; shift 2 ;;
    --env) need "$@"; [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env wants KEY=VALUE, got '$2'"
           envs+=("$2"); shift 2 ;;
    --name=*|--zone=*|--project=*|--accelerator=*|--version=*|--remote-dir=*|--python=*|--log=*|--env=*)
           flag="${1%%=*}"; set -- "$flag" "${1#*=}" "${@:2}" ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --internal-ip) internal_ip=1; shift ;;
    --no-install) install=0; shift ;;
    --no-follow) follow=0; shift ;;
    --follow-only) follow_only=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done
[[ -n "$name" ]] || die_usage "--name is required"
[[ -n "$zone" ]] || die_usage "--zone is required"
[[ $create -eq 0 || -n "$accelerator" ]] || die_usage "--create needs --accelerator (e.g. v4-32)"
if [[ $follow_only -eq 1 ]]; then
  [[ -n "$log" ]] || die_usage "--follow-only needs --log (the path printed when the job started)"
else
  check_module "$@"
  module="$1"; shift
  [[ -n "$log" ]] || log="logs/${module##*.}-$(date +%Y%m%d-%H%M%S).log"
fi

gcloud_flags=(--zone="$zone")
[[ -z "$project" ]] || gcloud_flags+=(--project="$project")
ssh_flags=("${gcloud_flags[@]}")
[[ $internal_ip -eq 0 ]] || ssh_flags+=(--internal-ip)
tpu=(gcloud compute tpus tpu-vm)
steps=()

# 1. Create or reuse.
describe="$(qa "${tpu[@]}" describe "$name" "${gcloud_flags[@]}") > /dev/null 2>&1"
if [[ $create -eq 1 ]]; then
  create_cmd=("${tpu[@]}" create "$name" "${gcloud_flags[@]}" --accelerator-type="$accelerator"
              --version="$version")
  [[ $spot -eq 0 ]] || create_cmd+=(--spot)
  steps+=("$describe || $(qa "${create_cmd[@]}")")
else
  steps+=("$describe || { echo $(q "tpu_vm.sh: no TPU VM '$name' in zone $zone; pass --create --accelerator TYPE to create it") >&2; exit 1; }")
fi

rdir_q="$(q "$remote_dir")"
if [[ $follow_only -eq 0 ]]; then
  # 2. Pack the checkout and copy it to every worker.
  if [[ $install -eq 1 ]]; then
    archive="${TMPDIR:-/tmp}/cat_jax-src-$name.tar.gz"
    if git -C "$root" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
      steps+=("git -C $(q "$root") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$archive") -C $(q "$root") --null -T -")
    else
      steps+=("tar -czf $(q "$archive") -C $(q "$root") --exclude=.venv --exclude=.git --exclude=__pycache__ .")
    fi
    steps+=("$(qa "${tpu[@]}" scp "$archive" "$name:cat_jax_src.tar.gz" --worker=all "${ssh_flags[@]}")")
    # 3. Unpack and install on every worker.
    py_q="$(q "$python")"
    remote_install="set -e; mkdir -p $rdir_q; tar -xzf cat_jax_src.tar.gz -C $rdir_q; cd $rdir_q; "
    remote_install+="test -x .venv/bin/python || $py_q -m venv .venv || "
    remote_install+="{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && $py_q -m venv .venv; }; "
    remote_install+=".venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . 'jax[tpu]'"
    steps+=("$(qa "${tpu[@]}" ssh "$name" --worker=all "${ssh_flags[@]}") --command=$(dq "$remote_install")")
  fi
  # 4. Start the job on every worker: a background subshell that ignores hang-ups, so it outlives
  #    the ssh session, runs the module and records its exit status.
  job="$(qa env PYTHONUNBUFFERED=1 "${envs[@]}" .venv/bin/python -m "$module" "$@" --gin.initialize.auto=True)"
  remote_start="cd $rdir_q && mkdir -p $(q "$(dirname "$log")") && rm -f $(q "$log.rc") && "
  remote_start+="(trap '' HUP; $job > $(q "$log") 2>&1; echo \$? > $(q "$log.rc")) > /dev/null 2>&1 < /dev/null & "
  remote_start+="echo \"started on \$(hostname): $remote_dir/$log\""
  steps+=("$(qa "${tpu[@]}" ssh "$name" --worker=all "${ssh_flags[@]}") --command=$(dq "$remote_start")")
fi
# 5. Stream worker 0's log until its exit status appears; exit with it.
if [[ $follow -eq 1 ]]; then
  remote_follow="cd $rdir_q || exit 1; tail -n +1 -F $(q "$log") 2> /dev/null & t=\$!; "
  remote_follow+="while [ ! -e $(q "$log.rc") ]; do sleep 1; done; sleep 1; kill \$t; exit \"\$(cat $(q "$log.rc"))\""
  steps+=("$(qa "${tpu[@]}" ssh "$name" --worker=0 "${ssh_flags[@]}") --command=$(dq "$remote_follow")")
fi

if [[ $dry -eq 1 ]]; then printf '%s\n' "${steps[@]}"; exit 0; fi
for step in "${steps[@]}"; do
  echo "+ $step" >&2
  bash -o pipefail -c "$step"
done
