"""SAE architectures, registered in the `SAE_ARCHS` family (one class each, the same shape as every
method family). An architecture says how pre-activations become sparse codes, what the training
loss is, how it is initialised, and how it is written in the SAELens layout.

    topk       keep each row's k largest ReLU pre-activations (Gao et al. 2024), + AuxK loss on
               dead latents (k_aux largest dead pre-activations reconstruct the residual error)
    batchtopk  keep the k * B largest over the whole batch (Bussmann et al. 2024); for inference
               it is saved in JumpReLU form: a latent fires when pre > threshold, the threshold an
               EMA of the smallest activation kept in training, so outputs do not depend on the batch
    relu       ReLU + L1 penalty (the baseline), penalty weighted by decoder row norms
    binding    TopK with a tied decoder W_dec = [D ; D M_1 ; ...]: slot s of feature i is D_i moved by
               one shared learned map M_s (`sae.binding`; its own SAE subclass through `Arch.module`)

A new architecture is one class here (or in its own file) with `@SAE_ARCHS.register(name)`; the
SAE tests iterate over the family.
"""

from __future__ import annotations

import torch

from ..config import Family
from ..errors import SteerscopeError

SAE_ARCHS: Family = Family("sae_archs", "SAE architecture")


class Arch:
    """Defaults shared by the architectures."""

    saelens = ""  # the SAELens `architecture` name
    init_scale = 1.0  # encoder initialised as init_scale x the decoder's transpose
    uses_k = True
    uses_slots = False
    module = None  # an SAE subclass for a structured decoder (binding), else the plain SAE

    @staticmethod
    def check(cfg) -> None:
        if not 0 < cfg.k <= cfg.n_latents:
            raise SteerscopeError(f"k must be in 1..n_latents ({cfg.n_latents}), got {cfg.k}.")

    @staticmethod
    def encode(sae, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def loss(sae, x, out, err, fvu, step: int, tcfg, dead: torch.Tensor) -> torch.Tensor:
        """FVU + AuxK on dead latents (TopK-style architectures)."""
        return fvu + sae.cfg.aux_coef * sae.aux_loss(x, out, dead)

    @staticmethod
    def warm_start(sae, batches, tcfg) -> None:
        """Called before training from scratch: may set initial weights from the first batches."""

    @staticmethod
    def finish(sae) -> None:
        """Called when training ends (e.g. switch to the inference form)."""

    @staticmethod
    def extra_tensors(sae) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def load_extra(sae, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _row_topk(r: torch.Tensor, k: int) -> torch.Tensor:
    top = r.topk(k, dim=-1)
    return torch.zeros_like(r).scatter(-1, top.indices, top.values)


@SAE_ARCHS.register("topk")
class TopK(Arch):
    """Each token keeps its k largest ReLU pre-activations (Gao et al. 2024)."""

    saelens = "topk"

    @staticmethod
    def encode(sae, x, pre):
        return _row_topk(torch.relu(pre), sae.cfg.k)


@SAE_ARCHS.register("batchtopk")
class BatchTopK(Arch):
    """The k x B largest over the batch (Bussmann et al. 2024); saved as JumpReLU."""

    saelens = "jumprelu"

    @staticmethod
    def encode(sae, x, pre):
        r = torch.relu(pre)
        if sae.inference:  # the saved form: JumpReLU with the learned threshold
            return r * (pre > sae.threshold)
        if x.shape[0] == 1:
            return _row_topk(r, sae.cfg.k)
        flat = r.reshape(-1)
        top = flat.topk(min(sae.cfg.k * x.shape[0], flat.numel()))
        acts = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(r.shape)
        if sae.training:
            with torch.no_grad():  # EMA of the smallest kept positive activation -> inference threshold
                kept = top.values[top.values > 0]
                if kept.numel():
                    m = kept.min()
                    sae.threshold.copy_(m if float(sae.threshold) == 0 else 0.99 * sae.threshold + 0.01 * m)
        return acts

    @staticmethod
    def finish(sae) -> None:
        sae.inference = True

    @staticmethod
    def extra_tensors(sae):
        return {"threshold": sae.threshold.expand(sae.cfg.n_latents)}

    @staticmethod
    def load_extra(sae, tensors):
        thr = tensors["threshold"]
        sae.threshold.copy_(thr.reshape(-1)[0] if thr.numel() else torch.zeros(()))
        sae.inference = True


@SAE_ARCHS.register("relu")
class ReLU(Arch):
    """ReLU + L1 (Anthropic's April 2024 recipe): the baseline."""

    saelens = "standard"
    # Every latent with a positive projection fires at first (about n/2 of them), so the encoder
    # starts at 0.1x (as in that recipe); at full scale the first reconstructions are ~10x the
    # input and short runs collapse (measured on SmolLM2: FVU 0.99 vs 0.65 at l1=5, 500 steps).
    init_scale = 0.1
    uses_k = False

    @staticmethod
    def check(cfg) -> None:
        pass

    @staticmethod
    def encode(sae, x, pre):
        return torch.relu(pre)

    @staticmethod
    def loss(sae, x, out, err, fvu, step, tcfg, dead):
        l1_w = sae.cfg.l1_coef * min(1.0, (step + 1) / max(1, int(tcfg.l1_warmup_frac * tcfg.steps)))
        # ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i|| on inputs scaled to E||x|| = sqrt(d_in),
        # lambda ~ 5. Both terms are divided by d_in, which only sets the gradient scale, so l1_coef
        # means the same lambda as in that recipe.
        return (err.mean() + l1_w * (out.acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()) / sae.cfg.d_in


def arch_by_saelens(name: str | None) -> str | None:
    return next((n for n, m in SAE_ARCHS.items() if m.fn.saelens == name), None)
