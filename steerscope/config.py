"""Method families and configs: the one shape every method in steerscope has.

A method is a frozen config dataclass (one docstring per field) plus a function returning a named
result, registered by name in its family::

    @dataclass(frozen=True)
    class MelboConfig:
        steps: int = 300
        \"\"\"Adam steps per chunk of vectors.\"\"\"

    @DISCOVERY.register("melbo", MelboConfig)
    def melbo(ctx: DiscoveryContext, cfg: MelboConfig) -> Discovered: ...

Families: `DISCOVERY` (directions.discovery), `EXTRACTORS` (directions.extract), `METRICS`
(judging.metrics), `SAE_ARCHS` (sae.archs), `INTERVENTIONS` (interventions.ops). Tests iterate over
the families, so a new method passes the shared checks without being listed anywhere else.

Configs are the single source of truth: the CLI is generated from them (`cli._args`), their
docstrings are the `--help` text, and `config_to_dict` / `config_from_dict` write and read them
in `config.json`. Field metadata understood here and in `cli._args`:
    min / max     inclusive bounds checked by `validate` (out of range: SteerscopeError)
    choices       allowed values, or a Family whose names are allowed
    none          the CLI word for None (e.g. "calibrate" for R); default "auto"
    family        on a config-typed field: the Family whose config class is chosen by the sibling
                  field named in `by` (e.g. DiscoverConfig.method_config by DiscoverConfig.method)
    cli           False: not exposed on the command line; a string: the flag name to use
    before        on a field added after configs were first saved: the value that reproduces what
                  steerscope did before the field existed, when that is not its default

Saved configs, across upgrades (`load_config`, used by `checkpoint.JobFolder`): a saved config
records the steerscope version and `CONFIG_FORMAT` (`_version.py`) that wrote it. A file of a
newer format is refused first, with "written by steerscope X, newer than this one (Y): upgrade
steerscope", before any of it is parsed. Otherwise a field the saved config lacks (added since)
takes the value an absent field stands for: its `before` metadata, else its default. So a field
added with a default that keeps the old behaviour (the rule for new fields) needs nothing; one
whose default changes behaviour declares `before`, and an old run then resumes only where the new
value is set back to it. The filled fields are named in one warning line. A saved key this
steerscope has no field for (removed, or added by a newer steerscope of the same format) is named
in that line too and ignored, never dropped silently. Changing an existing field's default changes
what saved configs mean no more than adding a field does: they hold every value explicitly, so an
old run then resumes only with the old value passed as a flag (the refusal names it).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._version import __version__
from .errors import SteerscopeError

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Method(Generic[F]):
    """One registered method: its name, its config class (None when it has no settings) and its
    function (or class, for interventions)."""

    name: str
    config: type | None
    fn: F
    family: str

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0].replace("\n", " ")

    def default_config(self):
        return None if self.config is None else self.config()


class Family(Generic[F]):
    """A registry of methods of one kind; every family has this shape."""

    def __init__(self, name: str, what: str):
        self.name, self.what = name, what
        self._methods: dict[str, Method[F]] = {}

    def register(self, name: str, config: type | None = None, *, replace: bool = False) -> Callable[[F], F]:
        if config is not None and not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"{self.what} {name!r}: its config must be a frozen dataclass.")

        def deco(fn: F) -> F:
            if name in self._methods and not replace:
                raise SteerscopeError(f"{self.what} {name!r} is already registered; pass replace=True to override it.")
            self._methods[name] = Method(name, config, fn, self.name)
            return fn

        return deco

    def get(self, name: str) -> Method[F]:
        if name not in self._methods:
            raise SteerscopeError(f"unknown {self.what} {name!r}; available: {', '.join(self.names())}.")
        return self._methods[name]

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._methods)

    def __getitem__(self, name: str) -> F:
        return self.get(name).fn

    def items(self) -> list[tuple[str, Method[F]]]:
        return [(n, self._methods[n]) for n in self.names()]

    def __repr__(self) -> str:
        return f"Family({self.name!r}: {', '.join(self.names())})"


# ---- field docstrings ---------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal written under each field in the class body
    (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations (configs use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


# ---- validation ---------------------------------------------------------------------------------
def validate(cfg: Any, where: str = "") -> None:
    """Check every field's `min`/`max`/`choices` metadata and finite floats, recursively; raise a
    SteerscopeError naming the field (as its CLI flag) and the allowed range."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if dataclasses.is_dataclass(v):
            validate(v, where)
            continue
        if v is None:
            continue
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, float) and not math.isfinite(x):
                raise SteerscopeError(f"{flag} must be a finite number, got {x}.")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                if lo is not None and x < lo or hi is not None and x > hi:
                    rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in {lo}..{hi}")
                    raise SteerscopeError(f"{flag} must be {rng}, got {x}.")
            ch = f.metadata.get("choices")
            if ch is not None and x not in ch:
                names = ch.names() if isinstance(ch, Family) else list(ch)
                raise SteerscopeError(f"{flag} must be one of {', '.join(map(str, names))}; got {x!r}.")


