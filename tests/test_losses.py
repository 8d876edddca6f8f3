"""Tests for cat_jax.losses against a NumPy float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import BFLOAT16, SHALLOW, assert_close

from cat_jax.losses import MASKS, NORMALIZERS, cascade_aware_loss, token_cross_entropy

BATCH, LENGTH, VOCAB = 4, 9, 13
ROW_LENGTHS = (9, 6, 4, 0)  # last row is all padding


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(student, teacher, targets, weights, alpha, temperature, mask, normalizer):
    """NumPy float64 CAT loss and metrics. student, teacher: [b, l, v]; targets, weights: [b, l]."""
    student = np.asarray(student, np.float64)
    teacher = np.asarray(teacher, np.float64)
    weights = np.asarray(weights, np.float64)
    ce = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]
    c_s = (student.argmax(-1) == targets).astype(np.float64)
    c_l = (teacher.argmax(-1) == targets).astype(np.float64)
    indicator = {
        "small_or_large": np.maximum(c_s, c_l),
        "large": c_l,
        "small": c_s,
        "none": np.ones_like(c_s),
    }[mask]
    m = weights * indicator
    log_pt = _log_softmax(teacher / temperature)
    log_ps = _log_softmax(student / temperature)
    pt = np.exp(log_pt)
    kl = np.where(pt > 0, pt * (np.where(pt > 0, log_pt, 0.0) - log_ps), 0.0).sum(-1)
    per_token = alpha * ce + (1 - alpha) * temperature**2 * kl
    denom = weights.sum() if normalizer == "weights" else m.sum()
    loss = (m * per_token).sum() / denom if denom > 0 else 0.0
    w = weights.sum()
    return {
        "loss": loss,
        "mask_fraction": m.sum() / w,
        "student_accuracy": (weights * c_s).sum() / w,
        "teacher_accuracy": (weights * c_l).sum() / w,
        "ce": (weights * ce).sum() / w,
        "kd": (weights * kl).sum() / w,
        "num_tokens": w,
        "mask": m,
    }


def make_batch(seed: int = 0, vocab: int = VOCAB, batch: int = BATCH, length: int = LENGTH):
    """Random logits where the target is the student's argmax on ~40% of tokens and the
    teacher's on ~50% (independently), so every mask keeps some tokens and drops others."""
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2.0
    teacher = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2.0
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    for logits, fraction in ((student, 0.4), (teacher, 0.5)):
        plant = rng.random((batch, length)) < fraction
        b, t = np.nonzero(plant)
        logits[b, t, targets[b, t]] = logits[b, t].max(-1) + 1.0
    row_lengths = np.resize(np.array(ROW_LENGTHS), batch)
    weights = (np.arange(length)[None, :] < row_lengths[:, None]).astype(np.float32)
    return student, teacher, targets, weights


def test_batch_exercises_every_mask():
    student, teacher, targets, weights = make_batch()
    ref = reference(student, teacher, targets, weights, 1.0, 1.0, "small_or_large", "weights")
    valid = weights > 0
    c_s = (student.argmax(-1) == targets)[valid]
    c_l = (teacher.argmax(-1) == targets)[valid]
    for counted in (c_s & c_l, c_s & ~c_l, ~c_s & c_l, ~c_s & ~c_l):
        assert counted.sum() >= 2
    assert 0.3 < ref["mask_fraction"] < 0.9


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("mask", MASKS)
def test_matches_numpy_reference(mask, normalizer, alpha, temperature):
    student, teacher, targets, weights = make_batch()
    loss, metrics = cascade_aware_loss(
        jnp.asarray(student),
        jnp.asarray(teacher),
        jnp.asarray(targets),
        jnp.asarray(weights),
        alpha=alpha,
        temperature=temperature,
        mask=mask,
        normalizer=normalizer,
    )
    ref = reference(student, teacher, targets, weights, alpha, temperature, mask, normalizer)
    assert loss.dtype == jnp.float32
    assert ref["loss"] > 0.1
    assert_close(loss, ref["loss"], SHALLOW)
    assert_close(metrics["loss"], ref["loss"], SHALLOW)
    for name in ("mask_fraction", "student_accuracy", "teacher_accuracy", "ce", "num_tokens"):
        assert_close(metrics[name], ref[name], SHALLOW, err_msg=name)
    if alpha < 1.0:
        assert_close(metrics["kd"], ref["kd"], SHALLOW)
    else:
        assert "kd" not in metrics


