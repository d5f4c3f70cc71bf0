"""The `steerscope` command line: a thin layer over the library, generated from config dataclasses.

One module per group of commands; each registers its commands in `_registry.COMMANDS` with
`@command` and imports nothing of the CLI but `._registry` and `._args`. This file imports them in
the order `steerscope --help` lists them, so `COMMANDS` is complete once `steerscope.cli` is
imported (the shape of vLLM's `entrypoints/cli/main.py`, whose `CMD_MODULES` is the same list).
A new group is a new module here and one entry in `CMD_MODULES`.
"""

from . import info, generate, supervised, discover, sae, serve, sweep, bench, refine, distill, audit  # isort: skip
from ._registry import COMMANDS, Command, build_parser, dispatch

CMD_MODULES = (info, generate, supervised, discover, sae, serve, sweep, bench, refine, distill, audit)

__all__ = ["COMMANDS", "CMD_MODULES", "Command", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """`steerscope ARGV` (default: sys.argv[1:]); returns the exit status."""
    return dispatch(argv)
