"""Command-line flags generated from config dataclasses, so the library and the CLI cannot drift.

`add_config_args(parser, default)` adds one flag per field of the config instance `default`
(nested configs are flattened; two fields that would share a flag are a programming error and
raise when the parser is built). `config_from_args(default, ns)` rebuilds the config from the
flags the user actually gave; every other field keeps the library default. Help text is the
field's docstring; defaults shown are the library's.

    bool            --flag / --no-flag
    bool | None     --flag / --no-flag, unset = None ("decide for me")
    X | None        --flag VALUE, or the field's `none` word (default "auto"; none for text) for None
    list[X]         comma-separated: --flag 0.5,1,2 (int lists also take ranges A:B);
                    metadata append=True: repeat the flag instead; nargs=N: N values after one flag
    metadata required=True: the flag must be given
    Literal / choices   one of the names (a Family's names for method fields)
    family field    every registered method's settings become flags; a flag that belongs to
                    another method than the chosen one is refused with one line
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from ..config import Family, _unwrap_optional, field_docs, field_types, validate
from ..errors import SteerscopeError

_UNSET = object()


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line naming the problem and where the help is; exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"steerscope: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


class _Append(argparse.Action):
    """Repeatable flag collecting a list (argparse's own `append` cannot start from our unset marker)."""

    def __call__(self, parser, namespace, values, option_string=None):
        cur = getattr(namespace, self.dest, _UNSET)
        setattr(namespace, self.dest, ([] if cur is _UNSET or cur is None else list(cur)) + [values])


_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(tp: Any, none_word: str | None, flag: str):
    def conv(text: str):
        if none_word is not None and text == none_word:
            return None
        try:
            if tp is bool:
                if text.lower() in ("1", "true", "yes"):
                    return True
                if text.lower() in ("0", "false", "no"):
                    return False
                raise ValueError(text)
            return tp(text)
        except ValueError:
            alt = f" or {none_word!r}" if none_word else ""
            raise argparse.ArgumentTypeError(f"{flag} takes {_NAMES.get(tp, tp.__name__)}{alt}, got {text!r}") from None

    conv.__name__ = tp.__name__
    return conv


def _list_converter(item: Any, flag: str):
    one = _converter(item, None, flag)

    def conv(text: str):
        out = []
        for x in (x.strip() for x in text.split(",")):
            if item is int and ":" in x:  # a range A:B (B exclusive)
                a, b = x.split(":", 1)
                try:
                    out += list(range(int(a or 0), int(b)))
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{flag} takes integers or ranges A:B, got {x!r}") from None
            elif x:
                out.append(one(x))
        return out

    conv.__name__ = f"list of {item.__name__}"
    return conv


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


class _Builder:
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.flags: dict[str, str] = {o: "argparse" for a in parser._actions for o in a.option_strings}

    def add(
        self, path: str, f: dataclasses.Field, tp: Any, default: Any, doc: str, note: str = "", shown: str | None = None
    ) -> None:
        meta = f.metadata
        flag = meta["cli"] if isinstance(meta.get("cli"), str) else _flag(f.name)
        if flag in self.flags:
            if note:  # the same setting name in two methods of one family: one flag serves both
                return
            raise RuntimeError(
                f"flag {flag} for {path} collides with {self.flags[flag]}; give one of them "
                "metadata={'cli': '--other-name'}."
            )
        self.flags[flag] = path
        inner, optional = _unwrap_optional(tp)
        # The word that means None on the command line: the field's own (e.g. "calibrate"), else
        # "auto" for optional numbers; an optional text is simply left out.
        none_word = meta.get("none", None if inner is str else "auto") if optional else None
        kw: dict[str, Any] = {"dest": path, "default": _UNSET}
        shown = shown or ((none_word or "unset") if default is None else _show(default))
        help_ = (doc or "").rstrip(".") + (f" [{note}]" if note else "") + f" (default: {shown})"
        choices = meta.get("choices")
        if isinstance(choices, Family):
            choices = choices.names()
        if typing.get_origin(inner) is typing.Literal:
            choices = list(typing.get_args(inner))
            inner = type(choices[0])
        if meta.get("required"):
            kw["required"] = True
            kw["help"] = (doc or "").rstrip(".") + " (required)"
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) in (list, tuple):
            item = (typing.get_args(inner) or (str,))[0]
            if meta.get("append"):
                kw["action"], kw["type"], kw["metavar"] = _Append, _converter(item, None, flag), item.__name__.upper()
            elif meta.get("nargs"):
                kw["nargs"], kw["type"] = meta["nargs"], _converter(item, None, flag)
                kw["metavar"] = meta.get("metavar", tuple(f"V{i}" for i in range(meta["nargs"])))
            else:
                kw["type"], kw["metavar"] = _list_converter(item, flag), "A,B,..."
        else:
            if inner not in (int, float, str):
                raise RuntimeError(f"cannot make a flag for {path} of type {inner!r}")
            kw["type"] = _converter(inner, none_word, flag)
            if choices is not None:
                kw["choices"] = list(choices) + ([none_word] if none_word else [])
            else:
                kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[inner] + (f"|{none_word}" if none_word else "")
        kw["help"] = kw.get("help", help_).replace("%", "%%")
        self.parser.add_argument(flag, **kw)


