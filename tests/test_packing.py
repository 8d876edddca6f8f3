"""Packing (`cat_jax.data.packing`, `PackedTrainBatches`): first-fit placement, the packed features,
batches as a pure function of (seed, step), and both families' packed batches giving each example
the loss, the gradients and the CAT mask it has unpacked; evaluation and decoding stay unpacked."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tolerances import DEEP, assert_close, undecided

from cat_jax import losses, models
from cat_jax.data import packing
from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.batches import InMemoryBatches, PackedTrainBatches, TrainBatches, eval_batches
from cat_jax.errors import ConfigError
from cat_jax.models.decoder import DecoderConfig
from cat_jax.models.t5 import T5Config

EOS = 1
VOCAB = 48
LI, LT = 12, 8
T5_TINY = T5Config(
    vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=2, num_decoder_layers=2
)
DECODER_TINY = DecoderConfig(
    vocab_size=VOCAB, emb_dim=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32
)
# A decoder vocabulary as the family reads it: BOS before every prompt (overhead 0: BOS in, EOS out).
DECODER_VOCAB = types.SimpleNamespace(eos_id=EOS, prompt_prefix_ids=(2,), prompt_suffix_ids=())


def synthetic(n: int, seed: int = 0, truncate: bool = True) -> ExampleArrays:
    """n examples with random lengths (EOS last, 0 padding); with `truncate`, one example's inputs and
    one's targets are longer than the arrays (stored truncated, without EOS)."""
    rng = np.random.default_rng(seed)
    n_in = rng.integers(2, LI // 2 + 2, n)
    n_t = rng.integers(2, LT // 2 + 1, n)
    if truncate:
        n_in[0], n_t[1] = LI + 3, LT + 2
    enc = np.zeros((n, LI), np.int32)
    targets = np.zeros((n, LT), np.int32)
    for i in range(n):
        row_in = np.append(rng.integers(3, VOCAB, n_in[i] - 1), EOS)[:LI]
        row_t = np.append(rng.integers(3, VOCAB, n_t[i] - 1), EOS)[:LT]
        enc[i, : len(row_in)], targets[i, : len(row_t)] = row_in, row_t
    dec = np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], axis=1)
    return ExampleArrays(
        features={
            "encoder_input_tokens": enc,
            "decoder_input_tokens": dec,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.float32),
        },
        ids=np.array([f"x:{i}" for i in range(n)]),
        task_names=np.array(["a" if i % 3 else "b" for i in range(n)]),
        inputs_text=np.full(n, ""),
        targets_text=np.full(n, ""),
        input_lengths=n_in.astype(np.int32),
        target_lengths=n_t.astype(np.int32),
        extras=np.full(n, "{}"),
    )


# ---- the packer ---------------------------------------------------------------------------------
def test_first_fit_places_each_example_in_the_first_row_with_room():
    rows = packing.first_fit(np.array([6, 5, 3, 4, 1, 2]), np.array([1, 1, 5, 1, 1, 1]), 10, 6)
    assert rows == [[0, 2], [1, 3, 4], [5]]
    # Bounded open rows: with one open row, row 0 closes when example 1 opens row 1.
    assert packing.first_fit(np.array([6, 5, 3]), np.array([1, 1, 1]), 10, 6, max_open_rows=1) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="Example 1 needs 11 input"):
        packing.first_fit(np.array([3, 11]), np.array([1, 1]), 10, 6)


