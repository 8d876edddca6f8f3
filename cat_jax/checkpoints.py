"""Orbax checkpoints: one directory per step holding the train state and a JSON metadata dict.

Layout written by `Checkpointer` (orbax `CheckpointManager`):

    <directory>/<step>/state/      the state pytree (params, opt_state, step, rng, ...)
    <directory>/<step>/metadata/   a JSON dict (model config, teacher, gin config hash, ...)
                                   plus "step": the checkpoint's step

A save is written into `<step>.orbax-checkpoint-tmp*` and renamed when complete, so a save
killed half-way leaves only a temporary directory; every read here ignores it and the next
save works. Restores check the template's structure and shapes against the checkpoint first
and fail with `CheckpointError` naming the first mismatching key path.

With several processes (`jax.distributed`), every process calls save and restore with the same
arguments: each writes and reads only the shards its devices hold, process 0 writes the metadata
and finalizes the step directory. A checkpoint does not record the mesh: one written by N
processes restores on M processes or on a different mesh, into the shardings of the template.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cat_jax.errors import CheckpointError

PyTree = Any

_STATE = "state"
_METADATA = "metadata"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {_STATE: ocp.PyTreeCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}


def _key_name(key: Any) -> str:
    """One key-path entry as orbax names it on disk."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _flat_shapes(tree: PyTree, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """`{"params/encoder/kernel": shape, ...}` for every leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        prefix + "/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in leaves
    }


def _check_structure(template: PyTree, saved: PyTree, where: str, prefix: str = "") -> None:
    """Raise CheckpointError on the first key or shape where `template` and `saved` differ.

    `prefix` is prepended to the template's key paths (e.g. "params/" when the template is
    only the params subtree); saved leaves outside the prefix are not compared.
    """
    want = _flat_shapes(template, prefix)
    have = _flat_shapes(saved)
    for key, shape in want.items():
        if key not in have:
            raise CheckpointError(
                f"Checkpoint {where} has no entry {key!r} that the template asks for "
                f"(template shape {shape}); its entries start with {sorted(have)[:5]}. "
                "Restore with the model/optimizer config the checkpoint was written with, "
                "or start a new model directory."
            )
        if have[key] != shape:
            raise CheckpointError(
                f"Checkpoint {where}: shape mismatch at {key!r}: checkpoint {have[key]}, "
                f"template {shape}. Restore with the model config the checkpoint was "
                "written with, or start a new model directory."
            )
    extra = sorted(k for k in have if k.startswith(prefix) and k not in want)
    if extra:
        raise CheckpointError(
            f"Checkpoint {where} has entry {extra[0]!r} (shape {have[extra[0]]}) that the "
            "template lacks. Restore with the model/optimizer config the checkpoint was "
            "written with, or start a new model directory."
        )


def _restore_args(template: PyTree) -> PyTree:
    """Per-leaf restore args: dtype and sharding taken from the template's leaves."""
    return ocp.checkpoint_utils.construct_restore_args(template)


def _pick_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(
            f"Checkpoint directory {directory} holds no finished checkpoint (temporary "
            "directories of interrupted saves are ignored). Point to a directory with a "
            "finished checkpoint, or train from scratch."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"Checkpoint directory {directory} has no step {step}; available steps: {steps}. "
            "Pass one of those steps, or None for the latest."
        )
    return step


def _read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    return dict(restored[_METADATA])


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> PyTree:
    return manager.item_metadata(step)[_STATE].tree


