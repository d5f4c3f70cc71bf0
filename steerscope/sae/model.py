"""Sparse autoencoders on residual-stream activations.

    pre  = (x - b_dec) W_enc + b_enc                      # (B, n_latents)
    acts = sparsify(pre)                                  # topk | batchtopk | relu
    x_hat = acts W_dec + b_dec                            # W_dec rows: unit norm during training

Architectures:
    topk       keep each row's k largest ReLU pre-activations (Gao et al. 2024), + AuxK loss on
               dead latents (k_aux largest dead pre-activations reconstruct the residual error)
    batchtopk  keep the k * B largest over the whole batch (Bussmann et al. 2024); for inference
               it is saved in JumpReLU form: a latent fires when pre > threshold, the threshold an
               EMA of the smallest activation kept in training, so outputs do not depend on the batch
    relu       ReLU + L1 penalty (the baseline), penalty weighted by decoder row norms
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from ..errors import SteerscopeError

ARCHS = ("topk", "batchtopk", "relu")


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    arch: str = "topk"
    k: int = 32
    k_aux: int = 256
    aux_coef: float = 1 / 32
    l1_coef: float = 5.0  # relu only
    # provenance (SAELens-style fields)
    model_id: str = ""
    model_type: str = ""
    layer: int = -1
    site: str = "resid_post"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SteerscopeError(f"unknown SAE architecture {self.arch!r}; use one of {', '.join(ARCHS)}.")
        if self.arch != "relu" and not 0 < self.k <= self.n_latents:
            raise SteerscopeError(f"k must be in 1..n_latents ({self.n_latents}), got {self.k}.")


class SAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, d_in)
    acts: torch.Tensor  # (B, n) sparse latent activations
    pre: torch.Tensor  # (B, n) pre-activations


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(cfg.n_latents, cfg.d_in, generator=g)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # (n, d) unit rows
        # (d, n): encoder initialised as the decoder's transpose. For ReLU every latent with a
        # positive projection fires at first (about n/2 of them), so the encoder starts at 0.1x
        # (as in Anthropic's April 2024 recipe); at full scale the first reconstructions are ~10x
        # the input and short runs collapse (measured on SmolLM2: FVU 0.99 vs 0.65 at l1=5, 500 steps).
        self.W_enc = nn.Parameter(w.T.clone() * (0.1 if cfg.arch == "relu" else 1.0))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk inference form
        self.inference = False  # batchtopk: JumpReLU with `threshold` instead of batch-level top-k

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(acts, pre), both (B, n)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        r = torch.relu(pre)
        arch, k = self.cfg.arch, self.cfg.k
        if arch == "relu":
            return r, pre
        if arch == "topk" or (arch == "batchtopk" and x.shape[0] == 1 and not self.inference):
            top = r.topk(k, dim=-1)
            return torch.zeros_like(r).scatter(-1, top.indices, top.values), pre
        if self.inference:  # batchtopk saved form: JumpReLU
            return r * (pre > self.threshold), pre
        flat = r.reshape(-1)
        top = flat.topk(min(k * x.shape[0], flat.numel()))
        acts = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(r.shape)
        if self.training:
            with torch.no_grad():  # EMA of the smallest kept positive activation -> inference threshold
                kept = top.values[top.values > 0]
                if kept.numel():
                    m = kept.min()
                    self.threshold.copy_(m if float(self.threshold) == 0 else 0.99 * self.threshold + 0.01 * m)
        return acts, pre

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
