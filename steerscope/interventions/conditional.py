"""Conditional activation steering: steer a row only when its prompt is "about" a condition.

CAST (Lee et al., ICLR 2025, "Programming Refusal with Conditional Activation Steering"): a
condition vector c is read at a condition layer L_c on the prompt; a behaviour (e.g. a refusal
vector added at later layers) is applied only when the prompt's hidden state is close enough to c.

What is implemented (per row b, per condition):

    h_b   = mean over row b's prompt tokens after the first of the hidden state at L_c        # (d,)
            (padding excluded; the first token is an attention sink, see `_reader`)
    score = cos(h_b, c)                                                                      # in [-1, 1]
    holds = score > threshold   (score < threshold with above=False)

CAST itself compares h with its projection on the condition subspace, sim = cos(h, tanh(P_c h))
with P_c = c c^T / c^T c (IBM activation-steering, "mean" comparison mode). For a single direction
without the tanh that similarity is |cos(h, c)|, which cannot tell "about X" from "against X"; the
signed cosine used here keeps the sign and is the common single-direction special case, so
thresholds found with IBM's library do not transfer as they are.

Several conditions combine with `combine="and"|"or"` (CAST's "if C1 or C2 then B" rules).

The decision is taken ONCE, on the prompt pass, inside the same forward pass that steers: the
condition hooks run at L_c before any behaviour hook (the condition sites must come at or before
the first behaviour site, else `steer` raises), and the decision is LATCHED per row for the rest of
the generation, so cached decode steps (which see only the new token) and uncached re-passes with
pinned prompt lengths reuse it instead of recomputing it on generated text. After the prompt pass
`Conditional.result` holds the scores and which rows fired.

Per row: condition directions/thresholds/comparators and the behaviour's parameters may carry a
leading batch dimension (as `Add` does), so rows with different conditions and behaviours share a
batch; a row that asks for no conditional behaviour gets a zero behaviour vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .._tensors import as_rows, as_scalars
from ..errors import SteerscopeError
from ..models.registry import Site, SiteKind
from .ops import INTERVENTIONS, Intervention
from .positions import StepState

# Forward order of the sites of one block: its input, attention output, MLP output, its output.
_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def _order(site: Site) -> tuple[int, int]:
    return (site.layer, _ORDER[site.kind])


def _where(site: Site) -> str:
    return f"layer {site.layer} ({site.kind})"


@dataclass(frozen=True)
class Condition:
    """Does the prompt's mean hidden state at `layer` point along `direction`?"""

    direction: torch.Tensor
    """Condition vector c, (d,) or per-row (batch, d); any non-zero norm (only its direction counts)."""
    layer: int
    """Condition layer L_c: the hidden state is read at this block's `kind` site."""
    threshold: float | torch.Tensor = 0.0
    """The condition holds when cos(mean prompt hidden state, c) is above it (below with above=False);
    a float or per-row (batch,)."""
    above: bool | torch.Tensor = True
    """True: holds when score > threshold; False: when score < threshold. A bool or per-row (batch,) bools."""
    kind: SiteKind = "resid_post"
    """Site read at `layer` (resid_post = the block's output = hidden_states[layer + 1])."""

    def __post_init__(self) -> None:
        t = torch.as_tensor(self.direction)
        if t.dim() not in (1, 2):
            raise SteerscopeError(f"condition direction must be (d,) or (rows, d); got shape {tuple(t.shape)}.")
        as_rows(t, t.shape[-1], "condition direction", unit=True)  # raises on zero norm / NaN
        as_scalars(self.threshold, "condition threshold")
        if self.kind not in _ORDER:
            raise SteerscopeError(f"condition kind must be one of {', '.join(_ORDER)}; got {self.kind!r}.")


@dataclass(frozen=True)
class ConditionResult:
    """The latched decision of one prompt pass."""

    fired: torch.Tensor
    """(batch,) bool: rows whose conditions (combined) hold, i.e. the rows the behaviour steers."""
    scores: torch.Tensor | None
    """(batch, n_conditions) float32 cos(mean prompt hidden state, c); None when the decision was given (`latched`)."""
    held: torch.Tensor | None
    """(batch, n_conditions) bool: which condition held on which row; None when given."""


