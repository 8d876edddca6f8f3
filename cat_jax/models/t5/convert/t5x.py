"""T5X checkpoints -> cat_jax parameter trees: the legacy format and the Orbax format.

Legacy (`t5x.checkpoints.Checkpointer`): `checkpoint_<step>/checkpoint` is a msgpack of
`{"version": ..., "optimizer": {"target": params, "state": {...}}}` whose leaves are either arrays
(small, unpartitioned ones) or TensorStore specs of zarr arrays written beside it, named by their
path with dots (`target.encoder.layers_0.attention.query.kernel`). A spec's path is relative to
the checkpoint directory; a checkpoint written to GCS holds `gcs` kvstore specs, which are
re-pointed at the local copy (the directory the `checkpoint` file is in).

Orbax (`t5x.checkpoints.OrbaxCheckpointManagerInterface`): `checkpoint_<step>/state/` is an Orbax
PyTree checkpoint (`_METADATA`, OCDBT) of the same `{"target": ..., "state": ...}` tree.

Only `target` (the parameters) is read, one array at a time. T5X's parameter names are cat_jax's
(the network was modelled on T5X's) except the norms: `pre_attention_layer_norm` ->
`pre_attention_norm` and likewise for `pre_self_attention`, `pre_cross_attention` and `pre_mlp`.
The model shape is read from the tree (layer counts, widths, heads from the relative-bias table,
relu (`wi`) vs gated (`wi_0`, `wi_1`) MLP, tied logits when there is no `logits_dense`); what
the tree cannot tell (GELU vs SiLU, the relative-position max distance, the layer-norm epsilon)
comes from a T5X gin file when given (`network.T5Config.*` bindings), else T5's defaults.
"""

from __future__ import annotations

import ast
import copy
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cat_jax.errors import ConversionError
from cat_jax.models.convert.tree import as_float32, check_names_and_shapes, flatten
from cat_jax.models.t5.config import T5Config

log = logging.getLogger("cat_jax")

_NORMS = {
    "pre_attention_layer_norm": "pre_attention_norm",
    "pre_self_attention_layer_norm": "pre_self_attention_norm",
    "pre_cross_attention_layer_norm": "pre_cross_attention_norm",
    "pre_mlp_layer_norm": "pre_mlp_norm",
}
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def _step_dir(directory: str) -> str:
    """The checkpoint_<step> directory: `directory` itself, or the newest one inside it."""
    if os.path.isfile(os.path.join(directory, "checkpoint")) or os.path.isdir(os.path.join(directory, "state")):
        return directory
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(directory)
        if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(directory, name))
    )
    if not steps:
        raise ConversionError(
            f"{directory} is not a T5X checkpoint (no `checkpoint` file, no `state/`, "
            "no checkpoint_<step> directories)."
        )
    chosen = os.path.join(directory, steps[-1][1])
    log.info("T5X model directory %s: importing its newest checkpoint, %s.", directory, steps[-1][1])
    return chosen


def detect(directory: str) -> str | None:
    """ "t5x_legacy", "t5x_orbax" or None for a directory (a checkpoint_<step> or its parent)."""
    try:
        step = _step_dir(directory)
    except (ConversionError, OSError):
        return None
    if os.path.isdir(os.path.join(step, "state")):
        return "t5x_orbax"
    path = os.path.join(step, "checkpoint")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(21)
        return None if head == b"model_checkpoint_path" else "t5x_legacy"  # a TF checkpoint index
    return None


def ours(t5x_path: str) -> str:
    """cat_jax's name of a T5X `target` path."""
    return "/".join(_NORMS.get(part, part) for part in t5x_path.split("/"))


# ---------------------------------------------------------------------------------------------
# Readers: {t5x path: shape} and a loader of one array.


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "driver" in value and ("kvstore" in value or "path" in value)


