"""actdiff: how the fine-tune's residual stream differs from its base's on the same prompts.

At the source layer, the per-token difference of residuals (fine-tune minus base, every real
prompt token after the first, which is an attention sink whose massive activation would dominate)
gives the mean difference, then the top principal components of the differences around it. They
are made orthogonal in that order and returned with both signs at norm R: adding one to the base
moves it toward the fine-tune, subtracting it from the fine-tune moves it back (model diffing by
activation differences; see the frontier notes). The mean difference's own norm and each
component's share of the variance are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import Config
from ...errors import SteerscopeError
from ...models.activations import read_layer
from .base import DISCOVERY, Discovered, DiscoveryContext, base_model, both_signs, orthonormal_in_order


@dataclass(frozen=True)
class ActDiffConfig(Config):
    base: str | None = None
    """the model the fine-tune is compared with: a checkpoint folder, a cached hub id, or embedded
    (default: for organism:NAME, the embedded model it was built from; otherwise required)"""


def residual_differences(lm, base, prompts: list[str], layer: int, chat: bool | None) -> torch.Tensor:
    """(n_tokens, d) float64 fine-tune minus base residual at `layer` on every real prompt token
    after the first."""
    enc = lm.encode(prompts, chat=chat)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    h_ft = read_layer(lm, layer, ids.to(lm.device), mask.to(lm.device)).double().cpu()  # (P, T, d)
    h_b = read_layer(base, layer, ids.to(base.device), mask.to(base.device)).double().cpu()
    m = mask.bool()
    keep = m & (m.long().cumsum(-1) > 1)  # left padding: a row's first real token is its sink
    return (h_ft - h_b)[keep]


@DISCOVERY.register("actdiff", ActDiffConfig)
def actdiff(ctx: DiscoveryContext, cfg: ActDiffConfig) -> Discovered:
    """Mean and principal components of fine-tune minus base residuals at the source layer, both signs."""
    lm, k = ctx.lm, ctx.settings.n_vectors
    base = base_model(ctx, cfg.base, "actdiff")
    lr_ = ctx.layer_range
    D = residual_differences(lm, base, lr_.prompts, lr_.source, lr_.chat)  # (N, d)
    mean = D.mean(0)
    if float(mean.norm()) == 0.0 and float(D.abs().max()) == 0.0:
        raise SteerscopeError(
            "actdiff: the model's residuals equal the base's on these prompts; nothing changed there."
        )
    n_dirs = (k + 1) // 2
    _, S, Vh = torch.linalg.svd(D - mean, full_matrices=False)  # principal components of the differences
    dirs, idx = orthonormal_in_order(torch.cat([mean[None], Vh[: n_dirs + 1]]), 1e-6, n_dirs)  # mean, pc1, pc2, ...
    vecs, src = both_signs(dirs, min(k, 2 * len(dirs)))
    var = (S**2 / (S**2).sum().clamp_min(1e-30)).tolist()
    info = {
        "mean_difference_norm": float(mean.norm()),
        "tokens": int(D.shape[0]),
        "components": [
            {"component": "mean" if idx[i] == 0 else f"pc{idx[i]}", "sign": 1 if j % 2 == 0 else -1}
            for j, i in enumerate(src)
        ],
        "pc_variance_share": [round(v, 6) for v in var[:n_dirs]],
    }
    return Discovered((vecs * ctx.R).float(), info=info)
