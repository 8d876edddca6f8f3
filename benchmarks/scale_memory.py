"""Per-device memory of the CAT step with and without rematerialisation, and compile seconds of
scanned and per-layer stacks, from XLA's analysis of abstract shapes (nothing is allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_memory.py \
        [--pairs=t5,decoder] [--remat=none,full,save_dot] [--batch=32] [--inputs=512] [--targets=128] \
        [--mesh=fsdp=-1] [--compile_layers=4,12,24] [--compile_model=small] [--skip=memory|compile]

Memory rows (`"kind": "memory"`): the CAT step (CAT-Xent, the small-or-large mask) of each pair,
one row per remat policy: `t5` = T5 v1.1 large student (float32 parameters, bfloat16 compute) with
an xl teacher (bfloat16), `decoder` = Llama 3.2 1B student with a Llama 3.1 8B teacher
(gin_configs/models/decoder/llama3_2_1b.gin, llama3_1_8b.gin), on the mesh `--mesh` (default: every
device on fsdp). The student's layers are scanned unless `--scan_student=0` (a per-layer stack of
24 + 24 layers compiles for more than ten minutes on a 2-core CPU). The teacher runs scanned (its
forward pass keeps no activations for a backward pass, so its layout changes its compile time, not
the step's memory). `peak_bytes` = arguments + outputs + temporaries - aliased outputs, per
device. `--student=FILE --teacher=FILE` (T5 gin model files) measure that pair instead.

Compile rows (`"kind": "compile"`): seconds to compile the CE train step of `--compile_model`'s
widths with 4, 12 and 24 layers (encoder and decoder each for T5; a path to a decoder gin file
works too), scanned and per layer, on the same mesh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cat_step_memory import STEPS, measure, parse_meshes  # noqa: E402
from benchmarks.common import REPO, compiled_peak_bytes, csv_ints, csv_list, model_config  # noqa: E402

DECODERS = REPO / "gin_configs" / "models" / "decoder"
LLAMA3_VOCAB = 128256
PAIRS = {
    "t5": ("large", "xl", None),
    "decoder": (str(DECODERS / "llama3_2_1b.gin"), str(DECODERS / "llama3_1_8b.gin"), LLAMA3_VOCAB),
}
GIB = 2**30


def _config(size: str, dtype: str, vocab: int | None):
    return model_config(size, dtype) if vocab is None else model_config(size, dtype, vocab)


def memory_rows(
    pairs: list[str], policies: list[str], batch: int, li: int, lt: int, mesh: list, scan_student: bool
) -> list[dict]:
    rows = []
    for pair in pairs:
        student_size, teacher_size, vocab = PAIRS[pair]
        student = _config(student_size, "bfloat16", vocab).replace(scan_layers=scan_student)
        teacher = _config(teacher_size, "bfloat16", vocab).replace(scan_layers=True)
        for policy in policies:
            row = measure(student.replace(remat_policy=policy), teacher, STEPS["cat"], batch, li, lt, mesh)
            peak = compiled_peak_bytes(row)
            rows.append(
                {
                    "kind": "memory",
                    "pair": pair,
                    "student": Path(student_size).stem,
                    "teacher": Path(teacher_size).stem,
                    "remat": policy,
                    "scan_student": scan_student,
                    "batch": batch,
                    "inputs": li,
                    "targets": lt,
                    **row,
                    "peak_bytes": peak,
                    "peak_gib": round(peak / GIB, 2),
                    "temp_gib": round(row.get("temp_size_in_bytes", 0) / GIB, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _with_layers(config, layers: int):
    if hasattr(config, "num_encoder_layers"):
        return config.replace(num_encoder_layers=layers, num_decoder_layers=layers)
    return config.replace(num_layers=layers)


def compile_rows(size: str, layer_counts: list[int], batch: int, li: int, lt: int, mesh: list) -> list[dict]:
    base = model_config(size, "bfloat16")  # (a decoder file's vocabulary replaced by T5's: compile time barely sees it)
    rows = []
    for scanned in (True, False):
        for layers in layer_counts:
            config = _with_layers(base, layers).replace(scan_layers=scanned)
            row = measure(config, None, STEPS["ce"], batch, li, lt, mesh)
            rows.append(
                {
                    "kind": "compile",
                    "model": Path(size).stem,
                    "layers": layers,
                    "scan_layers": scanned,
                    "compile_seconds": row["compile_seconds"],
                    "mesh": row["mesh"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="t5,decoder", help=f"a comma-separated subset of {list(PAIRS)}")
    p.add_argument("--student", default="", help="with --teacher: measure this pair (gin model files) instead")
    p.add_argument("--teacher", default="")
    p.add_argument("--remat", default="none,full,save_dot")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--mesh", default="fsdp=-1", help="one mesh shape, e.g. 'fsdp=-1' or 'data=2,fsdp=4'")
    p.add_argument("--compile_layers", default="4,12,24")
    p.add_argument("--compile_model", default="small", help="a T5 size or a gin model file")
    p.add_argument("--compile_batch", type=int, default=8)
    p.add_argument("--compile_lengths", default="128,32", help="inputs,targets of the compile rows")
    p.add_argument("--scan_student", type=int, default=1, help="1: the student's layers scanned (as MaxText runs)")
    p.add_argument("--skip", default="", help="'memory' or 'compile' to leave that part out")
    a = p.parse_args()
    (mesh,) = parse_meshes(a.mesh)
    print(json.dumps({"kind": "setup", "backend": jax.default_backend(), "devices": jax.device_count()}), flush=True)
    pairs = csv_list(a.pairs)
    if a.student:
        PAIRS["custom"], pairs = (a.student, a.teacher, None), ["custom"]
    if a.skip != "memory":
        memory_rows(pairs, csv_list(a.remat), a.batch, a.inputs, a.targets, mesh, bool(a.scan_student))
    if a.skip != "compile":
        li, lt = csv_ints(a.compile_lengths)
        compile_rows(a.compile_model, csv_ints(a.compile_layers), a.compile_batch, li, lt, mesh)


if __name__ == "__main__":
    main()