def local_spec(spec: Mapping[str, Any], step_dir: str) -> dict[str, Any]:
    """A TensorStore spec of a legacy checkpoint, pointed at the file under `step_dir`.

    Relative paths (what t5x writes) are joined to `step_dir`; a `gcs` kvstore (a checkpoint
    written to a bucket, its bucket name replaced by a dummy) becomes a `file` kvstore on the
    local copy; both the tensorstore>=0.1.14 layout (`kvstore.path`) and the older top-level
    `path` are understood.
    """
    spec = copy.deepcopy(dict(spec))
    kvstore = dict(spec.get("kvstore") or {})
    path = kvstore.pop("path", None) or spec.pop("path", None)
    if path is None:
        raise ConversionError(f"A TensorStore spec in {step_dir}/checkpoint has no path: {spec}.")
    if kvstore.get("driver") in ("gcs", "gfile", "file", None) or not kvstore:
        if os.path.isabs(path) and not os.path.exists(path):
            path = os.path.basename(path)  # an absolute path of the machine that wrote it
        spec["kvstore"] = {"driver": "file", "path": path if os.path.isabs(path) else os.path.join(step_dir, path)}
    else:
        raise ConversionError(f"Unsupported TensorStore kvstore {kvstore.get('driver')!r} in {step_dir}.")
    spec.pop("path", None)
    return spec


class LegacyCheckpoint:
    def __init__(self, directory: str):
        from flax import serialization  # pylint: disable=import-outside-toplevel

        self.step_dir = _step_dir(directory)
        with open(os.path.join(self.step_dir, "checkpoint"), "rb") as f:
            contents = serialization.msgpack_restore(f.read())
        optimizer = contents.get("optimizer", contents) if isinstance(contents, Mapping) else None
        if not isinstance(optimizer, Mapping) or "target" not in optimizer:
            raise ConversionError(
                f"{self.step_dir}/checkpoint is a msgpack without optimizer.target: not a T5X checkpoint."
            )
        self.leaves = flatten(optimizer["target"], is_leaf=_is_spec)
        self.step = _legacy_step(optimizer)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for path, leaf in self.leaves.items():
            out[path] = tuple(leaf["metadata"]["shape"]) if _is_spec(leaf) else tuple(np.shape(leaf))
        return out

    def get(self, path: str) -> np.ndarray:
        import tensorstore as ts  # pylint: disable=import-outside-toplevel

        leaf = self.leaves[path]
        if not _is_spec(leaf):
            return np.asarray(leaf)
        spec = local_spec(leaf, self.step_dir)
        try:
            return np.asarray(ts.open(spec, open=True).result().read().result())
        except Exception as e:  # pylint: disable=broad-except  # tensorstore raises ValueError & co
            raise ConversionError(f"Cannot read {path} of {self.step_dir} from {spec['kvstore']['path']}: {e}") from e


def _legacy_step(optimizer: Mapping[str, Any]) -> int | None:
    step = (optimizer.get("state") or {}).get("step")
    try:
        return int(np.asarray(step)) if step is not None else None
    except (TypeError, ValueError):
        return None


class OrbaxCheckpoint:
    def __init__(self, directory: str):
        import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

        self._ocp = ocp
        self.step_dir = _step_dir(directory)
        self.path = os.path.join(self.step_dir, "state")
        self._checkpointer = ocp.PyTreeCheckpointer()
        metadata = self._checkpointer.metadata(self.path)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, Mapping) or "target" not in tree:
            raise ConversionError(f"{self.path} is an Orbax checkpoint without a `target` tree: not a T5X checkpoint.")
        self.meta = flatten(tree["target"])
        self.step = None
        match = _STEP_DIR.match(os.path.basename(self.step_dir))
        if match:
            self.step = int(match.group(1))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {path: tuple(getattr(m, "shape", ()) or ()) for path, m in self.meta.items()}

    def get(self, path: str) -> np.ndarray:
        ocp = self._ocp
        node: dict[str, Any] = {}
        cursor = node
        parts = ["target", *path.split("/")]
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        meta = self.meta[path]
        cursor[parts[-1]] = np.zeros(tuple(meta.shape), dtype=getattr(meta, "dtype", np.float32))
        restore_args = {"target": _restore_args(node["target"], ocp)}
        restored = self._checkpointer.restore(
            self.path, args=ocp.args.PyTreeRestore(item=node, restore_args=restore_args, partial_restore=True)
        )
        value = restored
        for part in parts:
            value = value[part]
        return np.asarray(value)


def _restore_args(tree: Mapping[str, Any], ocp: Any) -> dict[str, Any]:
    return {
        k: _restore_args(v, ocp) if isinstance(v, Mapping) else ocp.RestoreArgs(restore_type=np.ndarray)
        for k, v in tree.items()
    }


# ---------------------------------------------------------------------------------------------
# The model shape: from the tree, and from a T5X gin file.