def test_jit_matches_eager():
    student, teacher, targets, weights = make_batch(seed=3)
    fn = jax.jit(lambda s, t, y, w: cascade_aware_loss(s, t, y, w, alpha=0.3, temperature=2.0))
    loss, metrics = fn(student, teacher, targets, weights)
    ref = reference(student, teacher, targets, weights, 0.3, 2.0, "small_or_large", "weights")
    assert_close(loss, ref["loss"], SHALLOW)
    assert_close(metrics["kd"], ref["kd"], SHALLOW)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mask", MASKS)
def test_gradient_zero_exactly_where_mask_drops(mask, alpha):
    student, teacher, targets, weights = make_batch(seed=1)
    grad = jax.grad(lambda s: cascade_aware_loss(s, teacher, targets, weights, alpha=alpha, mask=mask)[0])(
        jnp.asarray(student)
    )
    grad = np.asarray(grad)
    counted = reference(student, teacher, targets, weights, alpha, 1.0, mask, "weights")["mask"]
    dropped = counted == 0
    assert dropped.any() and (~dropped).any()
    assert np.all(grad[dropped] == 0.0)
    assert np.all(np.abs(grad[~dropped]).max(-1) > 1e-4)


def test_gradient_zero_at_padding_with_mask_none():
    student, teacher, targets, weights = make_batch(seed=2)
    grad = np.asarray(
        jax.grad(lambda s: cascade_aware_loss(s, teacher, targets, weights, mask="none")[0])(jnp.asarray(student))
    )
    assert np.all(grad[weights == 0] == 0.0)
    assert np.all(np.abs(grad[weights > 0]).max(-1) > 1e-4)


def test_no_gradient_to_teacher():
    student, teacher, targets, weights = make_batch(seed=2)
    grad = jax.grad(lambda t: cascade_aware_loss(student, t, targets, weights, alpha=0.5)[0])(jnp.asarray(teacher))
    assert np.all(np.asarray(grad) == 0.0)


def test_plain_cross_entropy_is_a_special_case():
    student, teacher, targets, weights = make_batch(seed=4)
    per_token = token_cross_entropy(jnp.asarray(student), jnp.asarray(targets))
    total = float(np.sum(np.asarray(per_token) * weights))
    ref_ce = -np.take_along_axis(_log_softmax(student.astype(np.float64)), targets[..., None], -1)[..., 0]
    assert_close(per_token, ref_ce, SHALLOW)
    assert_close(total, (ref_ce * weights).sum(), SHALLOW)
    for teacher_arg in (teacher, None):
        loss, metrics = cascade_aware_loss(student, teacher_arg, targets, weights, alpha=1.0, mask="none")
        assert_close(loss, total / weights.sum(), SHALLOW)  # summed in another order
        assert_close(metrics["ce"], loss, SHALLOW)
        assert metrics["mask_fraction"] == 1.0


def test_distillation_of_identical_logits_is_zero():
    student, _, targets, weights = make_batch(seed=5)
    for temperature in (1.0, 3.0):
        loss, metrics = cascade_aware_loss(
            student, student, targets, weights, alpha=0.0, temperature=temperature, mask="none"
        )
        assert abs(float(metrics["kd"])) < 1e-6
        assert abs(float(loss)) < 1e-6
        assert float(metrics["ce"]) > 1.0


def test_teacher_zero_probabilities_are_finite():
    student, teacher, targets, weights = make_batch(seed=6)
    teacher = teacher.copy()
    teacher[..., :4] = -np.inf  # probability exactly 0
    teacher[..., 4] = -1e5  # underflows to 0 in float32
    fn = lambda s: cascade_aware_loss(s, teacher, targets, weights, alpha=0.5, mask="none")
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(student))
    assert np.isfinite(loss) and np.isfinite(metrics["kd"])
    assert np.all(np.isfinite(np.asarray(grad)))
    safe_teacher = teacher.copy()
    safe_teacher[..., :5] = -1e4  # exp underflows to 0 in float64 too
    ref = reference(student, safe_teacher, targets, weights, 0.5, 1.0, "none", "weights")
    assert_close(loss, ref["loss"], SHALLOW)


