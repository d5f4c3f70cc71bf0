"""Per-row steering: every batch row carries its own additions and ablations, and one forward
pass applies them all.

`generation` (K vectors x P prompts as batch rows) and the server (one request per row) both
describe each row as a `RowSteering` and turn a batch of them into interventions with
`per_row`: one per-row `Add` per (layer, positions, slot) and one per-row `Ablate` per
(positions, slot), with zero vectors / strength 0 on the rows that do not ask for it. So K
distinct vectors in a batch cost what one does, and an untouched row stays bit-identical to the
unsteered model.

Gated rows (`RowSteering.when` and `RowSteering.gated`, CAST's conditional steering): a row may
carry several gates, each holding some of its additions ("French when about France, a refusal
when harmful"). Gates with the same condition sites (layers, kinds) and `combine` go into ONE
`Conditional` with per-row condition directions, thresholds and sides (a row's n-th gate of one
kind into the n-th such `Conditional`); it decides every row on the prompt pass of the same
forward call (no second pass) and latches the decision. Rows without a gate are not wrapped: their steering is built
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
class Gated:
    """Additions that apply only if the row's prompt meets `conditions` (combined by `combine`,
    as in `Conditional`), decided on the prompt pass and held while generating."""

    adds: tuple[AddSpec, ...]
    conditions: tuple[Condition, ...]
    """each with a (d,) direction and one threshold/side"""
    combine: str = "and"
    """"and": every condition must hold; "or": any"""
    tag: object = None
    """the caller's label, unused here (the server: the indices of the request entries it holds)"""


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
    gated: tuple[Gated, ...] = ()
    """more additions, each group behind its own gate (after `adds`' gate `when`, if any)"""

    def gates(self) -> list[Gated]:
        """The row's gated groups in decision order: `adds` behind `when` first, then `gated`; a gate
        holding no addition is no gate (nothing to decide, no decision reported or latched)."""
        first = [Gated(self.adds, (self.when,))] if self.when is not None and self.adds else []
        return first + [g for g in self.gated if g.adds]

    def ungated_adds(self) -> tuple[AddSpec, ...]:
        return () if self.when is not None else self.adds


@dataclass(frozen=True)
class RowGate:
    """A gated row's decision after the prompt pass."""

    fired: bool
    """whether its steering applies"""
    score: float | None
    """cos(mean prompt hidden state, condition vector) of its first condition; None when the
    decision was given (`latched`)"""
    scores: tuple[float, ...] | None = None
    """every condition's score, in the gate's order (None as `score`)"""


class RowInterventions(list):
    """The list `per_row` returns (pass it to `steer`), plus the gate groups it built."""

    def __init__(self, items=(), groups=()):
        super().__init__(items)
        # (Conditional, its members as (row, index of the gate in that row's `gates()`))
        self.groups: list[tuple[Conditional, list[tuple[int, int]]]] = list(groups)

    def gates(self, n_rows: int) -> list[tuple[RowGate, ...]]:
        """Per row: the decision of each of its gates, in `RowSteering.gates()` order (() for an
        ungated row). Call after the prompt pass."""
        out: list[dict[int, RowGate]] = [{} for _ in range(n_rows)]
        for iv, members in self.groups:
            res = iv.result
            if res is None:
                raise SteerscopeError("per_row: the gates have not decided yet; read them after the prompt pass.")
            for i, g in members:
                scores = None if res.scores is None else tuple(float(x) for x in res.scores[i])
                out[i][g] = RowGate(bool(res.fired[i]), None if scores is None else scores[0], scores)
        return [tuple(d[g] for g in sorted(d)) for d in out]


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


