"""``swift-sampler``: argument parsing only; every command calls a plain Python function.

Each module in ``swift_sampler.commands`` exposes ``register(sub, groups)`` and adds its
sub-commands; ``groups`` holds the nested groups (``pipeline``, ``search``, ``plot``, ``bench``).
Every command prints a one-line JSON summary last; ``--json`` prints only that line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import sys
from typing import Any

COMMAND_MODULES = ("ingest", "features", "train", "search", "sql", "plot", "demo", "bench")
GROUPS = {
    "pipeline": "data stages: ingest, build-features",
    "search": "learn a sampler: run, show",
    "plot": "the paper's figures as PNG",
    "bench": "benchmarks against peers",
}


class UserError(Exception):
    """A mistake in the command line or its inputs; printed without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # The project's own error types only: a ValueError from NumPy or a KeyError is a bug and
    # keeps its traceback.
    from swift_sampler.storage import SwiftSamplerError

    return (UserError, SwiftSamplerError, FileNotFoundError)


class CommandParser(argparse.ArgumentParser):
    """The parser of a command: its positional arguments may come anywhere among its options
    (``sql STORE --json "SELECT ..."``). Plain argparse hands the first run of positional words
    to every positional it can match at once (``STORE`` became the query) and refuses the rest;
    ``parse_known_intermixed_args`` reads options first, then positionals. Parsers of command
    groups (a sub-command positional) and commands without positionals parse as usual."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        positionals = self._get_positional_actions()
        if self._intermixing or not positionals or any(
                a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in positionals):
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args parses through this method: the flag ends the recursion.
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swift-sampler",
        description="Learn a static data sampler by 10 parameters and train with it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Command groups and their commands are CommandParsers too (add_subparsers inherits the class).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    groups = {}
    for name, help_text in GROUPS.items():
        group = sub.add_parser(name, help=help_text, description=help_text)
        groups[name] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        group.set_defaults(func=lambda args, g=group: g.print_help() or 2)
    for module in COMMAND_MODULES:
        importlib.import_module(f"swift_sampler.commands.{module}").register(sub, groups)
    return parser


def add_store_option(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--store STORE`` as on every command; ``positional`` also takes it as the first
    argument (``sql STORE "SELECT ..."``, and the older form of the plot commands)."""
    parser.add_argument("--store", dest="store_opt", metavar="STORE", default=None,
                        help="store directory (default: the first argument)" if positional
                        else "store directory (default: none: required)")
    if positional:
        parser.add_argument("store_pos", nargs="?", metavar="STORE", default=None,
                            help="store directory (or --store)")


def resolve_store(args: argparse.Namespace) -> str:
    opt, pos = getattr(args, "store_opt", None), getattr(args, "store_pos", None)
    if opt and pos and opt != pos:
        raise UserError(f"two stores given ({pos} and --store {opt}); give one")
    store = opt or pos
    if not store:
        raise UserError("no store given; pass --store STORE")
    args.store = store
    return store


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON summary line")


def emit(summary: dict[str, Any], args: argparse.Namespace | None = None, text: str | None = None) -> None:
    """Print the human-readable ``text`` (unless ``--json``), then the one-line JSON summary."""
    if text and not getattr(args, "json", False):
        print(text, flush=True)
    print(json.dumps(summary, default=_jsonable, allow_nan=False), flush=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "__fspath__"):
        return os.fspath(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("swift-sampler")
    except metadata.PackageNotFoundError:
        return "unknown"


def _message(e: BaseException) -> str:
    """The user-facing text of ``e``; an error raised in a DataLoader worker reaches us with
    the worker's traceback inside its message, whose last line is the original error."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SWIFT_SAMPLER_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "store_opt"):
            resolve_store(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (``swift-sampler sql ... | head -1``): stop quietly, as cat or grep
        # would on SIGPIPE; stdout goes to /dev/null so the interpreter's final flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except _user_error_types() as e:
        if os.environ.get("SWIFT_SAMPLER_DEBUG"):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        # A store (or output folder) the user cannot write: their setup, not a bug.
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        if os.environ.get("SWIFT_SAMPLER_DEBUG"):
            raise
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only"}.get(e.errno, "permission denied")
        print(f"error: cannot write {e.filename or 'the store'}: {what}; make the store "
              "writable (or free space) and run the same command again to resume",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
