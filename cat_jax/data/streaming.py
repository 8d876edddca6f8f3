"""Streaming data: a split stored as sharded ArrayRecord files and read by grain, never whole.

Layout written by `python -m cat_jax.export_task --gin.export_split.format='array_record'`
(`cat_jax.data.stream_export`), per (name, split):

    <dir>/<name>.<split>/manifest.json        tasks, rates, counts, shards, EOS ids, vocabulary,
        metrics (`cat_jax.data.manifest`)
    <dir>/<name>.<split>/<task>/shard-NNNNN.array_record   one msgpack record per example: id,
        the untruncated token ids of inputs and targets (EOS included), the pretokenized texts,
        the task's other string features and its postprocessed target

With `--gin.data_source.streaming_dir=<dir>` every task look-up reads these (`StreamingSource`, a
`cat_jax.data.file_source.FileSource` as the .npz export's source is): training batches stream
through grain, evaluation splits are read into memory (they are small).

The training stream (`StreamingBatches`), for a global batch size B over P processes:
  - each task's records in a seeded permutation per epoch (grain's index shuffle: O(1) memory,
    a different permutation every epoch), repeated without end;
  - a mixture interleaves its tasks by their rates (grain's deterministic `mix`);
  - global batch k is positions [k*B, (k+1)*B) of that sequence; process p reads rows
    [k*B + p*B/P, k*B + (p+1)*B/P) only, then trims / pads them to TASK_FEATURE_LENGTHS exactly as
    seqio's EncDecFeatureConverter does for the in-memory path (unpacked).
The iterator's state, saved in the orbax checkpoint by grain's checkpoint handler, is the index of
the next global batch: the same number on every process, so a run resumes on exactly the stream
an uninterrupted one sees, on the same or on a different number of processes (each process then
reads its rows of that batch). `IteratorHandler` adds that cross-count restore to grain's handler.

Packed (`DatasetConfig.pack`), a batch holds a varying number of examples, so the stream is read
per process, as seqio, MaxText and grain pack: process p takes positions p, p + P, p + 2P, ... of
the sequence above, trims each example as the unpacked rows do, and grain's first-fit packer
(`grain.experimental.FirstFitPackIterDataset`, B/P bins, the layout of `cat_jax.data.packing`) fills
this process's B/P rows of every batch in turn. Its state (where the packer's current round began in
the stream, and the batches given) is per process: a packed stream resumes bit-exactly on the same
number of processes, and a resume on another number is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.file_source import FileSource
from cat_jax.errors import CheckpointError, ConfigError, ExportedDataError

log = logging.getLogger(__name__)

FORMAT = "cat_jax.streaming_split/1"
MANIFEST = "manifest.json"
SHARD = "shard-{:05d}.array_record"
READ_THREADS = 8
PREFETCH_BATCHES = 16
PACKED_PREFETCH_BATCHES = 4


def split_dir(directory: str, name: str, split: str) -> str:
    return os.path.join(directory, f"{name}.{split}")


def encode_record(example: Mapping[str, Any]) -> bytes:
    """One example as the bytes of a record (msgpack; token ids as int32 little-endian)."""
    import msgpack  # pylint: disable=import-outside-toplevel

    return msgpack.packb(
        {
            "id": example["id"],
            "inputs": np.asarray(example["inputs"], "<i4").tobytes(),
            "targets": np.asarray(example["targets"], "<i4").tobytes(),
            "inputs_text": example["inputs_text"],
            "targets_text": example["targets_text"],
            "extras": example["extras"],
            "post": example["post"],
        }
    )


def decode_record(raw: bytes) -> dict[str, Any]:
    import msgpack  # pylint: disable=import-outside-toplevel

    record = msgpack.unpackb(raw)
    record["inputs"] = np.frombuffer(record["inputs"], "<i4")
    record["targets"] = np.frombuffer(record["targets"], "<i4")
    return record


def _fit(tokens: np.ndarray, length: int, eos_id: int | None) -> tuple[np.ndarray, int]:
    """(tokens trimmed to `length` (a cut sequence still ends in EOS, as seqio's
    append_eos_after_trim) and zero-padded, the untrimmed count)."""
    out = np.zeros(length, np.int32)
    n = len(tokens)
    if n > length:
        kept = tokens[:length].copy()
        if eos_id is not None:
            kept[-1] = eos_id
        out[:] = kept
    else:
        out[:n] = tokens
    return out, n


def model_features(
    records: Sequence[Mapping[str, Any]], lengths: Mapping[str, int], eos: Sequence[Mapping[str, int | None]]
) -> dict[str, np.ndarray]:
    """MODEL_FEATURES [N, L] of decoded records (`eos[i]`: record i's task's EOS ids, None where the
    task adds none), as seqio's unpacked EncDecFeatureConverter builds them: padded inputs; targets;
    targets shifted right with a 0 (BOS); weights 1 on target tokens."""
    inputs = np.stack([_fit(r["inputs"], lengths["inputs"], e["inputs"])[0] for r, e in zip(records, eos)])
    targets = np.stack([_fit(r["targets"], lengths["targets"], e["targets"])[0] for r, e in zip(records, eos)])
    decoder_inputs = np.concatenate([np.zeros((len(records), 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }


class StreamingSource(FileSource):
    """The streaming exports of a directory: names -> tasks / mixtures, vocabularies, batches."""

    kind = "streaming"
    format = FORMAT
    pattern = os.path.join("*", MANIFEST)
    setting = "data_source.streaming_dir"
    streaming = True

    def shard_paths(self, name: str, split: str, task: str) -> list[str]:
        base = split_dir(self.directory, name, split)
        return [os.path.join(base, task, f) for f in self.manifest(name, split)["shards"][task]]

    def load_split(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        max_examples: int | None = None,
        cache_dir: str | None = None,
    ) -> ExampleArrays:
        """Every example of the split in memory (for evaluation splits; training streams)."""
        del max_examples, cache_dir  # the caller samples
        from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel

        manifest = self.manifest(name, split)
        parts = []
        for task in manifest["task_order"]:
            records = []
            for path in self.shard_paths(name, split, task):
                reader = ArrayRecordReader(path)
                records += [decode_record(r) for r in reader.read_all()]
                reader.close()
            if not records:
                continue
            self.tasks[task].add_targets(np.array([r["id"] for r in records]), np.array([r["post"] for r in records]))
            features = model_features(records, lengths, [manifest["eos"][task]] * len(records))
            parts.append(
                ExampleArrays(
                    features=features,
                    ids=np.array([r["id"] for r in records], dtype=str),
                    task_names=np.full(len(records), task),
                    inputs_text=np.array([r["inputs_text"] for r in records], dtype=str),
                    targets_text=np.array([r["targets_text"] for r in records], dtype=str),
                    input_lengths=np.array([len(r["inputs"]) for r in records], np.int32),
                    target_lengths=np.array([len(r["targets"]) for r in records], np.int32),
                    extras=np.array([r["extras"] for r in records], dtype=str),
                )
            )
        if not parts:
            raise ExportedDataError(f"{split_dir(self.directory, name, split)} holds no examples.")
        return ExampleArrays.concatenate(parts)

    def train_batches(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        batch_size: int,
        seed: int,
        max_examples: int | None,
        rows: tuple[int, int],
        pack_input_overhead: int | None = None,
    ) -> StreamingBatches:
        if max_examples is not None:
            raise ConfigError(
                "DatasetConfig.max_examples cannot cap a streamed training split (the sample would need "
                "every id); export the capped split instead (--gin.MAX_EXAMPLES=... of export_task) or "
                "train in memory."
            )
        manifest = self.manifest(name, split)
        paths = {task: self.shard_paths(name, split, task) for task in manifest["task_order"]}
        return StreamingBatches(
            paths,
            manifest["num_examples_per_task"],
            manifest["rates"],
            lengths,
            manifest["eos"],
            batch_size,
            seed,
            rows,
            pack_input_overhead,
        )


class StreamingBatches:
    """Training batches streamed from ArrayRecord shards (see the module docstring).

    `batch(step)` returns this process's rows of global batch `step`, read ahead by grain's
    threads; `iterator` is the grain iterator whose state the checkpoint holds; `packed` whether
    rows hold several examples (`pack_input_overhead` not None: the tokens a family adds to each
    example's inputs, left free beside them).
    """

    def __init__(
        self,
        paths: Mapping[str, Sequence[str]],
        counts: Mapping[str, int],
        rates: Mapping[str, float] | None,
        lengths: Mapping[str, int],
        eos: Mapping[str, Mapping[str, int | None]],
        global_batch_size: int,
        seed: int,
        rows: tuple[int, int],
        pack_input_overhead: int | None = None,
    ):
        import grain  # pylint: disable=import-outside-toplevel

        index, count = rows
        if global_batch_size % count:
            raise ConfigError(f"BATCH_SIZE {global_batch_size} is not divisible into {count} row blocks.")
        self.tasks = list(paths)
        self.sources = [grain.sources.ArrayRecordDataSource(list(paths[t])) for t in self.tasks]
        for task, source in zip(self.tasks, self.sources):
            if len(source) != counts[task]:
                raise ExportedDataError(
                    f"The shards of {task} hold {len(source)} records, the manifest says "
                    f"{counts[task]}: export the split again."
                )
        streams = [
            grain.MapDataset.range(len(src))
            .shuffle(seed=_task_seed(seed, i))
            .repeat()
            .map(functools.partial(_tagged, i))
            for i, src in enumerate(self.sources)
        ]
        if len(streams) == 1:
            self.order = streams[0]
        else:
            weights = [float((rates or {}).get(t, 0.0)) for t in self.tasks]
            self.order = grain.MapDataset.mix(streams, weights=weights)
        self.lengths, self.eos = dict(lengths), [eos[t] for t in self.tasks]
        self.global_batch_size, self.rows = global_batch_size, (index, count)
        self.per_process = global_batch_size // count
        self.packed = pack_input_overhead is not None
        if self.packed:
            self.iterator = PackedIterator(self._packed_stream(int(pack_input_overhead)), count)
        else:
            batches = grain.MapDataset.range(sys.maxsize).map(self.local_batch)
            self.iterator = iter(
                batches.to_iter_dataset(
                    grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
                )
            )

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` (a pure function of the step), unpacked."""
        index, _ = self.rows
        start = step * self.global_batch_size + index * self.per_process
        picks = [self.order[p] for p in range(start, start + self.per_process)]
        records: list[Any] = [None] * len(picks)
        for task in range(len(self.sources)):
            where = [j for j, (t, _) in enumerate(picks) if t == task]
            if where:
                raws = self.sources[task].__getitems__([int(picks[j][1]) for j in where])
                for j, raw in zip(where, raws):
                    records[j] = decode_record(raw)
        return model_features(records, self.lengths, [self.eos[t] for t, _ in picks])

    def example(self, pick: tuple[int, int], input_overhead: int = 0) -> dict[str, np.ndarray]:
        """The stream's example `pick` (task, record) as the packer takes it: its inputs and targets
        trimmed as the unpacked rows are, and `room`, the input slots it claims (its inputs plus
        `input_overhead`, at most the row's)."""
        task, record = pick
        decoded = decode_record(self.sources[task][int(record)])
        out = {}
        for feature in ("inputs", "targets"):
            tokens, n = _fit(decoded[feature], self.lengths[feature], self.eos[task][feature])
            out[feature] = tokens[: min(n, self.lengths[feature])]
        out["room"] = np.zeros(min(len(out["inputs"]) + input_overhead, self.lengths["inputs"]), np.int32)
        return out

    def _packed_stream(self, input_overhead: int) -> Any:
        """This process's packed batches: its share of the stream (every P-th example), packed
        first-fit by grain into B/P rows a batch, as `cat_jax.data.packing.PACKED_FEATURES`."""
        import grain  # pylint: disable=import-outside-toplevel

        index, count = self.rows
        examples = self.order[index::count].map(functools.partial(self.example, input_overhead=input_overhead))
        read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES * self.per_process)
        batches = packed_batches(examples.to_iter_dataset(read), self.lengths, self.per_process)
        return iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=PACKED_PREFETCH_BATCHES))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The next batch of the stream, which must be batch `step` (the checkpoint restored it)."""
        at = self.iterator.next_index if self.packed else self.iterator.get_state()["next_index"]
        if at != step:
            raise CheckpointError(
                f"The data stream is at batch {at} but the train state at step {step}: the "
                "checkpoint's data state does not match its step."
            )
        return next(self.iterator)


def packed_batches(examples: Any, lengths: Mapping[str, int], rows: int) -> Any:
    """Batches of `rows` packed rows (`cat_jax.data.packing.PACKED_FEATURES`) of a grain IterDataset
    of examples (`StreamingBatches.example`'s dicts), packed by grain's first fit into `rows` bins
    at a time, each bin's examples in stream order."""
    import grain  # pylint: disable=import-outside-toplevel

    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={"inputs": lengths["inputs"], "targets": lengths["targets"], "room": lengths["inputs"]},
        num_packing_bins=rows,
        shuffle_bins=False,
    )
    return packed.batch(rows).map(packed_features)


