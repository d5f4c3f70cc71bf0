"""Choosing a candidate direction by its measured effect (Arditi et al. 2024, sec. 3.2 / app. C).

For every candidate (one per layer and read position) with A = prompts with the behaviour and
B = prompts without:
    induce   metric on B prompts with coef * v added at the candidate's layer (all positions)
    bypass   metric on A prompts with v's direction ablated at every layer
    kl_add   KL(base || steered) at the last position of neutral prompts, v added (mode add)
    kl_abl   the same with v ablated (mode ablate)
    effect   induce - metric(B) (mode add), or metric(A) - bypass (mode ablate)
Candidates in the last `1 - max_layer_frac` of the layers, or whose addition does not move B
towards the behaviour, are dropped. Among the rest, the effect-vs-KL Pareto frontier (no other
candidate has more effect for less KL) is where the choice is made, explicitly:
    choose="budget"  the most effective candidate whose KL is within `kl_bound`
    choose="knee"    the frontier point farthest from the line through its ends (Kneedle)
A one-line warning says when the winner barely beats the baseline, and which frontier
candidates would do better at a higher KL.

Speed and memory at scale: every score at the last position is reduced inside the batch loop
(memory stays flat in the number of candidates). Text metrics (which need generation) are run
only on a short list: all candidates are first ranked by a logit prefilter (for `refusal`, the
log-odds of refusal-start tokens at the last position, as in Arditi et al.), then the
`shortlist` best (half by effect within the KL budget, half by effect overall) are generated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .._io import write_json_atomic
from ..config import Config, config_to_dict
from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..generation import generate, last_token_logits
from ..progress import bar
from .metrics import Metric, kl_divergence, parse_metric

# Tokens a refusal starts with (SmolLM2 and Llama-style chat models), for the logit prefilter.
REFUSAL_START = "I,Sorry,As,Unfortunately,Apologies"


@dataclass(frozen=True)
class SelectConfig(Config):
    """How candidates are scored and chosen."""

    mode: Literal["add", "ablate"] = "add"
    """add: effect of adding on B prompts; ablate: effect of ablating on A prompts (Arditi)"""
    coef: float = 1.0
    """coefficient of the added vector"""
    kl_bound: float = field(default=0.1, metadata={"min": 0})
    """KL budget (nats, last position of neutral prompts) for --choose budget"""
    choose: Literal["budget", "knee"] = "budget"
    """budget: most effect within --kl-bound; knee: the knee of the effect-vs-KL frontier"""
    max_layer_frac: float = field(default=0.8, metadata={"min": 0, "max": 1})
    """drop candidates in layers at or beyond this fraction of the depth"""
    prefilter: str | None = field(default="auto", metadata={"none": "off"})
    """logit metric that ranks every candidate before a text metric generates (auto: refusal-start
    log-odds for `refusal`, none for others); off: generate for every candidate"""
    shortlist: int = field(default=8, metadata={"min": 1})
    """candidates generated for a text metric after the prefilter"""
    warn_ratio: float = field(default=0.25, metadata={"min": 0, "max": 1})
    """warn when the winner's effect is below this share of the A-B baseline gap"""
    max_new_tokens: int = field(default=40, metadata={"min": 1})
    """tokens generated for text metrics"""
    chat: bool | None = None
    """apply the chat template (unset: when the model has one)"""
    batch_size: int = field(default=32, metadata={"min": 1})
    """rows per forward pass"""


@dataclass
class CandidateScore:
    id: str
    layer: int
    induce: float | None
    bypass: float | None
    kl_add: float | None  # measured in mode add only
    kl_ablate: float | None  # measured in mode ablate only
    kept: bool
    reason: str = ""
    prefilter: float | None = None  # the prefilter's effect (text metrics)
    effect: float | None = None  # on the metric (None when not short-listed)
    frontier: bool = False


