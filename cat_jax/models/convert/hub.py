"""The Hugging Face Hub's checkpoint directory: `config.json` and safetensors (one file, or shards
listed in `model.safetensors.index.json`), read one tensor at a time. Every family's converter reads
through this."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from cat_jax.errors import ConversionError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_hf_dir(directory: str) -> bool:
    """Whether `directory` holds a Hub checkpoint (config.json and safetensors)."""
    return os.path.isfile(os.path.join(directory, CONFIG)) and (
        os.path.isfile(os.path.join(directory, SINGLE)) or os.path.isfile(os.path.join(directory, INDEX))
    )


def read_config(directory: str) -> dict[str, Any]:
    """The directory's config.json."""
    with open(os.path.join(directory, CONFIG)) as f:
        return json.load(f)


class SafetensorsFiles:
    """The tensors of a single or sharded safetensors checkpoint: names, shapes, one at a time."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        else:
            path = os.path.join(directory, SINGLE)
            with _safe_open(path) as f:
                files = dict.fromkeys(f.keys(), path)
        missing = sorted({p for p in files.values() if not os.path.isfile(p)})
        if missing:
            raise ConversionError(f"{index} names shard files that do not exist: {missing}.")
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in dict.fromkeys(files.values()):
            with _safe_open(path) as f:
                for name in f.keys():
                    if files.get(name) == path:
                        sl = f.get_slice(name)
                        self.shapes[name] = tuple(sl.get_shape())
                        self.dtypes[name] = sl.get_dtype()
        absent = sorted(set(files) - set(self.shapes))
        if absent:
            raise ConversionError(f"{directory}: the index lists tensors its shards lack: {absent[:10]}.")

    def get(self, name: str) -> np.ndarray:
        with _safe_open(self.files[name]) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # pylint: disable=broad-except  # safetensors' own error type
                raise _damaged(self.files[name], e) from e


@contextlib.contextmanager
def _safe_open(path: str) -> Iterator[Any]:
    """safetensors' reader of one file; a file it cannot read (truncated by an interrupted
    download, say) is a ConversionError naming it."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    try:
        handle = safe_open(path, framework="np")
    except FileNotFoundError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError and the I/O errors beneath
        raise _damaged(path, e) from e
    with handle as f:
        yield f


def _damaged(path: str, error: Exception) -> ConversionError:
    return ConversionError(
        f"{path} cannot be read as safetensors ({type(error).__name__}: {error}); the file is "
        f"damaged or incomplete ({os.path.getsize(path)} bytes). Download it again."
    )