_GIN_FIELDS = {
    "emb_dim": "emb_dim",
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "mlp_dim": "mlp_dim",
    "num_encoder_layers": "num_encoder_layers",
    "num_decoder_layers": "num_decoder_layers",
    "vocab_size": "vocab_size",
    "logits_via_embedding": "logits_via_embedding",
}
_GIN_ACTIVATIONS = {
    ("relu",): "relu",
    ("gelu", "linear"): "gated-gelu",
    ("silu", "linear"): "gated-silu",
    ("swish", "linear"): "gated-silu",
}


def gin_overrides(path: str) -> dict[str, Any]:
    """T5Config fields bound by a T5X gin file (`network.T5Config.<field> = <literal>`, macros of
    literals included)."""
    with open(path) as f:
        text = f.read()
    macros = {m.group(1): m.group(2).strip() for m in re.finditer(r"^([A-Z_][A-Z0-9_]*)\s*=\s*(.+)$", text, re.M)}
    out: dict[str, Any] = {}
    for match in re.finditer(r"^(?:[\w.]+\.)?T5Config\.(\w+)\s*=\s*(.+)$", text, re.M):
        field, raw = match.group(1), match.group(2).strip()
        if raw.startswith("%"):
            raw = macros.get(raw[1:], raw)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            continue
        if field in _GIN_FIELDS:
            out[_GIN_FIELDS[field]] = value
        elif field == "mlp_activations":
            activation = _GIN_ACTIVATIONS.get(tuple(value))
            if activation is None:
                raise ConversionError(
                    f"{path}: mlp_activations={value!r} is not one cat_jax supports "
                    f"({', '.join(str(k) for k in _GIN_ACTIVATIONS)})."
                )
            out["mlp_activation"] = activation
    return out


def config_from_tree(
    shapes: Mapping[str, tuple[int, ...]], where: str, overrides: Mapping[str, Any] | None = None
) -> T5Config:
    """The T5Config a T5X `target` tree ({t5x path: shape}) describes; `overrides` (from a gin
    file) win over what the tree suggests."""

    def count(stack: str) -> int:
        found = {int(m.group(1)) for p in shapes if (m := re.match(rf"^{stack}/layers_(\d+)/", p))}
        return max(found) + 1 if found else 0

    try:
        vocab, emb = shapes["token_embedder/embedding"]
        heads, buckets = shapes["encoder/relpos_bias/rel_embedding"]
        joined = shapes["encoder/layers_0/attention/query/kernel"][1]
        gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
        mlp = shapes["encoder/layers_0/mlp/" + ("wi_0" if gated else "wi") + "/kernel"][1]
    except KeyError as e:
        raise ConversionError(
            f"{where}: the T5X target tree lacks {e.args[0]!r}; it is not a T5 "
            f"encoder-decoder checkpoint (its entries start with {sorted(shapes)[:6]})."
        ) from e
    values: dict[str, Any] = dict(
        vocab_size=int(vocab),
        emb_dim=int(emb),
        num_heads=int(heads),
        head_dim=int(joined) // int(heads),
        mlp_dim=int(mlp),
        num_encoder_layers=count("encoder"),
        num_decoder_layers=count("decoder"),
        relative_attention_num_buckets=int(buckets),
        mlp_activation="gated-gelu" if gated else "relu",
        logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
    )
    values.update(overrides or {})
    try:
        return T5Config(**values)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: the tree and gin file give no valid T5Config ({values}): {e}") from e


def read(
    directory: str, gin_file: str | None = None
) -> tuple[T5Config, dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """(config, provenance, iterator over (our path, float32 array)) of a T5X checkpoint."""
    kind = detect(directory)
    if kind is None:
        raise ConversionError(f"{directory} is not a T5X checkpoint.")
    reader = OrbaxCheckpoint(directory) if kind == "t5x_orbax" else LegacyCheckpoint(directory)
    shapes = reader.shapes()
    overrides = gin_overrides(gin_file) if gin_file else {}
    config = config_from_tree(shapes, reader.step_dir, overrides)
    check_names_and_shapes(config, {ours(p): s for p, s in shapes.items()}, f"T5X checkpoint {reader.step_dir}")
    info = {"format": kind, "step_dir": reader.step_dir, "t5x_step": reader.step, "gin_file": gin_file}

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for path in shapes:
            yield ours(path), as_float32(reader.get(path))

    return config, info, tensors()
