"""Orbax checkpoints: one directory per step holding the train state and a JSON metadata dict.

Layout written by `Checkpointer` (orbax `CheckpointManager`):

    <directory>/<step>/state/      the state pytree (params, opt_state, step, rng, ...)
    <directory>/<step>/metadata/   a JSON dict (model config, teacher, gin config hash, ...)
                                   plus "step": the checkpoint's step

A save is written into `<step>.orbax-checkpoint-tmp*` and renamed when complete, so a save
killed half-way leaves only a temporary directory; every read here ignores it and the next
save works. Finishing a save records the checksums of the step's files (`cat_jax.integrity`)
before that rename, so every step under its final name has its record. Restores check the
template's structure and shapes against the checkpoint first and fail with `CheckpointError`
naming the first mismatching key path.

With several processes (`jax.distributed`), every process calls save and restore with the same
arguments: each writes and reads only the shards its devices hold, process 0 writes the metadata
and finalizes the step directory. A checkpoint does not record the mesh: one written by N
processes restores on M processes or on a different mesh, into the shardings of the template.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cat_jax import integrity, runtime
from cat_jax.errors import CheckpointError

log = logging.getLogger("cat_jax")

# orbax logs these at WARNING on every read-only open (each teacher, eval or cascade model load).
_READ_ONLY_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")
# orbax's writer threads log a full disk with their tracebacks before the save raises it; the job
# reports it in one line (`gin_utils.run`).
_DISK_FULL_NOISE = ("No space left on device", "Disk quota exceeded")
logging.getLogger("absl").addFilter(
    lambda r: (
        not r.getMessage().startswith(_READ_ONLY_NOISE)
        and not (r.levelno >= logging.ERROR and any(m in r.getMessage() for m in _DISK_FULL_NOISE))
    )
)

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_DATA = "data"  # a streamed run's data-iterator state (grain's checkpoint handler)


def _item_handlers(with_data: bool = False) -> dict[str, ocp.CheckpointHandler]:
    handlers = {_STATE: ocp.PyTreeCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
    if with_data:
        from cat_jax.data.streaming import iterator_handler  # pylint: disable=import-outside-toplevel

        handlers[_DATA] = iterator_handler()
    return handlers


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
    return {prefix + "/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


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


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> PyTree:
    return manager.item_metadata(step)[_STATE].tree


class _RecordedRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """orbax's rename of a finished temporary directory, preceded, for a step directory, by the
    record of its checksums: a step exists under its final name only with its record (a kill
    between the two leaves a temporary directory, which is ignored, and a record that the next
    save of that step replaces). orbax finalizes on the primary process only, the lead."""

    async def finalize(self):
        final = self.get_final()
        if final.name.isdigit():
            seconds = await asyncio.to_thread(
                integrity.write_record, str(final.parent), int(final.name), str(self.get())
            )
            if seconds > 10:
                log.info("Checksummed step %s in %.1f s", final.name, seconds)
        await super().finalize()


class Checkpointer:
    """Saves and restores `(state, metadata)` every `save_interval_steps`, keeping the last
    `max_to_keep` verified steps (None keeps all). Saves are synchronous unless `async_save`.

    With `async_save` (orbax's asynchronous checkpointing) `save` returns once the state is copied
    off the devices (so the next step may overwrite its buffers) and the files are written by a
    background thread; every guarantee below holds as for a synchronous save: the checksums are
    recorded by that thread after the last file is written and before the rename (`_RecordedRename`),
    so a kill during the write leaves only a temporary directory; at most one save is in flight
    (the next `save`, `wait` or `close` waits for it); old steps are deleted only after the new step
    is finished; `close` waits for the last save.

    Every save is recorded by its checksums as it finishes (`cat_jax.integrity`);
    `restore_latest_good` verifies steps newest first, moves damaged or unrecorded ones aside (or,
    when one cannot be moved, leaves it unused) and falls back to the previous one. Old steps are
    deleted only after the new step is finished, so the newest verified step is never the one
    deleted. With `data_iterator` (a grain iterator), every step also holds
    the iterator's state (item "data"), saved and restored with the train state.
    """

    def __init__(
        self,
        directory: str,
        save_interval_steps: int,
        max_to_keep: int | None,
        data_iterator: Any = None,
        async_save: bool = False,
    ):
        self.directory = os.path.abspath(directory)  # orbax needs absolute paths
        _ensure_writable(self.directory)
        self.save_interval_steps = save_interval_steps
        self.max_to_keep = max_to_keep
        self.data_iterator = data_iterator
        self._unusable: set[int] = set()  # damaged steps that could not be moved aside
        self.async_save = async_save
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=None,  # rotation is ours: after the new step is verified
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            multiprocessing_options=_multiprocessing_options(),
            temporary_path_class=_RecordedRename,
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            epath.Path(self.directory),
            options=self._options,
            item_handlers=_item_handlers(self.data_iterator is not None),
        )

    @staticmethod
    def latest_in(directory: str) -> int | None:
        """The newest finished step in `directory` without opening (or creating) anything: orbax
        renames a step's temporary directory to the bare step number only when it is complete."""
        if not os.path.isdir(directory):
            return None
        steps = [int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
        return max(steps) if steps else None

    def latest_step(self) -> int | None:
        """The newest finished step (verified or not), or None."""
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

    def save(self, step: int, state: PyTree, metadata: dict, force: bool = False, wait: bool = False) -> bool:
        """Save `state` and `metadata` at `step` if due (always if `force`); True if saved (with
        `async_save`: started, finished in the background unless `wait`).

        The saved metadata gets `"step": step` added, so every reader learns the step it got.
        A step that is already saved is left as it is (returns False; logged when it is a damaged
        step that could not be moved aside). The lead process then deletes the steps beyond
        `max_to_keep`.
        """
        metadata = {**metadata, "step": int(step)}
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise CheckpointError(
                f"Checkpoint metadata for {self.directory} step {step} is not JSON: {e}. "
                "Convert its values to str/int/float/list/dict."
            ) from e
        self.wait()
        if step in self._manager.all_steps():
            if step in self._unusable:
                log.warning(
                    "Step %d is not saved: %s holds the damaged step %d, which could not be moved "
                    "aside. Move it away to let a run save that step again.",
                    step,
                    integrity.step_dir(self.directory, step),
                    step,
                )
            return False
        items = {_STATE: ocp.args.PyTreeSave(state), _METADATA: ocp.args.JsonSave(metadata)}
        if self.data_iterator is not None:
            from cat_jax.data.streaming import iterator_save  # pylint: disable=import-outside-toplevel

            items[_DATA] = iterator_save(self.data_iterator)
        saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
        if saved:
            self._in_flight = step
        if not self.async_save or wait:
            self.wait()
        return saved

    def wait(self) -> None:
        """Wait for the save in flight (if any) to finish, then delete the steps beyond
        `max_to_keep` (the lead process); an error of the background write is raised here."""
        self._manager.wait_until_finished()
        step, self._in_flight = self._in_flight, None
        if step is not None and runtime.is_lead():
            self._rotate(keep_step=step)

    def _rotate(self, keep_step: int) -> None:
        if self.max_to_keep is None:
            return
        steps = [s for s in self.all_steps() if s != keep_step]
        excess = len(steps) + 1 - self.max_to_keep
        for old in steps[: max(excess, 0)]:
            shutil.rmtree(integrity.step_dir(self.directory, old), ignore_errors=True)
            integrity.remove_record(self.directory, old)
        if excess > 0:
            self._manager.reload()

    def restore(self, state_template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restore `(state, metadata)` at `step` (default: latest) into `state_template`'s
        structure, dtypes and shardings (leaves: jax arrays or jax.ShapeDtypeStruct); a step
        whose files do not match their checksums is refused by name."""
        step = _pick_step(self._manager, self.directory, step)
        _refuse_damaged(self.directory, step)
        return _restore(self._manager, self.directory, step, state_template, self.data_iterator)

    def restore_latest_good(self, state_template: PyTree) -> tuple[PyTree, dict, int] | None:
        """(state, metadata, step) of the newest step that verifies and restores, or None when the
        directory holds no step at all.

        A step that fails its checksums, or has no checksum record (it cannot be verified), is
        logged as an error and moved to `damaged_checkpoints/`; one that cannot be moved (no
        permission) stays in place, unused, and is said so. Then the previous step is tried. With
        steps on disk but none good, or damaged steps moved aside earlier and none left,
        CheckpointError: a run never starts from scratch over checkpoints it could not read.
        """
        skipped: list[int] = []
        while True:
            steps = [s for s in self.all_steps() if s not in skipped]
            if not steps:
                if skipped or integrity.quarantined(self.directory):
                    left = sorted(self._unusable)
                    raise CheckpointError(
                        f"No usable checkpoint is left in {self.directory}: the damaged steps "
                        f"{integrity.quarantined(self.directory)} are in "
                        f"{os.path.join(self.directory, integrity.DAMAGED_DIR)}"
                        + (f", and the damaged steps {left} that could not be moved are still in place" if left else "")
                        + ". Nothing was started from scratch. Restore the files from a copy, or "
                        "move them away (and the MODEL_DIR's checkpoints with them) to start a new run."
                    )
                return None
            step = steps[-1]
            found = _agreed_problems(self.directory, step)
            if found is None:
                found = [
                    "it has no checksum record, so its files cannot be verified (a save records them as it "
                    "finishes: this step was written without one, or its record was removed)"
                ]
            if not found:
                try:
                    state, meta = _restore(self._manager, self.directory, step, state_template, self.data_iterator)
                except CheckpointError:
                    raise
                except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore errors
                    raise CheckpointError(
                        f"Checkpoint {self.directory} step {step} verifies but cannot be restored: {e}"
                    ) from e
                if skipped:
                    log.error("Restored step %d after setting the damaged steps %s aside.", step, skipped)
                return state, meta, step
            self._set_aside(step, found)
            skipped.append(step)

    def _set_aside(self, step: int, found: list[str]) -> None:
        """Move a damaged step to `damaged_checkpoints/` (the lead does; every process waits), or
        log why it stays in place; either way it is not used again."""
        if runtime.is_lead():
            what = f"CHECKPOINT DAMAGED: step {step} in {self.directory}: {'; '.join(found)}."
            try:
                where = integrity.quarantine(self.directory, step)
            except OSError as e:
                log.error(
                    "%s It could not be moved aside (%s): it stays where it is, unused. Trying the previous "
                    "step. Fix its permissions or move it away yourself.",
                    what,
                    e,
                )
            else:
                log.error("%s Moved it to %s; trying the previous step.", what, where)
        runtime.sync(f"cat_jax_quarantine_{step}")
        self._manager = self._open()
        if step in self.all_steps():
            self._unusable.add(step)

    def close(self) -> None:
        """Wait for the last save, then release the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


def _agreed_problems(directory: str, step: int) -> list[str] | None:
    """`integrity.problems` as the lead process finds them, the same verdict on every process."""
    if jax.process_count() == 1:
        return integrity.problems(directory, step)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    lead = runtime.is_lead()
    found = integrity.problems(directory, step) if lead else None
    verdict = (2 if found is None else int(bool(found))) if lead else 0
    verdict = int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
    if lead:
        return found
    return {0: [], 1: ["its files do not match their checksums (the lead process logs which)"], 2: None}[verdict]


def _refuse_damaged(directory: str, step: int) -> None:
    """Refuse a step whose files fail their checksums; warn about one without a record."""
    found = integrity.problems(directory, step)
    if found is None:
        log.warning("Checkpoint %s step %d has no checksum record: its files cannot be verified.", directory, step)
    elif found:
        raise CheckpointError(
            f"Checkpoint {directory} step {step} is damaged: {'; '.join(found)}. Use another step "
            f"(finished steps: {sorted(int(n) for n in os.listdir(directory) if n.isdigit())}), or restore "
            "the files from a copy."
        )


def _restore(
    manager: ocp.CheckpointManager, directory: str, step: int, template: PyTree, data_iterator: Any = None
) -> tuple[PyTree, dict]:
    where = f"{directory} step {step}"
    _check_structure(template, _saved_tree(manager, step), where)
    items = {
        _STATE: ocp.args.PyTreeRestore(item=template, restore_args=_restore_args(template)),
        _METADATA: ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
        if not os.path.isdir(os.path.join(integrity.step_dir(directory, step), _DATA)):
            raise CheckpointError(
                f"Checkpoint {where} holds no data-iterator state: it was written by a run that read its "
                "data in memory, and this run streams it (data_source.streaming_dir). Resume with the same "
                "data source, or start a new MODEL_DIR."
            )
        from cat_jax.data.streaming import iterator_restore  # pylint: disable=import-outside-toplevel

        items[_DATA] = iterator_restore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE], dict(restored[_METADATA])


def _host_array_registry() -> Any:
    """orbax's type handlers, except that numpy arrays are written without a defensive copy, so
    memory-mapped arrays stream from disk to disk (orbax copies every host array by default)."""
    pairs = [
        (
            ty,
            ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
            if ty is np.ndarray
            else ocp.type_handlers.get_type_handler(ty),
        )
        for ty in ocp.type_handlers.supported_types()
    ]
    return ocp.type_handlers.create_type_handler_registry(*pairs)


def save_host_state(directory: str, step: int, state: PyTree, metadata: dict) -> None:
    """Write `state` (a pytree of numpy arrays, e.g. memory-mapped) as step `step` of a checkpoint
    directory in `Checkpointer`'s layout, without copying the arrays into memory (one process).

    `cat_jax.import_checkpoint` writes `{"params": ...}` this way, so an imported model larger than
    host memory streams to disk; `restore_params` and `load_frozen_model` read it like any other.
    """
    directory = os.path.abspath(directory)
    handlers = {
        _STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_host_array_registry(), use_ocdbt=False),
        _METADATA: ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(
        multiprocessing_options=_multiprocessing_options(), temporary_path_class=_RecordedRename
    )
    with ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.PyTreeSave(state), _METADATA: ocp.args.JsonSave({**metadata, "step": step})}
            ),
            force=True,
        )
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
            f"Checkpoint directory {directory} cannot be created or written ({e}). Choose a writable model directory."
        ) from e


def latest_finished_step(directory: str) -> int:
    """The newest finished step in a Checkpointer directory, found without restoring anything;
    CheckpointError when the directory is missing or holds no finished checkpoint."""
    path = epath.Path(os.path.abspath(directory))
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {path} does not exist. Pass the model directory of a finished training run."
        )
    options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=_multiprocessing_options())
    with ocp.CheckpointManager(path, options=options, item_handlers=_item_handlers()) as manager:
        return _pick_step(manager, str(path), None)


def restore_params(directory: str, params_template: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Restore only `state.params` of a `Checkpointer` checkpoint, plus its metadata.

    Leaves of `params_template` (jax arrays or jax.ShapeDtypeStruct) give each array's
    shape, dtype (e.g. bfloat16 to cast a frozen teacher) and sharding; the optimizer
    state is neither needed nor read.
    """
    directory = os.path.abspath(directory)
    if not epath.Path(directory).is_dir():
        raise CheckpointError(
            f"Checkpoint directory {directory} does not exist. Pass the model directory of a finished training run."
        )
    options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=_multiprocessing_options())
    with ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=_item_handlers()) as manager:
        step = _pick_step(manager, directory, step)
        _refuse_damaged(directory, step)
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
