"""Supervised extraction: one candidate direction per layer (and read position) from contrastive
data, all layers recorded in one batched pass, statistics in float64.

Extractors (`EXTRACTORS`, one function each; A = with the behaviour, B = without):
    diffmean    mean(A) - mean(B)                       (ActAdd/CAA; Arditi et al. 2024 eq. 1)
    pca         top right singular vector of the paired differences A_i - B_i, uncentred, so it
                follows the consistent shift (repeng "pca_diff"; steering-vectors' PCA aggregator)
    pca_center  top principal component of all activations centred on their mean (repeng "pca_center")
    probe       weight vector of an L2-regularised logistic-regression probe A vs B
Every non-diffmean direction is made unit, signed to point from B to A, and scaled by the mean
difference projected on it, so all methods share diffmean's units and one `coef` scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import SteerscopeError
from ..models.activations import record
from .data import ContrastSet
from .vectors import VectorSet

Extractor = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
EXTRACTORS: dict[str, Extractor] = {}


def register_extractor(name: str):
    def deco(fn: Extractor) -> Extractor:
        EXTRACTORS[name] = fn
        return fn

    return deco


def _scaled(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unit `u`, signed so mean(A) - mean(B) projects positively, times that projection."""
    u = u / u.norm().clamp_min(1e-30)
    shift = (a.mean(0) - b.mean(0)) @ u
    return u * shift.abs() * (1 if shift >= 0 else -1) if shift != 0 else u


@register_extractor("diffmean")
def diffmean(a: torch.Tensor, b: torch.Tensor, paired: bool) -> torch.Tensor:
    return a.mean(0) - b.mean(0)  # (d,)


@register_extractor("pca")
def pca_of_differences(a: torch.Tensor, b: torch.Tensor, paired: bool) -> torch.Tensor:
    if not paired:
        raise SteerscopeError("method 'pca' needs paired data (A_i - B_i); use diffmean, pca_center or probe for two prompt sets.")
    diffs = a - b  # (N, d)
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled(vh[0], a, b)


@register_extractor("pca_center")
def pca_centred(a: torch.Tensor, b: torch.Tensor, paired: bool) -> torch.Tensor:
    x = torch.cat([a, b])
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return _scaled(vh[0], a, b)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
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


@register_extractor("probe")
def probe(a: torch.Tensor, b: torch.Tensor, paired: bool) -> torch.Tensor:
    x = torch.cat([a, b])
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).to(x.dtype)
    w, _ = fit_probe(x, y)
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
@dataclass
class ExtractConfig:
    """How to read activations and which extractor to use."""

    method: str = "diffmean"
    read: str = "last"  # "last", "mean" (over real tokens) or "tail:K" (each of the last K tokens)
    layers: list[int] | None = None  # None = every layer
    chat: bool | None = None  # apply the chat template (default: when the model has one)
    system: str | None = None
    batch_size: int = 16
    stats: bool = True  # separation and probe accuracy per candidate


def _read_positions(read: str) -> int:
    if read in ("last", "mean"):
        return 1
    if read.startswith("tail:") and read[5:].isdigit() and int(read[5:]) >= 1:
        return int(read[5:])
    raise SteerscopeError(f"read must be 'last', 'mean' or 'tail:K' (K >= 1), got {read!r}.")


@torch.no_grad()
def collect(lm, texts: list[str], layers: list[int], read: str, batch_size: int = 16, progress=None) -> torch.Tensor:
    """(N, P, L, d) float64 activations of formatted `texts`: P read positions, L layers, all
    layers from one forward pass per batch."""
    P = _read_positions(read)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = lm.encode(texts[i:i + batch_size], formatted=True)
        mask = enc["attention_mask"].bool()  # (B, T)
        if P > 1 and int(mask.sum(-1).min()) < P:
            raise SteerscopeError(f"read={read!r} needs at least {P} tokens per text; a text is shorter.")
        with record(lm, layers) as acts:
            lm.forward(**enc)
        stack = torch.stack([acts[l] for l in layers], dim=1).double()  # (B, L, T, d)
        if read == "mean":
            m = mask[:, None, :, None].double()
            out.append(((stack * m).sum(2) / m.sum(2))[:, None])  # (B, 1, L, d)
        else:  # left padding: the last P columns are every row's last P real tokens
            out.append(stack[:, :, -P:].permute(0, 2, 1, 3))  # (B, P, L, d)
        if progress is not None:
            progress.update(len(enc["input_ids"]))
    return torch.cat(out)


def extract(lm, data: ContrastSet, config: ExtractConfig | None = None, progress: bool | None = None) -> VectorSet:
    """One candidate per (layer, read position). The VectorSet's hyper-parameters record the
    config and per-candidate statistics (norm, separation, probe accuracy)."""
    import sys

    from tqdm.auto import tqdm

    cfg = config or ExtractConfig()
    if cfg.method not in EXTRACTORS:
        raise SteerscopeError(f"unknown method {cfg.method!r}; available: {', '.join(EXTRACTORS)}.")
    if cfg.method == "pca" and not data.paired:
        raise SteerscopeError("method 'pca' needs paired data; use diffmean, pca_center or probe for two prompt sets.")
    layers = [lm.check_layer(l) for l in (cfg.layers if cfg.layers is not None else range(lm.n_layers))]
    P = _read_positions(cfg.read)
    a_txt, b_txt = data.formatted(lm, cfg.chat, cfg.system)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(a_txt) + len(b_txt), desc="activations", unit="text", disable=not show, leave=False) as bar:
        A = collect(lm, a_txt, layers, cfg.read, cfg.batch_size, bar)  # (N, P, L, d)
        B = collect(lm, b_txt, layers, cfg.read, cfg.batch_size, bar)
    fn = EXTRACTORS[cfg.method]
    vecs, cand_layers, ids, stats = [], [], [], []
    offsets = list(range(-P, 0)) if P > 1 else [None]
    for pi, off in enumerate(offsets):
        for li, layer in enumerate(layers):
            a, b = A[:, pi, li], B[:, pi, li]  # (N, d), (M, d)
            v = fn(a, b, data.paired)
            vecs.append(v.float())
            cand_layers.append(layer)
            ids.append(f"{cfg.method}-L{layer}" + (f"@{off}" if off is not None else ""))
            st = {"id": ids[-1], "layer": layer, "position": off, "norm": round(float(v.norm()), 4)}
            if cfg.stats:
                st["separation"] = round(separation(a, b, v), 4)
                st["probe_acc"] = round(probe_accuracy(a, b), 4)
            stats.append(st)
    hyper = {**asdict(cfg), "layers": layers, "data": data.name, "n_a": len(data.a), "n_b": len(data.b),
             "paired": data.paired, "stats": stats}
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
