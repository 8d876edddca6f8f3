"""Peak memory of a compiled CAT train step against a CE step, from XLA's memory analysis.

    python benchmarks/cat_step_memory.py --student=small --teacher=base --batch=32 \
        --inputs=512 --targets=128 [--dtype=bfloat16] [--steps=ce,cat,cat_distill] \
        [--meshes='data=-1;fsdp=-1;data=-1,model=2;data=-1,model=4'] [--microbatches=1,4,8]

Nothing is allocated: the steps are lowered and compiled from abstract shapes on the local
backend (CPU here, GPU/TPU where available), and XLA's per-device argument / output / temporary
bytes are printed as one JSON line per step and mesh. `--meshes` lists mesh shapes separated by
`;`, each `axis=size,...` over the axes data / fsdp / model (unnamed axes are 1; a size of -1
takes the devices left, otherwise the mesh uses the first devices it needs); the default is one
mesh, every device on `data`. On CPU, force devices for the mesh shapes:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`. The activation sharding rules are the
trainer's (`partitioning.logical_axis_rules()`). `--microbatches` lists the step's
`train.num_microbatches` values to compile (1: one pass, the default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import compiled_peak_bytes, model_config  # noqa: E402
from cat_jax import (
    models,  # noqa: E402
    partitioning,  # noqa: E402
)
from cat_jax.objectives.token_loss import LossOptions, token_loss  # noqa: E402
from cat_jax.optimizers import make_optimizer  # noqa: E402
from cat_jax.train_state import state_shardings  # noqa: E402
from cat_jax.train_step import compile_train_step, make_train_step  # noqa: E402

STEPS = {
    "ce": LossOptions(),
    "cat": LossOptions(mask="small_or_large"),
    "cat_distill": LossOptions(mask="small_or_large", alpha=0.5),
}


def parse_meshes(text: str) -> list[list[tuple[str, int]]]:
    """'data=-1;data=-1,model=2' -> [[('data', -1)], [('data', -1), ('model', 2)]]."""
    meshes = []
    for mesh in filter(None, (m.strip() for m in text.split(";"))):
        axes = [tuple(a.split("=")) for a in mesh.split(",")]
        unknown = {name for name, _ in axes} - set(partitioning.MESH_AXES)
        if unknown or any(len(a) != 2 for a in axes):
            raise SystemExit(f"--meshes: {mesh!r} is not axis=size,... over {partitioning.MESH_AXES}")
        meshes.append([(name, int(size)) for name, size in axes])
    return meshes


def measure(
    student: Any,
    teacher: Any,
    loss: LossOptions,
    batch: int,
    li: int,
    lt: int,
    mesh_shape: list[tuple[str, int]],
    microbatches: int = 1,
) -> dict:
    """The compiled train step of `student` (with `teacher`'s logits for a CAT step, None for CE)
    on a mesh of `mesh_shape`: compile seconds and XLA's per-device memory analysis (any family:
    the batch is the student's `batch_shapes` at inputs `li`, targets `lt`)."""
    sizes = [size for _, size in mesh_shape]
    # A mesh with every size given takes the first devices it needs (data=2: two of eight).
    devices = jax.devices()[: math.prod(sizes)] if min(sizes) > 0 else None
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    model = models.build(student)
    rules = model.fit_rules(mesh.shape, partitioning.logical_axis_rules())
    tx, schedule = make_optimizer(1000)
    abstract, shardings = state_shardings(model, tx, mesh, rules)
    shapes = model.batch_shapes({"inputs": li, "targets": lt}, batch)
    teacher_fn = t_abstract = t_shardings = None
    if teacher is not None:
        t_model = models.build(teacher)
        t_params, t_specs = t_model.abstract_params()
        t_abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, teacher.compute_dtype), t_params)
        t_shardings = partitioning.tree_shardings(mesh, t_specs, t_model.fit_rules(mesh.shape, rules))
        teacher_fn = t_model.logits
    step = make_train_step(
        token_loss(model, loss), tx, schedule, teacher_fn, num_microbatches=microbatches if microbatches > 1 else None
    )
    start = time.perf_counter()
    compiled = compile_train_step(
        step,
        abstract,
        shardings,
        shapes,
        partitioning.batch_sharding(mesh, rules),
        t_abstract,
        t_shardings,
        mesh,
        rules,
    )
    return {
        "mesh": dict(mesh.shape),
        "microbatches": microbatches,
        "compile_seconds": round(time.perf_counter() - start, 1),
        **compiled.memory,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="small")
    p.add_argument("--teacher", default="base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", default="ce,cat,cat_distill", help=f"a comma-separated subset of {list(STEPS)}")
    p.add_argument("--meshes", default="data=-1", help="mesh shapes separated by ';', e.g. 'data=-1;data=-1,model=2'")
    p.add_argument("--microbatches", default="1", help="train.num_microbatches values, e.g. '1,4,8' (1: one pass)")
    a = p.parse_args()
    names = a.steps.split(",")
    if set(names) - set(STEPS):
        raise SystemExit(f"--steps: unknown {sorted(set(names) - set(STEPS))}; choose from {list(STEPS)}")
    student = model_config(a.student, a.dtype)
    teacher = model_config(a.teacher, "bfloat16")
    common = {
        "student": a.student,
        "batch": a.batch,
        "inputs": a.inputs,
        "targets": a.targets,
        "dtype": a.dtype,
        "backend": jax.default_backend(),
    }
    for mesh_shape in parse_meshes(a.meshes):
        for name in names:
            for n in (int(x) for x in a.microbatches.split(",")):
                t = None if name == "ce" else teacher
                row = measure(student, t, STEPS[name], a.batch, a.inputs, a.targets, mesh_shape, n)
                row["peak_bytes"] = compiled_peak_bytes(row)
                print(json.dumps({"step": name, "teacher": a.teacher if t else None, **common, **row}), flush=True)


if __name__ == "__main__":
    main()
