"""Packing several examples into one row of the encoder-decoder arrays (plain numpy, pure).

A packed row holds whole examples one after the other, its inputs within `Li` tokens and its targets
within `Lt` (the example's lengths, truncated as unpacked). Besides the four MODEL_FEATURES it carries
what keeps the examples apart, as seqio's `EncDecFeatureConverter(pack=True)` and T5X write them:

    encoder_segment_ids / decoder_segment_ids  [R, L] int32: 1, 2, ... for a row's examples, 0 padding
    encoder_positions / decoder_positions      [R, L] int32: each token's index within its example

and `decoder_input_tokens` restarts at every example: 0 (the decoder's BOS), then that example's targets
shifted right. The families turn these into attention masks (no attention across segments), per-segment
relative positions (T5) or rotary positions (decoders); the losses are sums over tokens, so a packed
batch's loss equals the unpacked one's over the same examples.

Placement is greedy first-fit (each example goes to the first open row with room for its inputs and its
targets, else opens a row; at most `max_open_rows` rows stay open, the oldest closing first, as MaxText's
and grain's first-fit packers bound their bins). `input_overhead` adds the tokens a family adds to each
example's inputs (the decoder family's prompt prefix and suffix) so that its rows fit too.

This is the in-memory packer (`PackedTrainBatches`: a batch is a pure function of (seed, step)). A
streamed split is packed by grain's first fit in the same layout (`cat_jax.data.streaming`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cat_jax.data.arrays import ExampleArrays

SEGMENT_FEATURES = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")
PACKED_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
) + SEGMENT_FEATURES
MAX_OPEN_ROWS = 64


def example_lengths(arrays: ExampleArrays) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) token counts [N] as stored: EOS included, truncated to the arrays' lengths."""
    li = arrays.features["encoder_input_tokens"].shape[1]
    lt = arrays.features["decoder_target_tokens"].shape[1]
    return np.minimum(arrays.input_lengths, li).astype(np.int64), np.minimum(arrays.target_lengths, lt).astype(np.int64)


def first_fit(
    input_costs: np.ndarray,
    target_costs: np.ndarray,
    input_length: int,
    target_length: int,
    max_open_rows: int = MAX_OPEN_ROWS,
) -> list[list[int]]:
    """The rows (lists of positions into the cost arrays, in placement order) of greedy first-fit
    packing, in the order the rows were opened. Every cost must fit an empty row."""
    too_long = (input_costs > input_length) | (target_costs > target_length)
    if np.any(too_long):
        i = int(np.argmax(too_long))
        raise ValueError(
            f"Example {i} needs {int(input_costs[i])} input and {int(target_costs[i])} target tokens; a packed "
            f"row holds {input_length} and {target_length}."
        )
    rows: list[list[int]] = []
    open_rows: list[int] = []  # indices into rows
    room_in = np.zeros(0, np.int64)
    room_t = np.zeros(0, np.int64)
    for i, (ci, ct) in enumerate(zip(input_costs.tolist(), target_costs.tolist())):
        fits = np.flatnonzero((room_in >= ci) & (room_t >= ct))
        if fits.size:
            slot = int(fits[0])
            rows[open_rows[slot]].append(i)
            room_in[slot] -= ci
            room_t[slot] -= ct
            continue
        if len(open_rows) == max_open_rows:
            open_rows.pop(0)
            room_in, room_t = room_in[1:], room_t[1:]
        rows.append([i])
        open_rows.append(len(rows) - 1)
        room_in = np.append(room_in, input_length - ci)
        room_t = np.append(room_t, target_length - ct)
    return rows


def pack_rows(arrays: ExampleArrays, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """The packed features (PACKED_FEATURES) of `rows`, each a list of example indices into `arrays`
    laid out in that order."""
    feats = arrays.features
    li = feats["encoder_input_tokens"].shape[1]
    lt = feats["decoder_target_tokens"].shape[1]
    n_in, n_t = example_lengths(arrays)
    out = {name: np.zeros((len(rows), li if name.startswith("encoder") else lt), np.int32) for name in PACKED_FEATURES}
    out["decoder_loss_weights"] = np.zeros((len(rows), lt), np.float32)
    for r, examples in enumerate(rows):
        at_in = at_t = 0
        for segment, e in enumerate(examples, start=1):
            a, b = int(n_in[e]), int(n_t[e])
            if at_in + a > li or at_t + b > lt:
                raise ValueError(f"Row {r}'s examples {list(examples)} do not fit {li} inputs and {lt} targets.")
            out["encoder_input_tokens"][r, at_in : at_in + a] = feats["encoder_input_tokens"][e, :a]
            out["encoder_segment_ids"][r, at_in : at_in + a] = segment
            out["encoder_positions"][r, at_in : at_in + a] = np.arange(a)
            targets = feats["decoder_target_tokens"][e, :b]
            out["decoder_target_tokens"][r, at_t : at_t + b] = targets
            out["decoder_input_tokens"][r, at_t + 1 : at_t + b] = targets[:-1]
            out["decoder_loss_weights"][r, at_t : at_t + b] = feats["decoder_loss_weights"][e, :b]
            out["decoder_segment_ids"][r, at_t : at_t + b] = segment
            out["decoder_positions"][r, at_t : at_t + b] = np.arange(b)
            at_in, at_t = at_in + a, at_t + b
    return out


def pack(arrays: ExampleArrays, input_overhead: int = 0, max_open_rows: int = MAX_OPEN_ROWS) -> dict[str, np.ndarray]:
    """All of `arrays`' examples, in order, packed first-fit into as few rows as that gives."""
    costs = packing_costs(arrays, input_overhead)
    li = arrays.features["encoder_input_tokens"].shape[1]
    rows = first_fit(*costs, li, arrays.features["decoder_target_tokens"].shape[1], max_open_rows)
    return pack_rows(arrays, rows)


def packing_costs(arrays: ExampleArrays, input_overhead: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) tokens [N] each example takes in a packed row: its lengths, the inputs plus
    `input_overhead` (>= 0) capped at the row's input length."""
    n_in, n_t = example_lengths(arrays)
    li = arrays.features["encoder_input_tokens"].shape[1]
    return np.minimum(n_in + max(int(input_overhead), 0), li), n_t
