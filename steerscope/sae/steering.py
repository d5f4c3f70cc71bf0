"""Steering with SAE features: a decoder row as a SteeringVector, and feature clamping.

`ClampFeature` sets one latent's activation to `value` at the SAE's site while KEEPING the SAE's
reconstruction error: x' = decode(acts') + (x - decode(acts)) = x + (value - a_i) W_dec[i].
Replacing x by the reconstruction alone would throw away what the SAE misses, and an edit
computed without the error term can be cancelled by it (SAELens `use_error_term`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..interventions.ops import INTERVENTIONS, Intervention
from ..models.registry import Site
from .model import SAE


def feature_vectors(lm, sae: SAE, features: list[int], *, unit: bool = True) -> VectorSet:
    """Decoder rows of `features` as a VectorSet at the SAE's layer (unit norm by default, so
    `coef` is the steering magnitude; sweep it with `generate(..., coef=[...])`)."""
    n = sae.cfg.n_latents
    bad = [f for f in features if not 0 <= f < n]
    if bad:
        raise SteerscopeError(f"features {bad} are outside 0..{n - 1}.")
    rows = sae.W_dec.detach()[features].float()
    if unit:
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return VectorSet.create(
        lm,
        rows,
        sae.cfg.layer,
        "sae_feature",
        ids=[f"feature-{f}" for f in features],
        hyperparams={"sae_arch": sae.cfg.arch, "n_latents": n, "features": features, "unit": unit},
        site=sae.cfg.site,
    )


@INTERVENTIONS.register("sae_clamp")
@dataclass
class ClampFeature(Intervention):
    """Set SAE latent `feature` to `value` at the SAE's site, keeping the SAE's error term."""

    sae: SAE
    feature: int
    value: float
    layer: int | None = field(default=None)  # default: the SAE's layer

    def sites(self, lm) -> list[Site]:
        layer = self.sae.cfg.layer if self.layer is None else self.layer
        return [Site(lm.check_layer(layer), self.sae.cfg.site)]  # type: ignore[arg-type]

    def hook_specs(self, lm, state) -> list:
        sae, i, value = self.sae, self.feature, float(self.value)
        if sae.cfg.d_in != lm.d_model:
            raise SteerscopeError(
                f"the SAE reads {sae.cfg.d_in}-dim activations but this model's d_model is {lm.d_model}."
            )
        if not 0 <= i < sae.cfg.n_latents:
            raise SteerscopeError(f"feature {i} is outside 0..{sae.cfg.n_latents - 1}.")
        positions = self.positions
        sae.to(lm.device)  # the SAE runs where the activations are

        def apply(x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
            if next(sae.parameters()).device != x.device:  # the SAE's block sits on another device
                sae.to(x.device)
            flat = x.reshape(-1, x.shape[-1]).float()
            acts, _ = sae.encode(flat)
            delta = (value - acts[:, i])[:, None] * sae.W_dec[i].float()  # decode(acts') - decode(acts)
            new = x + delta.reshape(x.shape).to(x.dtype)
            sel = state.selection(positions, x.device)
            return new if sel is None else torch.where(sel, new, x)

        return [(*lm.arch.resolve(s), apply) for s in self.sites(lm)]