class Checkpointer:
    """Saves and restores `(state, metadata)` every `save_interval_steps`, keeping the last
    `max_to_keep` (None keeps all).

    Saves are synchronous unless `async_save=True`; with async saves call `wait()` before
    reading the checkpoint or exiting (`close()` waits too).
    """

    def __init__(
        self,
        directory: str,
        save_interval_steps: int,
        max_to_keep: int | None,
        async_save: bool = False,
    ):
        self.directory = os.path.abspath(directory)  # orbax needs absolute paths
        _ensure_writable(self.directory)
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            multiprocessing_options=_multiprocessing_options(),
        )
        self._manager = ocp.CheckpointManager(
            epath.Path(self.directory), options=options, item_handlers=_item_handlers()
        )

    def latest_step(self) -> int | None:
        """The newest finished step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finished steps, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True when `step` is on the save interval and newer than the latest checkpoint.

        (orbax alone would also say True for the first step of a fresh directory, an off-interval
        save that costs every host a cooperative write; the interval is checked here too.)
        """
        interval = self.save_interval_steps
        if interval and step % interval:
            return False
        return self._manager.should_save(step)

    def save(self, step: int, state: PyTree, metadata: dict, force: bool = False) -> bool:
        """Save `state` and `metadata` at `step` if due (always if `force`); True if saved.

        The saved metadata gets `"step": step` added, so every reader learns the step it got.
        A step that is already saved is left as it is (returns False).
        """
        metadata = {**metadata, "step": int(step)}
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise CheckpointError(
                f"Checkpoint metadata for {self.directory} step {step} is not JSON: {e}. "
                "Convert its values to str/int/float/list/dict."
            ) from e
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{_STATE: ocp.args.PyTreeSave(state), _METADATA: ocp.args.JsonSave(metadata)}
        )
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, state_template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restore `(state, metadata)` at `step` (default: latest) into `state_template`'s
        structure, dtypes and shardings (leaves: jax arrays or jax.ShapeDtypeStruct)."""
        step = _pick_step(self._manager, self.directory, step)
        where = f"{self.directory} step {step}"
        _check_structure(state_template, _saved_tree(self._manager, step), where)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    item=state_template, restore_args=_restore_args(state_template)
                ),
                _METADATA: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[_STATE], dict(restored[_METADATA])

    def read_metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved at `step` (default: latest)."""
        return _read_metadata(self._manager, _pick_step(self._manager, self.directory, step))

    def wait(self) -> None:
        """Block until an asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.close()


def _host_array_registry() -> Any:
    """orbax's type handlers, except that numpy arrays are written without a defensive copy, so
    memory-mapped arrays stream from disk to disk (orbax copies every host array by default)."""
    pairs = [(ty, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False) if ty is np.ndarray
              else ocp.type_handlers.get_type_handler(ty))
             for ty in ocp.type_handlers.supported_types()]
    return ocp.type_handlers.create_type_handler_registry(*pairs)


def save_host_state(directory: str, step: int, state: PyTree, metadata: dict) -> None:
    """Write `state` (a pytree of numpy arrays, e.g. memory-mapped) as step `step` of a checkpoint
    directory in `Checkpointer`'s layout, without copying the arrays into memory (one process).

    `cat_jax.import_checkpoint` writes `{"params": ...}` this way, so an imported model larger than
    host memory streams to disk; `restore_params` and `load_frozen_model` read it like any other.
    """
    directory = os.path.abspath(directory)
    handlers = {_STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_host_array_registry(),
                                                    use_ocdbt=False),
                _METADATA: ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(multiprocessing_options=_multiprocessing_options())
    with ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers) as manager:
        manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(state),
                                                      _METADATA: ocp.args.JsonSave({**metadata, "step": step})}),
                     force=True)
        manager.wait_until_finished()


def _multiprocessing_options() -> ocp.options.MultiprocessingOptions:
    """Every process writes its own shards of the arrays; process 0 (the primary host) alone
    creates and renames the step directories, writes the metadata and deletes old steps, after
    barriers that every process joins (so all processes must call save/restore together)."""
    return ocp.options.MultiprocessingOptions(primary_host=0)


def _ensure_writable(directory: str) -> None:
    """Create `directory` and prove a file can be written there, or raise CheckpointError.

    Every process checks (each writes its own shards); the probe's name is unique per process and
    `mkdir(exist_ok=True)` tolerates the other processes creating the directory at the same time.
    """
    path = epath.Path(directory)
    probe = path / f".write_probe_{jax.process_index()}_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"Checkpoint directory {directory} cannot be created or written ({e}). "
            "Choose a writable model directory."
        ) from e


def latest_finished_step(directory: str) -> int:
    """The newest finished step in a Checkpointer directory, found without restoring anything;
    CheckpointError when the directory is missing or holds no finished checkpoint."""
    path = epath.Path(os.path.abspath(directory))
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist. Pass the model directory of a "
                              "finished training run.")
    options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=_multiprocessing_options())
    with ocp.CheckpointManager(path, options=options, item_handlers=_item_handlers()) as manager:
        return _pick_step(manager, str(path), None)


def restore_params(
    directory: str, params_template: PyTree, step: int | None = None
) -> tuple[PyTree, dict]:
    """Restore only `state.params` of a `Checkpointer` checkpoint, plus its metadata.

    Leaves of `params_template` (jax arrays or jax.ShapeDtypeStruct) give each array's
    shape, dtype (e.g. bfloat16 to cast a frozen teacher) and sharding; the optimizer
    state is neither needed nor read.
    """
    directory = os.path.abspath(directory)
    if not epath.Path(directory).is_dir():
        raise CheckpointError(
            f"Checkpoint directory {directory} does not exist. Pass the model directory of "
            "a finished training run."
        )
    options = ocp.CheckpointManagerOptions(
        read_only=True, multiprocessing_options=_multiprocessing_options())
    with ocp.CheckpointManager(
        epath.Path(directory), options=options, item_handlers=_item_handlers()
    ) as manager:
        step = _pick_step(manager, directory, step)
        where = f"{directory} step {step}"
        saved = _saved_tree(manager, step)
        if "params" not in saved:
            raise CheckpointError(
                f"Checkpoint {where} has no 'params' entry (top-level entries: "
                f"{sorted(saved)}). Pass a checkpoint written by cat_jax.checkpoints.Checkpointer."
            )
        _check_structure(params_template, saved, where, prefix="params/")
        template = {"params": params_template}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    item=template, restore_args=_restore_args(template), partial_restore=True
                ),
                _METADATA: ocp.args.JsonRestore(),
            }
        )
        restored = manager.restore(step, args=args)
    return restored[_STATE]["params"], dict(restored[_METADATA])
