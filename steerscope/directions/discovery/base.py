"""The discovery family's contract: what a method receives and what it returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...checkpoint import Checkpoint
from ...config import Family
from ...errors import SteerscopeError
from ...progress import bar


@dataclass
class DiscoveryContext:
    """Everything a discovery method gets besides its own config."""

    lm: Any
    layer_range: Any  # models.layer_range.LayerRange on the training prompts, source -> target
    settings: Any  # the DiscoverConfig (n_vectors, target_tokens, seed, ...)
    R: float  # the norm every vector gets (given or calibrated)
    checkpoint: Checkpoint | None = None  # where a long method saves its state; None: no checkpoints
    progress: bool | None = None  # show progress bars (None: progress.bar's default; False: none)
    # Scores candidate vectors (n, d) -> (n,), higher is better, for a method that trains more
    # vectors than it keeps (kl's `candidates`). The caller supplies it: the run ranks by the
    # completions each candidate produces (judging.keep), which this layer cannot generate.
    rank: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The model `lm` was fine-tuned from, for the model-diffing methods (weightdiff, actdiff); None:
    # they load the one their config names (`base_model`).
    base: Any = None

    def bar(self, total: int, desc: str):
        """The method's progress bar over `total` steps (all vectors' steps together)."""
        return bar(total, desc, "step", show=self.progress)


@dataclass
class Discovered:
    """A method's result: K vectors (norm R each) and what to record about them."""

    vectors: torch.Tensor  # (K, d_model)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # saved in the VectorSet's safetensors
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able, saved in its hyper-parameters
    # Per vector, the layer it is added at, when a method places vectors elsewhere than the source
    # layer (weightdiff --at block: where the fine-tune wrote each); None: every one at the source.
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or not math.isfinite(float(self.vectors.float().abs().sum())):
            raise SteerscopeError("the discovery method returned non-finite vectors; try a smaller R or learning rate.")


DISCOVERY: Family = Family("discovery", "discovery method")


def base_model(ctx: DiscoveryContext, spec: str | None, method: str):
    """The base model a model-diffing method compares `ctx.lm` with: `ctx.base` when the caller
    holds one, else `models.loading.load_base(spec)`; checked to have the fine-tune's shape."""
    from ...models.loading import check_base, load_base

    if ctx.base is None:
        return load_base(spec, ctx.lm, method)
    check_base(ctx.base, ctx.lm, method)
    return ctx.base


def both_signs(dirs: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """(k, d): +u1, -u1, +u2, -u2, ... from unit rows `dirs` (a model difference has no preferred
    sign on its own: toward the fine-tune and away from it are both candidates), and the row of
    `dirs` each came from."""
    src = [i // 2 for i in range(k)]
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(k)], dtype=dirs.dtype)
    return dirs[src] * signs[:, None], src


def orthonormal_in_order(cands, min_share: float, limit: int) -> tuple[torch.Tensor, list[int]]:
    """Candidate directions (rows, any norm) made orthonormal in order (Gram-Schmidt): a candidate
    with less than `min_share` of its norm outside the span of those kept before it repeats them and
    is skipped; stops at `limit` kept. Returns (kept (n, d), their indices in `cands`)."""
    dirs: list[torch.Tensor] = []
    kept: list[int] = []
    for i, c in enumerate(cands):
        r = c / c.norm().clamp_min(1e-30)
        for q in dirs:
            r = r - (r @ q) * q
        if float(r.norm()) < min_share:
            continue
        dirs.append(r / r.norm())
        kept.append(i)
        if len(dirs) == limit:
            break
    return torch.stack(dirs), kept
