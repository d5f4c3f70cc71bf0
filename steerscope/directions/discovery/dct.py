"""DCT: deep causal transcoding (Mack & Turner, 2024-12), fitted by orthogonalised gradient
iteration (OGI), with exponential (default), quadratic or linear factors.

Model the prompt-averaged change at the target layer, Delta(theta) = mean over prompts and target
tokens of Z_t(theta) - Z_t(0), as sum_l alpha_l (exp(<v_l, theta> / R) - 1) u_l with unit input
directions v_l and output directions u_l. OGI maximises each factor's causal term
u_l . Delta(R v_l), batched over factors:

    V <- orthonormalise(V)                         # QR, rows
    G_U = Delta(R V)                               # one batched forward, (m, d)
    G_V = grad_V sum_l u_l . Delta(R v_l)          # one batched backward (a VJP per factor)
    U <- normalise(beta G_U + (1 - beta) U);  V <- normalise(beta G_V + (1 - beta) V)

V starts from the top right singular vectors of a random projection of the Jacobian (W J for
d_proj random output directions W, one batched VJP at theta = 0). The reference code took
*columns* of Vh there, which are not singular vectors; we take its rows. Factors are ranked by
alpha^2 with alpha = K^-1 [u_l . Delta(R v_l)], K = (U U^T) * expm1(V V^T) (the author calls this
ranking noisy; it orders, it does not filter). The vectors returned are R v_l, best first.

The other nonlinearities fit the same shape, sigma(<v, theta>) u, with sigma(x) = x or x^2, and
use the same iteration on the matching part of Delta (finite differences at +-R v, two forwards):
  quadratic: the even part (Delta(R v) + Delta(-R v)) / 2 = R^2 H[v, v] / 2 + O(R^4), so OGI is
             the symmetric orthogonalised ALS of the Hessian's CP decomposition the paper uses;
  linear:    the odd part (Delta(R v) - Delta(-R v)) / 2 = R J v + O(R^3), so OGI is power
             iteration for the Jacobian's singular vectors (the `jacobian` method, by another route).
Their ranking kernels are V V^T and (V V^T)^2 in place of expm1(V V^T). Iterations stop early when
the summed causal term gains less than `dct_tol` (relative) in one iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ...config import Config
from ...errors import SteerscopeError
from ...models.layer_range import frozen_weights
from .base import DISCOVERY, Discovered, DiscoveryContext
from .baselines import _orthonormal_rows, random_directions


@dataclass(frozen=True)
class DCTConfig(Config):
    """Settings of DCT."""

    sigma: Literal["exp", "quadratic", "linear"] = "exp"
    """factor nonlinearity: exp (exp(x) - 1, the paper's best), quadratic, or linear (for comparison)"""
    dct_iters: int = field(default=10, metadata={"min": 1})
    """most orthogonalised gradient iterations (tau)"""
    dct_tol: float = field(default=0.005, metadata={"min": 0})
    """stop when one iteration raises the summed causal term by less than this fraction (0: run all)"""
    beta: float = field(default=1.0, metadata={"min": 0, "max": 1})
    """step of each update: new = normalise(beta * gradient + (1 - beta) * old)"""
    init: Literal["jacobian", "random"] = "jacobian"
    """initial input directions: top singular vectors of a projected Jacobian, or random"""
    d_proj: int = field(default=32, metadata={"min": 1})
    """random output directions projecting the Jacobian for the initialisation"""
    factor_batch: int | None = field(default=None, metadata={"min": 1})
    """factors per forward/backward pass (auto: all at once)"""


def _delta_bar(layer_range, mask: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(K, d) mean change over prompts and target tokens when theta (K, d) is added."""
    K, P = theta.shape[0], layer_range.P
    delta = layer_range.delta(theta).view(K, P, -1, theta.shape[-1])  # (K, P, T, d)
    w = mask.float()  # (P, T)
    return (delta * w[None, :, :, None]).sum((1, 2)) / w.sum()


def _part(f, sigma: str):
    """The part of Delta a factor with nonlinearity `sigma` models, as a function of R v (K, d)."""
    if sigma == "exp":
        return f
    sign = 1.0 if sigma == "quadratic" else -1.0
    return lambda theta: (f(theta) + sign * f(-theta)) / 2


_KERNELS = {"exp": torch.expm1, "quadratic": torch.square, "linear": lambda x: x}


def _chunks(n: int, size: int | None):
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@DISCOVERY.register("dct", DCTConfig)
def dct(ctx: DiscoveryContext, cfg: DCTConfig) -> Discovered:
    """DCT (Mack & Turner 2024): causal input/output factor pairs, ranked, times R."""
    lr_, R, m, d = ctx.layer_range, ctx.R, ctx.settings.n_vectors, ctx.lm.d_model
    dev = ctx.lm.device
    mask = lr_.target_mask(ctx.settings.target_tokens)
    if m > d:
        raise SteerscopeError(f"{m} DCT factors do not fit in d_model={d}; ask for fewer vectors.")
    g = torch.Generator().manual_seed(ctx.settings.seed)
    delta = lambda theta: _delta_bar(lr_, mask, theta)  # noqa: E731
    f = _part(delta, cfg.sigma)
    objective: list[float] = []
    with frozen_weights(ctx.lm), ctx.bar(cfg.dct_iters + 1, "dct") as bar:
        V = random_directions(m, d, ctx.settings.seed).to(dev)
        if cfg.init == "jacobian":
            W = torch.randn(cfg.d_proj, d, generator=g).to(dev)  # random output directions
            _, vjp = torch.func.vjp(delta, torch.zeros(cfg.d_proj, d, device=dev))
            _, _, vh = torch.linalg.svd(vjp(W)[0].double(), full_matrices=False)  # rows of W J
            k = min(m, vh.shape[0])
            V = torch.cat([vh[:k].float(), V[k:]]) if k < m else vh[:m].float()
        V = _orthonormal_rows(V)
        with torch.no_grad():
            U = _normalise(torch.cat([f(R * V[s]) for s in _chunks(m, cfg.factor_batch)]))
        bar.update(1)
        for _ in range(cfg.dct_iters):
            V = _orthonormal_rows(V)
            GU, GV, causal = [], [], torch.zeros((), device=dev)
            for s in _chunks(m, cfg.factor_batch):
                v = V[s].clone().requires_grad_(True)
                out = f(R * v)  # (k, d)
                term = (U[s] * out).sum()
                (gv,) = torch.autograd.grad(term, v)
                GU.append(out.detach())
                GV.append(gv)
                causal = causal + term.detach()
            objective.append(float(causal))
            if (
                cfg.dct_tol > 0
                and len(objective) > 1
                and objective[-1] - objective[-2] < cfg.dct_tol * abs(objective[-2])
            ):
                bar.update(cfg.dct_iters - len(objective) + 1)
                break
            U = _normalise(cfg.beta * torch.cat(GU) + (1 - cfg.beta) * U)
            V = _normalise(cfg.beta * torch.cat(GV) + (1 - cfg.beta) * V)
            bar.update(1)
        V = _orthonormal_rows(V)  # the returned factors are orthonormal
        with torch.no_grad():
            out = torch.cat([f(R * V[s]) for s in _chunks(m, cfg.factor_batch)])  # (m, d)
    U = _normalise(out)
    causal = (U * out).sum(-1)  # (m,): u_l . Delta(R v_l)
    Kmat = ((U @ U.T) * _KERNELS[cfg.sigma](V @ V.T)).double()
    alpha = torch.linalg.lstsq(Kmat, causal.double()[:, None]).solution[:, 0].float()
    order = torch.argsort(alpha.square(), descending=True)
    objective.append(float(causal.sum()))
    return Discovered(
        R * V[order].cpu(),
        {"output_directions": U[order].cpu(), "alpha": alpha[order].cpu()},
        {
            "alpha": alpha[order].tolist(),
            "causal": causal[order].tolist(),
            "objective": objective,
            "iterations": len(objective) - 1,
        },
    )
