"""cat_jax.data: loading splits into arrays, deterministic train batches, eval batches, export."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from cat_jax import data

LENGTHS = {"inputs": 16, "targets": 12}
PER_TASK = 30


@pytest.fixture(scope="module")
def mix() -> data.ExampleArrays:
    return data.load_split("offline_mix", "validation", LENGTHS, max_examples=PER_TASK)


def _fake(task_sizes: dict[str, int], length: int = 3) -> data.ExampleArrays:
    """Synthetic arrays whose encoder tokens hold the row index (no TensorFlow needed)."""
    n = sum(task_sizes.values())
    rows = np.arange(n, dtype=np.int32)
    return data.ExampleArrays(
        features={
            "encoder_input_tokens": np.repeat(rows[:, None], length, axis=1),
            "decoder_input_tokens": np.zeros((n, length), np.int32),
            "decoder_target_tokens": np.repeat(rows[:, None] + 1, length, axis=1),
            "decoder_loss_weights": np.ones((n, length), np.float32),
        },
        ids=np.array([f"x:{i}" for i in range(n)]),
        task_names=np.concatenate([np.full(size, name) for name, size in task_sizes.items()]),
        inputs_text=np.array([f"in {i}" for i in range(n)]),
        targets_text=np.array([f"out {i}" for i in range(n)]),
        input_lengths=np.full(n, length, np.int32),
        target_lengths=np.full(n, length, np.int32),
        extras=np.full(n, "{}"),
    )


def test_load_split_shapes_order_and_text(mix):
    names = ["cmudict_g2p", "cmudict_syllables", "num2words_de", "num2words_fr"]
    assert len(mix) == 4 * PER_TASK
    assert mix.task_names.tolist() == [n for n in names for _ in range(PER_TASK)]
    assert len(set(mix.ids.tolist())) == len(mix)
    assert all(i.startswith(f"{t}:") for i, t in zip(mix.ids, mix.task_names))
    f = mix.features
    assert f["encoder_input_tokens"].shape == (len(mix), 16) and f["encoder_input_tokens"].dtype == np.int32
    for k in ("decoder_input_tokens", "decoder_target_tokens"):
        assert f[k].shape == (len(mix), 12) and f[k].dtype == np.int32
    assert f["decoder_loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(f["decoder_input_tokens"][:, 0], 0)
    np.testing.assert_array_equal(f["decoder_input_tokens"][:, 1:], f["decoder_target_tokens"][:, :-1])
    np.testing.assert_array_equal(f["decoder_loss_weights"], (f["decoder_target_tokens"] != 0).astype(np.float32))
    # Byte vocabulary: token = byte + 3, then EOS (1).
    short = [i for i, t in enumerate(mix.targets_text) if len(t.encode()) + 1 <= 12]
    assert short
    for i in short:
        expected = [b + 3 for b in mix.targets_text[i].encode()] + [1]
        assert f["decoder_target_tokens"][i, : len(expected)].tolist() == expected
        assert mix.target_lengths[i] == len(expected)


def test_truncation_counted_before_trimming_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="cat_jax.data"):
        arrays = data.load_split("cmudict_g2p", "validation", LENGTHS, max_examples=PER_TASK)
    input_lengths = np.array([len(t.encode()) + 1 for t in arrays.inputs_text])
    target_lengths = np.array([len(t.encode()) + 1 for t in arrays.targets_text])
    np.testing.assert_array_equal(arrays.input_lengths, input_lengths)
    assert arrays.num_truncated_inputs == int(np.sum(input_lengths > 16)) > 0
    assert arrays.num_truncated_targets == int(np.sum(target_lengths > 12)) > 0
    truncated = target_lengths > 12
    np.testing.assert_array_equal(arrays.features["decoder_target_tokens"][truncated, -1], 1)  # still ends in EOS
    message = caplog.text
    assert f"{arrays.num_truncated_inputs} of {PER_TASK} examples have inputs longer than 16" in message
    assert "TASK_FEATURE_LENGTHS" in message and f"'targets': {target_lengths.max()}" in message


def test_cache_dir_roundtrip(tmp_path, mix):
    first = data.load_split("offline_mix", "validation", LENGTHS, max_examples=PER_TASK, cache_dir=str(tmp_path))
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("offline_mix.validation.") and path.suffix == ".npz"
    second = data.load_split("offline_mix", "validation", LENGTHS, max_examples=PER_TASK, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(first.features["decoder_target_tokens"], mix.features["decoder_target_tokens"])
    np.testing.assert_array_equal(second.ids, mix.ids)
    other = data.load_split("num2words_fr", "validation", LENGTHS, max_examples=3, cache_dir=str(tmp_path))
    assert len(other) == 3 and len(list(tmp_path.iterdir())) == 2


def test_save_load_roundtrip(tmp_path, mix):
    path = str(tmp_path / "mix.npz")
    part = mix.take([5, 3, 100])
    part.save(path)
    loaded = data.ExampleArrays.load(path)
    assert loaded.ids.tolist() == [mix.ids[5], mix.ids[3], mix.ids[100]]
    assert loaded.task_names.tolist() == mix.task_names[[5, 3, 100]].tolist()
    assert loaded.targets_text.tolist() == mix.targets_text[[5, 3, 100]].tolist()
    for k, v in part.features.items():
        np.testing.assert_array_equal(loaded.features[k], v)
        assert loaded.features[k].dtype == v.dtype
    assert loaded.num_truncated_targets == part.num_truncated_targets


def test_unknown_name_lists_close_match():
    with pytest.raises(ValueError, match=r"cmudict_g2p.*python -m tasks"):
        data.get_task_or_mixture("cmudict_gp2")
    assert data.get_task_or_mixture("offline_mix").name == "offline_mix"
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.load_split("num2words_de", "dev", LENGTHS)


def test_mixture_rates():
    rates = data.mixture_rates("offline_mix")
    assert rates["num2words_fr"] == rates["num2words_de"] and rates["cmudict_g2p"] > 5 * rates["num2words_fr"]
    assert data.mixture_rates("num2words_fr") is None


def test_importing_data_does_not_import_tensorflow():
    code = "import sys, cat_jax.data; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_batches_are_a_pure_function_of_seed_and_step():
    arrays = _fake({"a": 10})
    first, second = data.TrainBatches(arrays, 4, seed=7), data.TrainBatches(arrays, 4, seed=7)
    for step in (0, 5, 3, 0):
        np.testing.assert_array_equal(
            first.batch(step)["encoder_input_tokens"], second.batch(step)["encoder_input_tokens"]
        )
    resumed = data.TrainBatches(arrays, 4, seed=7)
    np.testing.assert_array_equal(resumed.global_rows(6), first.global_rows(6))
    other_seed = data.TrainBatches(arrays, 4, seed=8)
    assert not all(np.array_equal(other_seed.global_rows(s), first.global_rows(s)) for s in range(3))
    rows = first.global_rows(1)
    np.testing.assert_array_equal(first.batch(1)["encoder_input_tokens"][:, 0], rows)


def test_each_epoch_covers_every_example_once():
    batches = data.TrainBatches(_fake({"a": 10}), 4, seed=0)
    stream = np.concatenate([batches.global_rows(s) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:].tolist()  # a fresh permutation each epoch


def test_process_shards_concatenate_to_the_global_batch():
    batches = data.TrainBatches(_fake({"a": 50}), 8, seed=3)
    shards = [batches.batch(2, process_index=i, process_count=4)["encoder_input_tokens"] for i in range(4)]
    assert all(s.shape == (2, 3) for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards)[:, 0], batches.global_rows(2))
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        batches.batch(0, process_index=0, process_count=3)


def test_mixture_sampling_follows_rates():
    arrays = _fake({"a": 100, "b": 100})
    batches = data.TrainBatches(arrays, 20, seed=1, rates={"a": 3.0, "b": 1.0})
    epoch0, epoch1 = batches.epoch_rows(0), batches.epoch_rows(1)
    names = arrays.task_names
    assert np.sum(names[epoch0] == "a") == 150 and np.sum(names[epoch0] == "b") == 50
    # Task b's rows are all used once over two epochs before any repeats.
    b_rows = np.concatenate([epoch0[names[epoch0] == "b"], epoch1[names[epoch1] == "b"]])
    assert sorted(b_rows.tolist()) == list(range(100, 200))
    first_steps = np.concatenate([batches.global_rows(s) for s in range(5)])
    assert 55 <= np.sum(names[first_steps] == "a") <= 95  # about 75 of 100
    with pytest.raises(ValueError, match="one rate per task"):
        data.TrainBatches(arrays, 20, seed=1, rates={"a": 1.0})
    only_a = data.TrainBatches(arrays, 20, seed=1, rates={"a": 1.0, "b": 0.0})
    assert set(names[only_a.epoch_rows(0)].tolist()) == {"a"}


def test_eval_batches_cover_everything_once_with_padding():
    arrays = _fake({"a": 10})
    out = list(data.eval_batches(arrays, 4))
    assert len(out) == 3
    assert [m.tolist() for _, m in out][-1] == [True, True, False, False]
    real = np.concatenate([b["encoder_input_tokens"][m] for b, m in out])
    np.testing.assert_array_equal(real, arrays.features["encoder_input_tokens"])
    last, mask = out[-1]
    assert all(v.shape[0] == 4 for v in last.values())
    np.testing.assert_array_equal(last["decoder_target_tokens"][~mask], 0)
    assert last["decoder_loss_weights"][~mask].sum() == 0.0