class Config:
    """Mixin for config dataclasses: `validate` in `__post_init__` (bad values raise at once, in
    the library and the CLI alike) and `replace`."""

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---- (de)serialisation --------------------------------------------------------------------------
def config_to_dict(cfg: Any) -> Any:
    """Plain JSON data; nested configs become dicts (a family-chosen config keeps its class's
    fields only, the family and choice are recorded by the sibling field)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007 (built from a tuple)
    return tp, False


def family_config_class(cls: type, f: dataclasses.Field, values: dict) -> type | None:
    """The config class of a family-chosen field, from the sibling field that names the method."""
    fam: Family = f.metadata["family"]
    by = f.metadata["by"]
    name = values.get(by, next(g.default for g in dataclasses.fields(cls) if g.name == by))
    return fam.get(name).config


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config (nested configs too) from `config_to_dict` output: `load_config`, with
    filled and unknown fields named in one warning line."""
    cfg, filled, unknown = load_config(cls, data)
    upgrade_warning(cls.__name__, "", filled, unknown)
    return cfg


def absent_value(f: dataclasses.Field) -> Any:
    """What field `f` stands for where a config has no such key (one saved, or a checkpoint key,
    from before the field existed): its `before` metadata, else its default (MISSING if none)."""
    if "before" in f.metadata:
        return f.metadata["before"]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def load_config(cls: type, data: dict, _at: str = "") -> tuple[Any, list[str], list[str]]:
    """(config, filled, unknown): the config rebuilt from `data` (a saved `config_to_dict`),
    `filled` naming the fields `data` lacks (given their `absent_value`), `unknown` naming the keys
    of `data` that `cls` has no field for (ignored); dotted names, nested configs included."""
    if not isinstance(data, dict):
        raise SteerscopeError(
            f"{cls.__name__}{' ' + _at.rstrip('.') if _at else ''}: expected a mapping, got {type(data).__name__}."
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [_at + k for k in sorted(set(data) - names)]
    filled: list[str] = []
    hints = field_types(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            v = absent_value(f)
            if v is dataclasses.MISSING:
                raise SteerscopeError(f"{cls.__name__} needs the setting {_at + f.name}; the saved config has none.")
            if f.init:
                filled.append(_at + f.name)
                if "before" in f.metadata:
                    kw[f.name] = v
            continue
        v = data[f.name]
        if "family" in f.metadata:
            sub = family_config_class(cls, f, data)
            if sub is not None and v is not None:
                v, fi, un = load_config(sub, v, f"{_at}{f.name}.")
                filled, unknown = filled + fi, unknown + un
            kw[f.name] = None if sub is None else v
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v, fi, un = load_config(tp, v, f"{_at}{f.name}.")
            filled, unknown = filled + fi, unknown + un
        elif typing.get_origin(tp) in (list, tuple) and isinstance(v, list):
            v = list(v)
        kw[f.name] = v
    try:
        return cls(**kw), filled, unknown
    except TypeError as e:  # e.g. a field that only a newer steerscope's class accepts
        raise SteerscopeError(f"{cls.__name__}: {e}") from None


def version_tuple(v: str) -> tuple[int, ...]:
    """ "0.10.2" -> (0, 10, 2); anything unreadable sorts first."""
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def check_format(where: str, found: Any, newest: int, written_by: str | None, what: str = "config") -> int:
    """The saved `found` format as an int (a file without one is format 1). A newer format than
    `newest` (the newest this steerscope reads) raises the one "upgrade steerscope" error; call it
    before parsing anything else of the file."""
    fmt = 1 if found is None else found
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise SteerscopeError(
            f"{where} is not a valid steerscope {what}: its format version is {found!r}, not a whole number."
        )
    if fmt > newest:
        by = written_by or "?"
        raise SteerscopeError(
            f"{where} was written by steerscope {by}, newer than this one ({__version__}): upgrade "
            f"steerscope (its {what} format {fmt} is newer than {newest}, the newest this one reads)."
        )
    return fmt


def upgrade_warning(where: str, written_by: str | None, filled: list[str], unknown: list[str]) -> str:
    """Print (once per process) and return the one warning line for a saved config that is older or
    newer than this steerscope: the fields filled with their defaults, the keys ignored. Nothing
    when neither."""
    if not filled and not unknown:
        return ""
    by = f"steerscope {written_by}" if written_by else "an older steerscope"
    parts = []
    if filled:
        parts.append(f"settings it lacks take their defaults: {', '.join(filled)}")
    if unknown:
        newer = bool(written_by) and version_tuple(written_by) > version_tuple(__version__)
        why = "are from a newer steerscope and are ignored" if newer else "no longer exist and are ignored"
        parts.append(f"settings it has that this steerscope ({__version__}) does not know {why}: {', '.join(unknown)}")
    msg = f"{where} was written by {by}; " + "; ".join(parts) + "."
    if msg not in _SAID:  # a job checks its folder twice (before loading the model, then to open it): one line
        _SAID.add(msg)
        print(f"steerscope: warning: {msg}", file=sys.stderr, flush=True)
    return msg


_SAID: set[str] = set()


# ---- one spelling for "the last K tokens" -------------------------------------------------------
def parse_last(spec: str, *, allow_all: bool = False, extra: tuple[str, ...] = (), what: str = "") -> int | str:
    """`last:K` -> K (K >= 1); `all` (when allowed) and the `extra` words are returned as is.
    The one spelling for "the last K tokens" everywhere (target tokens, read positions, steering
    positions)."""
    s = str(spec).strip()
    if (allow_all and s == "all") or s in extra:
        return s
    if s.startswith("last:") and s[5:].isdigit() and int(s[5:]) >= 1:
        return int(s[5:])
    words = ", ".join((["all"] if allow_all else []) + list(extra) + ["last:K (K >= 1)"])
    hint = f" (spelled last:{s[5:]} in steerscope)" if s.startswith("tail:") else ""
    raise SteerscopeError(f"{what + ' ' if what else ''}expected {words}; got {spec!r}{hint}.")
