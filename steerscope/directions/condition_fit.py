"""Finding a CAST condition vector and its threshold at every candidate layer (Lee et al., ICLR 2025).

Given prompts that should trigger the behaviour (ON) and prompts that should not (OFF):

    h_i      = mean over prompt i's tokens of the hidden state at layer L        # (d,), padding excluded
    c_L      = mean_train(h | ON) - mean_train(h | OFF)     (method "mean_diff")
             or the top principal component of the centred train states, signed towards ON ("pca")
             or S^-1 (mean_train(h | ON) - mean_train(h | OFF)), S the shrunk within-class covariance ("lda")
    score_i  = cos(h_i, c_L)                                  on the held-out validation prompts
    ROC, AUC, and the threshold + side (> or <) that maximise balanced accuracy on validation

CAST extracts c as the first principal component of the contrast (IBM activation-steering); the
difference of the class means of the per-prompt mean states is the simpler estimate of the same
direction when the two classes differ mainly by a shift, and is the default here; "pca" is offered.
"lda" is Fisher's discriminant: the mean difference is the better direction to *add* but not the
better one to *classify* with, because the classes' shared within-class variance leaks into it
(Marks & Tegmark 2023, "mass-mean probe" vs its covariance-corrected form); whitening by the
within-class covariance, shrunk towards a multiple of the identity (Ledoit & Wolf 2004) so that it
is invertible from a few hundred prompts in d_model dimensions, removes that. On the refusal
organism, from the same 1188 train prompts, it lifted the best layer's validation AUC from 0.975
(mean_diff) to 0.999; the held-out gate fires on 7 % of harmless requests, against 37 % for the
first condition (mean_diff on 28 + 28 packaged prompts) (benchmarks/cast_refusal.py).

The threshold is chosen on a seeded split of the two sets, or on explicit validation sets
(`val_on`, `val_off`: e.g. other requests than the ones the vector is fitted on, so the threshold
is judged on prompts unlike the train ones).

`h_i` is exactly what `interventions.conditional.Conditional` reads at run time: the mean over the
prompt's tokens after the first, of the prompt as the model sees it (chat template applied the same
way `generate` applies it). The first token is an attention sink with massive activations (Sun et
al. 2024): with it in the mean, every SmolLM2 prompt (harmful vs harmless, chat template) scored
within ~0.01 of one cosine at the best layer, a threshold too fragile to survive another prompt
length; without it the spread is several times wider for a similar AUC (README). `ConditionFit.warning`
still says so when the best layer's validation scores span less than `NARROW`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import Config, config_to_dict
from ..errors import SteerscopeError
from ..models.activations import record
from ..progress import bar
from .condition import condition_set
from .vectors import VectorSet

MIN_PROMPTS = 4
NARROW = 0.02  # cosine: validation scores of the best layer spanning less than this get a warning


@dataclass(frozen=True)
class ConditionFitConfig(Config):
    """How to find the condition vector and its threshold."""

    layers: list[int] | None = field(default=None, metadata={"none": "all"})
    """candidate condition layers: all, A:B (B exclusive) or A,B,C"""
    method: Literal["mean_diff", "pca", "lda"] = "mean_diff"
    """condition vector: difference of the class means (mean_diff), the top principal component of
    the centred train states, signed towards ON (pca, as CAST), or the mean difference whitened by the
    shrunk within-class covariance (lda, Fisher's discriminant: wants a few hundred prompts)"""
    shrinkage: float = field(default=0.2, metadata={"min": 0.01, "max": 1.0})
    """lda only: weight of the identity (scaled to the covariance's mean variance) in the covariance;
    1 gives back mean_diff's direction; 0.2 was best on the refusal organism's validation prompts"""
    val_fraction: float = field(default=0.3, metadata={"min": 0.05, "max": 0.95})
    """share of each prompt set held out to choose the threshold and report AUC/accuracy (unused when
    explicit validation sets are given)"""
    seed: int = 0
    """seed of the train/validation split"""
    chat: bool | None = None
    """apply the chat template (unset: when the model has one); use the same setting when generating"""
    system: str | None = None
    """system prompt for the chat template (the gate sees it too: use the same when generating)"""
    batch_size: int = field(default=16, metadata={"min": 1})
    """prompts per forward pass"""


@dataclass
class LayerFit:
    """The condition at one layer, judged on the validation split."""

    layer: int
    threshold: float
    """the gate fires when the score is above it (below with `above=False`)"""
    above: bool
    auc: float
    """validation ROC AUC of the score for ON vs OFF, on the chosen side (0.5 = chance, 1 = perfect)"""
    val_acc: float
    """balanced accuracy (mean of TPR and 1 - FPR) at the threshold, validation split"""
    tpr: float
    """share of ON validation prompts the gate fires on"""
    fpr: float
    """share of OFF validation prompts the gate fires on"""
    train_auc: float
    """the same AUC on the train split (far above `auc`: the vector overfits)"""
    roc: list[tuple[float, float]]
    """validation ROC curve, (FPR, TPR) from (0, 0) to (1, 1), on the chosen side"""
    scores_on: list[float]
    """validation cosine scores of the ON prompts (in the order of `ConditionFit.val["on"]`)"""
    scores_off: list[float]
    """validation cosine scores of the OFF prompts (in the order of `ConditionFit.val["off"]`)"""

    def to_dict(self) -> dict:
        r = lambda x: round(float(x), 6)  # noqa: E731
        return {
            "threshold": r(self.threshold),
            "above": self.above,
            "auc": r(self.auc),
            "val_acc": r(self.val_acc),
            "tpr": r(self.tpr),
            "fpr": r(self.fpr),
            "train_auc": r(self.train_auc),
            "roc": [[r(a), r(b)] for a, b in self.roc],
            "scores_on": [r(s) for s in self.scores_on],
            "scores_off": [r(s) for s in self.scores_off],
        }


@dataclass
class ConditionFit:
    """Every layer's condition vector and validation result, and the chosen layer."""

    layers: list[int]
    vectors: torch.Tensor
    """(L, d_model) float32, one condition vector per layer of `layers`"""
    fits: list[LayerFit]
    best_layer: int
    """highest validation balanced accuracy; ties -> higher AUC -> earlier layer"""
    config: ConditionFitConfig
    n: dict
    """prompt counts: on, off, on_train, on_val, off_train, off_val (+ val_given: 1 with explicit validation sets)"""
    val: dict
    """which prompts were held out: {"on": [indices into the ON set], "off": [...]}, in score order;
    with explicit validation sets, indices into those"""
    data: str = ""

    @property
    def best(self) -> LayerFit:
        return self.fits[self.layers.index(self.best_layer)]

    @property
    def warning(self) -> str:
        """One line when the best layer's threshold sits in a narrow band of scores, else ''."""
        s = self.best.scores_on + self.best.scores_off
        span = max(s) - min(s)
        if span >= NARROW:
            return ""
        return (
            f"the validation scores at layer {self.best_layer} span only {span:.4f} in cosine: the mean prompt state is "
            "dominated by a component every prompt shares (e.g. the first token's massive activation), so the "
            "threshold is fragile to prompt length and system prompt; check the gate on prompts like yours."
        )

    def to_vector_set(self, lm) -> VectorSet:
        """The condition set (`directions.condition` format) for the loaded model `lm`."""
        return condition_set(
            lm,
            self.vectors,
            self.layers,
            {f.layer: f.to_dict() for f in self.fits},
            self.best_layer,
            fit=config_to_dict(self.config),
            data=self.data,
            n=self.n,
            val=self.val,
        )

    def table(self) -> str:
        return format_table({f.layer: f.to_dict() for f in self.fits}, self.best_layer)


def format_table(per_layer: dict[int, dict], best_layer: int) -> str:
    """The per-layer results as a text table, the best layer marked with *."""
    cols = ["layer", "auc", "val_acc", "tpr", "fpr", "threshold", "side"]
    rows = [
        [
            f"{l}{'*' if l == best_layer else ''}",
            f"{d['auc']:.3f}",
            f"{d['val_acc']:.3f}",
            f"{d['tpr']:.2f}",
            f"{d['fpr']:.2f}",
            f"{d['threshold']:+.4f}",
            ">" if d["above"] else "<",
        ]
        for l, d in sorted(per_layer.items())
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in rows])


