"""The launch scripts: their dry runs print the exact commands, and with fake gcloud / srun /
python on PATH the real runs pass module and gin arguments through every shell level intact."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"

MODULE = "cat_jax.train"
ARGS = [
    "--gin_file=gin_configs/runs/train_large.gin",
    "--gin.MODEL_DIR='/tmp/cat jax/large'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
    "--gin.make_mesh.mesh_shape=[('data', -1), ('fsdp', 1), ('model', 2)]",
    '--gin.NOTE="it\'s $HOME `x` \\ !"',
]

# Records its argv, working directory and the CAT_JAX_* / launcher environment as JSON.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
out = os.environ["FAKE_OUT"]
pid = os.environ.get("CAT_JAX_PROCESS_ID", "0")
keep = ("CAT_JAX_", "XLA_", "TF_", "NCCL_", "CUDA_", "PYTHONUNBUFFERED", "FAKE_")
env = {{k: v for k, v in os.environ.items() if k.startswith(keep)}}
with open(os.path.join(out, f"python-{{pid}}.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}, f)
print("step 1 loss 2.5 from process", pid, flush=True)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "CAT_JAX_", "XLA_", "TF_FORCE", "NCCL_", "CUDA_VISIBLE"))
        and k not in ("DRY_RUN",)
    }
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env or _clean_env(), timeout=timeout
    )


def _words(command: str) -> list[str]:
    """Shell words of a command line, with ( ) ; & > | as words of their own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _bash_words(command: str) -> list[str]:
    """The words bash makes of a simple command line (shlex does not undo \\$ in double quotes)."""
    out = subprocess.run(
        ["bash", "-c", f"set -- {command}; printf '%s\\0' \"$@\""], capture_output=True, text=True, check=True
    ).stdout
    return out.split("\0")[:-1]


def _python_args(command: str, module: str = MODULE) -> list[str]:
    words = _words(command)
    i = words.index("-m")
    assert words[i + 1] == module
    rest = words[i + 2 :]
    end = next((j for j, w in enumerate(rest) if w in (">", ";", "&", "&&", ")")), len(rest))
    return rest[:end]


def _option(words: list[str], name: str) -> str:
    values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, (name, words)
    return values[0]


# ---------------------------------------------------------------------------------------------
# tpu_vm.sh

TPU_FLAGS = [
    "--name",
    "my-v4",
    "--zone",
    "us-central2-b",
    "--project",
    "my-proj",
    "--accelerator",
    "v4-32",
    "--version",
    "tpu-ubuntu2204-base",
    "--create",
]


