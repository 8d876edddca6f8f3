"""T5X-style command lines: `--gin_file=...` (repeatable) and `--gin.NAME=value` overrides.

Gin files are looked up as given, then relative to the repository root and to `gin_configs/`, so
`--gin_file=gin_configs/runs/train_large.gin` and `--gin_file=runs/train_large.gin` both work, and
run files can `include 'models/tiny.gin'`.

A `--gin.NAME=value` whose value is not a gin literal or reference is taken as a string, so
`--gin.MODEL_DIR=/tmp/run` works as well as T5X's `--gin.MODEL_DIR="'/tmp/run'"`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gin

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCH_PATHS = (REPO_ROOT / "gin_configs", REPO_ROOT)

# gin logs every search-path miss of an `include` as an error, even when a later path matches.
logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Path not found"))


class ConfigError(ValueError):
    """A command line or gin configuration that cannot work; the message names the fix."""


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
            name, value = arg[len("--gin."):].split("=", 1)
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
        + ", ".join(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gin_configs").rglob("*.gin"))))


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
    """Parse gin files and bindings; any gin error becomes a ConfigError naming file and fix."""
    _search_repository_first()
    resolved = [_resolve_gin_file(f) for f in files]
    skip = False if _importable("seqio") and _importable("tensorflow") else list(SEQIO_ONLY_CONFIGURABLES)
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=finalize, skip_unknown=skip)
    except (ValueError, KeyError, SyntaxError, ImportError, TypeError) as e:
        raise ConfigError(
            f"Invalid gin configuration ({type(e).__name__}): {e}\n"
            f"Gin files: {resolved or 'none'}; overrides: {list(bindings) or 'none'}. Check the "
            f"spelling of the configurable and parameter names, and that string values are quoted."
        ) from e


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


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
        description: str = "") -> None:
    """Run an entry point: parse `--gin_*` flags, call `main(rest)`, turn known errors into exit 2.

    Errors that name their fix (bad config, unknown task, missing checkpoint) are printed without a
    traceback and exit with status 2; a non-finite loss exits with status 3.
    """
    from cat_jax.errors import NonFiniteLossError, friendly_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(description or (main.__doc__ or ""))
        print("\nFlags: --gin_file=FILE (repeatable), --gin.NAME=VALUE (repeatable).")
        sys.exit(0)
    files, bindings, rest = split_gin_args(argv)
    try:
        parse_gin(files, bindings)
        code = main(rest)
    except NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(3)
    except friendly_errors() as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def parse_args(rest: Sequence[str], *flags: str) -> argparse.Namespace:
    """Parse the non-gin flags an entry point accepts (each `--name` optional, string-valued)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in flags:
        parser.add_argument(flag)
    ns, unknown = parser.parse_known_args(list(rest))
    if unknown:
        raise ConfigError(f"Unknown flags {unknown}; use --gin_file=... and --gin.NAME=VALUE.")
    return ns