def _owners(fam: Family, setting: str) -> list[str]:
    """The methods of `fam` whose config has a field named `setting`."""
    return [
        n for n, m in fam.items() if m.config is not None and setting in {g.name for g in dataclasses.fields(m.config)}
    ]


def _walk(default: Any, prefix: str = ""):
    """Every CLI-visible field of the config instance `default`, nested configs flattened:
    yields (kind, path, field, type, value) with kind "leaf", "nested" (value: the nested default
    instance) or "family" (value: the family-chosen config, possibly of another method)."""
    cls = type(default)
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        path, value = f"{prefix}{f.name}", getattr(default, f.name)
        if "family" in f.metadata:
            yield "family", path, f, None, value
            continue
        inner, _ = _unwrap_optional(types[f.name])
        if dataclasses.is_dataclass(inner):
            yield "nested", path, f, inner, value if value is not None else inner()
        else:
            yield "leaf", path, f, types[f.name], value


def _family_settings(f: dataclasses.Field, path: str, value: Any):
    """(dest, field, type, default, owners) for every setting of every method in the family."""
    fam: Family = f.metadata["family"]
    for _, m in fam.items():
        if m.config is None:
            continue
        sub = value if isinstance(value, m.config) else m.config()
        stypes = field_types(m.config)
        for sf in dataclasses.fields(m.config):
            yield f"{path}.{sf.name}", sf, stypes[sf.name], getattr(sub, sf.name), m.config, _owners(fam, sf.name)


def _owner_defaults(fam: Family, value: Any, setting: str, owners: list[str]) -> str | None:
    """'30 for kl, 300 for melbo' when the methods sharing a flag have different defaults; else None."""
    shown = {}
    for n in owners:
        cfg = fam.get(n).config
        sub = value if isinstance(value, cfg) else cfg()
        v = getattr(sub, setting)
        shown[n] = "auto" if v is None else _show(v)
    return ", ".join(f"{v} for {n}" for n, v in shown.items()) if len(set(shown.values())) > 1 else None


def add_config_args(
    parser: argparse.ArgumentParser, default: Any, *, prefix: str = "", _builder: _Builder | None = None
) -> None:
    """Add a flag for every field of the config instance `default` (nested ones flattened)."""
    b = _builder or _Builder(parser)
    docs = field_docs(type(default))
    for kind, path, f, tp, value in _walk(default, prefix):
        if kind == "family":
            for dest, sf, stp, sval, owner_cls, owners in _family_settings(f, path, value):
                b.add(
                    dest,
                    sf,
                    stp,
                    sval,
                    field_docs(owner_cls).get(sf.name, ""),
                    note=", ".join(owners),
                    shown=_owner_defaults(f.metadata["family"], value, sf.name, owners) if len(owners) > 1 else None,
                )
        elif kind == "nested":
            add_config_args(parser, value, prefix=f"{path}.", _builder=b)
        else:
            b.add(path, f, tp, value, docs.get(f.name, ""))


def config_from_args(default: Any, ns: argparse.Namespace, *, prefix: str = "") -> Any:
    """The config `default` with every field the user set on the command line replaced."""
    changes: dict[str, Any] = {}
    families = []
    for kind, path, f, _tp, value in _walk(default, prefix):
        if kind == "family":
            families.append((path, f))  # after the sibling that chooses the method is known
        elif kind == "nested":
            new = config_from_args(value, ns, prefix=f"{path}.")
            if new != getattr(default, f.name):
                changes[f.name] = new
        elif (got := getattr(ns, path, _UNSET)) is not _UNSET:
            changes[f.name] = got
    for path, f in families:
        fam: Family = f.metadata["family"]
        chosen = changes.get(f.metadata["by"], getattr(default, f.metadata["by"]))
        method = fam.get(chosen)
        value = getattr(default, f.name)
        mine = {g.name for g in dataclasses.fields(method.config)} if method.config else set()
        given = {k[len(path) + 1 :]: v for k, v in vars(ns).items() if k.startswith(path + ".") and v is not _UNSET}
        stray = sorted(set(given) - mine)
        if stray:
            desc = "; ".join(f"{_flag(s)} is a setting of {', '.join(_owners(fam, s))}" for s in stray)
            raise SteerscopeError(f"{desc}, not of {fam.what} {chosen!r}; drop it or choose that method.")
        base = value if method.config is not None and isinstance(value, method.config) else method.default_config()
        if base is not None and given:
            base = dataclasses.replace(base, **given)
        if base != value:
            changes[f.name] = base
    out = dataclasses.replace(default, **changes) if changes else default
    validate(out)
    return out


def walk_flags(default: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dest, library default) for every flag `add_config_args` makes from `default`: used by the
    test that checks CLI defaults equal library defaults."""
    out = []
    for kind, path, f, _, value in _walk(default, prefix):
        if kind == "family":
            out += [(dest, sval) for dest, _, _, sval, _, _ in _family_settings(f, path, value)]
        elif kind == "nested":
            out += walk_flags(value, f"{path}.")
        else:
            out.append((path, value))
    return out
