"""Steering strength matched to a side-effect budget.

Methods are only comparable at equal side effects: a vector at twice the coefficient changes
more, good and bad. Following the KL-matched protocol (steering-lite; see
`../shared/reference/serving_and_frontier.md`), the coefficient of each vector is searched so that
the per-token KL between the unsteered and the steered next-token distributions, over fixed
neutral rollouts, reaches a target at a chosen quantile (default 0.5 nats at the 95th percentile
over 32-token rollouts).

The rollouts are the unsteered model's own greedy continuations, teacher-forced under both
models, so every coefficient is judged on the same tokens and the measured KL grows smoothly
with the coefficient (a bracketing search in log space then converges in a few forward passes).
KL direction as everywhere in steerscope: KL(p_unsteered || p_steered), in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..errors import SteerscopeError
from ..generation import generate
from ..interventions.ops import Add
from ..interventions.positions import ALL, Positions
from ..interventions.steer import steer


@dataclass(frozen=True)
class KLMatchConfig(Config):
    """How the coefficient of a vector is matched to a side-effect budget."""

    target: float = field(default=0.5, metadata={"min": 0})
    """per-token KL budget in nats"""
    quantile: float = field(default=0.95, metadata={"min": 0, "max": 1})
    """which quantile of the per-token KLs must hit the target (0.5 = median, 1 = max)"""
    tokens: int = field(default=32, metadata={"min": 1})
    """length of the neutral rollouts"""
    rel_tol: float = field(default=0.1, metadata={"min": 0})
    """stop when the quantile is within this fraction of the target"""
    max_iters: int = field(default=24, metadata={"min": 2})
    """forward passes the search may use"""
    start: float = field(default=1.0, metadata={"min": 0})
    """first coefficient tried"""


@dataclass
class KLMatch:
    """The matched coefficient, the KL quantile it gives, and every (coef, KL) tried."""

    coef: float
    kl: float
    hit: bool  # within rel_tol of the target
    curve: list[tuple[float, float]]


class Rollouts:
    """Fixed unsteered greedy rollouts of `prompts`, with the unsteered log-probabilities at
    every rollout position (each position predicts the next rollout token)."""

    @torch.no_grad()
    def __init__(self, lm, prompts: list[str], tokens: int = 32, *, chat: bool | None = None):
        if not prompts:
            raise SteerscopeError("KL matching needs at least one neutral prompt.")
        self.lm = lm
        comps = generate(lm, prompts, max_new_tokens=tokens, min_new_tokens=tokens, chat=chat, progress=False)
        self.prompts, self.chat = list(prompts), chat
        self.completions = [c.token_ids for c in comps]
        self.ids, self.mask, self.sel = self._pack(None)
        self.base = self._logp(())  # (N, V) float32, N = selected positions

    def _pack(self, system: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts (under `system`) followed by the fixed rollout tokens, left-padded."""
        lm = self.lm
        prompt_ids = [lm.encode([p], chat=self.chat, system=system)["input_ids"][0].tolist() for p in self.prompts]
        seqs = [p + c for p, c in zip(prompt_ids, self.completions)]
        ids, mask = lm.left_pad(seqs)  # (P, T)
        T = ids.shape[1]
        # positions that predict a rollout token: the last prompt token .. the second-to-last token
        sel = torch.zeros(len(seqs), T, dtype=torch.bool)
        for b, c in enumerate(self.completions):
            sel[b, T - len(c) - 1 : T - 1] = True
        return ids, mask, sel.to(lm.device)  # (P, T) each

    def _logp(self, interventions, packed=None) -> torch.Tensor:
        ids, mask, sel = packed or (self.ids, self.mask, self.sel)
        # Left padding puts every rollout at the end: the unembedding (a fifth of a small model's
        # compute, and P x T x V floats) only runs on the last K columns.
        K = int(sel.shape[1] - sel.long().argmax(-1).min())
        with steer(self.lm, *interventions):
            logits = self.lm.last_logits(ids, mask, k=K)  # (P, K, V)
        return torch.log_softmax(logits[sel[:, -K:].to(logits.device)].float(), -1)

    def _kl(self, lq: torch.Tensor) -> torch.Tensor:
        lp = self.base.to(lq.device)
        return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)

    @torch.no_grad()
    def kl_prompted(self, system: str) -> torch.Tensor:
        """(N,) per-token KL on the same rollout tokens when the prompts carry `system` (the
        prompting baseline's side effects, comparable with a vector's)."""
        return self._kl(self._logp((), self._pack(system)))

    @torch.no_grad()
    def kl_model(self) -> torch.Tensor:
        """(N,) per-token KL of the model as it is now (e.g. with a LoRA adapter in place)."""
        return self._kl(self._logp(()))

    @torch.no_grad()
    def kl(self, vector: torch.Tensor, layer: int, coef: float, positions: Positions = ALL) -> torch.Tensor:
        """(N,) per-token KL(p_unsteered || p_steered) in nats on the rollouts."""
        return self._kl(self._logp([Add(vector, layer=layer, coef=coef, positions=positions)]))


def match_kl(
    rollouts: Rollouts,
    vector: torch.Tensor,
    layer: int,
    cfg: KLMatchConfig = KLMatchConfig(),
    positions: Positions = ALL,
) -> KLMatch:
    """The coefficient c >= 0 at which the `cfg.quantile` of the per-token KL is `cfg.target`.

    Bracket by doubling/halving from `cfg.start`, then bisect in log space. `hit` is False when
    the budget cannot be reached within `max_iters` (e.g. a vector that barely changes the
    output); the closest coefficient tried is returned then."""
    if float(torch.as_tensor(vector).norm()) == 0.0:
        raise SteerscopeError("cannot match a zero vector to a KL budget.")
    if cfg.target == 0:
        return KLMatch(0.0, 0.0, True, [(0.0, 0.0)])
    curve: list[tuple[float, float]] = []

    def f(c: float) -> float:
        v = float(torch.quantile(rollouts.kl(vector, layer, c, positions), cfg.quantile))
        curve.append((c, v))
        return v

    def close(v: float) -> bool:
        return abs(v - cfg.target) <= cfg.rel_tol * cfg.target

    c = cfg.start if cfg.start > 0 else 1.0
    v = f(c)
    lo, hi = (c, None) if v < cfg.target else (None, c)  # the target lies in [lo, hi]
    while not close(v) and len(curve) < cfg.max_iters:
        c = hi / 2 if lo is None else lo * 2 if hi is None else math.sqrt(lo * hi)
        v = f(c)
        if v < cfg.target:
            lo = c
        else:
            hi = c
    best_c, best_v = min(curve, key=lambda cv: abs(cv[1] - cfg.target))
    return KLMatch(best_c, best_v, close(best_v), curve)