class _Gate:
    """The per-row decision of one `steer` block: taken on the prompt pass, reused afterwards."""

    def __init__(self, owner: Conditional, n: int, preset: torch.Tensor | None) -> None:
        self.owner, self.n = owner, n
        self.fixed = preset is not None
        self.fired: torch.Tensor | None = preset  # (B,) bool
        self.call: torch.Tensor | None = None  # abs_pos of the call last seen: a new tensor per forward call
        self.deciding = False
        self.scores: list[torch.Tensor | None] = [None] * n
        self.held: list[torch.Tensor | None] = [None] * n
        self.by_device: dict[torch.device, torch.Tensor] = {}
        self.any = self.all = False
        if preset is not None:
            self._latch(preset)

    def begin(self, state: StepState) -> None:
        """Called by every hook; acts once per forward call: a pass that starts every row at its
        first token is a new prompt pass (re-decide) unless the prompt lengths are pinned and a
        decision for this batch exists (an uncached decode step); anything else reuses the latch."""
        if state.abs_pos is self.call:
            return
        self.call, self.deciding = state.abs_pos, False
        B = state.batch_size
        if self.fixed or (state.pinned is not None and self.fired is not None and self.fired.shape[0] == B):
            pass
        elif bool(((state.abs_pos == 0) & state.valid).any(-1).all()):
            self.deciding, self.fired, self.by_device = True, None, {}
            self.scores, self.held = [None] * self.n, [None] * self.n
            self.owner.result = None
            return
        if self.fired is None:
            raise SteerscopeError(
                "Conditional: this forward call continues sequences whose prompt pass it did not see; "
                "enter `steer(...)` before the prompt pass, or pass `latched=` the decision taken then."
            )
        if self.fired.shape[0] != B:
            raise SteerscopeError(
                f"Conditional: the latched decision has {self.fired.shape[0]} rows but the batch has {B}."
            )

    def _latch(self, fired: torch.Tensor) -> None:
        self.fired = fired.bool().reshape(-1)
        self.by_device = {}
        self.any, self.all = bool(self.fired.any()), bool(self.fired.all())

    def record(self, i: int, score: torch.Tensor, held: torch.Tensor) -> None:
        self.scores[i], self.held[i] = score, held
        if any(s is None for s in self.scores):
            return
        dev = score.device
        S = torch.stack([s.to(dev) for s in self.scores], -1)  # (B, n)
        H = torch.stack([h.to(dev) for h in self.held], -1)  # (B, n)
        self._latch(H.all(-1) if self.owner.combine == "and" else H.any(-1))
        self.deciding = False
        self.owner.result = ConditionResult(self.fired, S.detach(), H)

    def mask(self, device: torch.device) -> torch.Tensor:
        """(B, 1, 1) bool on `device`."""
        m = self.by_device.get(device)
        if m is None:
            m = self.by_device[device] = self.fired.to(device)[:, None, None]
        return m


def _rows_ok(t: torch.Tensor, B: int, what: str) -> torch.Tensor:
    if t.shape[0] not in (1, B):
        raise SteerscopeError(
            f"Conditional: per-row {what} has {t.shape[0]} rows but the batch has {B}; give one row per batch row or a single row."
        )
    return t


