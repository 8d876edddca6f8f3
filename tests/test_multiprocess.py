"""Several real processes (jax.distributed, gloo CPU collectives) against one process, end to end.

Every run uses the same mesh, (data=4, fsdp=1, model=2) over 8 CPU devices: either one process
with 8 forced devices, or 2 processes with 4 each that meet at a coordinator on 127.0.0.1. Each
process of a 2-process run feeds its own half of every global batch and writes its own shards of
every checkpoint.

Tolerance of the parameter comparisons: the 2-process program sums partial gradients across the
processes through gloo, whose all-reduce adds the per-device parts in a different order than the
single process's in-process all-reduce, so gradients (and the loss) differ by float32 rounding
(observed: at most 1 ulp, 6e-8, on parameters of magnitude <= 4, after 3-4 Adam steps). Adam's
update m/sqrt(v) scales such relative differences by at most the learning rate (3e-3), so 1e-6
absolute is ~15 ulp of headroom without hiding a real difference (a wrong row order or a missed
step moves parameters by ~1e-3, one learning-rate step).

The runs are shared through module fixtures to keep the whole module at a few minutes on 2 cores:
a 1-process and a 2-process CE run of 4 steps (checkpoints at 2 and 4), each one's step-2
checkpoint resumed by the other process count, the same with streamed data (1 and 2 processes,
the 2-process step 2 resumed on 1), a CAT student (1 and 2 processes) against the 1-process CE
run as its tiny teacher, and that teacher's cache pass (1 and 2 processes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import DATA_CACHE, REPO, SUBPROCESS_ENV, TINY_TASK, train_args

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

DEVICES = 8
MESH = "--gin.make_mesh.mesh_shape=[('data', 4), ('fsdp', 1), ('model', 2)]"
STEPS = 4
# Every run: one encoder and one decoder layer of the tiny model (half the compile time), and the
# SIGTERM flags exchanged between the processes every 2 steps (so that collective runs here too).
COMMON = (
    MESH,
    "--gin.T5Config.num_encoder_layers=1",
    "--gin.T5Config.num_decoder_layers=1",
    "--gin.PreemptionWatcher.check_every_steps=2",
)
# Inputs of 16 tokens truncate most words of the task: every process logs that warning, so process
# 1's log is never empty (its lines' format is checked).
CE_ARGS = (
    *COMMON,
    "--gin.train.checkpoint_period=2",
    "--gin.train.keep_checkpoints=None",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
)
ATOL = 1e-6


@dataclasses.dataclass
class Proc:
    index: int
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`python -m cat_jax.train args` (or another binary `module`) as `nprocs` cooperating processes over 8 CPU devices,
    started at once; `finish()` waits for it. Jobs run side by side to overlap their start-up and
    the waits in collectives (the processes of one job idle while a peer catches up)."""

    def __init__(
        self,
        nprocs: int,
        args: list[str],
        logs: Path,
        name: str,
        *,
        expect_rc: int | None = 0,
        timeout: float = 420,
        module: str = "cat_jax.train",
    ):
        self.nprocs, self.name, self.expect_rc = nprocs, name, expect_rc
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAT_JAX_")}
        env.update(
            SUBPROCESS_ENV, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // nprocs}"
        )
        if nprocs > 1:
            env.update(
                CAT_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
                CAT_JAX_NUM_PROCESSES=str(nprocs),
                CAT_JAX_CPU_COLLECTIVES="gloo",
            )
        self.procs, self.files = [], []
        for i in range(nprocs):
            out, err = logs / f"{name}.{i}.stdout", logs / f"{name}.{i}.stderr"
            self.files.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *args],
                        cwd=REPO,
                        stdout=fo,
                        stderr=fe,
                        env=dict(env, CAT_JAX_PROCESS_ID=str(i)) if nprocs > 1 else env,
                    )
                )
        self.deadline = time.monotonic() + timeout

    def finish(self) -> list[Proc]:
        first_failure = None
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            if first_failure is None and any(p.poll() not in (None, 0) for p in self.procs):
                first_failure = now  # its peers may wait for it in a collective
            if now > self.deadline or (first_failure is not None and now > first_failure + 60):
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                for p in self.procs:
                    p.wait()
                break
            time.sleep(0.2)
        results = [
            Proc(i, p.returncode, out.read_text(), err.read_text())
            for i, (p, (out, err)) in enumerate(zip(self.procs, self.files))
        ]
        if self.expect_rc is not None:
            for r in results:
                if r.returncode != self.expect_rc:
                    raise AssertionError(
                        f"{self.name}: process {r.index}/{self.nprocs} exited {r.returncode} "
                        f"(expected {self.expect_rc})\nstdout:\n{r.stdout[-3000:]}\n"
                        f"stderr:\n{r.stderr[-6000:]}"
                    )
        return results


