"""launch/experiments/offline_cascade.sh: the commands its dry run prints, per scale and seed."""

from __future__ import annotations

import ast
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "experiments" / "offline_cascade.sh"


def _commands(*args: str) -> list[dict[str, str]]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": "python"},
    ).stdout
    commands = []
    for line in out.splitlines():
        argv = shlex.split(line)
        assert argv[:2] == ["python", "-m"]
        flags: dict[str, str] = {"module": argv[2]}
        for arg in argv[3:]:
            key, _, value = arg.partition("=")
            flags[key] = flags[key] + "," + value if key in flags else value
        commands.append(flags)
    return commands


def test_cpu_scale_trains_large_then_four_students_then_evaluates_per_seed(tmp_path):
    commands = _commands("--scale", "cpu", "--out", str(tmp_path), "--seeds", "3 4")
    assert [c["module"] for c in commands] == ["cat_jax.train"] + (["cat_jax.train"] * 4 + ["cat_jax.cascade_eval"]) * 2
    large = commands[0]  # one large model for every seed, trained with the first seed
    assert large["--gin_file"] == "gin_configs/runs/train_large.gin,gin_configs/models/demo_large.gin"
    assert (large["--gin.TRAIN_STEPS"], large["--gin.SEED"]) == ("600", "3")
    assert large["--gin.MODEL_DIR"] == f"{tmp_path}/large"
    for seed, group in zip((3, 4), (commands[1:6], commands[6:])):
        *students, cascade = group
        names = ["ce", "distill", "cat", "cat_distill"]
        for name, student in zip(names, students):
            assert student["--gin_file"].split(",")[0] == f"gin_configs/runs/train_small_{name}.gin"
            assert (student["--gin.TRAIN_STEPS"], student["--gin.SEED"]) == ("300", str(seed))
            assert student["--gin.MODEL_DIR"] == f"{tmp_path}/seed{seed}/small_{name}"
            assert student.get("--gin.TEACHER_MODEL_DIR") == (None if name == "ce" else large["--gin.MODEL_DIR"])
        assert ast.literal_eval(cascade["--gin.SMALL_MODEL_DIRS"]) == {
            n: f"{tmp_path}/seed{seed}/small_{n}" for n in names
        }
        assert cascade["--gin.MAX_EXAMPLES"] == "128"  # per task
        assert cascade["--gin.LARGE_MODEL_DIR"] == large["--gin.MODEL_DIR"]
        for command in [large, *group]:
            assert ast.literal_eval(command["--gin.TASK_FEATURE_LENGTHS"]) == {"inputs": 32, "targets": 128}
            assert command["--gin.MIXTURE_OR_TASK_NAME"] == "offline_mix"
            for gin_file in command.get("--gin_file", "").split(","):
                assert not gin_file or (REPO / gin_file).is_file(), gin_file


def test_gpu_scale_uses_t5_shapes_in_bfloat16(tmp_path):
    large, student = _commands("--scale", "gpu", "--out", str(tmp_path), "--seeds", "0")[:2]
    assert large["--gin_file"].endswith("models/base.gin") and student["--gin_file"].endswith("models/small.gin")
    assert large["--gin.T5Config.dtype"] == "'bfloat16'" and large["--gin.BATCH_SIZE"] == "128"


def test_bad_arguments_print_the_usage_and_exit_2(tmp_path):
    for args in (["--scale", "tpu", "--out", str(tmp_path)], ["--scale", "cpu"]):
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
        assert result.returncode == 2 and "--scale gpu" in result.stderr


def test_decoder_family_swaps_the_model_files_and_dtype_binding(tmp_path):
    commands = _commands("--scale", "cpu", "--family", "decoder", "--out", str(tmp_path), "--seeds", "0")
    assert [c["module"] for c in commands] == ["cat_jax.train"] * 5 + ["cat_jax.cascade_eval"]
    assert commands[0]["--gin_file"].split(",")[1] == "gin_configs/models/decoder/decoder_demo_large.gin"
    for student in commands[1:5]:
        assert student["--gin_file"].split(",")[1] == "gin_configs/models/decoder/decoder_demo_small.gin"
    for command in commands:
        assert command["--gin.DecoderConfig.dtype"] == "'float32'" and "--gin.T5Config.dtype" not in command
        for gin_file in command.get("--gin_file", "").split(","):
            assert not gin_file or (REPO / gin_file).is_file(), gin_file
    refused = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--scale", "gpu", "--family", "decoder", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--family t5 (default) or decoder" in refused.stderr
