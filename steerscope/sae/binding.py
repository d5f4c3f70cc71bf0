"""The binding SAE: a TopK SAE whose decoder is restricted to `slots` copies of one base dictionary,
each moved by one shared learned linear map:

    W_dec = [D ; D M_1 ; ... ; D M_{slots-1}]        # (slots * n_base, d_in)
    D   (n_base, d_in)   the slot-1 features, unit rows during training
    M_k (d_in, d_in)     the map taking a slot-1 feature to slot k+1, shared by all features

so latent `s * n_base + i` is feature i "bound" to slot s+1. The encoder (W_enc, b_enc) and the
sparsity rule are TopK's (Gao et al. 2024). Saved in the SAELens layout as a plain TopK SAE with W_dec
materialised, plus D and M_1.. as extra tensors; cfg.json's steerscope section records arch and slots
so `load_saelens` rebuilds the structure (and checks that W_dec equals [D ; D M]).

Finding M. From its random start gradient descent does not find a planted M* (tests/test_sae_binding.py):
which slot-2 atom pairs with which slot-1 atom is a combinatorial choice the gradient cannot make.
`TrainConfig.binding_init = "icp"` makes it from data instead: a plain TopK SAE of the same size is
trained first; its atom set, which holds both slots, is registered onto itself: the orthogonal map R
under which the best-matched half of the atoms lands on the other half (ICP, Besl & McKay 1992, each
step refitting R by orthogonal Procrustes, Schonemann 1966, from many random starts; the start with
the best mean match wins). D starts as that half, M_1 as R. The restarts search O(d) at random, so
it finds M* on one of three seeds at d = 16 (benchmarks/binding_warm_start.py) and is not expected to
scale to d in the hundreds (untried).
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


@torch.no_grad()
def icp_slot_map(W: torch.Tensor, n_base: int, restarts: int, iters: int = 10, seed: int = 0):
    """The orthogonal R (d, d) under which n_base of the atoms W (N, d) land best on other atoms,
    from `restarts` random starts; returns (R, source atom indices (n_base,), score = their mean cosine)."""
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d, eye = W.shape[1], torch.eye(len(W), dtype=torch.bool, device=W.device)
    chunk = max(1, min(2000, 2**24 // (d * d + len(W) ** 2)))  # starts per batch: ~0.2 GB of float32 at most
    g = torch.Generator().manual_seed(seed)
    best = (-2.0, None, None)
    for r in range(0, restarts, chunk):
        R = torch.linalg.qr(torch.randn(min(chunk, restarts - r), d, d, generator=g)).Q.to(W)  # (r, d, d)
        for it in range(iters + 1):
            S = torch.einsum("nd,rde,me->rnm", W, R, W).masked_fill(eye, -2.0)  # (r, N, N): cos(a R, b)
            match, tgt = S.max(-1)  # (r, N): each atom's best image match
            score, src = match.topk(n_base, -1)  # (r, n_base): the best-matched atoms are the sources
            if it == iters:
                break
            a, b = W[src], W[tgt.gather(1, src)]  # (r, n_base, d)
            u, _, vh = torch.linalg.svd(a.transpose(1, 2) @ b)
            R = u @ vh  # Procrustes: the orthogonal map minimising ||a R - b||
        i = int(score.mean(-1).argmax())
        if float(score[i].mean()) > best[0]:
            best = (float(score[i].mean()), R[i], src[i])
    return best[1], best[2], best[0]


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
    def warm_start(sae, batches, tcfg) -> None:
        if tcfg.binding_init != "icp":
            return
        from .train import train_sae

        cfg = sae.cfg
        plain = cfg.replace(arch="topk", slots=2)
        warm, _ = train_sae(batches, plain, tcfg.replace(steps=tcfg.binding_warm_steps, binding_init="random"))
        W = warm.W_dec.detach().cpu()
        n_base = cfg.n_latents // cfg.slots
        R, src, _ = icp_slot_map(W, n_base, tcfg.binding_restarts, seed=tcfg.seed)
        with torch.no_grad():
            sae.D.copy_(W[src] / W[src].norm(dim=-1, keepdim=True))
            sae.M[0].copy_(R)  # M_2.. (slots > 2) keep their random start
            sae.W_enc.copy_(sae.W_dec.T * cfg.rule.init_scale)  # the encoder starts as the decoder's transpose

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
