"""Batches from in-memory examples: training batches as a pure function of (seed, step), unpacked or
packed (`cat_jax.data.packing`), and evaluation batches over every example once (plain numpy)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.packing import first_fit, pack_rows, packing_costs


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights`."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class TrainBatches:
    """Training batches as a pure function of (seed, step).

    The stream is a sequence of epochs of len(arrays) rows. Without rates an epoch is a seeded
    permutation of all rows. With rates ({task: rate}), an epoch takes from each task a count
    proportional to its rate, walking through that task's own seeded permutations (so a task's rows
    repeat only after all of them were used), and shuffles the lot.
    """

    def __init__(
        self, arrays: ExampleArrays, global_batch_size: int, seed: int, rates: Mapping[str, float] | None = None
    ):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive; got {global_batch_size}.")
        if len(arrays) == 0:
            raise ValueError("TrainBatches needs at least one example.")
        self.arrays = arrays
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch_size = len(arrays)
        self._groups: list[np.ndarray] = []
        self._counts = np.zeros(0, dtype=np.int64)
        if rates is not None:
            self._init_rates(rates)
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _init_rates(self, rates: Mapping[str, float]) -> None:
        present = sorted(set(self.arrays.task_names.tolist()))
        if set(rates) != set(present):
            raise ValueError(
                f"rates name the tasks {sorted(rates)} but the examples come from {present}; "
                "give one rate per task (0 to leave a task out)."
            )
        weights = np.array([float(rates[t]) for t in present])
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"rates must be >= 0 with a positive sum; got {dict(rates)}.")
        self._groups = [np.flatnonzero(self.arrays.task_names == t) for t in present]
        self._counts = _largest_remainder(self.epoch_size, weights)

    def _task_rows(self, group: int, start: int, count: int) -> np.ndarray:
        """Positions [start, start + count) of task `group`'s endless stream of permutations."""
        rows = self._groups[group]
        n = len(rows)
        out = []
        for lap in range(start // n, (start + count - 1) // n + 1):
            perm = rows[np.random.default_rng([self.seed, 1 + group, lap]).permutation(n)]
            lo, hi = max(start - lap * n, 0), min(start + count - lap * n, n)
            out.append(perm[lo:hi])
        return np.concatenate(out)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The rows of one epoch, in order."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 2:  # keep the two latest: a batch usually spans at most two
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            rng = np.random.default_rng([self.seed, 0, epoch])
            if not self._groups:
                rows = rng.permutation(self.epoch_size)
            else:
                parts = [self._task_rows(g, epoch * int(c), int(c)) for g, c in enumerate(self._counts) if c > 0]
                rows = rng.permutation(np.concatenate(parts))
            self._epoch_cache[epoch] = rows
        return self._epoch_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Row indices of the global batch of `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}.")
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs = positions // self.epoch_size
        rows = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.epoch_rows(int(epoch))[positions[mask] % self.epoch_size]
        return rows

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the global batch: global_batch_size // process_count consecutive rows."""
        if process_count <= 0 or self.global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"process_count {process_count}; choose a multiple of the host count."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count}).")
        per_host = self.global_batch_size // process_count
        rows = self.global_rows(step)[process_index * per_host : (process_index + 1) * per_host]
        return {k: v[rows] for k, v in self.arrays.features.items()}


class PackedTrainBatches:
    """Packed training batches as a pure function of (seed, step).

    Epoch e's examples, in `TrainBatches`' order for (seed, e) (rates included), are packed first-fit
    (`cat_jax.data.packing.first_fit`) into rows; the rows of epochs 0, 1, ... follow each other and
    global batch k is rows [k * B, (k + 1) * B) of that sequence. Reaching step k packs every epoch up
    to k's once (a few microseconds per example); the latest two epochs' rows are kept.
    """

    def __init__(
        self,
        arrays: ExampleArrays,
        global_batch_size: int,
        seed: int,
        rates: Mapping[str, float] | None = None,
        input_overhead: int = 0,
    ):
        self.order = TrainBatches(arrays, global_batch_size, seed=seed, rates=rates)
        self.arrays = arrays
        self.global_batch_size = global_batch_size
        self.costs = packing_costs(arrays, input_overhead)
        self._starts = [0]  # packed rows before epoch i, for every epoch packed so far (and the next)
        self._packed: dict[int, list[list[int]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of one epoch: lists of example indices."""
        if epoch not in self._packed:
            if len(self._packed) >= 2:
                self._packed.pop(next(iter(self._packed)))
            order = self.order.epoch_rows(epoch)
            li = self.arrays.features["encoder_input_tokens"].shape[1]
            lt = self.arrays.features["decoder_target_tokens"].shape[1]
            rows = first_fit(self.costs[0][order], self.costs[1][order], li, lt)
            self._packed[epoch] = [[int(order[i]) for i in row] for row in rows]
        return self._packed[epoch]

    def _epoch_of(self, position: int) -> int:
        """The epoch holding packed row `position` (packing the epochs before it as needed)."""
        while self._starts[-1] <= position:
            self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
        return int(np.searchsorted(self._starts, position, side="right")) - 1

    def global_rows(self, step: int) -> list[list[int]]:
        """The packed rows of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}.")
        out = []
        for position in range(step * self.global_batch_size, (step + 1) * self.global_batch_size):
            epoch = self._epoch_of(position)
            out.append(self.epoch_rows(epoch)[position - self._starts[epoch]])
        return out

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the packed global batch (`cat_jax.data.packing.PACKED_FEATURES`)."""
        if process_count <= 0 or self.global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"process_count {process_count}; choose a multiple of the host count."
            )
        per_host = self.global_batch_size // process_count
        rows = self.global_rows(step)[process_index * per_host : (process_index + 1) * per_host]
        return pack_rows(self.arrays, rows)


class InMemoryBatches:
    """The training batches of an in-memory split: `batch(step)` is this process's block of rows of
    the global batch of `step` (`TrainBatches`; with `pack_input_overhead` set, `PackedTrainBatches`
    leaving that many tokens for a family's prompt beside each example's inputs, see
    `cat_jax.data.packing`); no data iterator to checkpoint."""

    iterator = None

    def __init__(
        self,
        arrays: ExampleArrays,
        global_batch_size: int,
        seed: int,
        rates: Mapping[str, float] | None,
        rows: tuple[int, int],
        pack_input_overhead: int | None = None,
    ):
        if pack_input_overhead is not None:
            self.batches = PackedTrainBatches(arrays, global_batch_size, seed, rates, pack_input_overhead)
        else:
            self.batches = TrainBatches(arrays, global_batch_size, seed=seed, rates=rates)
        self.packed = pack_input_overhead is not None
        self.rows = rows
        self.features = arrays.features

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.batches.batch(step, *self.rows)


def eval_batches(arrays: ExampleArrays, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every example once, in order; the last batch is padded with zero rows. Yields (batch, real-row mask)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    for start in range(0, len(arrays), batch_size):
        stop = min(start + batch_size, len(arrays))
        batch = {}
        for k, v in arrays.features.items():
            padded = np.zeros((batch_size,) + v.shape[1:], dtype=v.dtype)
            padded[: stop - start] = v[start:stop]
            batch[k] = padded
        yield batch, np.arange(batch_size) < stop - start
