"""The one checkpoint / resume helper every job uses (discovery, SAE training, corpus sampling, runs).

`Checkpoint(folder, key)` keeps one resumable state: a tree of dicts / lists / numbers / strings
and tensors, written as `state.json` (the tree, tensors replaced by references) plus a
safetensors file (the tensors). Never pickle. The tensors go to a new file first and the JSON,
written atomically last, names it, so a kill at any moment leaves the previous state readable.
`key` identifies the job (a hash of model, data and settings); a folder holding another job's
state is refused unless the caller passes `force`, which discards it.

`JobFolder` is the same contract for a job's output folder: `config.json` records the settings,
the steerscope version and `CONFIG_FORMAT`; the same settings resume, different settings refuse
without `force`.

Upgrades (fields are added to configs often; an upgrade must not turn a saved run into "another
run"):
- `JobFolder.check` reads the saved config with `config.load_config`: a field the saved config
  lacks (added since) takes the value an absent field stands for (its default, or its `before`
  metadata where the default changed behaviour), and the filled fields are named in one warning
  line; a saved key this steerscope lacks is named there and ignored. The rebuilt saved config must
  then equal the new one: every field present in both compares as saved, and a field absent from
  the saved config is accepted only when the new value equals what its absence stood for (the run
  was made with that behaviour). A saved config of a newer `CONFIG_FORMAT` is refused first, with
  the "upgrade steerscope" message.
- Checkpoint keys (`config_key`) hash configs through `key_settings`: every field a keyed config
  had in 0.2.0 (`_FIELDS_0_2_0`, so a key is the one 0.2.0 computed, and 0.2.0 checkpoints
  resume), and a field added since only where it is set away from what its absence stands for. So
  adding a defaulted field changes no key; setting it does. Keys are not merely trusted inside a
  folder that passed `JobFolder.check`: they also hold what a job config does not (the model's
  weights fingerprint, the prompts' text, a calibrated R), which must still be checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ._io import write_json_atomic
from ._version import CONFIG_FORMAT, __version__
from .config import absent_value, check_format, config_to_dict, load_config, upgrade_warning
from .errors import SteerscopeError

STATE = "state.json"


# The fields each config that enters a checkpoint key had in 0.2.0, the first release whose
# checkpoints users hold (written by that code; by class name, so a moved module keeps them).
_FIELDS_0_2_0 = {
    "CorpusConfig": ["batch_size", "docs", "max_new_tokens", "seed", "temperature"],
    "DCTConfig": ["beta", "d_proj", "dct_iters", "dct_tol", "factor_batch", "init", "sigma"],
    "DiscoverConfig": [
        "R",
        "calibrate_ratio",
        "chat",
        "method",
        "method_config",
        "n_vectors",
        "seed",
        "source",
        "target",
        "target_tokens",
    ],
    "JacobianConfig": ["both_signs", "oversample", "power_iters", "tol"],
    "KLConfig": [
        "candidates",
        "checkpoint_every",
        "first_share",
        "lr",
        "orthogonal",
        "plateau",
        "plateau_window",
        "reply_tokens",
        "steps",
        "vectors_per_batch",
    ],
    "ManifoldConfig": ["manifold_rank"],
    "MelboConfig": [
        "checkpoint_every",
        "lr",
        "orthogonal",
        "p",
        "plateau",
        "plateau_window",
        "q",
        "steps",
        "vectors_per_batch",
    ],
    "SAEConfig": [
        "arch",
        "aux_coef",
        "d_in",
        "k",
        "k_aux",
        "l1_coef",
        "layer",
        "model_id",
        "model_type",
        "n_latents",
        "site",
    ],
    "TrainConfig": [
        "dead_after",
        "decay_frac",
        "device",
        "l1_warmup_frac",
        "lr",
        "scale_input",
        "seed",
        "steps",
        "warmup_steps",
    ],
}


def key_settings(obj: Any) -> Any:
    """A config as a checkpoint key sees it: `config_to_dict`, less each field added after 0.2.0
    whose value is what its absence stands for (`config.absent_value`). Adding a defaulted field
    therefore changes no key; a 0.2.0 config keys as 0.2.0 keyed it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        old = _FIELDS_0_2_0.get(type(obj).__name__, ())
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name not in old and config_to_dict(v) == config_to_dict(absent_value(f)):
                continue
            out[f.name] = key_settings(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [key_settings(x) for x in obj]
    if isinstance(obj, dict):
        return {k: key_settings(v) for k, v in obj.items()}
    return obj


def config_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (model fingerprint, data, settings); a config
    dataclass among them is hashed as its `key_settings`."""
    blob = json.dumps(key_settings(list(parts)), sort_keys=True, default=str)
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
            raise SteerscopeError(
                f"the checkpoint in {self.folder} is damaged ({type(e).__name__}); pass --force to start over."
            ) from None
        if key != self.key:
            raise SteerscopeError(
                f"{self.folder} holds a checkpoint of a different {self.what} (other model, data or "
                "settings); pass --force to discard it, or use the same settings to resume."
            )
        try:
            tensors = load_file(str(self.folder / file)) if file else {}
            return _decode(tree, tensors)
        except Exception as e:  # a truncated or overwritten tensor file
            raise SteerscopeError(
                f"the checkpoint in {self.folder} is damaged ({type(e).__name__}: {e}); pass --force to start over."
            ) from None

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
    """A job's output folder: `config.json` holds {"kind", "steerscope_version", "config_format",
    "config", "created_at"}.

    `config` is a config dataclass (read back across upgrades, see the module docstring) or a
    plain dict (then a key only the new dict has counts as a difference). Opening the folder with
    the same config resumes; another config (or a folder that is not a steerscope job) is refused
    unless `force`, which empties it first. An older folder's config.json is kept as written."""

    def __init__(self, out: str | Path, kind: str, config: Any, *, force: bool = False, version: str = __version__):
        self.out, self.kind = Path(out), kind
        self.config = config_to_dict(config)
        self.resumed = JobFolder.check(out, kind, config, force=force)
        cfg_file = self.out / "config.json"
        if not self.resumed and force and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg_file.is_file():
            write_json_atomic(
                cfg_file,
                {
                    "kind": kind,
                    "steerscope_version": version,
                    "config_format": CONFIG_FORMAT,
                    "config": self.config,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )

    @staticmethod
    def check(out: str | Path, kind: str, config: Any, *, force: bool = False) -> bool:
        """True when `out` holds this job (resume); False when it is new or `force` will replace
        it; a SteerscopeError when it holds something else (or was written by a newer steerscope)
        and `force` is not given."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise SteerscopeError(f"{out} is a file; choose a folder for --out.")
        if not out.exists() or not any(out.iterdir()):
            return False
        try:
            old = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
            old = None
        if old is not None and not force:  # before anything else of it is read
            check_format(
                str(out / "config.json"), old.get("config_format"), CONFIG_FORMAT, old.get("steerscope_version")
            )
        if old is not None and old.get("kind", kind) == kind:
            diff, filled, unknown = _compare(old["config"], config)
            if not diff:
                upgrade_warning(str(out / "config.json"), old.get("steerscope_version"), filled, unknown)
                return True
        if not force:
            if old is None:
                what = f"files that are not a steerscope {kind}"
            elif old.get("kind", kind) != kind:
                what = f"a steerscope {old.get('kind')}, not a {kind}"
            else:
                what = f"another {kind} (different settings: {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''})"
            hint = ", pass the saved settings to resume it" if old is not None and old.get("kind", kind) == kind else ""
            raise SteerscopeError(f"{out} holds {what}; choose another --out{hint}, or pass --force to replace it.")
        return False

    def path(self, name: str) -> Path:
        return self.out / name


def _compare(saved: dict, config: Any) -> tuple[list[str], list[str], list[str]]:
    """(differences, filled, unknown) between a saved config dict and `config` (see JobFolder)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        try:
            old, filled, unknown = load_config(type(config), saved)
        except SteerscopeError as e:
            return [f"the saved settings do not load here ({e})"], [], []
        return _differences(config_to_dict(old), config_to_dict(config)), filled, unknown
    unknown = sorted(set(saved) - set(config))
    new_only = [f"{k} (not in the saved settings)" for k in sorted(set(config) - set(saved))]
    return (
        new_only
        + _differences({k: saved[k] for k in config if k in saved}, {k: config[k] for k in config if k in saved}),
        [],
        unknown,
    )


def _differences(saved: Any, new: Any, at: str = "") -> list[str]:
    """What differs, each as "dotted.name: saved X, now Y"."""
    if isinstance(saved, dict) and isinstance(new, dict):
        return [d for k in sorted(set(saved) | set(new)) for d in _differences(saved.get(k), new.get(k), f"{at}{k}.")]
    return [] if saved == new else [f"{at.rstrip('.')}: saved {saved!r}, now {new!r}"]
