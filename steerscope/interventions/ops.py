"""Interventions on the residual stream: add, ablate, clamp.

Each intervention is a dataclass registered by name in the `INTERVENTIONS` family (the same
registration shape as every other method family; `ClampFeature` in `sae.steering` is one too).
Its operation is one pure function `(x, **params) -> new x`; the hook wrapper applies it only at
the selected positions with `torch.where`, so unselected and padding positions are bit-identical
to the unsteered model. A new intervention is one dataclass with `sites`, `params` and `fn`.

Per-row steering: any vector/coefficient/value may carry a leading batch dimension, so row i of
the batch is steered by row i of the parameter (K vectors x P prompts in one forward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .._tensors import as_rows, as_scalars
from ..config import Family
from ..errors import SteerscopeError
from ..models.registry import Site, SiteKind
from .positions import ALL, Positions, StepState

OpFn = Callable[..., torch.Tensor]
INTERVENTIONS: Family = Family("interventions", "intervention")


def _dot(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.einsum("btd,bd->bt", x, r.expand(x.shape[0], -1))  # (B, T)


def op_add(x: torch.Tensor, vector: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """ActAdd / CAA (Turner et al. 2023; Rimsky et al. 2024): x + c * v."""
    # x: (B, T, d); vector: (B|1, d); coef: (B|1,)
    return x + (coef[:, None] * vector)[:, None, :]


def op_ablate(x: torch.Tensor, direction: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Directional ablation (Arditi et al. 2024, eq. 4): x - s (x . r) r with unit r; s = 1 is
    full ablation, s = 0 leaves the row exactly unchanged (used for per-row batches)."""
    return x - (strength[:, None] * _dot(x, direction))[..., None] * direction[:, None, :]


def op_clamp(x: torch.Tensor, direction: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Set the projection on unit r to `value`: x + (value - x . r) r."""
    return x + (value[:, None] - _dot(x, direction))[..., None] * direction[:, None, :]


def base_device(params: dict[str, torch.Tensor]) -> torch.device | None:
    return next(iter(params.values())).device if params else None


def _layers(layer, lm) -> list[int]:
    seq = list(layer) if isinstance(layer, (list, tuple, range)) else [layer]
    if not seq:
        raise SteerscopeError("the layer list is empty.")
    return [lm.check_layer(int(l) if not isinstance(l, int) else l) for l in seq]


# ---- the interventions --------------------------------------------------------------------------
@dataclass
class Intervention:
    """Base: the sites an intervention applies at, its parameters, its operation `fn` and a
    position selector."""

    positions: Positions = field(default=ALL, kw_only=True)

    def sites(self, lm) -> list[Site]:
        raise NotImplementedError

    def params(self, lm) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def fn(x: torch.Tensor, **params) -> torch.Tensor:
        raise NotImplementedError

    def hook_specs(self, lm, state: StepState) -> list:
        base = {k: v.to(device=lm.device, dtype=lm.dtype) for k, v in self.params(lm).items()}
        on_device = {base_device(base): base}  # a model split across devices: a copy per block device
        fn = type(self).fn
        positions = self.positions

        def apply(x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
            params = on_device.get(x.device)
            if params is None:
                params = on_device[x.device] = {k: v.to(x.device) for k, v in base.items()}
            B = x.shape[0]
            for k, v in params.items():
                if v.shape[0] not in (1, B):
                    raise SteerscopeError(
                        f"{type(self).__name__}: per-row {k} has {v.shape[0]} rows but the batch has {B}; give one row per batch row or a single row."
                    )
            new = fn(x, **params)
            sel = state.selection(positions, x.device)
            return new if sel is None else torch.where(sel, new, x)

        return [(*lm.arch.resolve(s), apply) for s in self.sites(lm)]


@INTERVENTIONS.register("add")
@dataclass
class Add(Intervention):
    """Add `coef * vector` at `layer` (`kind` = resid_post by default). `vector` is (d,) or
    per-row (batch, d); `coef` a float or per-row (batch,)."""

    fn = staticmethod(op_add)
    vector: torch.Tensor
    layer: int
    coef: float | torch.Tensor = 1.0
    kind: SiteKind = "resid_post"

    @classmethod
    def of(cls, sv, coef: float = 1.0, positions: Positions = ALL) -> Add:
        """Add a `SteeringVector` at its own layer."""
        return cls(sv.vector, layer=sv.layer, coef=coef, positions=positions)

    def sites(self, lm) -> list[Site]:
        return [Site(l, self.kind) for l in _layers(self.layer, lm)]

    def params(self, lm) -> dict[str, torch.Tensor]:
        return {"vector": as_rows(self.vector, lm.d_model, "steering vector"), "coef": as_scalars(self.coef, "coef")}


@INTERVENTIONS.register("ablate")
@dataclass
class Ablate(Intervention):
    """Project the unit `direction` out of the residual stream.

    layer=None (default): everywhere, as in Arditi et al. 2024 — at every block input and at the
    output of every module that writes to the residual stream, so no `hidden_states` entry and no
    block sees the direction (equivalent to weight orthogonalisation). layer=L or a list: only at
    the output of those blocks.
    """

    fn = staticmethod(op_ablate)
    direction: torch.Tensor
    layer: int | Sequence[int] | None = None
    strength: float | torch.Tensor = 1.0

    def sites(self, lm) -> list[Site]:
        if self.layer is None:
            return [Site(l, k) for l in range(lm.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")]
        return [Site(l, "resid_post") for l in _layers(self.layer, lm)]

    def params(self, lm) -> dict[str, torch.Tensor]:
        return {
            "direction": as_rows(self.direction, lm.d_model, "ablation direction", unit=True),
            "strength": as_scalars(self.strength, "ablation strength"),
        }


@INTERVENTIONS.register("clamp")
@dataclass
class Clamp(Intervention):
    """Set the projection of the residual stream on the unit `direction` to `value` at `layer`."""

    fn = staticmethod(op_clamp)
    direction: torch.Tensor
    value: float | torch.Tensor
    layer: int | Sequence[int]
    kind: SiteKind = "resid_post"

    def sites(self, lm) -> list[Site]:
        return [Site(l, self.kind) for l in _layers(self.layer, lm)]

    def params(self, lm) -> dict[str, torch.Tensor]:
        return {
            "direction": as_rows(self.direction, lm.d_model, "clamp direction", unit=True),
            "value": as_scalars(self.value, "clamp value"),
        }
