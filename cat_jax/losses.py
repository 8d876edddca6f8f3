"""Token-level losses: cross-entropy, distillation and the cascade-aware loss (CAT).

All functions take logits `[batch, length, vocab]` (any float dtype; they are upcast to float32
inside), integer `targets [batch, length]` and float `weights [batch, length]` (0 on padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKS = ("small_or_large", "large", "small", "none")
NORMALIZERS = ("weights", "mask")
_MASKS_WITHOUT_TEACHER = ("small", "none")


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy -log softmax(logits)[target], in float32.

    logits: [batch, length, vocab]; targets: [batch, length] int -> [batch, length] float32.
    """
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    target_logit = jnp.sum(logits * one_hot, axis=-1)
    return log_normalizer - target_logit


def token_kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-token KL(softmax(teacher / T) || softmax(student / T)), in float32.

    Computed from log-softmaxes; vocabulary entries where the teacher's probability is exactly 0
    contribute 0 (no NaN from 0 * log 0).
    teacher_logits, student_logits: [batch, length, vocab] -> [batch, length] float32.
    """
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    terms = jnp.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    return jnp.sum(terms, axis=-1)


def top_k_kl_divergence(
    top_k_ids: jax.Array, top_k_logprobs: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Per-token KL(teacher || softmax(student / T)) over k + 1 outcomes: the teacher's k most
    probable tokens and "any other token" (the rest of its mass), in float32.

    top_k_ids [batch, length, k] int and top_k_logprobs [batch, length, k]: the teacher's log
    softmax at temperature T at those ids (a teacher cache's entries, taken at this T). The
    student's probabilities are grouped the same way (its rest: a log-sum-exp over the other ids).
    Equals `token_kl_divergence` when the k tokens hold all of the teacher's mass and never exceeds
    it (grouping outcomes cannot raise a KL); what it leaves out is the KL inside the rest.
    student_logits [batch, length, vocab] -> [batch, length] float32.
    """
    log_q = top_k_logprobs.astype(jnp.float32)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    head = jnp.sum(jnp.exp(log_q) * (log_q - jnp.take_along_axis(log_p, top_k_ids, axis=-1)), axis=-1)
    if top_k_ids.shape[-1] >= log_p.shape[-1]:
        return head  # every token is in the top k: no rest (its float residue is rounding)
    in_top = jnp.sum(jax.nn.one_hot(top_k_ids, log_p.shape[-1], dtype=jnp.bool_), axis=-2) > 0
    log_p_rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_p), axis=-1)
    q_rest = jnp.clip(1.0 - jnp.sum(jnp.exp(log_q), axis=-1), 0.0, 1.0)
    safe_rest = jnp.where(q_rest > 0, q_rest, 1.0)
    tail = jnp.where(q_rest > 0, q_rest * (jnp.log(safe_rest) - log_p_rest), 0.0)
    return head + tail


