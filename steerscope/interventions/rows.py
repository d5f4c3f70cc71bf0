"""Per-row steering: every batch row carries its own additions and ablations, and one forward
pass applies them all.

`generation` (K vectors x P prompts as batch rows) and the server (one request per row) both
describe each row as a `RowSteering` and turn a batch of them into interventions with
`per_row`: one per-row `Add` per (layer, positions, slot) and one per-row `Ablate` per
(positions, slot), with zero vectors / strength 0 on the rows that do not ask for it. So K
distinct vectors in a batch cost what one does, and an untouched row stays bit-identical to the
unsteered model.

Gated rows (`RowSteering.when`, CAST's conditional steering): the steering of the rows gated at
one condition site (layer, kind) goes into ONE `Conditional` with per-row condition directions,
thresholds and sides; it decides every row on the prompt pass of the same forward call (no second
pass) and latches the decision. Rows without a gate are not wrapped: their steering is built
exactly as without gates. Inside a group's `Conditional` the rows outside the group have zero
behaviour and a condition that never holds (threshold 2 > any cosine), so `torch.where` hands
them back their own hidden state untouched; and a gated row whose gate does not fire gets its
input back the same way. Every row is therefore touched only by its own steering, whatever else
shares the batch: alone = batched = joined later (the server), and an unfired row is
bit-identical to the unsteered one. An always-holding condition for ungated rows would also be
correct, but would route them through the gate's `where` and behaviour of another group for no
gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SteerscopeError
from .conditional import Condition, Conditional
from .ops import Ablate, Add, Intervention
from .positions import Positions

NEVER = 2.0  # a cosine threshold no score exceeds: the condition of the rows outside a gate group


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
    server reports per generated token (the playground's heat map); `per_row` ignores it.
    `when`: the row's gate (a `Condition` with a (d,) direction and scalar threshold/above):
    the row's additions apply only if its prompt meets it (decided on the prompt pass); its ablations are
    never gated (they act from the first layer, before any condition layer)."""

    adds: tuple[AddSpec, ...] = ()
    ablations: tuple[AblateSpec, ...] = ()
    probe: tuple[torch.Tensor, int] | None = None
    when: Condition | None = None


@dataclass(frozen=True)
class RowGate:
    """A gated row's decision after the prompt pass."""

    fired: bool
    """whether its steering applies"""
    score: float | None
    """cos(mean prompt hidden state, condition vector); None when the decision was given (`latched`)"""


class RowInterventions(list):
    """The list `per_row` returns (pass it to `steer`), plus the gate groups it built."""

    def __init__(self, items=(), groups=()):
        super().__init__(items)
        self.groups: list[tuple[Conditional, list[int]]] = list(groups)  # (Conditional, its rows)

    def gates(self, n_rows: int) -> list[RowGate | None]:
        """Per row: its gate's decision (None for ungated rows). Call after the prompt pass."""
        out: list[RowGate | None] = [None] * n_rows
        for iv, members in self.groups:
            res = iv.result
            if res is None:
                raise SteerscopeError("per_row: the gates have not decided yet; read them after the prompt pass.")
            for i in members:
                score = None if res.scores is None else float(res.scores[i, 0])
                out[i] = RowGate(bool(res.fired[i]), score)
        return out


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


def _plain(rows: Sequence[RowSteering], d_model: int) -> list[Intervention]:
    """Ungated per-row interventions: ablations first, then additions in layer order."""
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


def _gate_of(r: RowSteering, i: int) -> tuple[int, str] | None:
    c = r.when
    if c is None:
        return None
    if torch.as_tensor(c.direction).dim() != 1 or torch.as_tensor(c.threshold).numel() != 1:
        raise SteerscopeError(f"row {i}: a row's gate needs a (d,) condition direction and one threshold.")
    if not isinstance(c.above, bool):
        raise SteerscopeError(f"row {i}: a row's gate needs `above` as one bool.")
    return (c.layer, c.kind)


def per_row(
    rows: Sequence[RowSteering], d_model: int, latched: Sequence[bool | None] | None = None
) -> RowInterventions:
    """The interventions steering row i by `rows[i]` only: the ungated rows' ablations first (as
    in `generate(interventions=...)`), then their additions in layer order, then one
    `Conditional` per gate site holding the gated rows' steering (see the module docstring).

    `latched`: per row, the decision its gate took on an earlier prompt pass (the server's decode
    steps); every gated row needs one, and no condition is read then."""
    B = len(rows)
    keys = [_gate_of(r, i) for i, r in enumerate(rows)]
    empty = RowSteering()
    # A gated row's ablations stay ungated (they act from the first layer, before any condition
    # layer could decide); only its additions go behind the gate.
    out = RowInterventions(
        _plain([r if k is None else RowSteering(ablations=r.ablations) for r, k in zip(rows, keys)], d_model)
    )
    for key in sorted({k for k in keys if k is not None}):
        members = [i for i, k in enumerate(keys) if k == key]
        behaviour = _plain([RowSteering(adds=rows[i].adds) if keys[i] == key else empty for i in range(B)], d_model)
        if not behaviour:
            continue  # gated rows that ask for nothing: nothing to gate
        fill = rows[members[0]].when.direction
        dirs = torch.stack([(rows[i].when.direction if keys[i] == key else fill).float() for i in range(B)])  # (B, d)
        thr = torch.tensor([float(rows[i].when.threshold) if keys[i] == key else NEVER for i in range(B)])  # (B,)
        above = torch.tensor([bool(rows[i].when.above) if keys[i] == key else True for i in range(B)])  # (B,)
        fired = None
        if latched is not None:
            if len(latched) != B or any(latched[i] is None for i in members):
                raise SteerscopeError("per_row: `latched` needs one decision per row, for every gated row.")
            fired = torch.tensor([bool(latched[i]) if keys[i] == key else False for i in range(B)])  # (B,)
        iv = Conditional(behaviour, Condition(dirs, key[0], thr, above, kind=key[1]), latched=fired)
        out.append(iv)
        out.groups.append((iv, members))
    return out
