"""`synthetic_sums`: a task of any size, generated on the fly (nothing is held in memory).

Example i of a split: inputs "sum: a + b", targets "a+b" (its decimal value), with a and b drawn
from a hash of (split, i); id "synthetic_sums:<split>:<i>". The number of examples per split is
`synthetic_sizes()` (gin: `--gin.synthetic_sizes.train=3000000`), 2,000,000 train and 2,000
validation / test by default: large enough that the in-memory data path would need gigabytes, which
is what the streaming path (`cat_jax.data.streaming`) is measured against.
"""

from __future__ import annotations

import gin
import seqio
import tensorflow as tf

from cat_jax import metrics
from tasks.vocab import VOCABULARY

SPLITS = ("train", "validation", "test")
_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}


@gin.configurable
def synthetic_sizes(train: int = 2_000_000, validation: int = 2_000, test: int = 2_000) -> dict[str, int]:
    """Examples per split of synthetic_sums."""
    return {"train": int(train), "validation": int(validation), "test": int(test)}


def _dataset(split: str, shuffle_files: bool) -> tf.data.Dataset:
    del shuffle_files  # the order is fixed: example i is a function of (split, i)
    salt = _SPLIT_SALT[split]

    def make(i: tf.Tensor) -> dict[str, tf.Tensor]:
        a = tf.random.stateless_uniform([], [salt, 2 * i], 0, 10_000, dtype=tf.int64)
        b = tf.random.stateless_uniform([], [salt, 2 * i + 1], 0, 10_000, dtype=tf.int64)
        return {
            "id": tf.strings.join(["synthetic_sums:", split, ":", tf.strings.as_string(i)]),
            "inputs": tf.strings.join(["sum: ", tf.strings.as_string(a), " + ", tf.strings.as_string(b)]),
            "targets": tf.strings.as_string(a + b),
        }

    return tf.data.Dataset.range(synthetic_sizes()[split]).map(
        make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


class _SyntheticSource(seqio.FunctionDataSource):
    def __init__(self) -> None:
        super().__init__(_dataset, splits=SPLITS)

    def num_input_examples(self, split: str) -> int:
        return synthetic_sizes()[split]


seqio.TaskRegistry.add(
    "synthetic_sums",
    source=_SyntheticSource(),
    preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    output_features={name: seqio.Feature(VOCABULARY, add_eos=True) for name in ("inputs", "targets")},
    metric_fns=[metrics.exact_match],
)
metrics.register_quality("synthetic_sums", metrics.exact_match_scores)