def test_zero_weights_give_zero_loss_not_nan():
    student, teacher, targets, _ = make_batch(seed=7)
    weights = np.zeros(targets.shape, np.float32)
    for normalizer in NORMALIZERS:
        fn = lambda s: cascade_aware_loss(s, teacher, targets, weights, alpha=0.5, normalizer=normalizer)
        (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(student))
        assert float(loss) == 0.0
        assert all(np.isfinite(v) for v in metrics.values())
        assert np.all(np.asarray(grad) == 0.0)


def test_mask_normalizer_divides_by_counted_tokens():
    student, teacher, targets, weights = make_batch(seed=8)
    by_weights, metrics = cascade_aware_loss(student, teacher, targets, weights, normalizer="weights")
    by_mask, _ = cascade_aware_loss(student, teacher, targets, weights, normalizer="mask")
    assert 0.0 < float(metrics["mask_fraction"]) < 1.0
    assert_close(by_mask * metrics["mask_fraction"], by_weights, SHALLOW)


@pytest.mark.parametrize("mask", ["none", "small"])
def test_teacher_none_allowed(mask):
    student, teacher, targets, weights = make_batch(seed=9)
    loss, metrics = cascade_aware_loss(student, None, targets, weights, alpha=1.0, mask=mask)
    ref = reference(student, teacher, targets, weights, 1.0, 1.0, mask, "weights")
    assert_close(loss, ref["loss"], SHALLOW)
    assert "teacher_accuracy" not in metrics and "kd" not in metrics
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": "small_or_large"}, "mask='small_or_large' needs teacher_logits"),
        ({"mask": "large"}, "mask='large' needs teacher_logits"),
        ({"mask": "none", "alpha": 0.5}, "alpha=0.5 < 1 needs teacher_logits"),
        ({"mask": "small", "alpha": 0.0}, "alpha=0.0 < 1 needs teacher_logits"),
    ],
)
def test_teacher_none_refused(kwargs, message):
    student, _, targets, weights = make_batch()
    with pytest.raises(ValueError, match=message):
        cascade_aware_loss(student, None, targets, weights, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": "both"}, "Unknown mask 'both'; allowed values: small_or_large, large, small, none"),
        ({"normalizer": "tokens"}, "Unknown normalizer 'tokens'; allowed values: weights, mask"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ],
)
def test_bad_options_refused(kwargs, message):
    student, teacher, targets, weights = make_batch()
    with pytest.raises(ValueError, match=message):
        cascade_aware_loss(student, teacher, targets, weights, **kwargs)


def test_bad_shapes_refused():
    student, teacher, targets, weights = make_batch()
    with pytest.raises(ValueError, match="Vocabulary sizes differ: student 13, teacher 12"):
        cascade_aware_loss(student, teacher[..., :12], targets, weights)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        cascade_aware_loss(student, teacher[:, :5], targets, weights)
    with pytest.raises(ValueError, match="targets .* and weights"):
        cascade_aware_loss(student, teacher, targets[:, :5], weights)
    with pytest.raises(ValueError, match="targets must be integer"):
        cascade_aware_loss(student, teacher, targets.astype(np.float32), weights)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("mask", [m for m in MASKS if m != "none"])
def test_mask_start_step_matches_reference(mask, alpha):
    """Before mask_start_step every token counts (the reference with mask 'none'); from it on,
    the mask's reference. The step is traced (jit), as in the train step."""
    student, teacher, targets, weights = make_batch()
    fn = jax.jit(
        lambda step: cascade_aware_loss(
            student, teacher, targets, weights, alpha=alpha, mask=mask, mask_start_step=3, step=step
        )
    )
    for step, counted_as in ((0, "none"), (2, "none"), (3, mask), (7, mask)):
        loss, metrics = fn(jnp.asarray(step, jnp.int32))
        ref = reference(student, teacher, targets, weights, alpha, 1.0, counted_as, "weights")
        assert_close(loss, ref["loss"], SHALLOW, err_msg=f"step {step}")
        assert_close(metrics["mask_fraction"], ref["mask_fraction"], SHALLOW, err_msg=f"step {step}")
    masked = reference(student, teacher, targets, weights, alpha, 1.0, mask, "weights")
    assert masked["mask_fraction"] < 0.9  # the two phases differ on this batch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_start_step": -1, "step": 0}, "mask_start_step must be >= 0, got -1"),
        ({"mask_start_step": 5}, r"mask_start_step=5 needs the training step: pass step="),
        ({"mask_start_step": 5, "step": 0, "mask": "none"}, "mask_start_step=5 delays a mask, but mask='none'"),
    ],
)
def test_bad_mask_start_step_refused(kwargs, message):
    student, teacher, targets, weights = make_batch()
    with pytest.raises(ValueError, match=message):
        cascade_aware_loss(student, teacher, targets, weights, **kwargs)


