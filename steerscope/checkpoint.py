"""The one checkpoint / resume helper every job uses (discovery, SAE training, corpus sampling, runs).

`Checkpoint(folder, key)` keeps one resumable state: a tree of dicts / lists / numbers / strings
and tensors, written as `state.json` (the tree, tensors replaced by references) plus a
safetensors file (the tensors). Never pickle. The tensors go to a new file first and the JSON,
written atomically last, names it, so a kill at any moment leaves the previous state readable.
`key` identifies the job (a hash of model, data and settings); a folder holding another job's
state is refused unless the caller passes `force`, which discards it.

`JobFolder` is the same contract for a job's output folder: `config.json` records the settings;
the same settings resume, different settings refuse without `force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ._io import write_json_atomic
from .errors import SteerscopeError

STATE = "state.json"


def config_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (model fingerprint, data, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors)] for k, v in obj.items()]}  # e.g. optimiser state, int keys
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


class Checkpoint:
    """A resumable state in `folder` for the job identified by `key`."""

    def __init__(self, folder: str | Path | None, key: str, what: str = "job", *, force: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.key, self.what = key, what
        if force and self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)

    def load(self) -> dict | None:
        """The saved tree, or None when there is none. Another job's state or a damaged file
        raise a SteerscopeError that says how to start over."""
        if self.folder is None or not (self.folder / STATE).is_file():
            return None
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / STATE).read_text())
            key, tree, file = meta["key"], meta["tree"], meta["tensors"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SteerscopeError(f"the checkpoint in {self.folder} is damaged ({type(e).__name__}); "
                                  "pass --force to start over.") from None
        if key != self.key:
            raise SteerscopeError(f"{self.folder} holds a checkpoint of a different {self.what} (other model, data or "
                                  "settings); pass --force to discard it, or use the same settings to resume.")
        try:
            tensors = load_file(str(self.folder / file)) if file else {}
            return _decode(tree, tensors)
        except Exception as e:  # a truncated or overwritten tensor file
            raise SteerscopeError(f"the checkpoint in {self.folder} is damaged ({type(e).__name__}: {e}); "
                                  "pass --force to start over.") from None

    def save(self, tree: dict) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(tree, tensors)
        old = None
        if (self.folder / STATE).is_file():
            try:
                old = json.loads((self.folder / STATE).read_text()).get("tensors")
            except (OSError, ValueError):
                old = None
        name = f"state-{time.time_ns()}.safetensors" if tensors else None
        if name:
            tmp = self.folder / f".{name}.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, self.folder / name)
        write_json_atomic(self.folder / STATE, {"key": self.key, "what": self.what, "tensors": name, "tree": encoded})
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class JobFolder:
    """A job's output folder: `config.json` holds {"kind", "config", "steerscope_version"}.

    Opening it with the same config resumes; another config (or a folder that is not a steerscope
    job) is refused unless `force`, which empties it first."""

    def __init__(self, out: str | Path, kind: str, config: dict, *, force: bool = False, version: str = ""):
        self.out, self.kind, self.config = Path(out), kind, config
        self.resumed = JobFolder.check(out, kind, config, force=force)
        cfg_file = self.out / "config.json"
        if not self.resumed and force and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg_file.is_file():
            write_json_atomic(cfg_file, {"kind": kind, "steerscope_version": version, "config": config,
                                         "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")})

    @staticmethod
    def check(out: str | Path, kind: str, config: dict, *, force: bool = False) -> bool:
        """True when `out` holds this job (resume); False when it is new or `force` will replace
        it; a SteerscopeError when it holds something else and `force` is not given."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise SteerscopeError(f"{out} is a file; choose a folder for --out.")
        if not out.exists() or not any(out.iterdir()):
            return False
        old = None
        try:
            old = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("kind", kind) == kind and old.get("config") == config:
            return True
        if not force:
            what = f"another {kind} (different settings)" if old is not None else f"files that are not a steerscope {kind}"
            raise SteerscopeError(f"{out} holds {what}; choose another --out, or pass --force to replace it.")
        return False

    def path(self, name: str) -> Path:
        return self.out / name
