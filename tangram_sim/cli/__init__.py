"""`tangram-sim` command line.

Each subcommand group lives in its own module `tangram_sim/cli/<group>_cmd.py` exposing
`add_parser(subparsers)`, which adds the group's parser and sets `func(args) -> int | None` on every
leaf parser via `set_defaults(func=...)`. Modules are discovered by name, so adding a group needs no
edit here; keep heavy imports (torch, simpy, matplotlib) inside the command functions so that
`--help` and the other groups stay fast and work without optional dependencies.

User mistakes raise `TangramError`; `main` prints them as `error: <message>` and returns 2, and does
the same for an `OSError` on a path the user gave (name too long, permission denied). Ctrl-C prints
`interrupted` and returns 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from tangram_sim import __version__
from tangram_sim.errors import TangramError

# Groups listed first in `--help`, in this order; any other discovered `*_cmd` module follows.
_PREFERRED_ORDER = ("run", "models", "trace", "plot", "real")


def _command_modules() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")]
    rank = {f"{g}_cmd": i for i, g in enumerate(_PREFERRED_ORDER)}
    return sorted(found, key=lambda name: (rank.get(name, len(rank)), name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tangram-sim",
        description="Simulate and measure serverless LLM cold starts with GPU memory reuse (Tangram).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit status instead of raising."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT, without a traceback
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _check_common_options(args)
        result = func(args)
    except TangramError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other CLI tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:  # a path the user gave cannot be used: too long, no permission, disk full
        print(f"error: {one_line(_os_error(exc))}", file=sys.stderr)
        return 2
    return 0 if result is None else int(result)


def one_line(message: str) -> str:
    """`message` with line breaks and other control characters written as escapes (`\\x0b`), so an
    error that quotes bytes of a damaged file still prints as the one line the CLI promises."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def _check_common_options(args: argparse.Namespace) -> None:
    """Options several commands share, checked once here rather than by each command."""
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:  # 0 would mean "no worker at all", not "the default"
        raise TangramError(f"--jobs: expected an integer >= 1, got {jobs}")


def _os_error(exc: OSError) -> str:
    """`<file>: <reason>` on one line; a very long file name is shortened so the reason stays visible."""
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    shown = [n if len(n) <= 120 else f"{n[:60]}...{n[-40:]}" for n in names]
    return f"{' -> '.join(shown)}: {reason}" if shown else reason
