"""T5X-style command lines: `--gin_file=...` (repeatable) and `--gin.NAME=value` overrides.

Gin files are looked up as given, then relative to the repository root and to `gin_configs/`, so
`--gin_file=gin_configs/runs/train_large.gin` and `--gin_file=runs/train_large.gin` both work, and
run files can `include 'models/tiny.gin'`.

A `--gin.NAME=value` whose value is not a gin literal or reference is taken as a string, so
`--gin.MODEL_DIR=/tmp/run` works as well as T5X's `--gin.MODEL_DIR="'/tmp/run'"`.

A binary with a run file of its own name (`python -m cat_jax.eval` and `gin_configs/runs/eval.gin`)
loads it when no `--gin_file` is given.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import errno
import importlib.util
import logging
import os
import shutil
import sys
import tokenize
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from cat_jax.errors import FRIENDLY, ConfigError, NonFiniteLossError, Terminated

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCH_PATHS = (REPO_ROOT / "gin_configs", REPO_ROOT)

# gin logs every search-path miss of an `include` as an error, even when a later path matches.
logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Path not found"))


def _override_value(value: str) -> str:
    """`value` as gin source text: literals and @/% references stay, anything else is quoted."""
    stripped = value.strip()
    if stripped.startswith(("@", "%")):
        return stripped
    try:
        ast.literal_eval(stripped)
        return stripped
    except (ValueError, SyntaxError):
        return repr(stripped)


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(gin files, gin bindings, remaining args) from a command line."""
    files, bindings, rest = [], [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file" and args:
            files.append(args.pop(0))
        elif arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{name} = {_override_value(value)}")
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return files, bindings, rest


def _resolve_gin_file(path: str) -> str:
    candidates = [Path(path)] + [base / path for base in SEARCH_PATHS]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(
        f"Gin file {path!r} not found (looked in the working directory, {REPO_ROOT} and "
        f"{REPO_ROOT / 'gin_configs'}). Shipped files: "
        + ", ".join(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gin_configs").rglob("*.gin")))
    )


# Configurables registered by `tasks/` (which needs seqio): where seqio cannot be imported, the run
# files' `import tasks` is skipped and bindings of these are ignored (data then comes from
# `data_source.exported_dir`, whose manifest fixes the vocabulary).
SEQIO_ONLY_CONFIGURABLES = ("get_vocabulary",)


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _search_repository_first() -> None:
    """Look up `include`d files in gin_configs/ and the repository before the working directory.

    gin tries the working directory first, and for a relative path it also asks its Python-package
    reader, which crashes (TypeError) when the path's first folder is a namespace package there,
    e.g. a `runs/` or `models/` directory in the working directory. gin has no public way to order
    its search paths, so ours are put in front of its list.
    """
    prefixes = getattr(gin.config, "_LOCATION_PREFIXES", None)
    for base in reversed(SEARCH_PATHS):
        if prefixes is None:
            gin.add_config_file_search_path(str(base))
        elif str(base) not in prefixes:
            prefixes.insert(0, str(base))


def parse_gin(files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True) -> None:
    """Parse gin files and bindings; any gin error becomes a ConfigError naming file and fix.

    A `--gin.NAME=value` binding of a macro that no parsed gin file uses is an error too (a typo
    such as LEARNIG_RATE would otherwise train at the default), naming the closest used macros.
    """
    _search_repository_first()
    resolved = [_resolve_gin_file(f) for f in files]
    skip = False if _importable("seqio") and _importable("tensorflow") else list(SEQIO_ONLY_CONFIGURABLES)
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=finalize, skip_unknown=skip)
    except tokenize.TokenError as e:  # the tokenizer reached the end inside a bracket or a string
        raise ConfigError(
            f"Invalid gin configuration: an unclosed bracket or quote ({e.args[0]}). Gin files: "
            f"{resolved or 'none'}; overrides: {list(bindings) or 'none'}. Close it, or quote the value."
        ) from e
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError, OSError) as e:  # OSError: an include
        raise ConfigError(
            f"Invalid gin configuration ({type(e).__name__}): {_strip_gin_context(str(e))}\n"
            f"Gin files: {resolved or 'none'}; overrides: {list(bindings) or 'none'}. Check the "
            f"spelling of the configurable and parameter names, and that string values are quoted."
        ) from e
    _check_macros_used(bindings, resolved)


def _strip_gin_context(message: str) -> str:
    """A gin error message without the "In call to configurable ..." lines gin appends."""
    return "\n".join(
        line for line in message.splitlines() if not line.strip().startswith("In call to configurable")
    ).rstrip()


