"""Small file helpers: atomic writes and the cache location. Nothing a user made is lost: every
write goes to a temporary sibling first and is renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SteerscopeError


def cache_root() -> Path:
    """`$STEERSCOPE_CACHE`, else `$XDG_CACHE_HOME/steerscope`, else `~/.cache/steerscope`."""
    env = os.environ.get("STEERSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "steerscope"


def refuse_existing(path: str | Path, force: bool) -> None:
    """Raise before any work is done if `path` exists and the user did not ask to replace it."""
    if Path(path).exists() and not force:
        raise SteerscopeError(f"{path} already exists; choose another path or pass --force (overwrite=True).")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path` in one rename.

    An existing `path` is replaced only with `overwrite=True` (the old folder is removed after
    the new one is in place); on any error the temporary folder is deleted and `path` is untouched.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