def _run_together(*jobs: Job) -> list[list[Proc]]:
    try:
        return [job.finish() for job in jobs]
    finally:
        for job in jobs:  # after a failure: stop the other jobs' processes too
            for p in job.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _params(model_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """A checkpoint's parameters restored in this (1-device) process: another mesh than it was
    written on."""
    from cat_jax import partitioning
    from cat_jax.frozen_model import load_frozen_model

    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    frozen = load_frozen_model(str(model_dir), mesh=mesh, rules=partitioning.logical_axis_rules(), step=step)
    return frozen.step, jax.tree_util.tree_map(np.asarray, frozen.params)


def _assert_params_close(a: Path, b: Path, step: int) -> None:
    step_a, pa = _params(a)
    step_b, pb = _params(b)
    assert step_a == step_b == step
    leaves_a = jax.tree_util.tree_leaves_with_path(pa)
    leaves_b = jax.tree_util.tree_leaves_with_path(pb)
    assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=0, atol=ATOL, err_msg=jax.tree_util.keystr(path))


def _train_rows(model_dir: Path) -> list[dict]:
    from cat_jax.metric_writers import read_jsonl

    return [r for r in read_jsonl(str(model_dir / "train_metrics.jsonl")) if "train/loss" in r]


def _events(directory: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the TensorBoard event files under `directory`."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            out += [(v.tag, event.step) for v in event.summary.value]
            pos += 16 + length
    return out


def _copy_at_step(src: Path, dst: Path, step: int) -> Path:
    """A copy of a model directory as the run left it when it stopped after saving `step`:
    later checkpoints, metric rows and TensorBoard files removed."""
    shutil.copytree(src, dst)
    for entry in dst.iterdir():
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > step:
            shutil.rmtree(entry)
    shutil.rmtree(dst / "tensorboard", ignore_errors=True)
    rows = [json.dumps(r) for r in _train_rows(src) if r["step"] <= step]
    (dst / "train_metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return dst


def _lead_summary(procs: list[Proc]) -> dict:
    return json.loads(procs[0].stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process and 2-process CE runs of STEPS steps, side by side."""
    root = tmp_path_factory.mktemp("mp")
    out = {"root": root, "logs": root / "logs"}
    jobs = []
    for n in (1, 2):
        # Only the 2-process run evaluates (greedy predictions fed and gathered by both hosts).
        eval_period = STEPS if n == 2 else 0
        args = train_args(
            "train_small_ce.gin", root / f"ce_{n}p", STEPS, *CE_ARGS, f"--gin.train.eval_period={eval_period}"
        )
        jobs.append(Job(n, args, out["logs"], f"ce_{n}p"))
    # The same CE run reading its data streamed (ArrayRecord shards through grain), 1 and 2 processes.
    import tasks  # noqa: F401  (registers the task to export)
    from cat_jax.data.stream_export import export_streaming_one

    export_streaming_one(TINY_TASK, "train", str(root / "stream"), max_examples=256, examples_per_shard=100)
    for n in (1, 2):
        jobs.append(
            Job(
                n,
                train_args("train_small_ce.gin", root / f"stream_{n}p", STEPS, *CE_ARGS, *_streaming_args(root)),
                out["logs"],
                f"stream_{n}p",
            )
        )
    names = [1, 2, "stream_1p", "stream_2p"]
    for name, procs in zip(names, _run_together(*jobs)):
        out[name] = (root / (f"ce_{name}p" if isinstance(name, int) else name), procs)
    return out


def _streaming_args(root: Path) -> tuple[str, ...]:
    return ("--gin.DatasetConfig.max_examples=None", f"--gin.data_source.streaming_dir='{root / 'stream'}'")


@pytest.fixture(scope="module")
def later_runs(runs):
    """Side by side: each CE run's step-2 checkpoint continued to STEPS by the other process
    count, a 2-process resume with another model config, and the CAT students (1 and 2
    processes) against the 1-process CE run as their tiny teacher."""
    root, logs = runs["root"], runs["logs"]
    jobs, out = {}, {}
    for writer, reader in ((2, 1), (1, 2)):
        name = f"resume_{writer}to{reader}"
        model_dir = _copy_at_step(runs[writer][0], root / name, 2)
        out[name] = model_dir
        jobs[name] = Job(reader, train_args("train_small_ce.gin", model_dir, STEPS, *CE_ARGS), logs, name)
    out["stream_2to1"] = _copy_at_step(runs["stream_2p"][0], root / "stream_2to1", 2)
    jobs["stream_2to1"] = Job(
        1,
        train_args("train_small_ce.gin", out["stream_2to1"], STEPS, *CE_ARGS, *_streaming_args(root)),
        logs,
        "stream_2to1",
    )
    out["locked"] = _copy_at_step(runs[1][0], root / "locked", 2)  # held by this (live) test process
    (out["locked"] / "trainer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    jobs["locked"] = Job(
        2, train_args("train_small_ce.gin", out["locked"], STEPS, *CE_ARGS), logs, "locked", expect_rc=None
    )
    out["mismatch"] = _copy_at_step(runs[1][0], root / "mismatch", 2)
    jobs["mismatch"] = Job(
        2,
        train_args("train_small_ce.gin", out["mismatch"], STEPS, *CE_ARGS, "--gin.T5Config.mlp_dim=48"),
        logs,
        "mismatch",
        expect_rc=None,
    )
    for n in (1, 2):
        out[f"cat_{n}p"] = root / f"cat_{n}p"
        jobs[f"cat_{n}p"] = Job(
            n,
            train_args("train_small_cat.gin", out[f"cat_{n}p"], 3, *COMMON, f"--gin.TEACHER_MODEL_DIR='{runs[1][0]}'"),
            logs,
            f"cat_{n}p",
        )
    for n in (1, 2):
        out[f"cache_{n}p"] = root / f"cache_{n}p"
        jobs[f"cache_{n}p"] = Job(n, _cache_args(out[f"cache_{n}p"], runs[1][0]), logs, f"cache_{n}p", module=CACHE)
    for name, procs in zip(jobs, _run_together(*jobs.values())):
        out[name] = (out[name], procs)
    return out


CACHE = "cat_jax.cache_teacher"


def _cache_args(cache_dir: Path, teacher_dir: Path) -> list[str]:
    """A teacher-cache pass of 3 steps (shards of 2) over the CE runs' batches, its top 4 kept."""
    return [
        "--gin_file=gin_configs/runs/cache_teacher.gin",
        MESH,
        f"--gin.load_split.cache_dir='{DATA_CACHE}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TINY_TASK}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
        "--gin.BATCH_SIZE=8",
        "--gin.DatasetConfig.max_examples=256",
        f"--gin.CACHE_DIR='{cache_dir}'",
        f"--gin.TEACHER_MODEL_DIR='{teacher_dir}'",
        "--gin.TRAIN_STEPS=3",
        "--gin.TEACHER_DTYPE='float32'",
        "--gin.cache_teacher.top_k=4",
        "--gin.cache_teacher.steps_per_shard=2",
    ]


def test_teacher_cache_of_two_processes_like_one(later_runs):
    """Each process feeds its rows, process 0 writes: the 2-process cache holds the 1-process bits
    (and the top-k ids; the log-probabilities within float rounding of the gathered shards)."""
    from cat_jax.objectives.teacher_cache import TEACHER_CORRECT, TOP_K_IDS, TOP_K_LOGPROBS, TeacherCache

    (one, _), (two, procs) = later_runs["cache_1p"], later_runs["cache_2p"]
    reports = [[line for line in p.stdout.splitlines() if line.startswith("{")] for p in procs]  # gloo logs too
    assert json.loads(reports[0][-1])["steps"] == 3 and reports[1] == []  # only process 0 reports
    a, b = TeacherCache(str(one)), TeacherCache(str(two))
    assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == ["manifest.json", "shard_00000", "shard_00001"]
    for step in range(3):
        x, y = a.entries(step), b.entries(step)
        np.testing.assert_array_equal(x[TEACHER_CORRECT], y[TEACHER_CORRECT])
        np.testing.assert_array_equal(x[TOP_K_IDS], y[TOP_K_IDS])
        np.testing.assert_allclose(x[TOP_K_LOGPROBS], y[TOP_K_LOGPROBS], atol=ATOL)
    assert 0 < np.mean(a.entries(0)[TEACHER_CORRECT]) < 1


def test_two_processes_train_like_one(runs):
    (one, p1), (two, p2) = runs[1], runs[2]
    assert "Runtime: 2 processes, 8 devices (4 local to each process)" in p2[0].stderr
    assert "mesh(data=4, fsdp=1, model=2) over 8 cpu devices" in p2[0].stderr
    _assert_params_close(one, two, STEPS)
    l1 = [r["train/loss"] for r in _train_rows(one)]
    l2 = [r["train/loss"] for r in _train_rows(two)]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    s1, s2 = _lead_summary(p1), _lead_summary(p2)
    assert s1["final_step"] == s2["final_step"] == STEPS
    assert set(s2["eval"]) == {"cmudict_syllables/accuracy"}


def test_only_process_zero_writes_logs_and_metrics(runs):
    model_dir, procs = runs[2]
    assert [r["step"] for r in _train_rows(model_dir)] == list(range(1, STEPS + 1))
    from cat_jax.metric_writers import read_jsonl

    eval_rows = [r for r in read_jsonl(str(model_dir / "train_metrics.jsonl")) if "train/loss" not in r]
    assert [r["step"] for r in eval_rows] == [STEPS]
    event_files = list((model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    losses = [step for tag, step in _events(model_dir / "tensorboard" / "train") if tag == "train/loss"]
    assert losses == list(range(1, STEPS + 1))
    info = json.loads((model_dir / "run_info.json").read_text())
    assert info["model_config"]["emb_dim"] == 32
    for name in ("config.gin", "operative_config.gin"):
        assert (model_dir / name).stat().st_size > 0
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no probe left
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["2", "4"]
    # Process 0 logs progress and prints the summary; process 1 only warnings, tagged with its id.
    assert "INFO step 4/4" in procs[0].stderr
    assert not [line for line in _cat_jax_lines(procs[1].stderr) if "INFO" in line]
    # (gloo's own C++ chatter on stdout may be split across lines, so only our summary is checked.)
    assert "final_step" in procs[0].stdout and "final_step" not in procs[1].stdout
    lines = _cat_jax_lines(procs[1].stderr)
    assert any("were truncated" in line for line in lines), lines
    assert all(line.split()[1] == "[p1/2]" for line in lines), lines


def _cat_jax_lines(stderr: str) -> list[str]:
    """The lines of the cat_jax logger (HH:MM:SS ...), not JAX's or gloo's."""
    return [line for line in stderr.splitlines() if len(line) > 8 and line[2] == ":" and line[5] == ":"]


@pytest.mark.parametrize("writer,reader", [(2, 1), (1, 2)])
def test_checkpoint_of_n_processes_resumes_on_m(runs, later_runs, writer, reader):
    """Step 2 saved by `writer` processes, continued to STEPS by `reader` processes, equals the
    uninterrupted runs (which agree with each other, see above)."""
    model_dir, procs = later_runs[f"resume_{writer}to{reader}"]
    assert "resuming from this run's checkpoint at step 2" in procs[0].stderr
    _assert_params_close(model_dir, runs[reader][0], STEPS)
    _assert_params_close(model_dir, runs[writer][0], STEPS)
    assert [r["step"] for r in _train_rows(model_dir)] == list(range(1, STEPS + 1))
    assert [s for t, s in _events(model_dir / "tensorboard" / "train") if t == "train/loss"] == [3, 4]


def test_streamed_data_two_processes_like_one_and_resumed_on_one(runs, later_runs):
    """Streamed through grain, each of 2 processes reads its half of every global batch; a
    2-process checkpoint (each process's iterator state in it) resumes on 1 process on the same
    stream: all three end equal."""
    (one, _), (two, p2) = runs["stream_1p"], runs["stream_2p"]
    resumed, pr = later_runs["stream_2to1"]
    assert "streamed by grain from ArrayRecord shards" in p2[0].stderr
    assert sorted(p.name for p in (two / "2" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert "resuming from this run's checkpoint at step 2" in pr[0].stderr
    _assert_params_close(one, two, STEPS)
    _assert_params_close(resumed, one, STEPS)
    l1, l2, lr = ([r["train/loss"] for r in _train_rows(d)] for d in (one, two, resumed))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(lr, l2, rtol=1e-5)


def test_different_model_config_is_refused_on_every_process(later_runs):
    """A 2-process resume with another model config fails on both processes with the named
    error, before any collective could leave one of them waiting."""
    model_dir, procs = later_runs["mismatch"]
    for p in procs:
        assert p.returncode == 2, p.stderr[-3000:]
        assert "holds a run of a different model" in p.stderr and "mlp_dim" in p.stderr
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["2"]


def test_a_held_model_dir_stops_every_process(later_runs):
    """Process 0 alone takes MODEL_DIR's lock; held by another trainer, every process exits 2 with
    a named error (none is left waiting in a collective), and the lock is left as it was."""
    model_dir, procs = later_runs["locked"]
    for p in procs:
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"is in use by another trainer: pid {os.getpid()} on host {socket.gethostname()}" in procs[0].stderr
    assert "could not be locked by process 0" in procs[1].stderr
    assert json.loads((model_dir / "trainer.lock").read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["2"]


def test_restore_into_another_structure_names_the_mismatch(runs):
    """The checkpoint layer's own check (the one behind a restore without run_info.json): a
    2-process checkpoint restored into a template of another model raises CheckpointError."""
    from cat_jax import partitioning
    from cat_jax.checkpoints import restore_params
    from cat_jax.errors import CheckpointError
    from cat_jax.models.t5 import T5Config, T5Model

    model_dir = runs[2][0]
    info = json.loads((model_dir / "run_info.json").read_text())
    config = T5Config.from_dict(info["model_config"])
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    for other in (config, config.replace(mlp_dim=48)):
        abstract, specs = T5Model(other).abstract_params()
        shardings = partitioning.tree_shardings(mesh, specs, partitioning.logical_axis_rules())
        template = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        if other is config:
            _, meta = restore_params(str(model_dir), template)  # another mesh is fine
            assert meta["step"] == STEPS
        else:
            with pytest.raises(CheckpointError, match=r"shape mismatch at 'params/.*mlp"):
                restore_params(str(model_dir), template)


def test_cat_student_two_processes_like_one(runs, later_runs):
    """CAT (mask small_or_large) against a tiny teacher trained by 1 process: the bfloat16 teacher
    is restored in shards on both processes, and the students end equal."""
    teacher = runs[1][0]
    (one, p1), (two, p2) = later_runs["cat_1p"], later_runs["cat_2p"]
    for procs in (p1, p2):
        assert f"Teacher: step {STEPS} of {teacher}, bfloat16 parameters" in procs[0].stderr
    _assert_params_close(one, two, 3)
    r1, r2 = _train_rows(one), _train_rows(two)
    assert [r["step"] for r in r2] == [1, 2, 3]
    for key in ("train/loss", "train/mask_fraction", "train/teacher_accuracy"):
        np.testing.assert_allclose([r[key] for r in r1], [r[key] for r in r2], rtol=1e-5)
