"""Supervised extraction: one candidate direction per layer (and read position) from contrastive
data, all layers recorded in one batched pass, statistics in float64.

Extractors (the `EXTRACTORS` family, `fn(a, b, paired, cfg) -> direction`; A = with the behaviour,
B = without):
    diffmean    mean(A) - mean(B)                       (ActAdd/CAA; Arditi et al. 2024 eq. 1)
    pca         top right singular vector of the paired differences A_i - B_i, uncentred, so it
                follows the consistent shift (repeng "pca_diff"; steering-vectors' PCA aggregator)
    pca_center  top principal component of all activations centred on their mean (repeng "pca_center")
    probe       weight vector of an L2-regularised logistic-regression probe A vs B
Every non-diffmean direction is made unit, signed to point from B to A, and scaled by the mean
difference projected on it, so all methods share diffmean's units and one `coef` scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config, Family, config_to_dict
from ..errors import SteerscopeError
from ..models.activations import collect_activations, read_positions
from ..progress import bar
from .data import ContrastSet, from_sets
from .vectors import VectorSet

EXTRACTORS: Family = Family("extractors", "extraction method")


@dataclass(frozen=True)
class ProbeConfig(Config):
    """Settings of the logistic-regression probe."""

    l2: float = field(default=1e-3, metadata={"min": 0})
    """L2 penalty on the probe's weights (features centred, one global scale)"""
    probe_steps: int = field(default=100, metadata={"min": 1})
    """LBFGS iterations"""


def _scaled(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unit `u`, signed so mean(A) - mean(B) projects positively, times that projection."""
    u = u / u.norm().clamp_min(1e-30)
    shift = (a.mean(0) - b.mean(0)) @ u
    return u * shift.abs() * (1 if shift >= 0 else -1) if shift != 0 else u


@EXTRACTORS.register("diffmean")
def diffmean(a: torch.Tensor, b: torch.Tensor, paired: bool, cfg: None = None) -> torch.Tensor:
    """mean(A) - mean(B) (ActAdd / CAA)."""
    return a.mean(0) - b.mean(0)  # (d,)


@EXTRACTORS.register("pca")
def pca_of_differences(a: torch.Tensor, b: torch.Tensor, paired: bool, cfg: None = None) -> torch.Tensor:
    """Top singular vector of the paired differences A_i - B_i (uncentred)."""
    if not paired:
        raise SteerscopeError(
            "method 'pca' needs paired data (A_i - B_i); use diffmean, pca_center or probe for two prompt sets."
        )
    diffs = a - b  # (N, d)
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled(vh[0], a, b)


pca_of_differences.needs_pairs = True  # type: ignore[attr-defined]


@EXTRACTORS.register("pca_center")
def pca_centred(a: torch.Tensor, b: torch.Tensor, paired: bool, cfg: None = None) -> torch.Tensor:
    """Top principal component of all activations, centred."""
    x = torch.cat([a, b])
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return _scaled(vh[0], a, b)


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression (LBFGS, float64). Returns (w, bias) in the original
    feature space. Features are centred and divided by ONE global scale, not per feature:
    per-feature scaling would rotate the weight vector away from the class-mean direction."""
    mu, sd = x.mean(0), (x - x.mean(0)).std().clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    c = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + c, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_orig = (w / sd).detach()
    return w_orig, (c - (w * mu / sd).sum()).detach()


@EXTRACTORS.register("probe", ProbeConfig)
def probe(a: torch.Tensor, b: torch.Tensor, paired: bool, cfg: ProbeConfig | None = None) -> torch.Tensor:
    """Weights of an L2-regularised logistic-regression probe A vs B."""
    cfg = cfg or ProbeConfig()
    x = torch.cat([a, b])
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).to(x.dtype)
    w, _ = fit_probe(x, y, l2=cfg.l2, steps=cfg.probe_steps)
    return _scaled(w, a, b)


# ---- statistics -------------------------------------------------------------------------------
def separation(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> float:
    """Cohen's d of the projections on v: (mean_A - mean_B) / pooled std."""
    u = v / v.norm().clamp_min(1e-30)
    pa, pb = a @ u, b @ u
    pooled = ((pa.var(unbiased=False) + pb.var(unbiased=False)) / 2).sqrt().clamp_min(1e-12)
    return float((pa.mean() - pb.mean()) / pooled)


def probe_accuracy(a: torch.Tensor, b: torch.Tensor, folds: int = 2, seed: int = 0) -> float:
    """Held-out accuracy of a logistic probe (k-fold cross-validation)."""
    x = torch.cat([a, b])
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).to(x.dtype)
    if len(x) < 2 * folds:
        return float("nan")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    correct = 0
    for f in range(folds):
        test = perm[f::folds]
        train = torch.cat([perm[g::folds] for g in range(folds) if g != f])
        w, c = fit_probe(x[train], y[train], steps=50)
        correct += int((((x[test] @ w + c) > 0).to(x.dtype) == y[test]).sum())
    return correct / len(x)