def _macro_references(value: Any, found: set[str]) -> None:
    """Adds to `found` every macro name `value` (a bound gin value, maybe nested) refers to."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.name == "macro":
            found.add(value.scoped_selector.split("/")[0])
    elif isinstance(value, Mapping):
        for v in value.values():
            _macro_references(v, found)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _macro_references(v, found)


def used_macros() -> set[str]:
    """The macros that some binding of the parsed configuration refers to (`%NAME`)."""
    found: set[str] = set()
    for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
        for value in params.values():
            _macro_references(value, found)
    return found


def _check_macros_used(bindings: Sequence[str], files: Sequence[str]) -> None:
    bound = [b.split("=", 1)[0].strip() for b in bindings if "=" in b]
    macros = [name for name in bound if name and "." not in name and "/" not in name]
    if not macros:
        return
    used = used_macros()
    unknown = [m for m in macros if m not in used]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.5)
            hints.append(f"--gin.{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        if not files:
            raise ConfigError(
                f"{'; '.join(hints)}: no --gin_file was given, so no macro is defined. Pass the run file that "
                f"defines it, e.g. --gin_file=gin_configs/runs/<run>.gin; run files: {', '.join(run_files())}."
            )
        raise ConfigError(
            f"{'; '.join(hints)}: no gin file uses this macro, so the binding would change nothing. "
            f"Macros the gin files {list(files)} use: {', '.join(sorted(used)) or 'none'}. "
            "Fix the spelling, or bind a configurable's parameter instead (--gin.configurable.param=...)."
        )


def run_files() -> list[str]:
    """The shipped run files (`gin_configs/runs/*.gin` but the shared `*_common.gin` parts)."""
    return sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "gin_configs" / "runs").glob("*.gin")
        if not p.stem.endswith("_common")
    )


def default_run_file() -> str | None:
    """`gin_configs/runs/<binary>.gin` of the binary running as `__main__` (`python -m cat_jax.<binary>`),
    or None when it has none (train: choose a train_*.gin)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.rsplit(".", 1)[-1] if spec is not None and spec.name else None
    path = REPO_ROOT / "gin_configs" / "runs" / f"{name}.gin" if name else None
    return str(path) if path is not None and path.is_file() else None


def write_config(model_dir: str, name: str = "config.gin") -> str:
    """Write the whole gin config into `model_dir` (the operative one is written after a run)."""
    path = os.path.join(model_dir, name)
    with open(path, "w") as f:
        f.write(gin.config_str())
    return path


def write_operative_config(model_dir: str) -> str:
    path = os.path.join(model_dir, "operative_config.gin")
    with open(path, "w") as f:
        f.write(gin.operative_config_str())
    return path


def run(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    description: str = "",
    sigterm_exit_code: int = 143,
) -> None:
    """Run an entry point: parse `--gin_*` flags, call `main(rest)`, turn known errors into exits.

    Without `--gin_file`, the binary's own run file is loaded (`default_run_file`), said on stderr.
    Errors that name their fix (bad config, unknown task, missing checkpoint) are printed without a
    traceback and exit with status 2, and so is a full disk (one line: the disk, what was running
    and the checkpoint on disk); a non-finite loss or update exits with status 3. SIGTERM outside a
    phase that handles it (the training loop saves and stops) prints what was running and what is
    on disk, and exits with `sigterm_exit_code` (the trainer passes 0: its state on disk is always
    resumable).
    """
    from cat_jax import runtime  # pylint: disable=import-outside-toplevel

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(description or (main.__doc__ or ""))
        print("\nFlags: --gin_file=FILE (repeatable), --gin.NAME=VALUE (repeatable).")
        sys.exit(0)
    files, bindings, rest = split_gin_args(argv)
    if not files and default_run_file():
        files = [default_run_file()]
        print(f"No --gin_file given: using {os.path.relpath(files[0])}.", file=sys.stderr)
    runtime.install_sigterm_handler()
    try:
        parse_gin(files, bindings)
        code = main(rest)
    except NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    except FRIENDLY as e:
        print(f"ERROR: {_strip_gin_context(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(f"Stopped by SIGTERM {runtime.termination_report()}", file=sys.stderr)
        sys.exit(sigterm_exit_code)
    except Exception as e:  # pylint: disable=broad-except  # a full disk, wherever it was hit
        full = disk_full(e)
        if full is None:
            raise
        print(f"ERROR: {full} Stopped {runtime.termination_report()} Free space there first.", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def disk_full(error: BaseException) -> str | None:
    """ "The disk holding PATH is full (... free of ...)" when `error`, or an error it was raised
    from, is a full disk or an exceeded quota (an OSError, or a library error quoting one); None
    otherwise. PATH is the file being written when known, else the directory the job writes."""
    from cat_jax import runtime  # pylint: disable=import-outside-toplevel

    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        is_os = isinstance(current, OSError) and current.errno in _DISK_FULL
        if is_os or any(message in text for message in _DISK_FULL.values()):
            reason = _DISK_FULL[current.errno] if is_os else next(m for m in _DISK_FULL.values() if m in text)
            path = (current.filename if is_os else None) or runtime.output_dir()
            return f"The disk holding {path or 'the output'} is full ({reason}{_free_space(path)})."
        current = current.__cause__ or current.__context__
    return None


def _free_space(path: str | None) -> str:
    """ ", N MiB free of M MiB on MOUNT" for the file system holding `path`, or ""."""
    probe = os.path.abspath(path) if path else None
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not probe:
        return ""
    mount = probe
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    usage = shutil.disk_usage(probe)
    return f"; {usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB on {mount}"


def parse_args(rest: Sequence[str], *flags: str) -> argparse.Namespace:
    """Parse the non-gin flags an entry point accepts (each `--name` optional, string-valued)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in flags:
        parser.add_argument(flag)
    ns, unknown = parser.parse_known_args(list(rest))
    if unknown:
        raise ConfigError(f"Unknown flags {unknown}; use --gin_file=... and --gin.NAME=VALUE.")
    return ns