def test_tpu_vm_dry_run_prints_every_gcloud_command():
    result = _run("tpu_vm.sh", *TPU_FLAGS, "--log", "logs/run.log", "--dry-run", "--", MODULE, *ARGS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    create, pack, scp, install, start, follow = lines

    assert create.startswith(
        "gcloud compute tpus tpu-vm describe my-v4 --zone=us-central2-b --project=my-proj > /dev/null 2>&1 || "
    )
    create_words = _words(create.split("|| ", 1)[1])
    assert create_words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v4"]
    assert {
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
    } <= set(create_words)

    assert "ls-files" in pack and "tar -czf" in pack
    archive = _words(pack)[_words(pack).index("-czf") + 1]
    scp_words = _words(scp)
    assert scp_words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp_words[5:7] == [archive, "my-v4:cat_jax_src.tar.gz"]
    assert {"--worker=all", "--zone=us-central2-b", "--project=my-proj"} <= set(scp_words)

    for line in (install, start, follow):
        words = _bash_words(line)
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4"]
        assert {"--zone=us-central2-b", "--project=my-proj"} <= set(words)
    install_cmd = _option(_bash_words(install), "--command")
    assert "--worker=all" in _bash_words(install)
    assert "tar -xzf cat_jax_src.tar.gz -C cat_jax" in install_cmd
    assert "-m venv .venv" in install_cmd
    assert ".venv/bin/pip install -q -e . 'jax[tpu]'" in install_cmd

    start_words = _bash_words(start)
    assert "--worker=all" in start_words
    start_cmd = _option(start_words, "--command")
    assert _python_args(start_cmd) == ARGS + ["--gin.initialize.auto=True"]
    assert "> logs/run.log 2>&1" in start_cmd and "echo $? > logs/run.log.rc" in start_cmd
    assert "trap '' HUP" in start_cmd and start_cmd.startswith("cd cat_jax && ")

    follow_words = _bash_words(follow)
    assert "--worker=0" in follow_words
    assert "tail -n +1 -F logs/run.log" in _option(follow_words, "--command")


def test_tpu_vm_dry_run_reuse_no_install_no_follow():
    result = _run(
        "tpu_vm.sh",
        "--name",
        "v5e",
        "--zone",
        "z1",
        "--no-install",
        "--no-follow",
        "--env",
        "TFDS_DATA_DIR=gs://b/tfds",
        "--dry-run",
        "cat_jax.cascade_eval",
        "--gin.OUTPUT_DIR=/tmp/out",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert "tpu-vm create" not in lines[0] and "pass --create" in lines[0]
    start_cmd = _option(_bash_words(lines[1]), "--command")
    assert "TFDS_DATA_DIR=gs://b/tfds" in _words(start_cmd)
    assert _python_args(start_cmd, "cat_jax.cascade_eval") == [
        "--gin.OUTPUT_DIR=/tmp/out",
        "--gin.initialize.auto=True",
    ]
    assert "logs/cascade_eval-" in start_cmd


FAKE_GCLOUD = """#!/usr/bin/env bash
# Fake gcloud: records its argv; scp copies into $FAKE_HOME; ssh runs --command there with bash.
set -euo pipefail
printf '%s\\n' "$(printf '%q ' "$@")" >> "$FAKE_OUT/gcloud.log"
case "$4" in
  describe) [[ -z "${FAKE_TPU_MISSING:-}" ]] ;;
  create) ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh) for a in "$@"; do [[ "$a" != --command=* ]] || cmd="${a#--command=}"; done
       cd "$FAKE_HOME" && exec bash -c "$cmd" ;;
  *) exit 9 ;;
esac
"""


def test_tpu_vm_runs_with_fake_gcloud(tmp_path):
    fake_bin, home, out = tmp_path / "bin", tmp_path / "home", tmp_path / "out"
    home.mkdir(), out.mkdir()
    _write_exe(fake_bin / "gcloud", FAKE_GCLOUD)
    # The worker already has a venv: its python records argv, its pip records what it installs.
    _write_exe(home / "cj" / ".venv" / "bin" / "python", FAKE_PYTHON)
    _write_exe(home / "cj" / ".venv" / "bin" / "pip", '#!/usr/bin/env bash\necho "$*" >> "$FAKE_OUT/pip.log"\n')
    env = _clean_env(
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        FAKE_HOME=str(home),
        FAKE_OUT=str(out),
        FAKE_TPU_MISSING="1",
        TMPDIR=str(tmp_path),
    )
    result = _run(
        "tpu_vm.sh", *TPU_FLAGS, "--remote-dir", "cj", "--env", "FAKE_RC=3", "--", MODULE, *ARGS, env=env, timeout=120
    )
    # Worker 0's log is streamed, and the job's exit status comes back.
    assert result.returncode == 3, result.stderr
    assert "step 1 loss 2.5 from process 0" in result.stdout
    record = json.loads((out / "python-0.json").read_text())
    assert record["argv"] == ["-m", MODULE, *ARGS, "--gin.initialize.auto=True"]
    assert record["cwd"] == str(home / "cj")
    assert record["env"]["FAKE_RC"] == "3" and record["env"]["PYTHONUNBUFFERED"] == "1"
    # The checkout was unpacked on the worker and installed with jax[tpu].
    assert (home / "cj" / "cat_jax" / "runtime.py").is_file()
    assert not (home / "cj" / ".git").exists()
    assert "install -q -e . jax[tpu]" in (out / "pip.log").read_text()
    calls = [shlex.split(line) for line in (out / "gcloud.log").read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    assert all("--worker=all" in c for c in calls[2:5]) and "--worker=0" in calls[5]
    logs = list((home / "cj" / "logs").glob("train-*.log"))
    assert len(logs) == 1 and (Path(str(logs[0]) + ".rc")).read_text().strip() == "3"


# ---------------------------------------------------------------------------------------------
# gpu.sh


def test_gpu_dry_run_prints_install_and_python_command():
    result = _run("gpu.sh", "--dry-run", "--install", "--gpus", "0,1,2,3", "--mem-fraction", "0.8", "--", MODULE, *ARGS)
    assert result.returncode == 0, result.stderr
    make, plugin, run = result.stdout.splitlines()
    python = str(REPO / ".venv" / "bin" / "python")
    assert _words(make) == ["make", "-C", str(REPO), "install"]
    assert plugin.startswith(f"{python} -c 'import jax_cuda12_plugin' > /dev/null 2>&1 || ")
    assert 'pip install -q "jax[cuda12]==$(' in plugin
    words = _words(run)
    assert words[:4] == ["cd", str(REPO), "&&", "env"]
    assert {
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
        "CUDA_VISIBLE_DEVICES=0,1,2,3",
        "TF_FORCE_GPU_ALLOW_GROWTH=true",
        "PYTHONUNBUFFERED=1",
    } <= set(words)
    assert words[words.index("-m") - 1] == python
    assert _python_args(run) == ARGS
    assert not any(w.startswith("CAT_JAX_") for w in words)


def test_gpu_runs_python_with_multihost_env(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    python = _write_exe(tmp_path / "py" / "python", FAKE_PYTHON)
    result = _run(
        "gpu.sh",
        "--python",
        str(python),
        "--coordinator",
        "host0:1234",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--",
        MODULE,
        *ARGS,
        env=_clean_env(FAKE_OUT=str(out)),
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "python-1.json").read_text())
    assert record["argv"] == ["-m", MODULE, *ARGS]
    assert record["cwd"] == str(REPO)
    assert record["env"]["CAT_JAX_COORDINATOR"] == "host0:1234"
    assert record["env"]["CAT_JAX_NUM_PROCESSES"] == "2"
    assert record["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"


# ---------------------------------------------------------------------------------------------
# slurm_gpu.sbatch

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu-a[1-4]" ]] || { echo "bad scontrol call: $*" >&2; exit 1; }
printf 'gpu-a1\\ngpu-a2\\ngpu-a3\\ngpu-a4\\n'
"""

# Fake srun: reads --ntasks, then runs the task command once per task with SLURM_PROCID set.
FAKE_SRUN = """#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$(printf '%q ' "$@")" >> "$FAKE_OUT/srun.log"
n=1
while [[ "$1" == --* ]]; do [[ "$1" != --ntasks=* ]] || n="${1#--ntasks=}"; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@"; done
"""


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    fake_bin = tmp_path / "bin"
    _write_exe(fake_bin / "scontrol", FAKE_SCONTROL)
    _write_exe(fake_bin / "srun", FAKE_SRUN)
    return _clean_env(
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[1-4]",
        SLURM_NTASKS="4",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_ID="4321",
        SLURM_SUBMIT_DIR="/shared/cat_jax",
        **extra,
    )


def test_slurm_dry_run_derives_coordinator_and_processes(tmp_path):
    result = _run("slurm_gpu.sbatch", MODULE, *ARGS, env=_slurm_env(tmp_path, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    exports = dict(_words(l)[1].split("=", 1) for l in lines if l.startswith("export "))
    assert exports["CAT_JAX_COORDINATOR"] == "gpu-a1:24321"
    assert exports["CAT_JAX_NUM_PROCESSES"] == "4"
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert any("gpu-a1=0 gpu-a2=1 gpu-a3=2 gpu-a4=3" in l for l in lines if l.startswith("#"))
    srun = _words(lines[-1])
    assert srun[:5] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[5:7] == ["bash", "-c"] and 'CAT_JAX_PROCESS_ID="$SLURM_PROCID"' in srun[7]
    assert srun[8:10] == ["/shared/cat_jax", "/shared/cat_jax/.venv/bin/python"]
    assert srun[10:] == ["-m", MODULE, *ARGS]
    # --dry-run as the first argument is the same as DRY_RUN=1; CAT_JAX_PORT picks the port.
    again = _run("slurm_gpu.sbatch", "--dry-run", MODULE, *ARGS, env=_slurm_env(tmp_path, CAT_JAX_PORT="5555"))
    assert again.returncode == 0, again.stderr
    assert "export CAT_JAX_COORDINATOR=gpu-a1:5555" in again.stdout.splitlines()


def test_slurm_runs_one_process_per_node(tmp_path):
    out, root = tmp_path / "out", tmp_path / "checkout"
    out.mkdir(), root.mkdir()
    python = _write_exe(tmp_path / "py" / "python", FAKE_PYTHON)
    env = _slurm_env(tmp_path, FAKE_OUT=str(out), CAT_JAX_ROOT=str(root), CAT_JAX_PYTHON=str(python))
    result = _run("slurm_gpu.sbatch", MODULE, *ARGS, env=env)
    assert result.returncode == 0, result.stderr
    for pid in range(4):
        record = json.loads((out / f"python-{pid}.json").read_text())
        assert record["argv"] == ["-m", MODULE, *ARGS]
        assert record["cwd"] == str(root)
        assert record["env"]["CAT_JAX_PROCESS_ID"] == str(pid)
        assert record["env"]["CAT_JAX_NUM_PROCESSES"] == "4"
        assert record["env"]["CAT_JAX_COORDINATOR"] == "gpu-a1:24321"


# ---------------------------------------------------------------------------------------------
# local.sh


def test_local_dry_run():
    result = _run(
        "local.sh",
        "--dry-run",
        "--env",
        "JAX_PLATFORMS=cpu",
        "cat_jax.cascade_eval",
        "--gin_file=gin_configs/runs/cascade_eval.gin",
        "--gin.SMALL_MODEL_DIRS={'ce': '/tmp/ce', 'cat': '/tmp/cat'}",
    )
    assert result.returncode == 0, result.stderr
    run = result.stdout.splitlines()[-1]
    words = _words(run)
    assert words[:5] == ["cd", str(REPO), "&&", "env", "JAX_PLATFORMS=cpu"]
    assert _python_args(run, "cat_jax.cascade_eval") == [
        "--gin_file=gin_configs/runs/cascade_eval.gin",
        "--gin.SMALL_MODEL_DIRS={'ce': '/tmp/ce', 'cat': '/tmp/cat'}",
    ]


# ---------------------------------------------------------------------------------------------
# Bad arguments: exit status 2 and the usage.


@pytest.mark.parametrize(
    "script,args",
    [
        ("tpu_vm.sh", ["--zone", "z", MODULE]),  # no --name
        ("tpu_vm.sh", ["--name", "n", MODULE]),  # no --zone
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--create", MODULE]),  # no --accelerator
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--bogus", MODULE]),
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--dry-run"]),  # no module
        ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--env", "noequals", MODULE]),
        ("tpu_vm.sh", ["--name"]),
        ("gpu.sh", ["--dry-run"]),
        ("gpu.sh", ["--gpus", "all", MODULE]),
        ("gpu.sh", ["--coordinator", "h:1", MODULE]),  # incomplete multi-host
        ("gpu.sh", ["--dry-run", "not a module"]),
        ("slurm_gpu.sbatch", ["--dry-run"]),
        ("slurm_gpu.sbatch", ["--dry-run", MODULE]),  # not under SLURM
        ("local.sh", []),
        ("local.sh", ["--frobnicate", MODULE]),
    ],
)
def test_bad_arguments_exit_2_with_usage(script, args):
    result = _run(script, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage:" in result.stderr
    assert result.stdout == ""
