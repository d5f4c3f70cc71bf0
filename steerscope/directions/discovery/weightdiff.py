"""weightdiff: what the fine-tune writes into the residual stream that its base did not.

For every matrix that writes into the residual stream (each block's attention output and MLP
output projections), the top singular vectors of (W_ft - W_base) on the output side are residual
directions the fine-tune added; they are ranked by singular value across all blocks, made
orthogonal in that order (a direction mostly inside the span of stronger ones is skipped), and
returned with both signs at norm R, added at the source layer like every discovery vector (the
residual stream is additive: a direction written at block l is still present, or arrives, there).

This is the model-diffing baseline of auditing work: a rank-1 SVD of a LoRA fine-tune's weight
difference recovers the planted behaviour of 85-98 % of AuditBench's synthetic-document organisms
and 18-38 % of its transcript-distilled ones (frontier notes). Each vector's provenance (matrix,
block, singular value, sign) is in the set's hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...config import Config
from ...errors import SteerscopeError
from .base import DISCOVERY, Discovered, DiscoveryContext, base_model, both_signs, orthonormal_in_order


@dataclass(frozen=True)
class WeightDiffConfig(Config):
    base: str | None = None
    """the model the fine-tune is compared with: a checkpoint folder, a cached hub id, or embedded
    (default: for organism:NAME, the embedded model it was built from; otherwise required)"""
    per_matrix: int = field(default=4, metadata={"min": 1})
    """singular vectors taken from each matrix's difference before ranking them all"""
    min_new: float = field(default=0.5, metadata={"min": 0, "max": 1})
    """a direction is kept only if at least this share of its norm lies outside the stronger ones'
    span (else it repeats them)"""
    at: str = field(default="source", metadata={"choices": ("source", "block")})
    """where each vector is added: source (the source layer, norm R, like every discovery method) or
    block (the block whose matrix wrote it, norm R scaled by that layer's residual norm over the
    source layer's, so it is as large there relative to the stream as R is at the source)"""


def residual_writers(lm) -> list[tuple[int, str, nn.Module]]:
    """(block, dotted name, module) of every matrix writing into the residual stream. One loud
    error when an architecture's writer is not a linear map (post-norm blocks write through a norm)."""
    import transformers

    out = []
    for layer in range(lm.n_layers):
        for kind in ("attn_out", "mlp_out"):
            name = f"{lm.arch.spec.layers}.{layer}.{getattr(lm.arch.spec, kind)}"
            module = lm.model.get_submodule(name)
            if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                raise SteerscopeError(
                    f"weightdiff: {lm.model_type}'s {kind} writer {name} is a {type(module).__name__}, not a linear "
                    f"map (transformers {transformers.__version__}); weightdiff reads output projections."
                )
            out.append((layer, name, module))
    return out


def _output_side(module: nn.Module) -> torch.Tensor:
    """The weight as (d_model out, in): nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    w = module.weight.detach().float()
    return w.T if type(module).__name__ == "Conv1D" else w


@DISCOVERY.register("weightdiff", WeightDiffConfig)
def weightdiff(ctx: DiscoveryContext, cfg: WeightDiffConfig) -> Discovered:
    """Top output-side singular vectors of the residual writers' weight differences, both signs."""
    lm, k = ctx.lm, ctx.settings.n_vectors
    base = base_model(ctx, cfg.base, "weightdiff")
    found = []  # (sigma, block, name, u (d,))
    for (layer, name, mod), (_, _, bmod) in zip(residual_writers(lm), residual_writers(base)):
        delta = (_output_side(mod) - _output_side(bmod).to(mod.weight.device)).cpu().double()  # (d, in)
        if float(delta.abs().max()) == 0.0:
            continue
        U, S, _ = torch.linalg.svd(delta, full_matrices=False)  # U (d, r), S (r,)
        for i in range(min(cfg.per_matrix, S.numel())):
            found.append((float(S[i]), layer, name, U[:, i]))
    if not found:
        raise SteerscopeError(
            "weightdiff: the model's residual-writing weights equal the base's; nothing changed there."
        )
    found.sort(key=lambda f: -f[0])
    # (n, d) orthonormal, strongest first; fewer than k / 2 when fewer directions changed
    D, idx = orthonormal_in_order(torch.stack([f[3] for f in found]), cfg.min_new, (k + 1) // 2)
    kept = [{"matrix": found[i][2], "block": found[i][1], "sigma": round(found[i][0], 6)} for i in idx]
    vecs, src = both_signs(D, min(k, 2 * len(D)))
    prov = [{**kept[i], "sign": 1 if j % 2 == 0 else -1} for j, i in enumerate(src)]
    info = {"provenance": prov, "matrices_changed": len({f[2] for f in found}), "at": cfg.at}
    if cfg.at == "source":
        return Discovered((vecs * ctx.R).float(), info=info)
    from ...models.activations import residual_norms

    norms = residual_norms(lm)  # (n_layers,) median resid_post norms
    blocks = [p["block"] for p in prov]
    scale = torch.tensor([ctx.R * float(norms[b] / norms[ctx.layer_range.source]) for b in blocks])  # (K,)
    return Discovered((vecs * scale[:, None]).float(), info={**info, "norms": scale.tolist()}, layers=blocks)
