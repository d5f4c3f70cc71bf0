"""Refine methods: search near good vectors for ones whose fitness is higher (the `REFINE_METHODS` family).

Like the DISCOVERY family these are methods, not jobs: each is `fn(evaluate, start, settings) -> None`,
where `evaluate(candidates (P, d), mult) -> fitness (P,)` scores one generation (it is the caller's:
`steerscope refine` passes `jobs.refine.Evaluator`, which generates, scores and checkpoints; this
module never generates, so it sits below `generation` and `judging`), `start` holds the seed vectors
and `settings` anything with the fields of `SearchSettings` (`jobs.refine.RefineConfig` is one).
A method keeps nothing: `evaluate` records every candidate and its fitness.

Candidates live on the sphere of radius R (the steering norm, as in MELBO), and R is annealed up
and down over the generations (`settings.anneal`, multiples of the best seed's R): a vector that
only works at one R is found out, and the best vector at each R shows which coordinates keep their
magnitude as R varies. Methods:
    local   (1+lambda) evolution strategy in the full space around the best seed, step size
            adapted by success (Rechenberg's rule)
    cma     CMA-ES (Hansen; the `cma` package) in the span of the seeds
    cem     the cross-entropy method (Rubinstein) in the span of the seeds: refit a diagonal
            Gaussian to the top quarter of each population
Every method is deterministic given `settings.seed`, so a caller that replays saved fitness
values replays the same search.

Also the analysis of what a search found: `k90`/`sparsity` (how many coordinates, in the neuron
basis or an SAE's feature basis, hold a vector's mass) and `growth` (which coordinates keep their
share of the norm as R varies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..config import Family
from ..errors import SteerscopeError

REFINE_METHODS: Family = Family("refine_methods", "refine method")

Evaluate = Callable[[torch.Tensor, float], torch.Tensor]  # (candidates (P, d), R multiple) -> fitness (P,)


class SearchSettings(Protocol):
    """The settings a refine method reads (documented field by field on `jobs.refine.RefineConfig`)."""

    @property
    def generations(self) -> int: ...
    @property
    def population(self) -> int: ...
    @property
    def sigma(self) -> float: ...  # initial step size, as a fraction of R
    @property
    def anneal(self) -> list[float]: ...  # multiples of R, spread over the generations
    @property
    def seed(self) -> int: ...


@dataclass
class Start:
    """Where the search starts: seed vectors at one layer and their fitness."""

    vectors: torch.Tensor  # (k, d) float32, best first
    ids: list[str]
    fitness: list[float]
    layer: int
    R: float  # norm of the best seed: the radius the anneal multiples scale


def schedule(anneal: list[float], generations: int) -> list[float]:
    """The R multiple of each generation: the anneal list spread evenly over the generations."""
    return [anneal[min(len(anneal) - 1, g * len(anneal) // generations)] for g in range(generations)]


def on_sphere(x: torch.Tensor, R: float) -> torch.Tensor:
    """Rows of x rescaled to norm R (the steering norm is a constraint, as in MELBO)."""
    return R * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---- methods: fn(evaluate, start, settings) -> None; `evaluate` keeps every candidate ---------


@REFINE_METHODS.register("local")
def local_search(evaluate: Evaluate, start: Start, cfg: SearchSettings) -> None:
    """(1+lambda)-ES on the sphere around the best seed: each generation keeps the current point
    (re-scored at the new R) and adds population-1 Gaussian perturbations of relative size sigma;
    sigma grows 1.5x after a success and shrinks 0.7x after a failure."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = start.vectors[0] / start.vectors[0].norm()  # (d,) unit direction
    sigma = cfg.sigma
    for mult in schedule(cfg.anneal, cfg.generations):
        eps = torch.randn(cfg.population - 1, x.shape[0], generator=gen)
        eps = eps / eps.norm(dim=-1, keepdim=True)
        cands = torch.cat([x[None], x[None] + sigma * eps])  # (P, d): the current point first
        f = evaluate(on_sphere(cands, start.R * mult), mult)
        j = int(f.argmax())
        sigma = sigma * 1.5 if j > 0 else sigma * 0.7
        x = cands[j] / cands[j].norm()


def import_cma():
    import warnings

    with warnings.catch_warnings():  # cma warns at import when matplotlib is missing; its plots are not used
        warnings.simplefilter("ignore")
        import cma
    return cma


