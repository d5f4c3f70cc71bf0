"""Baselines and controls: PCA of source-layer activations and random vectors of matched norm.

pca                top-k principal components of the (token x d_model) activations at the
                   source layer (centred), times R
pca_onmanifold     the same PCs restricted to the span of the top-m right singular vectors of
                   the UNcentred token x activation matrix (the directions activations
                   actually occupy), re-orthonormalised
random             Gaussian directions, orthonormalised (QR), times R: the control
random_onmanifold  random directions inside that top-m span, orthonormalised, times R
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...config import Config
from ...errors import SteerscopeError
from .base import DISCOVERY, Discovered, DiscoveryContext


def _orthonormal_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x made orthonormal in order (Gram-Schmidt via QR, signs kept)."""
    q, r = torch.linalg.qr(x.T)
    return (
        q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=q.dtype, device=q.device))
    ).T


def random_directions(k: int, d: int, seed: int) -> torch.Tensor:
    """(k, d) orthonormal random directions (k <= d)."""
    if k > d:
        raise SteerscopeError(f"cannot have {k} mutually orthogonal vectors in {d} dimensions.")
    g = torch.Generator().manual_seed(seed)
    return _orthonormal_rows(torch.randn(k, d, generator=g, dtype=torch.float64)).float()


def source_tokens(layer_range, tokens: str = "all") -> torch.Tensor:
    """(n_tokens, d) float64 source-layer activations at the selected real tokens."""
    mask = layer_range.target_mask(tokens)
    return layer_range.h_source[mask].double()


def top_subspace(x: torch.Tensor, m: int) -> torch.Tensor:
    """(m, d) top right singular vectors of the uncentred matrix x."""
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:m]


def pca(layer_range, k: int, manifold_rank: int | None = None) -> tuple[torch.Tensor, dict]:
    x = source_tokens(layer_range)
    if k > min(x.shape):
        raise SteerscopeError(
            f"pca: {k} components from {x.shape[0]} tokens x {x.shape[1]} dims is not possible; use fewer vectors or more prompts."
        )
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    dirs = vh[:k]
    info = {"explained_variance": (s[:k] ** 2 / (s**2).sum()).tolist()}
    if manifold_rank is not None:
        basis = top_subspace(x, manifold_rank)  # (m, d)
        inside = (dirs @ basis.T) @ basis  # projection on the span
        info["kept_fraction"] = (inside.norm(dim=-1) / dirs.norm(dim=-1)).tolist()
        dirs = _orthonormal_rows(inside)
    return dirs.float(), info


def random_onmanifold(layer_range, k: int, manifold_rank: int, seed: int) -> tuple[torch.Tensor, dict]:
    basis = top_subspace(source_tokens(layer_range), manifold_rank)  # (m, d)
    if k > manifold_rank:
        raise SteerscopeError(
            f"{k} orthogonal vectors do not fit in a rank-{manifold_rank} subspace; raise manifold_rank."
        )
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(k, manifold_rank, generator=g, dtype=torch.float64).to(basis.device)
    return _orthonormal_rows(coeffs @ basis).float(), {"manifold_rank": manifold_rank}


@dataclass(frozen=True)
class ManifoldConfig(Config):
    """Settings of the on-manifold baselines."""

    manifold_rank: int | None = field(default=None, metadata={"min": 1})
    """rank of the activation subspace kept (auto: 2 x the number of vectors)"""


@DISCOVERY.register("pca")
def _pca(ctx: DiscoveryContext, cfg: None) -> Discovered:
    """Top principal components of the source-layer activations, times R."""
    dirs, info = pca(ctx.layer_range, ctx.settings.n_vectors)
    return Discovered(ctx.R * dirs.cpu(), info=info)


@DISCOVERY.register("pca_onmanifold", ManifoldConfig)
def _pca_onmanifold(ctx: DiscoveryContext, cfg: ManifoldConfig) -> Discovered:
    """Those PCs kept inside the span the activations occupy, times R."""
    dirs, info = pca(ctx.layer_range, ctx.settings.n_vectors, cfg.manifold_rank or 2 * ctx.settings.n_vectors)
    return Discovered(ctx.R * dirs.cpu(), info=info)


@DISCOVERY.register("random")
def _random(ctx: DiscoveryContext, cfg: None) -> Discovered:
    """Orthogonal random directions of norm R: the control."""
    return Discovered(ctx.R * random_directions(ctx.settings.n_vectors, ctx.lm.d_model, ctx.settings.seed))


@DISCOVERY.register("random_onmanifold", ManifoldConfig)
def _random_onmanifold(ctx: DiscoveryContext, cfg: ManifoldConfig) -> Discovered:
    """Random directions inside the activations' top subspace, norm R."""
    n = ctx.settings.n_vectors
    dirs, info = random_onmanifold(ctx.layer_range, n, cfg.manifold_rank or 2 * n, ctx.settings.seed)
    return Discovered(ctx.R * dirs.cpu(), info=info)