def test_packed_rows_hold_the_examples_with_segments_and_positions():
    arrays = synthetic(3, truncate=False)
    packed = packing.pack_rows(arrays, [[2, 0], [1]])
    n_in, n_t = packing.example_lengths(arrays)
    f = arrays.features
    row = packed["encoder_input_tokens"][0]
    assert row[: n_in[2]].tolist() == f["encoder_input_tokens"][2, : n_in[2]].tolist()
    assert row[n_in[2] : n_in[2] + n_in[0]].tolist() == f["encoder_input_tokens"][0, : n_in[0]].tolist()
    assert packed["encoder_segment_ids"][0].tolist() == [1] * n_in[2] + [2] * n_in[0] + [0] * (LI - n_in[2] - n_in[0])
    assert packed["encoder_positions"][0, : n_in[2] + n_in[0]].tolist() == [*range(n_in[2]), *range(n_in[0])]
    want_dec = [0, *f["decoder_target_tokens"][2, : n_t[2] - 1], 0, *f["decoder_target_tokens"][0, : n_t[0] - 1]]
    assert packed["decoder_input_tokens"][0, : n_t[2] + n_t[0]].tolist() == want_dec
    assert packed["decoder_loss_weights"][0].sum() == n_t[2] + n_t[0]
    assert packed["decoder_segment_ids"][1].tolist() == [1] * n_t[1] + [0] * (LT - n_t[1])
    # One example per row, in its own row: the unpacked arrays (decoder inputs where a target is
    # weighted: unpacked, the shifted EOS also fills the first padding slot).
    alone = packing.pack_rows(arrays, [[0], [1], [2]])
    for name in ("encoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
        np.testing.assert_array_equal(alone[name], f[name])
    real = f["decoder_loss_weights"] > 0
    np.testing.assert_array_equal(alone["decoder_input_tokens"][real], f["decoder_input_tokens"][real])


def test_packed_train_batches_are_a_pure_function_of_seed_and_step():
    arrays = synthetic(40)
    batches = PackedTrainBatches(arrays, 4, seed=3, rates={"a": 1.0, "b": 1.0})
    sequential = [batches.global_rows(step) for step in range(12)]
    fresh = PackedTrainBatches(arrays, 4, seed=3, rates={"a": 1.0, "b": 1.0})
    assert fresh.global_rows(11) == sequential[11]  # resuming at step 11 packs the same rows
    epoch0 = sorted(e for row in batches.epoch_rows(0) for e in row)
    assert epoch0 == sorted(TrainBatches(arrays, 4, seed=3, rates={"a": 1.0, "b": 1.0}).epoch_rows(0).tolist())
    assert len(batches.epoch_rows(0)) < len(arrays) / 2  # > 2 examples per row on average
    host1 = batches.batch(5, 1, 2)
    np.testing.assert_array_equal(host1["encoder_input_tokens"], batches.batch(5)["encoder_input_tokens"][2:])
    assert PackedTrainBatches(arrays, 4, seed=4).global_rows(0) != sequential[0]


def test_in_memory_batches_pack_only_the_training_batches():
    arrays = synthetic(20)
    packed = InMemoryBatches(arrays, 4, 0, None, (0, 1), pack_input_overhead=0)
    assert packed.packed and set(packed.batch(0)) == set(packing.PACKED_FEATURES)
    unpacked = InMemoryBatches(arrays, 4, 0, None, (0, 1))
    assert not unpacked.packed and set(unpacked.batch(0)) == set(arrays.features)
    # Evaluation (and so decoding) reads unpacked rows, whatever the training batches do.
    batch, _ = next(eval_batches(arrays, 4))
    assert set(batch) == set(arrays.features)


# ---- the families -------------------------------------------------------------------------------
def _per_token(model, params, batch, teacher_params):
    """(per-token CE [b, L], CAT mask [b, L], gradient of the batch's CAT loss)."""

    def cat_loss(p):
        logits = model.logits(p, batch)
        teacher = model.logits(teacher_params, batch)
        return losses.cascade_aware_loss(
            logits, teacher, batch["decoder_target_tokens"], batch["decoder_loss_weights"], alpha=0.5
        )[0]

    forward = jax.jit(model.logits)
    logits = forward(params, batch).astype(jnp.float32)
    teacher = forward(teacher_params, batch).astype(jnp.float32)
    targets = batch["decoder_target_tokens"]
    ce = losses.token_cross_entropy(logits, targets) * batch["decoder_loss_weights"]
    correct = lambda x: jnp.argmax(x, -1) == targets
    mask = (correct(logits) | correct(teacher)) & (batch["decoder_loss_weights"] > 0)
    open_ = undecided(logits, targets) | undecided(teacher, targets)
    return np.asarray(ce), np.asarray(mask), np.asarray(open_), jax.jit(jax.grad(cat_loss))(params)


def _by_example(values, rows, segments, weights):
    """{example: the values of its weighted tokens, in order} of a packed batch."""
    out = {}
    for r, examples in enumerate(rows):
        for s, e in enumerate(examples, start=1):
            out[e] = values[r][(segments[r] == s) & (weights[r] > 0)]
    return out


@pytest.mark.parametrize("family", ["t5", "decoder"])
@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_packed_batch_gives_each_example_its_unpacked_loss_gradient_and_cat_mask(family):
    config, vocab = (T5_TINY, None) if family == "t5" else (DECODER_TINY, DECODER_VOCAB)
    model = models.build(config)
    params = nn.meta.unbox(model.init_params(jax.random.key(0)))
    teacher_params = nn.meta.unbox(model.init_params(jax.random.key(1)))
    arrays = synthetic(10)
    overhead = 0 if vocab is None else model.packing_input_overhead(vocab)
    rows = packing.first_fit(*packing.packing_costs(arrays, overhead), LI, LT)
    assert len(rows) < len(arrays)
    packed = model.make_batch(packing.pack_rows(arrays, rows), vocab)
    unpacked = model.make_batch(arrays.features, vocab)
    assert set(packed) == set(model.batch_shapes({"inputs": LI, "targets": LT}, len(rows), packed=True))
    for name, shape in model.batch_shapes({"inputs": LI, "targets": LT}, len(rows), packed=True).items():
        assert packed[name].shape == shape.shape and packed[name].dtype == shape.dtype, name

    ce_u, mask_u, open_u, grads_u = _per_token(model, params, unpacked, teacher_params)
    ce_p, mask_p, open_p, grads_p = _per_token(model, params, packed, teacher_params)
    segments = packed["decoder_segment_ids" if family == "t5" else "packed_segment_ids"]
    weights_u, weights_p = unpacked["decoder_loss_weights"], packed["decoder_loss_weights"]
    assert weights_p.sum() == weights_u.sum()
    by_example = {
        name: _by_example(values, rows, segments, weights_p)
        for name, values in (("ce", ce_p), ("mask", mask_p), ("open", open_p))
    }
    for e in range(len(arrays)):
        real = weights_u[e] > 0
        assert_close(by_example["ce"][e], ce_u[e][real], DEEP, f"example {e}'s token losses")
        decided = ~(open_u[e][real] | by_example["open"][e])
        np.testing.assert_array_equal(by_example["mask"][e][decided], mask_u[e][real][decided])
    flat_u = dict(jax.tree_util.tree_leaves_with_path(grads_u))
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads_p):
        assert_close(leaf, flat_u[path], DEEP, jax.tree_util.keystr(path))


