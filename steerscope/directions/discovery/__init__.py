"""Unsupervised discovery: directions found without naming a behaviour in advance.

`discover(lm, prompts, DiscoverConfig(method=...))` returns a VectorSet of vectors of norm R at
the source layer. Methods (`DISCOVERY`, one function each): melbo, jacobian, pca,
pca_onmanifold, random, random_onmanifold. R is calibrated from the model when not given
(`calibrate_R`). `random_control(lm, vs)` gives orthogonalised random vectors of the same norms:
the control every learned set should be compared with.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ...errors import SteerscopeError
from ...models.layer_range import LayerRange
from ..vectors import VectorSet
from .baselines import pca, random_directions, random_onmanifold
from .jacobian import calibrate_R, jacobian_singular_vectors
from .melbo import _Checkpoint, run_key, train_melbo


@dataclass
class DiscoverConfig:
    """Settings of a discovery run; defaults follow the MELBO/DCT papers scaled to depth."""

    method: str = "melbo"
    source: int | None = None  # default: round(n_layers / 4)
    target: int | None = None  # default: n_layers - 8 (at least source + 1)
    n_vectors: int = 16
    R: float | None = None  # norm of every vector; None: calibrate (ratio below)
    calibrate_ratio: float = 0.5
    # "last:K" or "all". Default last 3 tokens, as in DCT and the MELBO backdoor runs: with "all",
    # p=2 lets the first token's massive activation (the attention sink) dominate the objective,
    # and on SmolLM2 MELBO then learned vectors that changed completions no more than random ones.
    target_tokens: str = "last:3"
    # MELBO
    p: float = 2.0
    q: float = 1.0
    steps: int = 300
    lr: float | None = None  # None: 0.01 * R / sqrt(d_model) (the reference's 1e-3 at R=4, d=2048)
    orthogonal: bool = True
    vectors_per_batch: int | None = None  # None: all vectors in one batch
    checkpoint_every: int = 25
    # Jacobian
    power_iters: int = 50
    tol: float = 1e-4
    # PCA / on-manifold
    manifold_rank: int | None = None  # None: 2 * n_vectors
    seed: int = 0
    chat: bool | None = None

    def resolve_layers(self, n_layers: int) -> tuple[int, int]:
        s = self.source if self.source is not None else round(n_layers / 4)
        t = self.target if self.target is not None else max(s + 1, n_layers - 8)
        return s, t


def _melbo(lm, lr_, cfg, R, ckpt, progress):
    vecs, curves = train_melbo(lr_, n_vectors=cfg.n_vectors, R=R, p=cfg.p, q=cfg.q, target_tokens=cfg.target_tokens,
                               steps=cfg.steps, lr=cfg.lr, orthogonal=cfg.orthogonal, chunk=cfg.vectors_per_batch,
                               seed=cfg.seed, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every, progress=progress)
    return vecs, {"curves": curves}, {"final_objective": curves[:, -1].tolist()}


def _jacobian(lm, lr_, cfg, R, ckpt, progress):
    res = jacobian_singular_vectors(lr_, cfg.n_vectors, target_tokens=cfg.target_tokens, iters=cfg.power_iters,
                                    tol=cfg.tol, seed=cfg.seed, progress=progress)
    info = {"singular_values": res.singular_values.tolist(), "residuals": res.residuals.tolist(),
            "iterations": res.iterations, "converged": res.converged}
    return R * res.vectors, {"singular_values": res.singular_values, "history": torch.tensor(res.history)}, info


def _pca(lm, lr_, cfg, R, ckpt, progress, onmanifold=False):
    dirs, info = pca(lr_, cfg.n_vectors, (cfg.manifold_rank or 2 * cfg.n_vectors) if onmanifold else None)
    return R * dirs, {}, info


def _random(lm, lr_, cfg, R, ckpt, progress):
    return R * random_directions(cfg.n_vectors, lm.d_model, cfg.seed), {}, {}


def _random_onmanifold(lm, lr_, cfg, R, ckpt, progress):
    dirs, info = random_onmanifold(lr_, cfg.n_vectors, cfg.manifold_rank or 2 * cfg.n_vectors, cfg.seed)
    return R * dirs, {}, info


Method = Callable[..., tuple[torch.Tensor, dict, dict]]
DISCOVERY: dict[str, Method] = {
    "melbo": _melbo,
    "jacobian": _jacobian,
    "pca": _pca,
    "pca_onmanifold": lambda *a: _pca(*a, onmanifold=True),
    "random": _random,
    "random_onmanifold": _random_onmanifold,
}


def discover(lm, prompts: list[str], config: DiscoverConfig | None = None, *, checkpoint_dir: str | Path | None = None,
             progress: bool | None = None) -> VectorSet:
    """Run a discovery method; the result records R, layers, the config and method diagnostics
    (MELBO training curves, Jacobian singular values) in its hyper-parameters and extras."""
    from tqdm.auto import tqdm

    cfg = config or DiscoverConfig()
    if cfg.method not in DISCOVERY:
        raise SteerscopeError(f"unknown discovery method {cfg.method!r}; available: {', '.join(DISCOVERY)}.")
    if not prompts:
        raise SteerscopeError("discovery needs at least one prompt.")
    if cfg.n_vectors < 1:
        raise SteerscopeError("n_vectors must be >= 1.")
    s, t = cfg.resolve_layers(lm.n_layers)
    lr_ = LayerRange(lm, list(prompts), s, t, chat=cfg.chat)
    calibration = None
    R = cfg.R
    if R is None:
        R, trace = calibrate_R(lr_, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=cfg.seed)
        calibration = {"ratio": cfg.calibrate_ratio, "R": R, "trace": trace[-5:]}
    if R <= 0:
        raise SteerscopeError(f"R must be positive, got {R}.")
    key_cfg = {**asdict(cfg), "R": R, "source": s, "target": t}
    ckpt = _Checkpoint(Path(checkpoint_dir), run_key(lm, list(prompts), key_cfg)) if checkpoint_dir else None
    total = cfg.steps * -(-cfg.n_vectors // (cfg.vectors_per_batch or cfg.n_vectors)) if cfg.method == "melbo" else \
        cfg.power_iters if cfg.method == "jacobian" else 0
    show = (sys.stderr.isatty() if progress is None else progress) and total > 0
    with tqdm(total=total, desc=cfg.method, unit="step", disable=not show, leave=False) as bar:
        vecs, extras, info = DISCOVERY[cfg.method](lm, lr_, cfg, R, ckpt, bar)
    hyper = {**key_cfg, "n_prompts": len(prompts), "prompts": list(prompts)[:50], "calibration": calibration, **info}
    return VectorSet.create(lm, vecs, s, cfg.method, ids=[f"{cfg.method}-{i}" for i in range(len(vecs))],
                            hyperparams=hyper, extras=extras)


def random_control(lm, vs: VectorSet, seed: int = 12345) -> VectorSet:
    """Orthogonalised random vectors with the same norms and layers as `vs` (the MELBO control)."""
    norms = vs.vectors.norm(dim=-1, keepdim=True)
    dirs = random_directions(len(vs), lm.d_model, seed)
    return VectorSet.create(lm, dirs * norms, vs.layers, "random", ids=[f"random-{i}" for i in range(len(vs))],
                            hyperparams={"control_for": vs.config.method, "seed": seed, "R": vs.config.hyperparams.get("R")})


__all__ = ["DiscoverConfig", "DISCOVERY", "discover", "random_control", "calibrate_R", "jacobian_singular_vectors", "train_melbo"]
