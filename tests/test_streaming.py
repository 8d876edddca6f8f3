"""Streaming data: the ArrayRecord export equals the live seqio pipeline example by example, the
grain stream is a seeded global shuffle mixed by rate and split by process, an interrupted export
resumes to the same files, and a streamed training run resumes on the uninterrupted stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import seqio
from conftest import run_module, train_args

import tasks  # noqa: F401  (registers the tasks)
from cat_jax import data as data_lib
from cat_jax.data import stream_export, streaming

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

MIXTURE = "streaming_test_mix"
RATES = {"num2words_de": 1.0, "num2words_fr": 3.0}
SPLIT = "validation"
LENGTHS = {"inputs": 8, "targets": 12}  # short enough that inputs and targets are truncated
SHARD = 300


def _register() -> None:
    if MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(MIXTURE, list(RATES.items()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _register()
    root = tmp_path_factory.mktemp("stream")
    manifest = stream_export.export_streaming_one(MIXTURE, SPLIT, str(root), examples_per_shard=SHARD)
    live = data_lib.load_split(MIXTURE, SPLIT, LENGTHS, cache_dir=None)
    return root, manifest, live


def _rows_by_id(arrays) -> dict[str, int]:
    return {i: k for k, i in enumerate(arrays.ids.tolist())}


def test_export_equals_the_live_pipeline(exported):
    root, manifest, live = exported
    assert manifest["format"] == streaming.FORMAT and manifest["rates"] == RATES
    assert manifest["num_examples_per_task"] == {"num2words_de": 1945, "num2words_fr": 1945}
    assert manifest["shards"]["num2words_de"] == [f"shard-{i:05d}.array_record" for i in range(7)]  # 6*300+145
    source = streaming.StreamingSource(str(root))
    got = source.load_split(MIXTURE, SPLIT, LENGTHS)
    assert got.num_truncated_inputs > 0 and got.num_truncated_targets > 0
    assert got.ids.tolist() == live.ids.tolist()
    for k in data_lib.MODEL_FEATURES:
        np.testing.assert_array_equal(got.features[k], live.features[k], err_msg=k)
    for field in ("task_names", "inputs_text", "targets_text", "input_lengths", "target_lengths", "extras"):
        np.testing.assert_array_equal(getattr(got, field), getattr(live, field), err_msg=field)
    assert source.mixture_rates(MIXTURE) == RATES
    assert source.vocabulary(MIXTURE).vocab_size == data_lib.get_vocabulary_of(MIXTURE).vocab_size


def test_stream_is_a_seeded_shuffle_mixed_by_rate_and_split_by_process(exported):
    root, _, live = exported
    source = streaming.StreamingSource(str(root))
    rows = _rows_by_id(live)

    def batches(seed, rows_of):
        return source.train_batches(MIXTURE, SPLIT, LENGTHS, 16, seed, None, rows_of)

    whole, first, second = batches(0, (0, 1)), batches(0, (0, 2)), batches(0, (1, 2))
    for step in (0, 1, 57):
        b = whole.local_batch(step)
        halves = [first.local_batch(step), second.local_batch(step)]
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([h[k] for h in halves]), err_msg=k)
        # Each row is the in-memory example of the id the stream picked.
        picks = [whole.order[p] for p in range(16 * step, 16 * (step + 1))]
        ids = [_record_id(source, whole.tasks[t], i) for t, i in picks]
        for k in b:
            np.testing.assert_array_equal(b[k], live.features[k][[rows[i] for i in ids]], err_msg=k)
    picks = [whole.order[p] for p in range(16 * 250)]
    share = np.mean([whole.tasks[t] == "num2words_fr" for t, _ in picks])
    assert abs(share - 0.75) < 0.03, share  # rates 1 : 3
    # Every epoch of a task is a permutation of its records (different from the next epoch's).
    fr = [i for t, i in (whole.order[p] for p in range(8000)) if whole.tasks[t] == "num2words_fr"]
    assert sorted(fr[:1945]) == list(range(1945)) and sorted(fr[1945:3890]) == list(range(1945))
    assert fr[:1945] != fr[1945:3890] and fr[:100] != list(range(100))
    other = batches(1, (0, 1))
    assert not np.array_equal(
        other.local_batch(0)["decoder_target_tokens"], whole.local_batch(0)["decoder_target_tokens"]
    )
    # The iterator yields local_batch(step) in order, and its state is the next step.
    it = batches(0, (0, 1))
    for step in range(3):
        np.testing.assert_array_equal(
            it.batch(step)["decoder_target_tokens"], whole.local_batch(step)["decoder_target_tokens"]
        )
    assert it.iterator.get_state()["next_index"] == 3


def _segments(batch: dict, row: int) -> list[tuple[tuple, tuple]]:
    """(inputs, targets) of each example of a packed row, in segment order."""
    out = []
    for seg in range(1, int(batch["decoder_segment_ids"][row].max()) + 1):
        inputs = batch["encoder_input_tokens"][row][batch["encoder_segment_ids"][row] == seg]
        targets = batch["decoder_target_tokens"][row][batch["decoder_segment_ids"][row] == seg]
        out.append((tuple(inputs.tolist()), tuple(targets.tolist())))
    return out


def _stream_arrays(batches, picks) -> data_lib.ExampleArrays:
    """The stream's examples `picks` as unpacked in-memory arrays (what `pack_rows` packs)."""
    records = [batches.example(p) for p in picks]
    eos = [batches.eos[t] for t, _ in picks]
    n = len(picks)
    return data_lib.ExampleArrays(
        features=streaming.model_features(records, batches.lengths, eos),
        ids=np.arange(n).astype(str),
        task_names=np.full(n, "t"),
        inputs_text=np.full(n, ""),
        targets_text=np.full(n, ""),
        input_lengths=np.array([len(r["inputs"]) for r in records], np.int32),
        target_lengths=np.array([len(r["targets"]) for r in records], np.int32),
        extras=np.full(n, "{}"),
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_stream_packs_each_process_share_in_turn_and_resumes(exported, processes):
    """Each packed batch holds the next examples of this process's share of the stream (positions p,
    p + P, ...), laid out as in-memory packing lays them out; a saved state resumes on the same batches,
    and on another number of processes is refused."""
    from cat_jax.data import packing
    from cat_jax.errors import CheckpointError

    root, _, _ = exported
    source = streaming.StreamingSource(str(root))
    lengths = {"inputs": 48, "targets": 160}  # untruncated (inputs <= 19, targets <= 112): two or three to a row

    def batches(rows_of, overhead=0):
        return source.train_batches(MIXTURE, SPLIT, lengths, 8, 0, None, rows_of, overhead)

    for p in range(processes):
        stream = batches((p, processes))
        assert stream.packed
        at = 0  # the next position of this process's share
        for step in range(4):
            b = stream.batch(step)
            assert set(b) == set(packing.PACKED_FEATURES) and b["encoder_input_tokens"].shape == (8 // processes, 48)
            rows = [_segments(b, r) for r in range(len(b["encoder_input_tokens"]))]
            count = sum(len(r) for r in rows)
            assert count > len(rows)  # more examples than rows
            picks = [stream.order[p + processes * (at + j)] for j in range(count)]
            arrays = _stream_arrays(stream, picks)
            unplaced = {
                j: (
                    tuple(arrays.features["encoder_input_tokens"][j][: arrays.input_lengths[j]].tolist()),
                    tuple(arrays.features["decoder_target_tokens"][j][: arrays.target_lengths[j]].tolist()),
                )
                for j in range(count)
            }
            placed = []
            for row in rows:
                placed.append([])
                for example in row:
                    j = next(j for j, e in unplaced.items() if e == example)  # the stream's next examples
                    placed[-1].append(j)
                    del unplaced[j]
            assert not unplaced
            want = packing.pack_rows(arrays, placed)
            for k in packing.PACKED_FEATURES:
                np.testing.assert_array_equal(b[k], want[k], err_msg=f"{k} of step {step}")
            at += count
    # A family's prompt room: every example claims its inputs plus 3 slots of a row's 48.
    roomy = batches((0, 1), overhead=3).batch(0)
    for r in range(8):
        segments = roomy["encoder_segment_ids"][r]
        claimed = sum(min(int(np.sum(segments == s)) + 3, 48) for s in range(1, segments.max() + 1))
        assert claimed <= 48
    # Resuming from a saved state gives the batches an uninterrupted stream gives.
    whole, parts = batches((0, processes)), batches((0, processes))
    want = [whole.batch(step) for step in range(6)]
    for step in range(3):
        parts.batch(step)
    state = parts.iterator.get_state()
    resumed = batches((0, processes))
    resumed.iterator.set_state(state)
    for step in range(3, 6):
        got = resumed.batch(step)
        for k in got:
            np.testing.assert_array_equal(got[k], want[step][k], err_msg=f"{k} of resumed step {step}")
    other = batches((0, 3 - processes))
    with pytest.raises(CheckpointError, match="resumes on the number of processes"):
        other.iterator.set_state(state)


def _record_id(source, task: str, index: int) -> str:
    from array_record.python.array_record_module import ArrayRecordReader

    paths = source.shard_paths(MIXTURE, SPLIT, task)
    reader = ArrayRecordReader(paths[index // SHARD])
    try:
        return streaming.decode_record(reader.read([index % SHARD])[0])["id"]
    finally:
        reader.close()


def test_interrupted_export_resumes_to_the_same_files(exported, tmp_path, monkeypatch, caplog):
    root, manifest, _ = exported
    real = stream_export.examples_with_metadata

    def dies_after(n):
        def examples(*args, **kwargs):
            for k, ex in enumerate(real(*args, **kwargs)):
                if k == n:
                    raise KeyboardInterrupt
                yield ex

        return examples

    monkeypatch.setattr(stream_export, "examples_with_metadata", dies_after(700))
    with pytest.raises(KeyboardInterrupt):
        stream_export.export_streaming_one(MIXTURE, SPLIT, str(tmp_path), examples_per_shard=SHARD)
    task_dir = tmp_path / f"{MIXTURE}.{SPLIT}" / "num2words_de"
    progress = json.loads((task_dir / stream_export.PROGRESS).read_text())
    assert progress == {
        "shards": ["shard-00000.array_record", "shard-00001.array_record"],
        "counts": [300, 300],
        "done": False,
    }
    assert not (tmp_path / f"{MIXTURE}.{SPLIT}" / streaming.MANIFEST).exists()
    monkeypatch.setattr(stream_export, "examples_with_metadata", real)
    caplog.set_level("INFO")
    again = stream_export.export_streaming_one(MIXTURE, SPLIT, str(tmp_path), examples_per_shard=SHARD)
    assert "resuming the export after 600 examples in 2 complete shards" in caplog.text
    assert "Exporting num2words_fr/validation: 1,945 examples" in caplog.text
    assert again["shards"] == manifest["shards"]
    for task, names in manifest["shards"].items():
        for name in names:
            assert (tmp_path / f"{MIXTURE}.{SPLIT}" / task / name).read_bytes() == (
                root / f"{MIXTURE}.{SPLIT}" / task / name
            ).read_bytes(), (task, name)


def test_progress_line_has_rate_and_eta():
    meter = stream_export.Progress("Exporting t/train", total=1000, done=100)
    meter.start -= 10.0
    meter.update(200)
    line = meter.line()
    assert line.startswith("Exporting t/train: 300 examples, 20/s (30.0% of 1,000, ETA 0:00:35)"), line


@pytest.mark.parametrize("pack", [False, True])
def test_streamed_training_resumes_on_the_uninterrupted_stream(exported, tmp_path, pack):
    root, _, _ = exported
    args = (
        "--gin.DatasetConfig.max_examples=None",
        f"--gin.data_source.streaming_dir='{root}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        f"--gin.DatasetConfig.split='{SPLIT}'",
        "--gin.train.checkpoint_period=2",
        f"--gin.DatasetConfig.pack={pack}",
        *(["--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 160}"] if pack else []),
    )
    whole = run_module("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "whole", 4, *args))
    assert "streamed by grain from ArrayRecord shards" + (", packed" if pack else ")") in whole.stderr
    for _ in range(2):
        run_module(
            "cat_jax.train",
            train_args("train_small_ce.gin", tmp_path / "parts", 4, *args, "--gin.train.max_steps_per_run=2"),
        )
    assert (tmp_path / "parts" / "2" / "data").is_dir()
    info = json.loads((tmp_path / "parts" / "run_info.json").read_text())
    assert info["data_order"] == "streamed" and info["data_source"] == f"streaming:{root}"
    assert info["dataset"].get("pack", False) is pack
    losses = [
        [json.loads(l)["train/loss"] for l in (tmp_path / d / "train_metrics.jsonl").read_text().splitlines()]
        for d in ("whole", "parts")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert _state_bytes(tmp_path / "whole") == _state_bytes(tmp_path / "parts")
    # The same MODEL_DIR continued in memory instead is a changed data order: refused.
    refused = run_module("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "parts", 6), check=False)
    assert refused.returncode == 2 and "data_order" in refused.stderr, refused.stderr[-2000:]


def _state_bytes(model_dir) -> tuple[int, list[bytes]]:
    """(step, the bytes of every leaf of the newest saved train state)."""
    import os

    import jax
    import orbax.checkpoint as ocp

    from cat_jax.checkpoints import Checkpointer

    step = Checkpointer.latest_in(str(model_dir))
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(model_dir, str(step), "state"))
    return step, [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]
