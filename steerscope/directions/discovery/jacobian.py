"""Singular vectors of the source->target Jacobian, and choosing R from the model's own scale.

J is the Jacobian of the target-layer activations at the chosen tokens (all prompts, flattened)
with respect to a vector added at the source layer, at theta = 0. Its top right singular vectors
are the directions that move the target layer most to first order (the linear DCT; "Power
Steering"). J is never materialised: block subspace iteration applies J^T J to k vectors at once
with one forward-mode pass (torch.func.jvp, k rows in one batch) and one reverse pass (a vjp
function built once at theta = 0 and reused), followed by Rayleigh-Ritz on the k x k projection.
Forward-mode AD has no CPU SDPA kernel, so attention runs eagerly here.

Calibration (after DCT, Mack & Turner 2024): for random unit v, the relative nonlinearity
    ratio(R) = sqrt( mean ||Delta(R v) - R J v||^2 / mean ||R J v||^2 )
grows with R; the calibrated R solves ratio(R) = target (0.5 by default): large enough to leave
the linear regime, small enough not to drown the residual stream. Residual norms differ a lot
between models, so a fixed R is wrong for most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...config import Config
from ...errors import SteerscopeError
from ...models.layer_range import eager_attention, frozen_weights
from ...progress import bar
from .base import DISCOVERY, Discovered, DiscoveryContext
from .baselines import _orthonormal_rows, random_directions


@dataclass(frozen=True)
class JacobianConfig(Config):
    """Settings of the Jacobian singular-vector method."""

    power_iters: int = field(default=8, metadata={"min": 1})
    """most subspace iterations (discovery needs the top subspace, not 1e-4 convergence)"""
    tol: float = field(default=1e-4, metadata={"min": 0})
    """stop earlier when every singular vector's relative residual is below this"""
    both_signs: bool = True
    """return +v and -v for every singular vector: J is linear, so both move the target layer
    equally to first order, and they are two candidate behaviours at no extra cost"""
    oversample: int = field(default=4, metadata={"min": 0})
    """extra vectors iterated alongside for faster convergence"""