def test_bfloat16_logits_upcast():
    student, teacher, targets, weights = make_batch(seed=10)
    kwargs = dict(alpha=0.5, temperature=2.0, mask="small_or_large")
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    loss16, metrics16 = cascade_aware_loss(s16, t16, targets, weights, **kwargs)
    assert loss16.dtype == jnp.float32
    # Same values in float32: computing inside in float32 makes them agree tightly.
    loss_rounded, _ = cascade_aware_loss(s16.astype(jnp.float32), t16.astype(jnp.float32), targets, weights, **kwargs)
    assert_close(loss16, loss_rounded, SHALLOW)
    loss32, metrics32 = cascade_aware_loss(student, teacher, targets, weights, **kwargs)
    assert_close(loss16, loss32, BFLOAT16)
    np.testing.assert_allclose(metrics16["mask_fraction"], metrics32["mask_fraction"])
    assert_close(metrics16["kd"], metrics32["kd"], BFLOAT16)


_SHARDED_CODE = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cat_jax.losses import cascade_aware_loss
    from tests.test_losses import make_batch

    assert jax.device_count() == 8, jax.devices()
    student, teacher, targets, weights = make_batch(seed=11, vocab=16, batch=8)
    configs = [
        dict(alpha=0.5, temperature=2.0, mask="small_or_large", normalizer="weights"),
        dict(alpha=1.0, temperature=1.0, mask="large", normalizer="mask"),
    ]

    def loss_and_grad(kwargs, s, t, y, w):
        fn = lambda s: cascade_aware_loss(s, t, y, w, **kwargs)
        return jax.value_and_grad(fn, has_aux=True)(s)

    one = jax.devices()[0]
    dense = [
        jax.jit(lambda *a, k=k: loss_and_grad(k, *a))(
            *(jax.device_put(x, one) for x in (student, teacher, targets, weights))
        )
        for k in configs
    ]
    out = {}
    for shape in ((2, 4), (4, 2)):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))
        logits_sharding = NamedSharding(mesh, P("data", None, "model"))
        token_sharding = NamedSharding(mesh, P("data", None))
        s = jax.device_put(student, logits_sharding)
        t = jax.device_put(teacher, logits_sharding)
        y = jax.device_put(targets, token_sharding)
        w = jax.device_put(weights, token_sharding)
        assert s.sharding.shard_shape(s.shape) == (8 // shape[0], 9, 16 // shape[1])
        for i, k in enumerate(configs):
            (loss, metrics), grad = jax.jit(lambda *a: loss_and_grad(k, *a))(s, t, y, w)
            (dloss, dmetrics), dgrad = dense[i]
            out[f"{shape[0]}x{shape[1]}/{i}"] = {
                "loss": float(loss),
                "dense_loss": float(dloss),
                "metric_diff": max(abs(float(metrics[m]) - float(dmetrics[m])) for m in dmetrics),
                "grad_diff": float(np.abs(np.asarray(grad) - np.asarray(dgrad)).max()),
                "grad_norm": float(np.abs(np.asarray(dgrad)).max()),
                "grad_shard_shape": list(grad.sharding.shard_shape(grad.shape)),
            }
    print(json.dumps(out))
    """
)


def test_sharded_equals_single_device():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([repo, os.path.join(repo, "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_CODE],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(out) == ["2x4/0", "2x4/1", "4x2/0", "4x2/1"]
    for name, r in out.items():
        assert r["dense_loss"] > 0.1, name
        assert_close(r["loss"], r["dense_loss"], SHALLOW, err_msg=name)
        assert r["metric_diff"] <= SHALLOW * max(r["dense_loss"], 1.0), name
        assert r["grad_norm"] > 1e-3 and r["grad_diff"] <= SHALLOW * r["grad_norm"], name
        assert r["grad_shard_shape"] == [8 // int(name[0]), 9, 16 // int(name[2])], name
