"""The vector artifact every direction-finding method produces.

A `VectorSet` is K vectors, each tied to a layer (see `models.registry` for what "layer" means),
saved as one folder:

    config.json          model id + weights fingerprint, model_type, n_layers, d_model, site,
                         method, hyper-parameters, ids, layers, norms, steerscope version, time
    vectors.safetensors  "vectors" (K, d_model) float32, "layers" (K,) int64, "extra.<name>" ...

No pickle anywhere. Loading against a model checks d_model, layer count and fingerprint and says
exactly what differs.

Versions: `format_version` is the file's major format. Loading checks it before anything else: a
newer one is refused with "written by steerscope X, newer than this one (Y): upgrade steerscope".
A newer steerscope of the same format may add keys (a minor change): they are named in one
warning line and ignored. Bump FORMAT_VERSION only when an older reader would misread a file.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from .._tensors import as_rows
from .._version import __version__
from ..config import check_format, upgrade_warning
from ..errors import ModelMismatchError, SteerscopeError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "vectors.safetensors"


@dataclass
class VectorSetConfig:
    model_id: str
    model_fingerprint: str
    model_type: str
    n_layers: int
    d_model: int
    method: str
    ids: list[str]
    layers: list[int]
    norms: list[float]
    site: str = "resid_post"
    hyperparams: dict[str, Any] = field(default_factory=dict)
    steerscope_version: str = __version__
    created_at: str = ""
    format_version: int = FORMAT_VERSION


@dataclass
class SteeringVector:
    """One vector of a set: `vector` (d_model,) at `layer`."""

    vector: torch.Tensor
    layer: int
    id: str


class VectorSet:
    def __init__(self, vectors: torch.Tensor, config: VectorSetConfig, extras: dict[str, torch.Tensor] | None = None):
        self.vectors = vectors  # (K, d_model) float32
        self.config = config
        self.extras = extras or {}
        self._validate()

    @classmethod
    def create(
        cls,
        lm,
        vectors,
        layers: int | Sequence[int],
        method: str,
        *,
        ids: Sequence[str] | None = None,
        hyperparams: dict[str, Any] | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        site: str = "resid_post",
    ) -> VectorSet:
        """Build a set for the loaded model `lm` (records its id and fingerprint)."""
        v = as_rows(torch.as_tensor(vectors).detach().float().cpu(), lm.d_model, "vector")
        K = v.shape[0]
        layer_list = [layers] * K if isinstance(layers, int) else list(layers)
        if len(layer_list) != K:
            raise SteerscopeError(
                f"{K} vectors but {len(layer_list)} layers; give one layer per vector or a single int."
            )
        layer_list = [lm.check_layer(l) for l in layer_list]
        cfg = VectorSetConfig(
            model_id=lm.model_id,
            model_fingerprint=lm.fingerprint,
            model_type=lm.model_type,
            n_layers=lm.n_layers,
            d_model=lm.d_model,
            method=method,
            ids=list(ids) if ids is not None else [f"{method}-{i}" for i in range(K)],
            layers=layer_list,
            norms=[],
            site=site,
            hyperparams=dict(hyperparams or {}),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        return cls(v, cfg, extras)

    def _validate(self) -> None:
        c = self.config
        v = self.vectors
        if v.dim() != 2 or v.shape[1] != c.d_model:
            raise SteerscopeError(f"vectors have shape {tuple(v.shape)}, expected (K, {c.d_model}).")
        if len(c.ids) != v.shape[0] or len(c.layers) != v.shape[0]:
            raise SteerscopeError(f"{v.shape[0]} vectors but {len(c.ids)} ids and {len(c.layers)} layers.")
        if len(set(c.ids)) != len(c.ids):
            raise SteerscopeError("vector ids must be unique.")
        if not bool(torch.isfinite(v).all()):
            raise SteerscopeError("vectors contain NaN or inf values.")
        bad = [l for l in c.layers if not 0 <= l < c.n_layers]
        if bad:
            raise SteerscopeError(f"layers {bad} are outside 0..{c.n_layers - 1}.")
        c.norms = [round(float(x), 6) for x in v.norm(dim=-1)]

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, i: int | str) -> SteeringVector:
        if isinstance(i, str):
            if i not in self.config.ids:
                raise SteerscopeError(
                    f"no vector with id {i!r}; ids: {', '.join(self.config.ids[:10])}{' ...' if len(self) > 10 else ''}."
                )
            i = self.config.ids.index(i)
        if not -len(self) <= i < len(self):
            raise SteerscopeError(
                f"vector index {i} is out of range; this set has {len(self)} vectors (0..{len(self) - 1})."
            )
        return SteeringVector(self.vectors[i], self.config.layers[i], self.config.ids[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def ids(self) -> list[str]:
        return list(self.config.ids)

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    # ---- checks against a model ---------------------------------------------------------
    def check(self, lm, *, check_model: bool = True) -> None:
        """Raise `ModelMismatchError` naming every difference between this set's model and `lm`.

        d_model and layer count must match; with `check_model=False` a different fingerprint
        (e.g. a fine-tune of the same base) is allowed.
        """
        c = self.config
        problems = []
        if c.d_model != lm.d_model:
            problems.append(f"d_model {c.d_model} vs {lm.d_model}")
        if c.n_layers != lm.n_layers:
            problems.append(f"{c.n_layers} layers vs {lm.n_layers}")
        hard = bool(problems)
        if check_model and c.model_fingerprint != lm.fingerprint:
            problems.append(f"weights fingerprint {c.model_fingerprint} vs {lm.fingerprint}")
        if problems:
            hint = (
                ""
                if hard
                else " Pass check_model=False (--allow-other-model) to use it anyway, e.g. on a fine-tune of the same base."
            )
            raise ModelMismatchError(
                f"these vectors were made for {c.model_id!r} ({c.model_type}), not the loaded {lm.model_id!r}: {'; '.join(problems)}.{hint}"
            )

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "vectors": self.vectors.contiguous().float(),
            "layers": torch.tensor(self.config.layers, dtype=torch.int64),
        }
        for k, t in self.extras.items():
            tensors[f"extra.{k}"] = t.detach().cpu().contiguous()
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(
                tensors, str(tmp / TENSORS_FILE), metadata={"format": "steerscope", "version": str(FORMAT_VERSION)}
            )
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, lm=None, *, check_model: bool = True) -> VectorSet:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
            raise SteerscopeError(f"{path} is not a steerscope vector folder (needs {CONFIG_FILE} and {TENSORS_FILE}).")
        try:
            raw = json.loads((path / CONFIG_FILE).read_text())
        except ValueError as e:
            raise SteerscopeError(f"{path / CONFIG_FILE} is not a valid vector config: {e}") from None
        if not isinstance(raw, dict):
            raise SteerscopeError(f"{path / CONFIG_FILE} is not a valid vector config: expected a JSON object.")
        # The format first: a newer file must say "upgrade", whatever else in it is new.
        check_format(str(path), raw.get("format_version"), FORMAT_VERSION, raw.get("steerscope_version"), "vector file")
        known = {f.name for f in fields(VectorSetConfig)}
        unknown = sorted(set(raw) - known)
        upgrade_warning(
            str(path / CONFIG_FILE), raw.get("steerscope_version"), [], unknown
        )  # a newer minor: its extra keys
        try:
            cfg = VectorSetConfig(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise SteerscopeError(f"{path / CONFIG_FILE} is not a valid vector config: {e}") from None
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except Exception as e:
            raise SteerscopeError(f"{path / TENSORS_FILE} is unreadable ({e}); the file is damaged.") from None
        if tensors["layers"].tolist() != cfg.layers:
            raise SteerscopeError(
                f"{path}: layers in {CONFIG_FILE} and {TENSORS_FILE} disagree; the folder was edited by hand."
            )
        extras = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        vs = cls(tensors["vectors"], cfg, extras)
        if lm is not None:
            vs.check(lm, check_model=check_model)
        return vs

    def __repr__(self) -> str:
        c = self.config
        return f"VectorSet({len(self)} x {c.d_model}, method={c.method!r}, layers={sorted(set(c.layers))}, model={c.model_id!r})"