# ---- extraction -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractConfig(Config):
    """How to read activations and which extractor to use."""

    method: str = field(default="diffmean", metadata={"choices": EXTRACTORS})
    """extraction method"""
    read: str = "mean"
    """positions read per text: mean (over its real tokens after the first, whose massive
    activations would dominate), last, or last:K (each of the last K, e.g.
    the post-instruction template tokens)"""
    layers: list[int] | None = field(default=None, metadata={"none": "all"})
    """layers to extract at: all, A:B (B exclusive) or A,B,C"""
    chat: bool | None = None
    """apply the chat template (unset: when the model has one)"""
    system: str | None = None
    """system prompt for the chat template"""
    batch_size: int = field(default=16, metadata={"min": 1})
    """texts per forward pass"""
    stats: bool = True
    """separation and held-out probe accuracy per candidate"""
    method_config: Any = field(default=None, metadata={"family": EXTRACTORS, "by": "method"})
    """the extractor's own settings"""

    def __post_init__(self) -> None:
        super().__post_init__()
        read_positions(self.read)
        m = EXTRACTORS.get(self.method)
        if self.method_config is None and m.config is not None:
            object.__setattr__(self, "method_config", m.config())


def extract(lm, data: ContrastSet, config: ExtractConfig | None = None, progress: bool | None = None) -> VectorSet:
    """One candidate per (layer, read position). The VectorSet's hyper-parameters record the
    config and per-candidate statistics (norm, separation, probe accuracy)."""
    cfg = config or ExtractConfig()
    fn = EXTRACTORS.get(cfg.method).fn
    if getattr(fn, "needs_pairs", False) and not data.paired:  # say so before the expensive pass
        raise SteerscopeError(
            f"method {cfg.method!r} needs paired data; use diffmean, pca_center or probe for two prompt sets."
        )
    layers = [lm.check_layer(l) for l in (cfg.layers if cfg.layers is not None else range(lm.n_layers))]
    P = read_positions(cfg.read)
    a_txt, b_txt = data.formatted(lm, cfg.chat, cfg.system)
    with bar(len(a_txt) + len(b_txt), "activations", "text", show=progress) as texts:
        A = collect_activations(
            lm, a_txt, layers, read=cfg.read, formatted=True, batch_size=cfg.batch_size, progress=texts
        )
        B = collect_activations(
            lm, b_txt, layers, read=cfg.read, formatted=True, batch_size=cfg.batch_size, progress=texts
        )
        # (N, P, L, d) each
    vecs, cand_layers, ids, stats = [], [], [], []
    offsets = list(range(-P, 0)) if P > 1 else [None]
    for pi, off in enumerate(offsets):
        for li, layer in enumerate(layers):
            a, b = A[:, pi, li], B[:, pi, li]  # (N, d), (M, d)
            v = fn(a, b, data.paired, cfg.method_config)
            vecs.append(v.float())
            cand_layers.append(layer)
            ids.append(f"{cfg.method}-L{layer}" + (f"@{off}" if off is not None else ""))
            st = {"id": ids[-1], "layer": layer, "position": off, "norm": round(float(v.norm()), 4)}
            if cfg.stats:
                st["separation"] = round(separation(a, b, v), 4)
                st["probe_acc"] = round(probe_accuracy(a, b), 4)
            stats.append(st)
    hyper = {
        **config_to_dict(cfg),
        "layers": layers,
        "data": data.name,
        "n_a": len(data.a),
        "n_b": len(data.b),
        "paired": data.paired,
        "stats": stats,
    }
    return VectorSet.create(lm, torch.stack(vecs), cand_layers, cfg.method, ids=ids, hyperparams=hyper)


def format_stats(vs: VectorSet) -> str:
    """The per-candidate statistics as a text table."""
    stats = vs.config.hyperparams.get("stats", [])
    cols = ["id", "layer", "position", "norm", "separation", "probe_acc"]
    cols = [c for c in cols if any(c in s for s in stats)]
    rows = [[("" if s.get(c) is None else str(s.get(c))) for c in cols] for s in stats]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in rows])


def mean_difference(
    lm, positive: Sequence[str], negative: Sequence[str], layers: int | Sequence[int], **settings
) -> VectorSet:
    """Difference of means between two text sets at `layers` (ActAdd, Turner et al. 2023; CAA,
    Rimsky et al. 2024): `extract` with method diffmean, so both share one set of defaults
    (`ExtractConfig`; e.g. read="mean"). `settings` are further ExtractConfig fields."""
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    cfg = ExtractConfig(method="diffmean", layers=layer_list, stats=False, **settings)
    return extract(lm, from_sets(list(positive), list(negative), name="mean_difference"), cfg, progress=False)