# ---- the statistics ---------------------------------------------------------------------------
def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n1 n0)."""
    d = pos[:, None] - neg[None, :]  # (n1, n0)
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def roc_curve(pos: torch.Tensor, neg: torch.Tensor, above: bool = True) -> list[tuple[float, float]]:
    """(FPR, TPR) of the rule `score > t` (`score < t` with above=False) as t sweeps every score."""
    if not above:
        pos, neg = -pos, -neg
    ts = torch.cat([pos, neg]).unique().flip(0)  # descending
    pts = [(0.0, 0.0)]
    for t in ts:
        pts.append((float((neg >= t).double().mean()), float((pos >= t).double().mean())))
    return pts


def best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, bool, float, float, float]:
    """(threshold, above, balanced accuracy, TPR, FPR) maximising balanced accuracy over every cut
    between two neighbouring scores and both sides; ties -> the cut with the widest gap (the most
    room either side), then `above`. A cut is the midpoint of its gap, so no score sits on it."""
    s = torch.cat([pos, neg]).unique()  # ascending
    cuts = [float(s[0]) - 1e-3] + [float(a + b) / 2 for a, b in zip(s[:-1], s[1:])] + [float(s[-1]) + 1e-3]
    gaps = [1e-3] + [float(b - a) for a, b in zip(s[:-1], s[1:])] + [1e-3]
    best = None
    for t, gap in zip(cuts, gaps):
        for above in (True, False):
            tpr = float(((pos > t) if above else (pos < t)).double().mean())
            fpr = float(((neg > t) if above else (neg < t)).double().mean())
            key = ((tpr + 1 - fpr) / 2, gap, above)
            if best is None or key > best[0]:
                best = (key, t, above, tpr, fpr)
    (bal, _, _), t, above, tpr, fpr = best
    return t, above, bal, tpr, fpr


# ---- the fit ----------------------------------------------------------------------------------
@torch.no_grad()
def prompt_means(
    lm,
    prompts: Sequence[str],
    layers: Sequence[int],
    chat: bool | None = None,
    system: str | None = None,
    batch_size: int = 16,
    progress=None,
) -> torch.Tensor:
    """(N, L, d) float64 mean over each prompt's real tokens after the first (padding excluded; a
    one-token prompt keeps its token) of the resid_post at each layer: the statistic `Conditional`
    reads. The prompts are encoded as `generate` encodes them (`lm.encode(prompts, chat, system)`:
    template or special tokens alike)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.encode(list(prompts[i : i + batch_size]), chat=chat, system=system)
        with record(lm, layers) as acts:
            lm.forward(**enc)
        real = enc["attention_mask"].double()  # (B, T), padding on either side
        first = real * (real.cumsum(1) == 1)  # (B, T) each row's first real token (the attention sink)
        m = (real - first * (real.sum(1, keepdim=True) > 1))[:, :, None]  # (B, T, 1)
        out.append(
            torch.stack([(acts[l].double() * m.to(acts[l].device)).sum(1).cpu() for l in layers], 1)
            / m.sum(1)[:, None].cpu()
        )  # (B, L, d)
        if progress is not None:
            progress.update(len(enc["input_ids"]))
    return torch.cat(out)