def packed_features(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`cat_jax.data.packing.PACKED_FEATURES` of grain's packed rows (`inputs`, `targets` and their
    `_segment_ids` / `_positions`): the decoder's inputs are each example's targets shifted right
    behind a 0, as `cat_jax.data.packing.pack_rows` lays them out."""
    targets = np.asarray(rows["targets"], np.int32)
    segments = np.asarray(rows["targets_segment_ids"], np.int32)
    positions = np.asarray(rows["targets_positions"], np.int32)
    shifted = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": np.asarray(rows["inputs"], np.int32),
        "decoder_input_tokens": np.where((positions > 0) & (segments > 0), shifted, 0).astype(np.int32),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": ((targets > 0) & (segments > 0)).astype(np.float32),
        "encoder_segment_ids": np.asarray(rows["inputs_segment_ids"], np.int32),
        "encoder_positions": np.asarray(rows["inputs_positions"], np.int32),
        "decoder_segment_ids": segments,
        "decoder_positions": positions,
    }


class PackedIterator:
    """A packed stream's iterator with the count of batches it gave (`next_index`). Its state, in
    the checkpoint, is JSON bytes: {"next_index", "processes", "stream": grain's state}."""

    def __init__(self, inner: Any, processes: int):
        self.inner, self.processes, self.next_index = inner, processes, 0

    def __iter__(self) -> PackedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.inner)
        self.next_index += 1
        return batch

    def get_state(self) -> bytes:
        state = {"next_index": self.next_index, "processes": self.processes, "stream": self.inner.get_state()}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if state.get("processes") != self.processes:
            raise CheckpointError(
                f"The checkpoint's packed data stream was read by {state.get('processes')} processes, this run "
                f"has {self.processes}: a packed stream resumes on the number of processes that wrote it."
            )
        self.inner.set_state(state["stream"])
        self.next_index = int(state["next_index"])

    def start_prefetch(self) -> None:
        """As grain's iterators (its handler calls it after a restore): reading starts on demand."""