def test_decoder_packing_refuses_rows_its_prompts_overflow():
    model = models.build(DECODER_TINY)
    chat = types.SimpleNamespace(eos_id=EOS, prompt_prefix_ids=(2, 3, 4), prompt_suffix_ids=(5,))
    assert model.packing_input_overhead(chat) == 3
    arrays = synthetic(10, truncate=False)
    rows = packing.first_fit(*packing.packing_costs(arrays, 0), LI, LT)
    with pytest.raises(ConfigError, match="each prompt adds 3 special tokens"):
        model.make_batch(packing.pack_rows(arrays, rows), chat)
    rows = packing.first_fit(*packing.packing_costs(arrays, 3), LI, LT)
    assert model.make_batch(packing.pack_rows(arrays, rows), chat)["packed_tokens"].shape == (len(rows), LI + LT - 1)


def test_train_job_packs_with_the_family_overhead_and_refuses_unpacked_batches(monkeypatch):
    """DatasetConfig.pack: the job asks the source for rows with the model's prompt room, and refuses
    an objective's own (unpacked) batches."""
    from cat_jax.data.config import DatasetConfig
    from cat_jax.jobs import train

    arrays = synthetic(10, truncate=False)
    asked = {}

    class Source:
        kind = "exported"

        def describe(self):
            return "test"

        def train_batches(self, *args):
            asked["overhead"] = args[-1]
            return InMemoryBatches(arrays, 2, 0, None, (0, 1), args[-1])

    monkeypatch.setattr(train.data_lib, "data_source", Source)
    monkeypatch.setattr(train.partitioning, "process_batch_slice", lambda *a: (0, 1))
    monkeypatch.setattr(train.partitioning, "batch_sharding", lambda *a: None)
    chat = types.SimpleNamespace(eos_id=EOS, prompt_prefix_ids=(2, 3), prompt_suffix_ids=(4,))
    own = types.SimpleNamespace(train_batches=lambda *a: None)
    run = types.SimpleNamespace(model=models.build(DECODER_TINY), vocab=chat, objective=own, mesh=None, rules=None)
    dataset = DatasetConfig("t", {"inputs": LI, "targets": LT}, batch_size=2, pack=True)
    assert train._train_data(dataset, run).packed and asked["overhead"] == 2
    assert not train._train_data(dataset.__class__("t", {"inputs": LI, "targets": LT}, 2), run).packed
    assert asked["overhead"] is None
    # SALT_DS's selection: batches of its own, unpacked.
    run.objective = types.SimpleNamespace(train_batches=lambda *a: InMemoryBatches(arrays, 2, 0, None, (0, 1)))
    with pytest.raises(ConfigError, match="not packed"):
        train._train_data(dataset, run)
    # Recorded in run_info only when on: a run directory from before packing resumes unpacked.
    assert "pack" not in DatasetConfig("t", {"inputs": 4, "targets": 4}).record()
    assert dataset.record()["pack"] is True


@pytest.mark.slow
def test_train_binary_packs_its_batches(tmp_path):
    """The train binary with DatasetConfig.pack: the same tiny run, more examples' tokens per step."""
    import json

    from conftest import run_module, train_args

    lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"
    tokens = {}
    for pack in (False, True):
        model_dir = tmp_path / f"pack_{pack}"
        run_module(
            "cat_jax.train", train_args("train_large.gin", model_dir, 2, lengths, f"--gin.DatasetConfig.pack={pack}")
        )
        rows = [json.loads(line) for line in (model_dir / "train_metrics.jsonl").read_text().splitlines()]
        tokens[pack] = [r["train/num_tokens"] for r in rows if "train/num_tokens" in r]
    assert len(tokens[True]) == len(tokens[False]) == 2
    # cmudict_syllables: inputs of about 20 tokens, targets of 2; 64 input slots hold about 3 examples.
    assert min(tokens[True]) >= 2 * max(tokens[False]), tokens
