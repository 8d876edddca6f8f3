"""Microbatches (`train.num_microbatches`): one step over N microbatches updates the parameters as
one step over the whole batch does, and reports the same metrics; a batch size N does not divide is
refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_module, train_args
from flax import linen as nn
from tolerances import DEEP, SHALLOW, assert_close, undecided

from cat_jax.errors import ConfigError
from cat_jax.models.t5 import T5Config, T5Model
from cat_jax.objectives.token_loss import LossOptions, token_loss
from cat_jax.train_state import TrainState
from cat_jax.train_step import check_microbatches, make_train_step

VOCAB, B, LI, LT = 64, 8, 12, 10
MODEL = T5Model(
    T5Config(
        vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1
    )
)


def _batch() -> dict[str, np.ndarray]:
    """Rows of different lengths (so that microbatches hold different token counts)."""
    rng = np.random.default_rng(0)
    targets = rng.integers(2, VOCAB, (B, LT)).astype(np.int32)
    for row, length in enumerate([10, 3, 7, 1, 9, 5, 2, 8]):
        targets[row, length:] = 0
    return {
        "encoder_input_tokens": rng.integers(2, VOCAB, (B, LI)).astype(np.int32),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], 1),
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }


def _teacher_logits(teacher_params, batch):
    """A teacher right on the targets divisible by 3 (so that the CAT mask keeps some tokens and
    drops others) with smooth logits elsewhere: a function of each row alone."""
    targets = batch["decoder_target_tokens"]
    guess = jnp.where(targets % 3 == 0, targets, (targets + 1) % VOCAB)
    return 4.0 * jax.nn.one_hot(guess, VOCAB) + teacher_params[targets]


def _state() -> tuple[TrainState, optax.GradientTransformation]:
    params = nn.meta.unbox(MODEL.init_params(jax.random.key(0)))
    tx = optax.sgd(0.5)
    return TrainState(
        step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(1))
    ), tx


def _step(options: LossOptions, num_microbatches):
    state, tx = _state()
    teacher = jax.random.normal(jax.random.key(2), (VOCAB, VOCAB))
    fn = make_train_step(
        token_loss(MODEL, options),
        tx,
        optax.constant_schedule(0.5),
        _teacher_logits if options.needs_teacher else None,
        num_microbatches=num_microbatches,
    )
    new, metrics = jax.jit(fn)(state, _batch(), teacher)
    return new.params, jax.device_get(metrics)


@pytest.mark.parametrize(
    "options, num_microbatches",
    [
        (LossOptions(), 2),
        (LossOptions(mask="small_or_large"), 4),
        (LossOptions(mask="small_or_large", alpha=0.5, temperature=2.0, normalizer="mask"), 2),
    ],
    ids=["ce", "cat_xent", "cat_distill_mask_normalizer"],
)
@pytest.mark.slow  # 10-30 s on 2 CPU cores: the fast tier leaves it to `make test`
def test_microbatched_update_equals_full_batch(options, num_microbatches):
    """SGD (the update is the gradient itself, so a difference in it is not hidden or amplified by
        an optimizer's normalisation): the parameters after one step and every metric, N = 2 and 4
        against one pass (N = 2 or 4; N = 2 takes rows of 28 and 17 tokens: a mean of the microbatches' losses
    would differ); the loss is the token-weighted one of the whole batch."""
    batch = _batch()
    params0 = _state()[0].params
    student = np.asarray(MODEL.logits(params0, batch), np.float64)
    assert not undecided(student, batch["decoder_target_tokens"], DEEP).any()  # the mask is well posed
    want_params, want = _step(options, None)
    assert "loss_denominator" not in want
    if options.mask != "none":
        assert 0.1 < want["mask_fraction"] < 0.9  # the mask drops some tokens, keeps others
    got_params, got = _step(options, num_microbatches)
    assert sorted(got) == sorted(want)
    for name in want:
        assert_close(got[name], want[name], SHALLOW, err_msg=name)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_params), jax.tree_util.tree_leaves(want_params), strict=True
    ):
        assert_close(g, w, DEEP, err_msg=jax.tree_util.keystr(path))
    # The step really moved the parameters (the comparison above is not of two copies of params0).
    moved = max(
        float(np.max(np.abs(w - p)))
        for w, p in zip(jax.tree_util.tree_leaves(want_params), jax.tree_util.tree_leaves(params0))
    )
    assert moved > 1e-3


def test_microbatches_must_divide_the_batch():
    check_microbatches(None, 8)
    check_microbatches(4, 8)
    with pytest.raises(ConfigError, match="does not divide BATCH_SIZE=8"):
        check_microbatches(3, 8)
    with pytest.raises(ConfigError, match="train.num_microbatches"):
        check_microbatches(0, 8)


def test_train_binary_refuses_microbatches_that_do_not_divide(tmp_path):
    """N = 3 of BATCH_SIZE 8: exit 2, naming the setting, before MODEL_DIR is created."""
    refused = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", tmp_path / "n3", 1, "--gin.train.num_microbatches=3"),
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "train.num_microbatches=3 does not divide BATCH_SIZE=8" in refused.stderr
    assert not (tmp_path / "n3").exists()


@pytest.mark.slow  # a train run: about a minute on 2 shared CPU cores
def test_train_binary_takes_microbatches(tmp_path):
    """The train binary with N = 2 trains (its log says so) and saves its step."""
    trained = run_module(
        "cat_jax.train", train_args("train_small_ce.gin", tmp_path / "n2", 1, "--gin.train.num_microbatches=2")
    )
    assert "2 microbatches" in trained.stderr
    assert (tmp_path / "n2" / "1").is_dir()