def _split(n: int, frac: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    k = min(max(1, round(frac * n)), n - 1)
    return perm[k:], perm[:k]  # train, val


def _direction(a: torch.Tensor, b: torch.Tensor, method: str, shrinkage: float = 0.2) -> torch.Tensor:
    """The condition vector from train states a (ON, (n, d)) and b (OFF, (m, d))."""
    diff = a.mean(0) - b.mean(0)  # (d,)
    if method == "mean_diff":
        return diff
    if method == "lda":
        x = torch.cat([a - a.mean(0), b - b.mean(0)])  # (n + m, d) within-class deviations
        s = x.T @ x / len(x)  # (d, d)
        eye = torch.eye(len(s), dtype=s.dtype, device=s.device)
        s = (1 - shrinkage) * s + shrinkage * (s.trace() / len(s)).clamp_min(1e-30) * eye  # positive definite
        w = torch.linalg.solve(s, diff)  # (d,), w @ diff > 0 since s is positive definite
        return w * (diff.norm() / w.norm().clamp_min(1e-30))  # mean_diff's length: only the direction matters
    x = torch.cat([a, b])
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    u = vh[0]
    return u if float(diff @ u) >= 0 else -u


def _check_sets(on: Sequence[str], off: Sequence[str]) -> None:
    for name, s in (("ON", on), ("OFF", off)):
        if len(s) < MIN_PROMPTS:
            raise SteerscopeError(
                f"the {name} prompt set has {len(s)} prompts; a condition needs at least {MIN_PROMPTS} per set "
                "(some to fit the vector, some to choose its threshold)."
            )
    if sorted(on) == sorted(off):
        raise SteerscopeError("the ON and OFF prompt sets are the same prompts; give two sets that differ.")


def find_condition(
    lm,
    on_prompts: Sequence[str],
    off_prompts: Sequence[str],
    config: ConditionFitConfig | None = None,
    progress: bool | None = None,
    name: str = "",
    val_on: Sequence[str] | None = None,
    val_off: Sequence[str] | None = None,
) -> ConditionFit:
    """A condition vector, threshold and side at every layer of `config.layers`, judged on a seeded
    validation split of each set, or on `val_on` / `val_off` when given (then every ON and OFF prompt
    fits the vector); `best_layer` the one whose gate separates validation best."""
    cfg = config or ConditionFitConfig()
    on, off = list(on_prompts), list(off_prompts)
    _check_sets(on, off)
    if (val_on is None) != (val_off is None):
        raise SteerscopeError("give both validation sets (val_on and val_off) or neither.")
    von, voff = list(val_on or []), list(val_off or [])
    given = val_on is not None
    if given and (not von or not voff):
        raise SteerscopeError("an explicit validation set is empty; give at least one ON and one OFF prompt.")
    layers = [lm.check_layer(l) for l in (cfg.layers if cfg.layers is not None else range(lm.n_layers))]
    if not layers:
        raise SteerscopeError("--layers selects no layer.")
    allp = on + von + off + voff
    with bar(len(allp), "activations", "prompt", show=progress) as pb:
        H = prompt_means(lm, allp, layers, cfg.chat, cfg.system, cfg.batch_size, pb)  # (N, L, d)
    A, B = H[: len(on) + len(von)], H[len(on) + len(von) :]  # ON (+ its validation), OFF (+ its validation)
    if given:
        a_tr, a_va = torch.arange(len(on)), torch.arange(len(on), len(on) + len(von))
        b_tr, b_va = torch.arange(len(off)), torch.arange(len(off), len(off) + len(voff))
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        a_tr, a_va = _split(len(on), cfg.val_fraction, g)
        b_tr, b_va = _split(len(off), cfg.val_fraction, g)
    fits, vecs = [], []
    for li, layer in enumerate(layers):
        a, b = A[:, li], B[:, li]  # (N_on, d), (N_off, d)
        c = _direction(a[a_tr], b[b_tr], cfg.method, cfg.shrinkage)
        if float(c.norm()) <= 1e-9 * max(float(a.norm(dim=-1).max()), 1e-30):
            raise SteerscopeError(
                f"the ON and OFF train prompts give the same mean hidden state at layer {layer}; "
                "no condition vector separates them (give two sets that differ)."
            )
        u = c / c.norm()
        sa, sb = (a @ u) / a.norm(dim=-1).clamp_min(1e-30), (b @ u) / b.norm(dim=-1).clamp_min(1e-30)  # cosines
        t, above, bal, tpr, fpr = best_threshold(sa[a_va], sb[b_va])
        sign = 1 if above else -1
        fits.append(
            LayerFit(
                layer=layer,
                threshold=t,
                above=above,
                auc=auc(sign * sa[a_va], sign * sb[b_va]),
                val_acc=bal,
                tpr=tpr,
                fpr=fpr,
                train_auc=auc(sign * sa[a_tr], sign * sb[b_tr]),
                roc=roc_curve(sa[a_va], sb[b_va], above),
                scores_on=sa[a_va].tolist(),
                scores_off=sb[b_va].tolist(),
            )
        )
        vecs.append(c.float())
    best = max(fits, key=lambda f: (round(f.val_acc, 9), round(f.auc, 9), -f.layer)).layer
    n = {
        "on": len(on),
        "off": len(off),
        "on_train": len(a_tr),
        "on_val": len(a_va),
        "off_train": len(b_tr),
        "off_val": len(b_va),
    }
    if given:
        n["val_given"] = 1
        a_va, b_va = a_va - len(on), b_va - len(off)  # indices into val_on / val_off
    val = {"on": a_va.tolist(), "off": b_va.tolist()}
    return ConditionFit(layers, torch.stack(vecs), fits, best, cfg, n, val, name)
