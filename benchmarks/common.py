"""Shared helpers of the throughput benchmarks: model shapes, timing, peak FLOP/s, JSON lines,
the HuggingFace twin of a `T5Config`, and running one implementation in a child process.

Nothing here imports JAX, torch or transformers at module level: the parent process of a
benchmark only orchestrates, and each implementation (ours in JAX, HuggingFace in torch) runs in
a child process of its own so that neither framework's allocator holds device memory the other
needs (JAX preallocates 75% of a GPU by default; torch's caching allocator keeps what it used).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "gin_configs" / "models"
T5_VOCAB = 32128  # the T5 SentencePiece vocabulary (padded), as T5 v1.1 checkpoints use

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched
# against jax / torch device names. Only reported beside the measured peak, never used instead.
NOMINAL_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


# ----------------------------------------------------------------------------- arguments


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def csv_ints(text: str) -> list[int]:
    return [int(t) for t in csv_list(text)]


def hf_available() -> bool:
    """torch and transformers importable (checked without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


# ----------------------------------------------------------------------------- model shapes

ONE_LAYER_MODEL_GIN = """import cat_jax.models
MODEL_CONFIG = @T5Config()
T5Config.emb_dim = {emb}
T5Config.num_heads = 2
T5Config.head_dim = 8
T5Config.mlp_dim = {mlp}
T5Config.num_encoder_layers = 1
T5Config.num_decoder_layers = 1
T5Config.dropout_rate = 0.0
"""


def one_layer_model(path: Path, emb: int) -> Path:
    """Writes (once) a 1+1-layer model file of width `emb` (MLP 2 x emb) for smoke runs: compiling
    a step takes seconds on CPU, where the shipped `tiny` (2+2 layers) takes twice that."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ONE_LAYER_MODEL_GIN.format(emb=emb, mlp=2 * emb))
    return path


def gin_file_of(size: str) -> Path:
    """`small` -> gin_configs/models/small.gin; a path to a .gin file is taken as it is."""
    path = Path(size) if size.endswith(".gin") else MODELS_DIR / f"{size}.gin"
    if not path.is_absolute():
        path = (REPO / path) if not path.exists() else path.resolve()
    if not path.exists():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.gin"))
        raise SystemExit(
            f"Unknown model size {size!r}: no {path}. Known sizes: {', '.join(known)} "
            f"(or pass a path to a model .gin file)."
        )
    return path


def model_config(size: str, dtype: str, vocab_size: int = T5_VOCAB):
    """The model config (its MODEL_CONFIG) the size's gin model file binds, with this vocabulary
    and compute dtype."""
    import gin

    from cat_jax import gin_utils

    gin.clear_config()
    gin_utils.parse_gin([str(gin_file_of(size))], [])
    config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
    config = config.replace(vocab_size=vocab_size, dtype=dtype)
    gin.clear_config()
    return config


def shape_fields(config) -> dict[str, Any]:
    return {
        "d_model": config.emb_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "d_kv": config.head_dim,
        "encoder_layers": config.num_encoder_layers,
        "decoder_layers": config.num_decoder_layers,
        "vocab_size": config.vocab_size,
    }


def hf_t5_config(config):
    """transformers.T5Config with exactly our shapes: gated-GELU, untied head, no dropout."""
    import transformers

    return transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.emb_dim,
        d_ff=config.mlp_dim,
        num_heads=config.num_heads,
        d_kv=config.head_dim,
        num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        layer_norm_epsilon=1e-6,
    )


# ----------------------------------------------------------------------------- timing


def time_steps(run: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `run` after `warmup` untimed ones.

    Every call is followed by `sync(result)` (block_until_ready / cuda.synchronize) inside the
    timed region, so each sample is one step's full device time plus its dispatch.
    """
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median (the reported figure), min and max of per-step seconds, in milliseconds."""
    return {
        "step_ms": round(1e3 * statistics.median(times), 3),
        "step_ms_min": round(1e3 * min(times), 3),
        "step_ms_max": round(1e3 * max(times), 3),
        "timed_steps": len(times),
    }


def nominal_peak_tflops(device_name: str) -> float | None:
    for key, value in NOMINAL_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def measure_peak_tflops(size: int | None = None, repeats: int = 20) -> dict[str, Any]:
    """Best bf16 matmul throughput (f32 accumulation) on JAX's default device.

    The peak model FLOPs utilisation is measured against: a [n, n] x [n, n] bf16 matmul (n = 8192
    on accelerators, 1024 on CPU unless given), warmed up, timed `repeats` times; the fastest
    run gives the peak (2 n^3 FLOPs).
    """
    import jax
    import jax.numpy as jnp

    if size is None:
        size = 1024 if jax.default_backend() == "cpu" else 8192
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), jnp.bfloat16)
    b = jax.random.normal(kb, (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    times = time_steps(lambda: matmul(a, b), lambda r: r.block_until_ready(), repeats, 3)
    best = min(times)
    return {
        "peak_tflops": round(2 * size**3 / best / 1e12, 3),
        "matmul_size": size,
        "matmul_ms_min": round(1e3 * best, 3),
        "matmul_ms_median": round(1e3 * statistics.median(times), 3),
    }


def jax_device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def torch_device() -> tuple[str, str]:
    """('cuda' or 'cpu', a readable name)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", f"gpu:{torch.cuda.get_device_name(0)}"
    return "cpu", "cpu:cpu"


def torch_sync(device: str) -> Callable[[Any], None]:
    import torch

    if device == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def compiled_peak_bytes(memory: dict[str, int]) -> int:
    """Per-device bytes a compiled step holds at its peak, from XLA's memory analysis (the
    `CompiledStep.memory` dict): arguments + outputs + temporaries - outputs aliased to arguments."""
    return (
        memory.get("argument_size_in_bytes", 0)
        + memory.get("output_size_in_bytes", 0)
        + memory.get("temp_size_in_bytes", 0)
        - memory.get("alias_size_in_bytes", 0)
    )


def memory_fields(memory: dict[str, int]) -> dict[str, int]:
    """`memory_{argument,output,temp,alias,peak}_bytes` of a compiled step ({} without an analysis)."""
    if not memory:
        return {}
    out = {
        f"memory_{kind}_bytes": memory.get(f"{kind}_size_in_bytes", 0)
        for kind in ("argument", "output", "temp", "alias")
    }
    out["memory_peak_bytes"] = compiled_peak_bytes(memory)
    return out


def untie_lm_head(model) -> None:
    """Give a HuggingFace T5 its own LM head, as ours has (T5 v1.1: `tie_word_embeddings=False`).

    transformers 5 ties T5's head to the shared embedding whatever the config says (4.x honoured
    the flag); a tied head would leave HuggingFace vocab x d_model fewer parameters to update
    than ours. The head keeps the embedding's values in a parameter of its own.
    """
    import torch

    if model.lm_head.weight is model.shared.weight:
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())


def versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


# ----------------------------------------------------------------------------- output


def emit(row: dict[str, Any]) -> None:
    """One measurement: one JSON line on stdout (progress and logs go to stderr)."""
    print(json.dumps(row, sort_keys=False), flush=True)


_START = time.perf_counter()


def note(message: str) -> None:
    """A progress line on stderr, with the seconds since this process started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def run_child(script: Path, args: Sequence[str], impl: str) -> list[dict[str, Any]]:
    """Run `script --impl impl args` in a fresh process; echo and return its JSON lines.

    HuggingFace children keep JAX (imported for the model configs) on the CPU, off the GPU.
    A child that fails is reported (its stderr passes through, an error row on stdout)
    without stopping the other implementations.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if impl.startswith("hf"):
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(script), *args, "--impl", impl]
    note(f"[{impl}] {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    rows = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            note(f"[{impl}] {line}")
            continue
        rows.append(row)
        emit(row)
    code = proc.wait()
    if code != 0:
        row = {
            "benchmark": "error",
            "impl": impl,
            "returncode": code,
            "message": f"{script.name} --impl {impl} exited with status {code}; see stderr",
        }
        rows.append(row)
        emit(row)
    return rows


class guarded:
    """`with guarded(fields):` a failed measurement (out of memory, say) becomes an error row
    with `fields`, and the benchmark goes on with the next one."""

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception):
            return False
        import traceback

        note("".join(traceback.format_exception(kind, error, tb))[-4000:])
        emit({**self.fields, "error": f"{kind.__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"})
        return True


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if not ours or not theirs:
        return None
    return round(ours / theirs, 3)


def index_rows(rows: Iterable[dict[str, Any]], benchmark: str, keys: Sequence[str]) -> dict:
    """{(row[k] for k in keys): row} of the rows of one benchmark kind."""
    return {tuple(r.get(k) for k in keys): r for r in rows if r.get("benchmark") == benchmark}


def anon_mib() -> float:
    """This process's anonymous resident memory (RssAnon: not counting file pages the kernel can drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def peak_anon_mib() -> Iterator[dict[str, float]]:
    """Samples `anon_mib` every 5 ms inside the block; the yielded dict then holds `baseline` (at
    entry) and `peak_above_baseline` (MiB)."""
    out = {"baseline": anon_mib(), "peak_above_baseline": 0.0}
    peak, done = [out["baseline"]], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield out
    finally:
        done.set()
        watcher.join()
        out["peak_above_baseline"] = peak[0] - out["baseline"]
