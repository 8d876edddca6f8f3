"""`DatasetConfig`: which examples, at which lengths, in which batches (T5X's DatasetConfig, trimmed).

One class for every job: a training run's data (`train.train_dataset`: the task or mixture and the
lengths are required) and the split a restored model runs on (eval, infer, cascade_eval,
speculative_eval: the task and lengths default, when None, to what the checkpoint's run_info.json
recorded).
"""

from __future__ import annotations

import dataclasses

import gin

from cat_jax.errors import ConfigError, check_int


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """A split of a task or mixture at TASK_FEATURE_LENGTHS, in batches of `batch_size`; `seed`
    orders a training run's batches; `max_examples` takes a uniform sample of each task; `pack`
    (T5X's `DatasetConfig.pack`) packs several examples into each row of a training batch, in memory
    or streamed (`cat_jax.data.packing`; evaluation and decoding always read unpacked rows)."""

    mixture_or_task_name: str | None = None
    task_feature_lengths: dict | None = None
    batch_size: int = 64
    split: str = "train"
    seed: int = 0
    max_examples: int | None = None
    pack: bool = False

    def __post_init__(self) -> None:
        lengths = self.task_feature_lengths
        if lengths is not None:
            if not isinstance(lengths, dict) or set(lengths) != {"inputs", "targets"}:
                raise ConfigError(
                    f"TASK_FEATURE_LENGTHS (DatasetConfig.task_feature_lengths) needs exactly the keys "
                    f"'inputs' and 'targets'; got {lengths!r}."
                )
            for key, value in lengths.items():
                check_int(f"TASK_FEATURE_LENGTHS[{key!r}]", value, 1)
        check_int("BATCH_SIZE (DatasetConfig.batch_size)", self.batch_size, 1)
        check_int("DatasetConfig.seed", self.seed, 0)
        check_int("DatasetConfig.max_examples", self.max_examples, 1, allow_none=True)
        if not isinstance(self.pack, bool):
            raise ConfigError(f"DatasetConfig.pack must be True or False; got {self.pack!r}.")

    def record(self) -> dict:
        """The settings as run_info.json and a teacher cache record them: `pack` only when on, so
        that records written before packing existed still equal an unpacked run's."""
        record = dataclasses.asdict(self)
        if not self.pack:
            del record["pack"]
        return record

    def require_task(self) -> DatasetConfig:
        """Itself, or a ConfigError when the task or the lengths are unset (a training run needs both)."""
        if self.mixture_or_task_name is None or self.task_feature_lengths is None:
            raise ConfigError(
                "A training run needs its task and lengths: set MIXTURE_OR_TASK_NAME "
                "(DatasetConfig.mixture_or_task_name) and TASK_FEATURE_LENGTHS."
            )
        return self