@dataclass
class Selection:
    metric: str
    config: SelectConfig
    baseline_a: float
    baseline_b: float
    candidates: list[CandidateScore] = field(default_factory=list)
    best: int | None = None
    prefilter: str | None = None
    warning: str = ""

    @property
    def best_candidate(self) -> CandidateScore | None:
        return None if self.best is None else self.candidates[self.best]

    @property
    def kl_key(self) -> str:
        return "kl_add" if self.config.mode == "add" else "kl_ablate"

    def table(self) -> str:
        head = ["id", "layer", "induce", "bypass", "kl_add", "kl_ablate", "effect", "frontier", "kept", "note"]
        if self.prefilter:
            head.insert(6, "prefilter")
        fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
        rows = []
        for i, c in enumerate(self.candidates):
            r = [
                c.id,
                c.layer,
                c.induce,
                c.bypass,
                c.kl_add,
                c.kl_ablate,
                c.effect,
                "F" if c.frontier else "",
                "*" if i == self.best else ("yes" if c.kept else "no"),
                c.reason,
            ]
            if self.prefilter:
                r.insert(6, c.prefilter)
            rows.append([fmt(x) for x in r])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
        c = self.config
        top = (
            f"metric {self.metric}: baseline on A {self.baseline_a:.4f}, on B {self.baseline_b:.4f}; mode={c.mode}, "
            f"coef={c.coef:g}, choose={c.choose}"
            + (f" (KL budget {c.kl_bound:g})" if c.choose == "budget" else "")
            + (f"; prefilter {self.prefilter}, {c.shortlist} generated" if self.prefilter else "")
        )
        best = self.best_candidate
        tail = (
            f"selected: {best.id} (layer {best.layer}, effect {best.effect:.4f}, {self.kl_key} {getattr(best, self.kl_key):.4f})"
            if best
            else "selected: none (no candidate passed the filters within the budget; see the notes)"
        )
        return "\n".join([top, line(head)] + [line(r) for r in rows] + [tail])

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {
            "metric": self.metric,
            "config": config_to_dict(self.config),
            "baseline_a": self.baseline_a,
            "baseline_b": self.baseline_b,
            "best": self.best,
            "prefilter": self.prefilter,
            "warning": self.warning,
            "candidates": [asdict(c) for c in self.candidates],
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def _logit_scores(
    lm, metric: Metric, prompts: list[str], vs: VectorSet | None, mode: str, cfg: SelectConfig, desc: str
) -> torch.Tensor:
    """(K,) mean logit metric over prompts per candidate (or (1,) unsteered when vs is None)."""
    n = (len(vs) if vs is not None else 1) * len(prompts)
    with bar(n, desc, "row") as rows:
        s = last_token_logits(
            lm,
            prompts,
            vectors=vs,
            coef=cfg.coef,
            mode=mode,
            chat=cfg.chat,
            batch_size=cfg.batch_size,
            include_unsteered=vs is None,
            reduce=lambda lg, _: metric.score_logits(lg),
            progress=rows,
        )
    return s.mean(1)


def _text_scores(
    lm, metric: Metric, prompts: list[str], vs: VectorSet | None, mode: str, cfg: SelectConfig
) -> torch.Tensor:
    res = generate(
        lm,
        prompts,
        vectors=vs,
        coef=cfg.coef,
        mode=mode,
        include_unsteered=vs is None,
        chat=cfg.chat,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    k = len(vs) if vs is not None else 1
    return metric.score_texts([r.text for r in res], [r.prompt for r in res]).reshape(k, len(prompts)).mean(1)


def _kl(lm, neutral: list[str], vs: VectorSet, mode: str, cfg: SelectConfig) -> torch.Tensor:
    base = torch.log_softmax(
        last_token_logits(lm, neutral, chat=cfg.chat, include_unsteered=True, batch_size=cfg.batch_size)[0].double(), -1
    )  # (P, V)

    def kl(logits: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        return kl_divergence(base.to(logits.device)[pi], logits)

    with bar(len(vs) * len(neutral), f"KL ({mode})", "row") as rows:
        return last_token_logits(
            lm,
            neutral,
            vectors=vs,
            coef=cfg.coef,
            mode=mode,
            chat=cfg.chat,
            batch_size=cfg.batch_size,
            reduce=kl,
            progress=rows,
        ).mean(1)  # (K,)


def _subset(vs: VectorSet, idx: list[int]) -> VectorSet:
    return VectorSet(
        vs.vectors[idx],
        type(vs.config)(
            **{
                **vs.config.__dict__,
                "ids": [vs.ids[i] for i in idx],
                "layers": [vs.layers[i] for i in idx],
                "norms": [],
            }
        ),
    )


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, gain) points no other point beats on both (less or equal cost and more or
    equal gain, one strictly), cheapest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def knee(points: list[tuple[float, float]], front: list[int]) -> int | None:
    """The frontier point farthest above the line through its two ends (axes scaled to [0, 1])."""
    if not front:
        return None
    if len(front) <= 2:
        return front[-1] if len(front) == 2 and points[front[-1]][1] > points[front[0]][1] else front[0]
    xs = [points[i][0] for i in front]
    ys = [points[i][1] for i in front]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    x = [(v - min(xs)) / sx for v in xs]
    y = [(v - min(ys)) / sy for v in ys]
    dist = [yy - (y[0] + (y[-1] - y[0]) * (xx - x[0]) / ((x[-1] - x[0]) or 1.0)) for xx, yy in zip(x, y)]
    return front[max(range(len(front)), key=lambda j: dist[j])]


def select(
    lm,
    vs: VectorSet,
    metric: str | Metric,
    a_prompts: Sequence[str],
    b_prompts: Sequence[str],
    neutral_prompts: Sequence[str],
    config: SelectConfig | None = None,
) -> Selection:
    cfg = config or SelectConfig()
    for name, p in (("A", a_prompts), ("B", b_prompts), ("neutral", neutral_prompts)):
        if not p:
            raise SteerscopeError(f"selection needs {name} prompts; the list is empty.")
    vs.check(lm, check_model=False)
    m = parse_metric(metric, lm)
    pre = None
    if m.kind == "text":
        spec = cfg.prefilter
        if spec == "auto":
            spec = f"logodds:{REFUSAL_START}" if m.name == "refusal" else None
        pre = parse_metric(spec, lm) if spec else None
        if pre is not None and pre.kind != "logits":
            raise SteerscopeError(f"--prefilter must be a logit metric such as logodds:TOKENS, got {spec!r}.")
    a, b, neutral = list(a_prompts), list(b_prompts), list(neutral_prompts)
    K = len(vs)
    # Only the chosen mode's KL decides anything, so only it is measured (a quarter of the passes).
    kl_mode = _kl(lm, neutral, vs, cfg.mode, cfg)
    kl_add, kl_abl = (kl_mode, None) if cfg.mode == "add" else (None, kl_mode)
    max_layer = cfg.max_layer_frac * lm.n_layers

    def effect_of(metric_: Metric, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
        """(induce, bypass, baseline A, baseline B) of `metric_` for candidates `idx`."""
        sub = _subset(vs, idx)
        if metric_.kind == "logits":
            base_a = float(_logit_scores(lm, metric_, a, None, "add", cfg, "baseline A")[0])
            base_b = float(_logit_scores(lm, metric_, b, None, "add", cfg, "baseline B")[0])
            ind = _logit_scores(lm, metric_, b, sub, "add", cfg, "induce")
            byp = _logit_scores(lm, metric_, a, sub, "ablate", cfg, "bypass") if cfg.mode == "ablate" else None
        else:
            base_a = float(_text_scores(lm, metric_, a, None, "add", cfg)[0])
            base_b = float(_text_scores(lm, metric_, b, None, "add", cfg)[0])
            ind = _text_scores(lm, metric_, b, sub, "add", cfg)
            byp = _text_scores(lm, metric_, a, sub, "ablate", cfg) if cfg.mode == "ablate" else None
        return ind, byp, base_a, base_b

    def effects(ind, byp, base_a, base_b) -> list[float]:
        return [float(ind[j] - base_b) if cfg.mode == "add" else float(base_a - byp[j]) for j in range(len(ind))]

    all_idx = list(range(K))
    pre_eff = None
    if pre is not None:
        ind_p, byp_p, pa, pb = effect_of(pre, all_idx)
        pre_eff = effects(ind_p, byp_p, pa, pb)
        eligible = [i for i in all_idx if vs.layers[i] < max_layer]
        within = sorted((i for i in eligible if float(kl_mode[i]) <= cfg.kl_bound), key=lambda i: -pre_eff[i])
        overall = sorted(eligible, key=lambda i: -pre_eff[i])
        short: list[int] = []
        for i in within[: max(1, cfg.shortlist // 2)] + overall:
            if i not in short and len(short) < cfg.shortlist:
                short.append(i)
        short = sorted(short)
    else:
        short = all_idx
    ind, byp, base_a, base_b = effect_of(m, short)
    eff = dict(zip(short, effects(ind, byp, base_a, base_b)))
    sel = Selection(m.name, cfg, base_a, base_b, prefilter=pre.name if pre else None)
    pos = {i: j for j, i in enumerate(short)}
    for i, sv in enumerate(vs):
        reasons = []
        j = pos.get(i)
        induce = None if j is None else float(ind[j])
        if j is None:
            reasons.append("not short-listed by the prefilter")
        elif induce <= base_b:
            reasons.append("adding does not induce")
        if sv.layer >= max_layer:
            reasons.append(f"layer in last {100 * (1 - cfg.max_layer_frac):.0f} %")
        sel.candidates.append(
            CandidateScore(
                sv.id,
                sv.layer,
                induce,
                None if j is None or byp is None else float(byp[j]),
                None if kl_add is None else float(kl_add[i]),
                None if kl_abl is None else float(kl_abl[i]),
                not reasons,
                "; ".join(reasons),
                None if pre_eff is None else pre_eff[i],
                eff.get(i),
            )
        )
    _choose(sel)
    return sel


def _choose(sel: Selection) -> None:
    """Mark the frontier, choose along it, and write the warning."""
    cfg, key = sel.config, sel.kl_key
    kept = [i for i, c in enumerate(sel.candidates) if c.kept]
    pts = [(getattr(sel.candidates[i], key), sel.candidates[i].effect) for i in kept]
    front = [kept[j] for j in pareto_frontier(pts)]
    for i in front:
        sel.candidates[i].frontier = True
    if cfg.choose == "knee":
        k = knee([(getattr(c, key), c.effect) for c in sel.candidates], front)
        sel.best = k
    else:
        within = [i for i in front if getattr(sel.candidates[i], key) <= cfg.kl_bound]
        sel.best = within[-1] if within else None
    for c in sel.candidates:
        if c.kept and cfg.choose == "budget" and getattr(c, key) > cfg.kl_bound:
            c.reason = f"KL {getattr(c, key):.3f} > {cfg.kl_bound:g}"
    gap = abs(sel.baseline_a - sel.baseline_b)
    best = sel.best_candidate
    better = [sel.candidates[i] for i in front if best is None or sel.candidates[i].effect > best.effect]
    alt = ""
    if better:
        top = max(better, key=lambda c: c.effect)
        alt = f"; {top.id} reaches effect {top.effect:.3f} at {key} {getattr(top, key):.3f}: " + (
            "raise --kl-bound or use --choose knee" if cfg.choose == "budget" else "raise the KL you accept"
        )
    if gap == 0:
        sel.warning = (
            f"{sel.metric} scores A and B the same without steering ({sel.baseline_a:.3f}): it does not "
            "measure this behaviour on this model, so no choice is meaningful; try a logit metric such as "
            "logodds:I,Sorry or a scorer that separates the sets."
        )
    elif best is None:
        sel.warning = (
            "no candidate was chosen"
            + (f" within the KL budget {cfg.kl_bound:g}" if cfg.choose == "budget" else "")
            + alt
            + "."
        )
    elif gap > 0 and best.effect < cfg.warn_ratio * gap:
        sel.warning = (
            f"the selected {best.id} barely beats the baseline: effect {best.effect:.3f} is "
            f"{100 * best.effect / gap:.0f} % of the A-B gap {gap:.3f}{alt}."
        )


def mean_projection(lm, prompts: Sequence[str], direction: torch.Tensor, layer: int, chat: bool | None = None) -> float:
    """Mean projection of the last-token activation at `layer` on the unit `direction` over
    `prompts`: the value for "clamp to what set A shows" (`Clamp(direction, value, layer)`)."""
    from ..models.activations import collect_activations

    acts = collect_activations(lm, list(prompts), [layer], read="last", chat=chat)[:, 0, 0]  # (N, d) float64
    u = direction.double().cpu() / direction.double().norm()
    return float((acts @ u).mean())
