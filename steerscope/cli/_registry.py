"""The CLI's registry and parser: every `steerscope` command is a `Command` in `COMMANDS`.

A command is a frozen config dataclass (its flags, their help text and defaults come from the
fields; nested library configs such as `ModelConfig`, `DiscoverConfig` or `RunConfig` are flattened
into it) plus a handler `fn(cfg) -> exit status`, registered with `@command`. Errors a user can fix
exit with status 2 and one line naming the problem and the fix.

`steerscope --help` must not import torch, and every library config does. So a command module
imports nothing heavier than this file at its top; a command whose config holds a library config
registers a *loader*, a function that imports that config and returns the command's config class.
The loader runs only when that command's flags are built (its run, or its own --help).

Imports only the ground (`config`, `errors`) and `._args`; the command modules import this file,
and `steerscope.cli` (the package) imports them, so nothing imports back (tests/test_architecture.py).
"""

# No `from __future__ import annotations`: `with_model` builds its class inside a function, and
# `typing.get_type_hints` (config.field_types) resolves string annotations from module globals only.
import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import SteerscopeError
from ._args import Parser, add_config_args, config_from_args


@dataclass(frozen=True)
class Command:
    name: str  # "info" or "sae train"
    help: str
    description: str
    config: Callable[[], type]  # the command's config class (a cached loader: it may import torch)
    handler: Callable[[Any], int]

    def default(self) -> Any:
        """The command's config with library defaults."""
        return self.config()()


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, description: str, config: type | Callable[[], type]):
    """Register `fn(cfg) -> int` as `steerscope NAME`; its flags come from the fields of `config`,
    a config class, or a function returning one (called once, when the flags are first needed)."""
    load = (lambda: config) if isinstance(config, type) else functools.cache(config)

    def deco(fn):
        if name in COMMANDS:
            raise RuntimeError(f"two commands named {name!r}: {COMMANDS[name].handler.__module__} and {fn.__module__}")
        COMMANDS[name] = Command(name, help, description, load, fn)
        return fn

    return deco


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_index(spec: str) -> int | str:
    """A vector index (negative counts from the end) or an id."""
    return int(spec) if spec.lstrip("-").isdigit() else spec


@functools.cache
def with_model() -> type:
    """`WithModel`, the base config of every command that loads a model. Made on first use, inside
    a command's loader, because `ModelConfig`'s module imports torch."""
    from ..models.loading import ModelConfig

    @dataclass(frozen=True)
    class WithModel(Config):
        """Base of every command that loads a model."""

        model: ModelConfig = field(default_factory=ModelConfig)
        """the model"""

    return WithModel


# ---- the parser -----------------------------------------------------------------------------------
def chosen(argv: list[str]) -> str | None:
    """The command `argv` names ("sae train" or "run"), or None (e.g. `--help`, a typo)."""
    for n in (" ".join(argv[:2]), argv[0] if argv else ""):
        if n in COMMANDS:
            return n
    return None


def build_parser(only: Iterable[str] | None = None) -> Parser:
    """The `steerscope` parser over COMMANDS. Every command gets its flags, or with `only` just
    those named (the rest are listed by name and help), so parsing one command loads one config."""
    from .._version import __version__

    full = set(COMMANDS) if only is None else set(only)
    p = Parser(prog="steerscope", description="Find, apply and judge steering vectors in language models.")
    p.add_argument("--version", action="version", version=f"steerscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    groups: dict[str, Any] = {}
    for name, cmd in COMMANDS.items():
        parent = sub
        words = name.split()
        if len(words) == 2:
            if words[0] not in groups:
                g = sub.add_parser(
                    words[0], help=f"{words[0]} commands", description=f"steerscope {words[0]} commands."
                )
                groups[words[0]] = g.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND", parser_class=Parser)
                groups[words[0]].required = True
            parent = groups[words[0]]
        sp = parent.add_parser(words[-1], help=cmd.help, description=cmd.description)
        if name in full:
            add_config_args(sp, cmd.default())
        sp.set_defaults(_command=cmd)
    return p


def dispatch(argv: list[str] | None = None) -> int:
    """Parse `argv` and run its command: what `steerscope.cli.main` does once the command modules
    have registered. Exit status: the handler's; 2 with one line for an error the user can fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = chosen(argv)
    try:
        args = build_parser(only=[name] if name else []).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        cmd: Command = args._command
        cfg = config_from_args(cmd.default(), args)
        return cmd.handler(cfg)
    except SteerscopeError as e:
        print(f"steerscope: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerscope: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