@DISCOVERY.register("jacobian", JacobianConfig)
def jacobian(ctx: DiscoveryContext, cfg: JacobianConfig) -> Discovered:
    """Top right singular vectors of the source->target Jacobian (the linear DCT), times R."""
    s = ctx.settings
    n = -(-s.n_vectors // 2) if cfg.both_signs else s.n_vectors
    with ctx.bar(cfg.power_iters, "jacobian") as bar:
        res = jacobian_singular_vectors(
            ctx.layer_range,
            n,
            target_tokens=s.target_tokens,
            oversample=cfg.oversample,
            iters=cfg.power_iters,
            tol=cfg.tol,
            seed=s.seed,
            progress=bar,
        )
    vecs, sv = res.vectors.cpu(), res.singular_values.cpu()
    if cfg.both_signs:  # v1, -v1, v2, -v2, ...: (n, 2, d) -> (2n, d), cut to K
        vecs = torch.stack([vecs, -vecs], 1).flatten(0, 1)[: s.n_vectors]
        sv = sv.repeat_interleave(2)[: s.n_vectors]
    info = {
        "singular_values": sv.tolist(),
        "residuals": res.residuals.tolist(),
        "iterations": res.iterations,
        "converged": res.converged,
    }
    return Discovered(ctx.R * vecs, {"singular_values": sv, "history": torch.tensor(res.history)}, info)


@dataclass
class JacobianResult:
    vectors: torch.Tensor  # (n, d) unit right singular vectors, largest first
    singular_values: torch.Tensor  # (n,)
    residuals: torch.Tensor  # (n,) ||J^T J v - s^2 v|| / s^2 at the end
    history: list[list[float]]  # singular values per iteration
    iterations: int
    converged: bool


def _masked_delta(layer_range, mask: torch.Tensor):
    def f(theta: torch.Tensor) -> torch.Tensor:  # (K, d) -> (K*P, T, d)
        return layer_range.delta(theta) * mask.repeat(theta.shape[0], 1)[..., None]

    return f


def jacobian_singular_vectors(
    layer_range,
    n: int,
    *,
    target_tokens: str = "all",
    oversample: int = 4,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    progress=None,
) -> JacobianResult:
    lm = layer_range.lm
    d = lm.d_model
    k = min(n + oversample, d)
    if n > d:
        raise SteerscopeError(f"cannot find {n} singular vectors in d_model={d}.")
    mask = layer_range.target_mask(target_tokens).float()
    try:
        with eager_attention(lm), frozen_weights(lm):
            layer_range.capture()  # masks in the eager format
            return _subspace_iteration(_masked_delta(layer_range, mask), d, n, k, iters, tol, seed, progress, lm.device)
    finally:
        layer_range.capture()  # back to masks for the model's own attention implementation


def _subspace_iteration(
    f, d: int, n: int, k: int, iters: int, tol: float, seed: int, progress, device
) -> JacobianResult:
    zero = torch.zeros(k, d, device=device)
    _, vjp_fn = torch.func.vjp(f, zero)  # linearisation point theta = 0, reused every iteration
    V = random_directions(k, d, seed).to(device)  # (k, d) orthonormal rows
    history, converged = [], False
    for it in range(1, iters + 1):  # noqa: B007 (`it` is returned: the iterations used)
        _, JV = torch.func.jvp(f, (zero,), (V,))  # row block i: J v_i
        W = vjp_fn(JV)[0]  # (k, d): J^T J v_i
        H = V.double() @ W.double().T  # Rayleigh-Ritz: V^T (J^T J) V
        evals, evecs = torch.linalg.eigh((H + H.T) / 2)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        ritz = (evecs.T @ V.double()).float()
        W_ritz = (evecs.T @ W.double()).float()
        lam = evals.float()
        res = (W_ritz - lam[:, None] * ritz).norm(dim=-1) / lam.clamp_min(1e-30)
        history.append(lam[:n].sqrt().tolist())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(residual=f"{float(res[:n].detach().max()):.2e}")
        if bool((res[:n] < tol).all()):
            converged = True
            break
        V = _orthonormal_rows(W_ritz)
    vecs = ritz[:n]
    # Signs are arbitrary (-v is as singular as v); fix them reproducibly.
    s = torch.sign(vecs.sum(-1, keepdim=True))
    vecs = vecs * s.where(s != 0, torch.ones(1, device=s.device))
    return JacobianResult(vecs, lam[:n].sqrt(), res[:n], history, it, converged)


def nonlinearity_ratio(layer_range, R: float, V: torch.Tensor, JV: torch.Tensor, mask: torch.Tensor) -> float:
    delta = layer_range.delta(R * V) * mask.repeat(V.shape[0], 1)[..., None]
    lin = R * JV
    return math.sqrt(float((delta - lin).square().sum() / lin.square().sum().clamp_min(1e-30)))


@torch.no_grad()
def _jv(layer_range, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    f = _masked_delta(layer_range, mask)
    with torch.enable_grad():
        _, JV = torch.func.jvp(f, (torch.zeros_like(V),), (V,))
    return JV.detach()


def calibrate_R(
    layer_range,
    *,
    target_ratio: float = 0.5,
    n_probe: int = 8,
    target_tokens: str = "all",
    seed: int = 0,
    grid: int = 25,
    iters: int = 30,
    progress: bool | None = None,
) -> tuple[float, list[tuple[float, float]]]:
    """The R where ratio(R) crosses `target_ratio` on its way up. Returns (R, [(R, ratio), ...]).

    The ratio is scanned on a geometric grid from 1e-3 to 1e3 times the median token norm at
    the source layer. At very small R low-precision dtypes (bfloat16) make the ratio large
    through rounding noise alone, so the search starts from the grid's minimum and bisects the
    first upward crossing. `progress`: show a bar over its passes (`progress.bar`; False: none)."""
    lm = layer_range.lm
    mask = layer_range.target_mask(target_tokens).float()
    V = random_directions(n_probe, lm.d_model, seed).to(lm.device)
    # One unit per pass: the Jacobian-vector product, the grid, the bisection. Each bisection step
    # halves log(hi / lo), from one grid step (a factor 10 ** (6 / (grid - 1))) to below 1.01.
    bisections = min(iters, math.ceil(math.log2(6 / (grid - 1) * math.log(10) / math.log(1.01))))
    with bar(1 + grid + bisections, "calibrating R", "pass", show=progress) as passes:
        try:
            with eager_attention(lm), frozen_weights(lm):
                layer_range.capture()
                JV = _jv(layer_range, V, mask)
        finally:
            layer_range.capture()
        passes.update(1)
        scale = float(layer_range.h_source.float().norm(dim=-1)[layer_range.valid].median())
        Rs = [scale * 10 ** (-3 + 6 * i / (grid - 1)) for i in range(grid)]
        with torch.no_grad():
            trace = []
            for R in Rs:
                trace.append((R, nonlinearity_ratio(layer_range, R, V, JV, mask)))
                passes.update(1)
            i_min = min(range(grid), key=lambda i: trace[i][1])
            if trace[i_min][1] >= target_ratio:
                raise SteerscopeError(
                    f"cannot calibrate R: the nonlinearity ratio never falls below {target_ratio} "
                    f"(lowest {trace[i_min][1]:.3g} at R={trace[i_min][0]:.3g}); numerical noise in "
                    f"{str(lm.dtype)[6:]} may dominate: use float32 or pass R explicitly."
                )
            up = next((j for j in range(i_min + 1, grid) if trace[j][1] > target_ratio), None)
            if up is None:
                raise SteerscopeError(
                    f"cannot calibrate R: the ratio stays below {target_ratio} up to R={Rs[-1]:.3g}; pass R explicitly."
                )
            lo, hi = Rs[up - 1], Rs[up]
            for _ in range(iters):
                mid = math.sqrt(lo * hi)
                r = nonlinearity_ratio(layer_range, mid, V, JV, mask)
                trace.append((mid, r))
                lo, hi = (mid, hi) if r < target_ratio else (lo, mid)
                passes.set_postfix(R=f"{math.sqrt(lo * hi):.3g}")
                passes.update(1)
                if hi / lo < 1.01:
                    break
    return math.sqrt(lo * hi), trace
