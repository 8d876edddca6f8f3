"""Every error class of cat_jax, and the checks of configured numbers that raise them (a leaf
module: it imports nothing of cat_jax).

Errors whose message names the problem and its fix are printed by the entry points without a
traceback (`FRIENDLY`, exit status 2); a non-finite loss or update exits with status 3.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A command line or gin configuration that cannot work; the message names the fix."""


class ExportedDataError(ConfigError):
    """An exported split that is missing or does not match the run; the message has the command."""


class InputFileError(ConfigError):
    """An INPUT_FILE (JSONL prompts) that cannot be read: missing, empty, not JSON, no `inputs`."""


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
    ConfigError,
    UnknownTaskError,
    ModelDirError,
    CheckpointError,
    TeacherMismatchError,
    ConversionError,
)


def check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """ConfigError unless `value` is an int >= `minimum` (or None, when allowed); `name` says
    where it is set (e.g. "TRAIN_STEPS (train.train_steps)")."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}{' or None' if allow_none else ''}; got {value!r}.")


def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    allow_none: bool = False,
) -> None:
    """ConfigError unless `value` is a finite real number, >= `minimum`, <= `maximum` and < `below`
    when given (or None, when allowed)."""
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )
    ok = (
        ok
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
        and (below is None or value < below)
    )
    if not ok:
        bounds = " and ".join(
            b
            for b in (
                f">= {minimum}" if minimum is not None else "",
                f"<= {maximum}" if maximum is not None else "",
                f"< {below}" if below is not None else "",
            )
            if b
        )
        raise ConfigError(
            f"{name} must be a finite number{' ' + bounds if bounds else ''}"
            f"{' or None' if allow_none else ''}; got {value!r}."
        )
