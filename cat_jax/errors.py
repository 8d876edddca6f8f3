"""Every error class of cat_jax (a leaf module: it imports nothing of cat_jax).

Errors whose message names the problem and its fix are printed by the entry points without a
traceback (`FRIENDLY`, exit status 2); a non-finite loss or update exits with status 3.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A command line or gin configuration that cannot work; the message names the fix."""


class ExportedDataError(ConfigError):
    """An exported split that is missing or does not match the run; the message has the command."""


class UnknownTaskError(ValueError):
    """A task or mixture name that is not registered."""


class ModelDirError(ValueError):
    """MODEL_DIR cannot be used for this run (unwritable, or holds a different run)."""


class CheckpointError(ValueError):
    """A checkpoint directory, step or structure that cannot be used; the message names the fix."""


class TeacherMismatchError(ValueError):
    """The teacher (or another model of a cascade) cannot serve this run: vocabulary or config."""


class ConversionError(ValueError):
    """A checkpoint that cannot be imported or exported (unknown format, missing or extra tensors)."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the updated state became NaN or infinite; nothing of that state is saved."""


class Terminated(BaseException):
    """SIGTERM arrived outside a phase that handles it itself (start-up, decoding, writing)."""


FRIENDLY: tuple[type[BaseException], ...] = (
    ConfigError, UnknownTaskError, ModelDirError, CheckpointError, TeacherMismatchError,
    ConversionError)
