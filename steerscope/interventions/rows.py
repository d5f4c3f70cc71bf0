"""Per-row steering: every batch row carries its own additions and ablations, and one forward
pass applies them all.

`generation` (K vectors x P prompts as batch rows) and the server (one request per row) both
describe each row as a `RowSteering` and turn a batch of them into interventions with
`per_row`: one per-row `Add` per (layer, positions, slot) and one per-row `Ablate` per
(positions, slot), with zero vectors / strength 0 on the rows that do not ask for it. So K
distinct vectors in a batch cost what one does, and an untouched row stays bit-identical to the
unsteered model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import Ablate, Add, Intervention
from .positions import Positions


@dataclass(frozen=True)
class AddSpec:
    """coef * vector added at `layer` on `positions`."""

    vector: torch.Tensor  # (d,) float32
    layer: int
    coef: float
    positions: Positions


@dataclass(frozen=True)
class AblateSpec:
    """`direction` projected out at every layer on `positions` (Arditi et al. 2024)."""

    direction: torch.Tensor  # (d,) float32, any norm (made unit by Ablate)
    positions: Positions


@dataclass(frozen=True)
class RowSteering:
    """Everything one row asks for. `probe`: (unit vector (d,), layer) whose projection the
    server reports per generated token (the playground's heat map); `per_row` ignores it."""

    adds: tuple[AddSpec, ...] = ()
    ablations: tuple[AblateSpec, ...] = ()
    probe: tuple[torch.Tensor, int] | None = None


def _slots(rows: Sequence[RowSteering], items, key) -> dict:
    """{(key, slot): {row: item}}: a row's n-th item under one key goes to slot n, so two
    additions of one row at the same layer and positions land in two interventions."""
    groups: dict = {}
    for i, r in enumerate(rows):
        seen: dict = {}
        for a in items(r):
            k = key(a)
            slot = seen[k] = seen.get(k, -1) + 1
            groups.setdefault((*k, slot), {})[i] = a
    return groups


def per_row(rows: Sequence[RowSteering], d_model: int) -> list[Intervention]:
    """The interventions steering row i by `rows[i]` only: ablations first (as in
    `generate(interventions=...)`), then additions in layer order."""
    B = len(rows)
    out: list[Intervention] = []
    for (pos, _), members in _slots(rows, lambda r: r.ablations, lambda a: (a.positions,)).items():
        fill = next(iter(members.values())).direction  # any unit direction: strength 0 leaves the row as is
        dirs = torch.stack([members[i].direction if i in members else fill for i in range(B)])  # (B, d)
        strength = torch.tensor([1.0 if i in members else 0.0 for i in range(B)])  # (B,)
        out.append(Ablate(dirs, strength=strength, positions=pos))
    groups = _slots(rows, lambda r: r.adds, lambda a: (a.layer, a.positions))
    for (L, pos, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        vec, coef = torch.zeros(B, d_model), torch.zeros(B)  # (B, d), (B,)
        for i, a in members.items():
            vec[i], coef[i] = a.vector, a.coef
        out.append(Add(vec, layer=L, coef=coef, positions=pos))
    return out