def _span(start: Start) -> torch.Tensor:
    """(k, d) orthonormal basis of the seeds' span, the best seed's direction first."""
    if len(start.vectors) < 2:
        raise SteerscopeError(
            "cma and cem search the span of the seeds and need at least 2; pass --seeds 2 "
            "(or more --ids), or use --method local."
        )
    q, r = torch.linalg.qr(start.vectors.double().T)  # (d, k)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    if int(keep.sum()) < 2:
        raise SteerscopeError(
            "the seeds are parallel (their span is 1-dimensional); pick other --ids or use --method local."
        )
    return q[:, keep].T.float()


@REFINE_METHODS.register("cma")
def cma_search(evaluate: Evaluate, start: Start, cfg: SearchSettings) -> None:
    """CMA-ES (Hansen & Ostermeier 2001, the `cma` package) over coordinates in the seeds' span,
    starting at the best seed; a coordinate vector c is the steering vector R * Qc / |Qc|."""
    cma = import_cma()
    Q = _span(start)  # (k, d)
    x0 = (Q @ start.vectors[0]) / start.vectors[0].norm()  # (k,) unit
    es = cma.CMAEvolutionStrategy(
        x0.double().tolist(),
        cfg.sigma,
        {"popsize": cfg.population, "seed": cfg.seed + 1, "verbose": -9, "CMA_diagonal": False},
    )
    for mult in schedule(cfg.anneal, cfg.generations):
        X = torch.from_numpy(np.asarray(es.ask(), dtype=np.float32))  # (P, k)
        f = evaluate(on_sphere(X @ Q, start.R * mult), mult)
        es.tell(X.double().tolist(), (-f).double().tolist())  # cma minimises


@REFINE_METHODS.register("cem")
def cem_search(evaluate: Evaluate, start: Start, cfg: SearchSettings) -> None:
    """Cross-entropy method (Rubinstein 1999) in the seeds' span: sample a diagonal Gaussian, refit
    its mean and spread to the best quarter (at least 2) of each population."""
    gen = torch.Generator().manual_seed(cfg.seed)
    Q = _span(start)
    mu = (Q @ start.vectors[0]) / start.vectors[0].norm()  # (k,)
    std = torch.full_like(mu, cfg.sigma)
    n_elite = max(2, cfg.population // 4)
    for mult in schedule(cfg.anneal, cfg.generations):
        X = mu + std * torch.randn(cfg.population, mu.shape[0], generator=gen)  # (P, k)
        X[0] = mu  # the current mean is always a candidate
        f = evaluate(on_sphere(X @ Q, start.R * mult), mult)
        elite = X[f.argsort(descending=True)[:n_elite]]
        mu, std = elite.mean(0), elite.std(0).clamp_min(0.02 * cfg.sigma)


# ---- analysis -----------------------------------------------------------------------------------
def k90(weights: torch.Tensor) -> int:
    """How many coordinates hold 90 % of the squared mass (smaller = sparser)."""
    w = (weights.double() ** 2).sort(descending=True).values
    return int((w.cumsum(0) < 0.9 * w.sum()).sum()) + 1


def sparsity(vectors: dict[str, torch.Tensor], sae=None) -> dict[str, dict]:
    """Per vector: k90 in the neuron basis and, given an SAE (anything with a `W_dec` of shape
    (n_latents, d)), in its feature basis (cosines to the unit decoder rows), with the top features."""
    out = {}
    dec = None
    if sae is not None:
        dec = sae.W_dec.detach().float().cpu()
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (n_latents, d)
    for name, v in vectors.items():
        u = v.float() / v.norm()
        row = {"neuron_k90": k90(u), "d_model": int(u.shape[0])}
        if dec is not None:
            cos = dec @ u  # (n_latents,)
            top = cos.abs().topk(min(5, cos.shape[0]))
            row |= {
                "sae_k90": k90(cos),
                "n_latents": int(cos.shape[0]),
                "sae_top": [[int(i), round(float(cos[i]), 3)] for i in top.indices],
            }
        out[name] = row
    return out


def growth(best_per_mult: dict[float, torch.Tensor], best: torch.Tensor, top: int = 12) -> dict:
    """Which dimensions keep their magnitude as R varies: for the refined vector's `top` largest
    coordinates, their value in the best vector found at each R multiple, per unit of R (a
    coordinate that keeps its share of the norm is flat), and the cosine of each R's best vector
    to the refined one."""
    mults = sorted(best_per_mult)
    dims = best.abs().topk(min(top, best.shape[0])).indices.tolist()
    return {
        "mults": mults,
        "dims": dims,
        "per_unit_R": {
            str(d): [round(float(best_per_mult[m][d] / best_per_mult[m].norm()), 5) for m in mults] for d in dims
        },
        "cosine_to_refined": [
            round(float(torch.nn.functional.cosine_similarity(best_per_mult[m], best, 0)), 4) for m in mults
        ],
    }