def _task_seed(seed: int, task: int) -> int:
    return int(np.random.default_rng([seed, 7, task]).integers(2**31))


def _tagged(task: int, index: int) -> tuple[int, int]:
    return task, index


@functools.lru_cache(maxsize=None)
def _checkpoint_types() -> tuple[type, type, type]:
    """(handler, save args, restore args): grain's orbax handler for the stream's iterator, restoring
    on any process count, with its own orbax argument types."""
    import dataclasses  # pylint: disable=import-outside-toplevel

    import grain  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    class IteratorHandler(grain.checkpoint.CheckpointHandler):
        """As grain's handler; an unpacked stream's state written by another number of processes is
        restored from any process's file (the state, the next global batch, is the same on all of
        them); a packed stream's is refused (`PackedIterator.set_state`)."""

        def restore(self, directory, item=None, args=None):
            import jax  # pylint: disable=import-outside-toplevel

            index, count = jax.process_index(), jax.process_count()
            if (directory / f"process_{index}-of-{count}.json").exists():
                return super().restore(directory, item=item, args=args)
            files = sorted(directory.glob("process_*-of-*.json"))
            if not files:
                raise CheckpointError(f"{directory} holds no data-iterator state.")
            item = item or args.item
            text = files[0].read_text()
            # a packed stream's state is per process: PackedIterator refuses another count
            item.set_state(text.encode() if isinstance(item, PackedIterator) else json.loads(text))
            return item

    @ocp.args.register_with_handler(IteratorHandler, for_save=True)
    @dataclasses.dataclass
    class IteratorSave(ocp.args.CheckpointArgs):
        item: Any

    @ocp.args.register_with_handler(IteratorHandler, for_restore=True)
    @dataclasses.dataclass
    class IteratorRestore(ocp.args.CheckpointArgs):
        item: Any

    return IteratorHandler, IteratorSave, IteratorRestore


def iterator_handler() -> Any:
    """The orbax handler of a checkpoint's data-iterator item."""
    return _checkpoint_types()[0]()


def iterator_save(iterator: Any) -> Any:
    """The orbax save arguments of the iterator's state."""
    return _checkpoint_types()[1](iterator)


def iterator_restore(iterator: Any) -> Any:
    """The orbax restore arguments that set the iterator's state."""
    return _checkpoint_types()[2](iterator)
