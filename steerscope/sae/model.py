"""Sparse autoencoders on residual-stream activations.

pre  = (x - b_dec) W_enc + b_enc                      # (B, n_latents)
acts = sparsify(pre)                                  # the architecture's rule (`sae.archs`)
x_hat = acts W_dec + b_dec                            # W_dec rows: unit norm during training
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import Config
from ..errors import SteerscopeError
from .archs import SAE_ARCHS


@dataclass(frozen=True)
class SAEConfig(Config):
    """An SAE's shape and architecture, and where it reads."""

    d_in: int = field(metadata={"cli": False})
    """width of the activations it reads (the model's d_model)"""
    n_latents: int = field(default=4096, metadata={"min": 1})
    """number of latents (dictionary size)"""
    arch: str = field(default="topk", metadata={"choices": SAE_ARCHS})
    """architecture"""
    k: int = field(default=32, metadata={"min": 1})
    """active latents per token (topk, batchtopk)"""
    k_aux: int = field(default=256, metadata={"min": 1})
    """dead latents used by the AuxK loss"""
    aux_coef: float = field(default=1 / 32, metadata={"min": 0})
    """weight of the AuxK loss"""
    l1_coef: float = field(default=5.0, metadata={"min": 0})
    """L1 coefficient lambda (relu; Anthropic's April 2024 recipe uses ~5)"""
    slots: int = field(default=2, metadata={"min": 2})
    """binding: dictionary slots, n_latents = slots x n_base (W_dec = [D ; D M_1 ; ...])"""
    model_id: str = field(default="", metadata={"cli": False})
    """the model it was trained on (SAELens `model_name`)"""
    model_type: str = field(default="", metadata={"cli": False})
    """that model's config.model_type"""
    layer: int = field(default=-1, metadata={"cli": False})
    """the layer it reads"""
    site: str = field(default="resid_post", metadata={"cli": False})
    """the site it reads at that layer"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_in < 1 or self.n_latents < 1:
            raise SteerscopeError(f"an SAE needs d_in >= 1 and n_latents >= 1, got {self.d_in} and {self.n_latents}.")
        if self.slots != 2 and not self.rule.uses_slots:
            raise SteerscopeError(f"--slots applies only to --arch binding, not {self.arch}.")
        SAE_ARCHS.get(self.arch).fn.check(self)

    @property
    def rule(self):
        """The architecture class from `SAE_ARCHS`."""
        return SAE_ARCHS.get(self.arch).fn


class SAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, d_in)
    acts: torch.Tensor  # (B, n) sparse latent activations
    pre: torch.Tensor  # (B, n) pre-activations


class SAE(nn.Module):
    def __new__(cls, cfg: SAEConfig | None = None, *args, **kwargs):
        # An architecture with a structured decoder (binding: W_dec = [D ; D M]) has its own subclass
        # (`Arch.module`); SAE(cfg) builds it, so the trainer and the loader need no special case.
        sub = cfg.rule.module if isinstance(cfg, SAEConfig) else None
        if sub is not None and not issubclass(cls, sub):
            cls = sub
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(cfg.n_latents, cfg.d_in, generator=g)
        w = self._init_decoder(w / w.norm(dim=-1, keepdim=True), g)  # (n, d) unit rows
        # (d, n): encoder initialised as (a multiple of) the decoder's transpose
        self.W_enc = nn.Parameter(w.T.clone() * cfg.rule.init_scale)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk inference form
        self.inference = False  # batchtopk: JumpReLU with `threshold` instead of batch-level top-k

    def _init_decoder(self, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Register the decoder's parameters from unit rows `w` (n, d); returns the (n, d) decoder."""
        self.W_dec = nn.Parameter(w)
        return w

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(acts, pre), both (B, n)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return self.cfg.rule.encode(self, x, pre), pre

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        acts, pre = self.encode(x)
        return SAEOutput(self.decode(acts), acts, pre)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row, so a step keeps the rows
        (nearly) unit norm; `normalize_decoder` after the step removes the rest."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def divide_decoder_(self, scale: float) -> None:
        """Divide the decoder by `scale` in place (folding the input scale)."""
        self.W_dec.div_(scale)

    def aux_loss(self, x: torch.Tensor, out: SAEOutput, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024, A.2): the k_aux largest pre-activations among dead latents
        reconstruct the residual error; normalised by the error's variance."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        err = x - out.recon.detach()
        pre = torch.relu(out.pre).masked_fill(~dead, 0.0)
        top = pre.topk(min(self.cfg.k_aux, n_dead), dim=-1)
        rec = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ self.W_dec
        return (err - rec).square().sum(-1).mean() / err.square().sum(-1).mean().clamp_min(1e-12)