@INTERVENTIONS.register("conditional")
@dataclass
class Conditional(Intervention):
    """Apply `behaviour` only to the rows whose prompt meets `condition` (CAST, Lee et al. 2025).

    Example::

        iv = Conditional(Add(refusal, layer=12, coef=4.0), Condition(harm_dir, layer=8, threshold=0.1))
        with steer(lm, iv):
            out = lm.model.generate(**lm.encode(prompts), max_new_tokens=40)
        iv.result.fired, iv.result.scores   # which rows were steered, and why
    """

    behaviour: Intervention | Sequence[Intervention]
    """What to apply to the rows that fire: an `Add` (per-row vectors allowed) or any intervention(s)."""
    condition: Condition | Sequence[Condition]
    """One condition, or several combined by `combine`."""
    combine: Literal["and", "or"] = "and"
    """How several conditions combine: all must hold ("and") or any ("or")."""
    latched: torch.Tensor | None = None
    """A decision taken earlier, (batch,) bool (e.g. `result.fired` of a server's prefill); when
    given no condition is read and every call reuses it."""
    result: ConditionResult | None = field(default=None, init=False, repr=False, compare=False)
    """Set by the prompt pass inside `steer`: which rows fired and their scores."""

    def __post_init__(self) -> None:
        if self.combine not in ("and", "or"):
            raise SteerscopeError(f"Conditional: combine must be 'and' or 'or'; got {self.combine!r}.")
        if not self._conditions() and self.latched is None:
            raise SteerscopeError("Conditional needs at least one Condition (or a `latched` decision).")
        for c in self._conditions():
            if not isinstance(c, Condition):
                raise SteerscopeError(f"Conditional: not a Condition: {type(c).__name__}.")
        bad = [type(b).__name__ for b in self._behaviour() if not isinstance(b, Intervention)]
        if bad or not self._behaviour():
            raise SteerscopeError(f"Conditional: the behaviour must be one or more interventions; got {bad or 'none'}.")

    def _conditions(self) -> list[Condition]:
        return [self.condition] if isinstance(self.condition, Condition) else list(self.condition)

    def _behaviour(self) -> list[Intervention]:
        return [self.behaviour] if isinstance(self.behaviour, Intervention) else list(self.behaviour)

    def sites(self, lm) -> list[Site]:
        """The condition sites (read only), then the behaviour's sites."""
        reads = [] if self.latched is not None else [Site(lm.check_layer(c.layer), c.kind) for c in self._conditions()]
        return reads + [s for b in self._behaviour() for s in b.sites(lm)]

    def _check_order(self, lm) -> None:
        """The decision must exist before the first behaviour hook runs (no second pass)."""
        if self.latched is not None:
            return
        reads = [Site(lm.check_layer(c.layer), c.kind) for c in self._conditions()]
        writes = [s for b in self._behaviour() for s in b.sites(lm)]
        last, first = max(reads, key=_order), min(writes, key=_order)
        if _order(last) > _order(first):
            raise SteerscopeError(
                f"Conditional: the condition is read at {_where(last)}, after the behaviour's first site {_where(first)}; "
                f"the gate must be decided before steering, so use a condition layer <= {first.layer} or move the behaviour later."
            )

    def hook_specs(self, lm, state: StepState) -> list:
        self._check_order(lm)
        conds = self._conditions() if self.latched is None else []
        preset = None if self.latched is None else torch.as_tensor(self.latched).bool().reshape(-1)
        gate = _Gate(self, len(conds), preset)
        self.result = None if preset is None else ConditionResult(preset, None, None)
        specs = [(*lm.arch.resolve(Site(lm.check_layer(c.layer), c.kind)), self._reader(gate, state, lm, i, c))
                 for i, c in enumerate(conds)]  # fmt: skip
        positions = self.positions
        for b in self._behaviour():
            for module, kind, apply in b.hook_specs(lm, state):
                specs.append((module, kind, self._gated(gate, state, positions, apply)))
        return specs

    @staticmethod
    def _reader(gate: _Gate, state: StepState, lm, i: int, c: Condition):
        direction = as_rows(c.direction, lm.d_model, "condition direction", unit=True).float()  # (1|B, d) unit
        threshold = as_scalars(c.threshold, "condition threshold")  # (1|B,)
        above = torch.as_tensor(c.above, dtype=torch.bool).reshape(-1)  # (1|B,)

        def read(x: torch.Tensor) -> torch.Tensor:  # (B, T, d); returned unchanged
            gate.begin(state)
            if not gate.deciding or gate.scores[i] is not None:
                return x
            B, dev = x.shape[0], x.device
            plen = state.require_prompt_len().to(dev)  # (B,)
            # The mean prompt representation (CAST's "mean" mode) over the row's real prompt
            # tokens after the first, never padding. The first token is an attention sink whose
            # massive activations (Sun et al. 2024) dominate a mean that includes it: on SmolLM2
            # every harmful and harmless prompt then scored within 0.011 of one cosine at the best
            # layer, and a threshold in so narrow a band does not survive another prompt length.
            # `extract`'s mean leaves it out for the same reason. A one-token prompt keeps it.
            pos = state.abs_pos.to(dev)
            sel = state.valid.to(dev) & (pos < plen[:, None]) & ((pos > 0) | (plen[:, None] == 1))  # (B, T)
            count = sel.sum(-1)  # (B,)
            if not torch.equal(count, (plen - 1).clamp_min(1)):
                raise SteerscopeError(
                    "Conditional: the prompt pass does not hold each row's whole prompt (chunked prefill?); "
                    "the condition needs the mean over every prompt token in one call."
                )
            mean = torch.where(sel[..., None], x.float(), 0.0).sum(1) / count.clamp_min(1)[:, None]  # (B, d)
            c_dir = _rows_ok(direction, B, "condition direction").to(dev).expand(B, -1)  # (B, d)
            score = F.cosine_similarity(mean, c_dir, dim=-1)  # (B,)
            thr = _rows_ok(threshold, B, "condition threshold").to(dev)
            up = _rows_ok(above, B, "condition `above`").to(dev)
            gate.record(i, score, torch.where(up, score > thr, score < thr))
            return x

        return read

    @staticmethod
    def _gated(gate: _Gate, state: StepState, positions, apply):
        def gated(x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
            gate.begin(state)
            if gate.fired is None:  # _check_order makes this unreachable; never steer undecided rows
                raise SteerscopeError("Conditional: a behaviour hook ran before the condition was decided.")
            if not gate.any:
                return x
            new = apply(x)
            sel = state.selection(positions, x.device)
            if sel is None and gate.all:
                return new  # every row fired: exactly the plain behaviour
            m = gate.mask(x.device) if sel is None else gate.mask(x.device) & sel  # (B, T|1, 1)
            return torch.where(m, new, x)

        return gated
