"""The suite's float tolerances, each with its reason. Every float comparison that is not bitwise
goes through this module, so a tolerance is chosen once, for a stated reason, not per test.

Three kinds of comparison occur:

1. **The same program on the same inputs** (a resumed run against an uninterrupted one, a
   checkpoint round trip, export then import): bitwise. Use `np.testing.assert_array_equal`;
   nothing here.
2. **The same float maths computed by two different programs**: XLA against PyTorch (the recorded
   Hugging Face fixtures), XLA on one CPU against another (AMD EPYC's AVX2 kernels against an Intel
   Xeon's AVX-512 / AMX ones), one jax/XLA release against the next, one device against a sharded
   mesh, a cached decoding step against a teacher-forced pass, float32 against a float64 NumPy
   reference. Each sum is then taken in another order: a reordered float32 sum of n terms is off by
   up to about n * eps (typically sqrt(n) * eps) of its terms' magnitude, and a network stacks such
   sums through its layers, whose nonlinearities and norms amplify them. So these comparisons are
   relative to the *scale* of the reference (its largest magnitude), not element by element: an
   element near zero is as exposed to the rounding of the large terms it was summed from as any
   other (`assert_close`).
   - `SHALLOW` = 1e-5 of the scale: one or two reductions over at most a few thousand terms
     (a loss, a log-softmax or an entropy of given logits; probabilities of a rule). About 80
     float32 ulps of the scale; the error seen is at most a few ulps.
   - `DEEP` = 1e-4 of the scale: a whole forward or backward pass (logits, gradients, parameters
     after an update). The largest error seen: 1.2e-5 (mt5's imported logits on an Intel Xeon with
     AMX against PyTorch's on an AMD EPYC; 3e-6 on the EPYC itself), so 1e-4 leaves 8x headroom,
     while the smallest real defect of an import or a layer is 10x above it: one dropped RMSNorm
     scale is off by >= 7e-2 of the scale, a dropped relative-attention bias table by >= 0.15, a
     layer-norm epsilon 1000x too large by >= 9.6e-4 (`tests/test_convert.py::
     test_tolerance_catches_real_import_errors` keeps that true).
   - `BFLOAT16` = 2e-2 of the scale: bfloat16 compute against float32, or two bfloat16 programs.
     One bfloat16 ulp is 2**-8 = 3.9e-3 relative; a few roundings of the activations compound.
   tests/test_multiprocess.py compares parameters after a few Adam steps of 1 and 2 processes in
   absolute terms; its docstring gives the reason for its bound.
3. **A discrete outcome of such floats** (an argmax, a greedy token, the CAT mask): equal where
   the decision is not a near-tie. Where the reference's top two logits are closer than the
   tolerance of kind 2, either program may pick either token (`near_ties`); where the decision is
   whether the argmax is a given target, it is open when the target's logit and the best other one
   are that close (`undecided`). A test either shows its inputs have no such position, or allows
   exactly those positions to differ.
"""

from __future__ import annotations

import numpy as np

SHALLOW = 1e-5
DEEP = 1e-4
BFLOAT16 = 2e-2


def scale_of(want) -> float:
    """The reference's largest magnitude (1 for an all-zero reference: then the tolerance is
    absolute)."""
    peak = float(np.max(np.abs(np.asarray(want, np.float64)))) if np.size(want) else 0.0
    return peak if peak > 0 else 1.0


def assert_close(got, want, rel: float, err_msg: str = "") -> None:
    """|got - want| <= rel * scale_of(want) everywhere (see the module docstring for `rel`); a
    scalar `want` is compared with every element of `got`."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if want64.ndim == 0:
        want64 = np.broadcast_to(want64, got64.shape)
    assert got64.shape == want64.shape, f"{err_msg} shapes differ: {got64.shape} vs {want64.shape}"
    scale = scale_of(want64)
    error = float(np.max(np.abs(got64 - want64))) if got64.size else 0.0
    assert error <= rel * scale, (
        f"{err_msg} max |got - want| = {error:.3g} = {error / scale:.3g} of the reference's scale "
        f"{scale:.4g}; allowed {rel:g} of it"
    )


def near_ties(logits, rel: float = DEEP) -> np.ndarray:
    """[...] bool: where the top two of `logits` [..., vocab] are within `rel` of the logits'
    scale, so that another program computing them may take the other one as the argmax."""
    x = np.asarray(logits, np.float64)
    top2 = np.sort(x, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) <= rel * scale_of(x)


def undecided(logits, targets, rel: float = DEEP) -> np.ndarray:
    """[...] bool: where "argmax of `logits` [..., vocab] == `targets` [...]" is open to another
    program: the target's logit and the best other logit are within `rel` of the logits' scale."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(targets)[..., None]
    target = np.take_along_axis(x, y, axis=-1)[..., 0]
    others = x.copy()
    np.put_along_axis(others, y, -np.inf, axis=-1)
    return np.abs(target - others.max(-1)) <= rel * scale_of(x)