def _validate(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    targets: jax.Array,
    weights: jax.Array,
    alpha: float | None,
    temperature: float,
    mask: str,
    normalizer: str,
    mask_start_step: int = 0,
    step: jax.Array | int | None = None,
    cached: tuple[bool, bool] = (False, False),
) -> None:
    """Raises ValueError naming the bad option or shape and the allowed values. `cached`: whether
    a teacher cache gives (the teacher's correctness, its top-k) in place of teacher_logits."""
    if mask not in MASKS:
        raise ValueError(f"Unknown mask {mask!r}; allowed values: {', '.join(MASKS)}.")
    if mask_start_step < 0:
        raise ValueError(f"mask_start_step must be >= 0, got {mask_start_step}.")
    if mask_start_step > 0 and mask == "none":
        raise ValueError(
            f"mask_start_step={mask_start_step} delays a mask, but mask='none'; "
            f"choose a mask ({', '.join(m for m in MASKS if m != 'none')}) or set mask_start_step=0."
        )
    if mask_start_step > 0 and step is None:
        raise ValueError(f"mask_start_step={mask_start_step} needs the training step: pass step=.")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"Unknown normalizer {normalizer!r}; allowed values: {', '.join(NORMALIZERS)}.")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if teacher_logits is not None and any(cached):
        raise ValueError("Give teacher_logits or a teacher cache's entries (teacher_correct, teacher_top_k), not both.")
    if teacher_logits is None:
        if mask not in _MASKS_WITHOUT_TEACHER and not cached[0]:
            raise ValueError(
                f"mask={mask!r} needs teacher_logits (it uses the large model's argmax); "
                f"pass teacher_logits or use mask='none' or 'small'."
            )
        if alpha != 1.0 and not cached[1]:
            raise ValueError(
                f"alpha={'(a traced array)' if alpha is None else alpha} < 1 needs teacher_logits "
                "(the distillation term); "
                f"pass teacher_logits or set alpha=1."
            )
    if student_logits.ndim != 3:
        raise ValueError(f"student_logits must be [batch, length, vocab], got shape {student_logits.shape}.")
    if targets.shape != student_logits.shape[:2] or weights.shape != targets.shape:
        raise ValueError(
            f"targets {targets.shape} and weights {weights.shape} must both equal the "
            f"[batch, length] of student_logits {student_logits.shape}."
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}.")
    if teacher_logits is not None:
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"Vocabulary sizes differ: student {student_logits.shape[-1]}, "
                f"teacher {teacher_logits.shape[-1]}; both models must share one vocabulary."
            )
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {teacher_logits.shape} differs from student_logits shape {student_logits.shape}."
            )


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or 0 where denominator is 0 (gradient-safe)."""
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def cascade_aware_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    targets: jax.Array,
    weights: jax.Array,
    *,
    alpha: float | jax.Array = 1.0,
    temperature: float = 1.0,
    mask: str = "small_or_large",
    normalizer: str = "weights",
    mask_start_step: int = 0,
    step: jax.Array | int | None = None,
    teacher_correct: jax.Array | None = None,
    teacher_top_k: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cascade-aware loss (CAT) of a small student against a frozen large teacher.

        c_S(t) = 1[argmax student_t = y_t]      c_L(t) = 1[argmax teacher_t = y_t]
        m_t    = stop_gradient(w_t * I_t),  I_t = max(c_S, c_L) | c_L | c_S | 1
                                            for mask = small_or_large | large | small | none
        l_t    = alpha * CE(y_t, softmax(student_t))
                 + (1 - alpha) * T^2 * KL(softmax(teacher_t / T) || softmax(student_t / T))
        L      = sum_t m_t l_t / sum_t w_t          (normalizer="weights")
               = sum_t m_t l_t / sum_t m_t          (normalizer="mask")
    With mask_start_step = N > 0, I_t = 1 while step < N (every token counts: the first N steps
    are plain CE or distillation, a warm start inside the run) and the mask applies from step N;
    `step` (the 0-based step of this batch, a scalar int or traced array) is then required.
    Zero denominators give L = 0. mask="none", alpha=1 is plain cross-entropy; mask="none",
    alpha<1 is standard distillation. The teacher logits are constants (stop_gradient); its
    softmax is computed only when alpha < 1. `alpha` may be a scalar jax array (a weight that
    follows a schedule inside a jitted step, e.g. SALT's): then it needs teacher_logits, both
    terms are computed, and its range is the caller's to keep.

    student_logits: [batch, length, vocab]; teacher_logits: [batch, length, vocab] or None
    (allowed only when mask is "none" or "small" and alpha == 1); targets: [batch, length] int;
    weights: [batch, length] float, 0 on padding.
    Returns (scalar float32 loss, metrics) where metrics holds float32 scalars: loss,
    mask_fraction (sum m / sum w), student_accuracy, ce (weighted mean CE, unmasked), num_tokens
    (sum w), plus teacher_accuracy when a teacher is given and kd (weighted mean KL, unmasked)
    when alpha < 1.

    From a teacher cache (`cat_jax.objectives.teacher_cache`), with teacher_logits None:
    `teacher_correct` [batch, length] (c_L as stored: bool or 0/1) gives the mask and
    teacher_accuracy, and `teacher_top_k` (ids, log-probabilities [batch, length, k]) the
    distillation term, the KL over its top k and the rest (`top_k_kl_divergence`; the
    log-probabilities taken at `temperature`).
    """
    traced = isinstance(alpha, jax.Array)
    alpha = jnp.asarray(alpha, jnp.float32) if traced else float(alpha)
    temperature = float(temperature)
    _validate(
        student_logits,
        teacher_logits,
        targets,
        weights,
        None if traced else alpha,
        temperature,
        mask,
        normalizer,
        mask_start_step,
        step,
        (teacher_correct is not None, teacher_top_k is not None),
    )
    weights = weights.astype(jnp.float32)
    num_tokens = jnp.sum(weights)

    student_correct = (jnp.argmax(student_logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "num_tokens": num_tokens,
        "student_accuracy": _safe_divide(jnp.sum(weights * student_correct), num_tokens),
    }
    if teacher_logits is not None:
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        teacher_correct = (jnp.argmax(teacher_logits, axis=-1) == targets).astype(jnp.float32)
    elif teacher_correct is not None:
        teacher_correct = jax.lax.stop_gradient(teacher_correct.astype(jnp.float32))
    if teacher_correct is not None:
        metrics["teacher_accuracy"] = _safe_divide(jnp.sum(weights * teacher_correct), num_tokens)

    if mask == "small_or_large":
        indicator = jnp.maximum(student_correct, teacher_correct)
    elif mask == "large":
        indicator = teacher_correct
    elif mask == "small":
        indicator = student_correct
    else:
        indicator = jnp.ones_like(weights)
    if mask_start_step > 0:
        indicator = jnp.where(jnp.asarray(step) >= mask_start_step, indicator, 1.0)
    token_mask = jax.lax.stop_gradient(weights * indicator)
    mask_count = jnp.sum(token_mask)

    ce = token_cross_entropy(student_logits, targets)
    metrics["ce"] = _safe_divide(jnp.sum(weights * ce), num_tokens)
    if not traced and alpha == 1.0:
        per_token = ce
    else:
        if teacher_logits is not None:
            kd = token_kl_divergence(teacher_logits, student_logits, temperature)
        else:
            ids, logprobs = jax.lax.stop_gradient(teacher_top_k)
            kd = top_k_kl_divergence(ids, logprobs, student_logits, temperature)
        metrics["kd"] = _safe_divide(jnp.sum(weights * kd), num_tokens)
        per_token = (1.0 - alpha) * temperature**2 * kd
        if traced or alpha > 0.0:
            per_token = per_token + alpha * ce

    denominator = num_tokens if normalizer == "weights" else mask_count
    loss = _safe_divide(jnp.sum(token_mask * per_token), denominator)
    metrics["loss"] = loss
    metrics["mask_fraction"] = _safe_divide(mask_count, num_tokens)
    return loss, metrics
