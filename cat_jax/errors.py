"""Errors that name their fix; entry points print them without a traceback."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the trainer stops and keeps the last good checkpoint."""


class ModelDirError(ValueError):
    """MODEL_DIR cannot be used for this run (unwritable, or holds a different model)."""


class UnknownTaskError(ValueError):
    """A task or mixture name that is not registered."""


class TeacherMismatchError(ValueError):
    """The teacher cannot serve this student (different vocabulary or model config)."""


def friendly_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is the whole story (printed without a traceback)."""
    from cat_jax.checkpoints import CheckpointError
    from cat_jax.gin_utils import ConfigError
    return (ConfigError, CheckpointError, ModelDirError, UnknownTaskError, TeacherMismatchError)
