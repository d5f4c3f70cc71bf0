"""Choosing a candidate direction by its measured effect (Arditi et al. 2024, sec. 3.2 / app. C).

For every candidate (one per layer and read position) with A = prompts with the behaviour and
B = prompts without:
    induce   metric on B prompts with coef * v added at the candidate's layer (all positions)
    bypass   metric on A prompts with v's direction ablated at every layer
    kl_add   KL(base || steered) at the last position of neutral prompts, v added
    kl_abl   the same with v ablated
and the baselines metric(A), metric(B) unsteered. Candidates are dropped when the KL of the
chosen mode exceeds `kl_bound` (default 0.1), when adding does not move B towards the behaviour
(induce <= baseline B), or when the layer is in the last `1 - max_layer_frac` of the model
(default: the last 20 %). mode="ablate" picks the lowest bypass (the refusal-direction rule);
mode="add" picks the highest induce.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from .._io import write_json_atomic
from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..generation import generate, last_token_logits
from .metrics import Metric, kl_divergence, parse_metric


@dataclass
class SelectConfig:
    mode: Literal["add", "ablate"] = "add"
    coef: float = 1.0
    kl_bound: float = 0.1
    max_layer_frac: float = 0.8
    max_new_tokens: int = 40  # for text metrics
    chat: bool | None = None
    batch_size: int = 32


@dataclass
class CandidateScore:
    id: str
    layer: int
    induce: float
    bypass: float | None
    kl_add: float
    kl_ablate: float
    kept: bool
    reason: str = ""


@dataclass
class Selection:
    metric: str
    config: SelectConfig
    baseline_a: float
    baseline_b: float
    candidates: list[CandidateScore] = field(default_factory=list)
    best: int | None = None

    @property
    def best_candidate(self) -> CandidateScore | None:
        return None if self.best is None else self.candidates[self.best]

    def table(self) -> str:
        head = ["id", "layer", "induce", "bypass", "kl_add", "kl_ablate", "kept", "note"]
        fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
        rows = [[fmt(c.id), fmt(c.layer), fmt(c.induce), fmt(c.bypass), fmt(c.kl_add), fmt(c.kl_ablate),
                 "*" if i == self.best else ("yes" if c.kept else "no"), c.reason] for i, c in enumerate(self.candidates)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
        top = (f"metric {self.metric}: baseline on A {self.baseline_a:.4f}, on B {self.baseline_b:.4f}; "
               f"mode={self.config.mode}, coef={self.config.coef:g}, KL bound {self.config.kl_bound:g}")
        best = self.best_candidate
        tail = f"selected: {best.id} (layer {best.layer})" if best else "selected: none (every candidate was filtered out; see the notes)"
        return "\n".join([top, line(head)] + [line(r) for r in rows] + [tail])

    def to_dict(self) -> dict:
        return {"metric": self.metric, "config": asdict(self.config), "baseline_a": self.baseline_a,
                "baseline_b": self.baseline_b, "best": self.best, "candidates": [asdict(c) for c in self.candidates]}

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def _measure(lm, metric: Metric, prompts: list[str], vs: VectorSet, mode: str, cfg: SelectConfig) -> torch.Tensor:
    """(K,) mean metric over prompts for every candidate under `mode`."""
    if metric.kind == "logits":
        logits = last_token_logits(lm, prompts, vectors=vs, coef=cfg.coef, mode=mode, chat=cfg.chat, batch_size=cfg.batch_size)
        return metric.score_logits(logits.reshape(-1, logits.shape[-1])).reshape(len(vs), len(prompts)).mean(1)
    res = generate(lm, prompts, vectors=vs, coef=cfg.coef, mode=mode, include_unsteered=False, chat=cfg.chat,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    return metric.score_texts([r.text for r in res]).reshape(len(vs), len(prompts)).mean(1)


def _baseline(lm, metric: Metric, prompts: list[str], cfg: SelectConfig) -> float:
    if metric.kind == "logits":
        return float(metric.score_logits(last_token_logits(lm, prompts, chat=cfg.chat, batch_size=cfg.batch_size)[0]).mean())
    res = generate(lm, prompts, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    return float(metric.score_texts([r.text for r in res]).mean())


def _kl(lm, neutral: list[str], vs: VectorSet, mode: str, cfg: SelectConfig) -> torch.Tensor:
    base = last_token_logits(lm, neutral, chat=cfg.chat, batch_size=cfg.batch_size)[0]  # (P, V)
    steered = last_token_logits(lm, neutral, vectors=vs, coef=cfg.coef, mode=mode, chat=cfg.chat, batch_size=cfg.batch_size)
    return kl_divergence(base[None].expand_as(steered), steered).mean(1)  # (K,)


def select(lm, vs: VectorSet, metric: str | Metric, a_prompts: Sequence[str], b_prompts: Sequence[str],
           neutral_prompts: Sequence[str], config: SelectConfig | None = None) -> Selection:
    cfg = config or SelectConfig()
    if cfg.mode not in ("add", "ablate"):
        raise SteerscopeError(f"mode must be 'add' or 'ablate', got {cfg.mode!r}.")
    for name, p in (("A", a_prompts), ("B", b_prompts), ("neutral", neutral_prompts)):
        if not p:
            raise SteerscopeError(f"selection needs {name} prompts; the list is empty.")
    vs.check(lm, check_model=False)
    m = parse_metric(metric, lm)
    a, b, neutral = list(a_prompts), list(b_prompts), list(neutral_prompts)
    sel = Selection(m.name, cfg, _baseline(lm, m, a, cfg), _baseline(lm, m, b, cfg))
    induce = _measure(lm, m, b, vs, "add", cfg)
    bypass = _measure(lm, m, a, vs, "ablate", cfg) if cfg.mode == "ablate" else None
    kl_add, kl_abl = _kl(lm, neutral, vs, "add", cfg), _kl(lm, neutral, vs, "ablate", cfg)
    max_layer = cfg.max_layer_frac * lm.n_layers
    for i, sv in enumerate(vs):
        reasons = []
        kl = float(kl_add[i] if cfg.mode == "add" else kl_abl[i])
        if kl > cfg.kl_bound:
            reasons.append(f"KL {kl:.3f} > {cfg.kl_bound:g}")
        if float(induce[i]) <= sel.baseline_b:
            reasons.append("adding does not induce")
        if sv.layer >= max_layer:
            reasons.append(f"layer in last {100 * (1 - cfg.max_layer_frac):.0f} %")
        sel.candidates.append(CandidateScore(sv.id, sv.layer, float(induce[i]), None if bypass is None else float(bypass[i]),
                                             float(kl_add[i]), float(kl_abl[i]), not reasons, "; ".join(reasons)))
    kept = [i for i, c in enumerate(sel.candidates) if c.kept]
    if kept:
        key = (lambda i: sel.candidates[i].bypass) if cfg.mode == "ablate" else (lambda i: -sel.candidates[i].induce)
        sel.best = min(kept, key=key)
    return sel


def mean_projection(lm, prompts: Sequence[str], direction: torch.Tensor, layer: int, chat: bool | None = None) -> float:
    """Mean projection of the last-token activation at `layer` on the unit `direction` over
    `prompts`: the value for "clamp to what set A shows" (`Clamp(direction, value, layer)`)."""
    from ..models.activations import get_activations

    acts = get_activations(lm, list(prompts), [layer], read="last", chat=chat)[:, 0].double()  # (N, d)
    u = direction.double() / direction.double().norm()
    return float((acts @ u).mean())
