"""The binding SAE: a TopK SAE whose decoder is restricted to `slots` copies of one base dictionary,
each moved by one shared learned linear map:

    W_dec = [D ; D M_1 ; ... ; D M_{slots-1}]        # (slots * n_base, d_in)
    D   (n_base, d_in)   the slot-1 features, unit rows during training
    M_k (d_in, d_in)     the map taking a slot-1 feature to slot k+1, shared by all features

so latent `s * n_base + i` is feature i "bound" to slot s+1. The encoder (W_enc, b_enc) and the
sparsity rule are TopK's (Gao et al. 2024). Saved in the SAELens layout as a plain TopK SAE with W_dec
materialised, plus D and M_1.. as extra tensors; cfg.json's steerscope section records arch and slots
so `load_saelens` rebuilds the structure (and checks that W_dec equals [D ; D M]).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SteerscopeError
from .archs import SAE_ARCHS, TopK
from .model import SAE


class BindingSAE(SAE):
    """An SAE with the tied slot structure above; `W_dec` is computed from D and M."""

    def _init_decoder(self, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        slots, d = self.cfg.slots, self.cfg.d_in
        n_base = self.cfg.n_latents // slots
        self.D = nn.Parameter(w[:n_base].clone())  # (n_base, d) unit rows
        # M_k starts as a random orthogonal matrix, not the identity: D M_k then has unit rows in
        # random directions, the same distribution as a plain SAE's initial decoder, so each slot
        # starts as an independent dictionary. With M = I every slot-2 latent would start as an
        # exact copy of its slot-1 latent (identical encoder columns and gradients: a symmetry
        # TopK has to break by ties), and M would have to travel far to reach a rotation.
        q = torch.linalg.qr(torch.randn(slots - 1, d, d, generator=g)).Q  # (slots-1, d, d)
        self.M = nn.Parameter(q)
        return self.W_dec.detach().clone()

    @property
    def W_dec(self) -> torch.Tensor:  # (slots * n_base, d)
        return torch.cat([self.D] + [self.D @ m for m in self.M])

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # Only D is constrained: D M_k's row norms are M's business (the encoder absorbs a scale).
        self.D.div_(self.D.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        if self.D.grad is not None:
            self.D.grad -= (self.D.grad * self.D).sum(-1, keepdim=True) * self.D

    @torch.no_grad()
    def divide_decoder_(self, scale: float) -> None:
        self.D.div_(scale)  # W_dec is linear in D, so this divides every slot


@SAE_ARCHS.register("binding")
class Binding(TopK):
    """TopK encoder, decoder W_dec = [D ; D M_1 ; ...] with D and the slot maps M_k learned."""

    saelens = "topk"  # SAELens reads the materialised W_dec as a TopK SAE
    uses_slots = True
    module = BindingSAE

    @staticmethod
    def check(cfg) -> None:
        TopK.check(cfg)
        if cfg.n_latents % cfg.slots:
            raise SteerscopeError(f"binding: n_latents ({cfg.n_latents}) must be a multiple of --slots ({cfg.slots}).")

    @staticmethod
    def extra_tensors(sae):
        return {"D": sae.D} | {f"M_{k + 1}": m for k, m in enumerate(sae.M)}

    @staticmethod
    def load_extra(sae, tensors):
        sae.D.copy_(tensors["D"])
        for k in range(len(sae.M)):
            sae.M[k].copy_(tensors[f"M_{k + 1}"])
        if not torch.allclose(sae.W_dec, tensors["W_dec"], atol=1e-5, rtol=1e-4):
            raise ValueError("W_dec is not [D ; D M_1 ; ...] of the stored D and M")