def _gate_key(g: Gated, i: int) -> tuple:
    """The `Conditional` a gate can share with other rows' gates: its condition sites and `combine`."""
    if not g.conditions:
        raise SteerscopeError(f"row {i}: a gate needs at least one condition.")
    if g.combine not in ("and", "or"):
        raise SteerscopeError(f"row {i}: a gate's combine must be 'and' or 'or'; got {g.combine!r}.")
    for c in g.conditions:
        if torch.as_tensor(c.direction).dim() != 1 or torch.as_tensor(c.threshold).numel() != 1:
            raise SteerscopeError(f"row {i}: a row's gate needs a (d,) condition direction and one threshold.")
        if not isinstance(c.above, bool):
            raise SteerscopeError(f"row {i}: a row's gate needs `above` as one bool.")
    return (tuple((c.layer, c.kind) for c in g.conditions), g.combine)


def _latched_of(latched, i: int, n: int) -> tuple:
    """Row i's earlier decisions, one per gate (a bare bool for a one-gate row)."""
    got = latched[i]
    got = (got,) if isinstance(got, bool) else tuple(got) if got is not None else ()
    if len(got) != n or any(x is None for x in got):
        raise SteerscopeError("per_row: `latched` needs one decision per gate of every gated row.")
    return got


def per_row(rows: Sequence[RowSteering], d_model: int, latched: Sequence | None = None) -> RowInterventions:
    """The interventions steering row i by `rows[i]` only: every row's ablations first (as in
    `generate(interventions=...)`), then the ungated additions in layer order, then one
    `Conditional` per gate kind and slot holding the gated additions (see the module docstring).

    `latched`: per row, the decisions its gates took on an earlier prompt pass (the server's decode
    steps), a tuple in `RowSteering.gates()` order (a bool for a one-gate row, None for an ungated
    one); every gated row needs them, and no condition is read then."""
    B = len(rows)
    per = [r.gates() for r in rows]  # (B, its gates)
    if latched is not None and len(latched) != B:
        raise SteerscopeError("per_row: `latched` needs one entry per row.")
    decided = [_latched_of(latched, i, len(g)) if latched is not None and g else () for i, g in enumerate(per)]
    # A gated row's ablations stay ungated (they act from the first layer, before any condition
    # layer could decide); only its additions go behind a gate.
    out = RowInterventions(_plain([RowSteering(adds=r.ungated_adds(), ablations=r.ablations) for r in rows], d_model))
    slots: dict[tuple, dict[int, int]] = {}  # (key, slot) -> {row: index of the gate in the row}
    for i, gates in enumerate(per):
        seen: dict[tuple, int] = {}
        for g, gate in enumerate(gates):
            key = _gate_key(gate, i)
            slot = seen[key] = seen.get(key, -1) + 1
            slots.setdefault((key, slot), {})[i] = g
    empty = RowSteering()
    for (key, _slot), members in sorted(slots.items(), key=lambda kv: kv[0]):  # condition sites, combine, slot
        sites, combine = key
        gate_of = {i: per[i][g] for i, g in members.items()}
        behaviour = _plain([RowSteering(adds=gate_of[i].adds) if i in gate_of else empty for i in range(B)], d_model)
        if not behaviour:
            continue  # gates that hold no addition: nothing to gate
        first = next(iter(gate_of.values()))
        conds = []
        for n, (layer, kind) in enumerate(sites):
            # Rows outside the group: condition NEVER, so under "and" and "or" alike they never fire.
            fill = first.conditions[n].direction
            dirs = torch.stack(
                [(gate_of[i].conditions[n].direction if i in gate_of else fill).float() for i in range(B)]
            )
            thr = torch.tensor([float(gate_of[i].conditions[n].threshold) if i in gate_of else NEVER for i in range(B)])
            above = torch.tensor([bool(gate_of[i].conditions[n].above) if i in gate_of else True for i in range(B)])
            conds.append(Condition(dirs, layer, thr, above, kind=kind))  # (B, d), (B,), (B,)
        fired = None
        if latched is not None:
            fired = torch.tensor([bool(decided[i][members[i]]) if i in members else False for i in range(B)])  # (B,)
        iv = Conditional(behaviour, conds if len(conds) > 1 else conds[0], combine=combine, latched=fired)
        out.append(iv)
        out.groups.append((iv, sorted(members.items())))
    return out
