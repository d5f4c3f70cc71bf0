"""Null models: copies of a model whose transformer blocks carry no learned structure.

The control asked by "do discovered vectors elicit natural behaviours?": run the same discovery on
a copy of the model whose block weights were destroyed, and compare what the vectors elicit. A
real model's discovered vectors should elicit fluent, coherent text (high log-probability under
the unsteered real model, little repetition); on the null copy the same procedure can only find
artefacts. Embeddings, unembedding and norms are kept, so the copy reads and writes the same
tokens and its residual stream has the same scale.
    shuffle   the entries of every block matrix permuted (per matrix: the same values, so the same
              norm, mean and spread; the structure gone)
    reinit    every block matrix drawn again from N(mean, std) of its own entries
"""

from __future__ import annotations

import copy

import torch

from ..errors import SteerscopeError
from .lm import LM, weights_fingerprint

NULL_KINDS = ("shuffle", "reinit")


@torch.no_grad()
def null_copy(lm: LM, kind: str, seed: int = 0) -> LM:
    """A copy of `lm` with its block matrices shuffled or re-initialised (`lm` is untouched)."""
    if kind not in NULL_KINDS:
        raise SteerscopeError(f"unknown null model {kind!r}; choose {' or '.join(NULL_KINDS)}.")
    if getattr(lm.model, "hf_device_map", None):
        raise SteerscopeError("a null-model control needs the model in one piece; load it without --device-map.")
    out = LM(
        copy.deepcopy(lm.model),
        lm.tokenizer,
        model_id=f"{lm.model_id} [{kind}d blocks]",
        fingerprint="",
        source=lm.source,
    )
    g = torch.Generator().manual_seed(seed)
    n = 0
    for block in out.arch.blocks:
        for p in block.parameters():
            if p.dim() < 2:  # norms and biases keep their values
                continue
            flat = p.detach().reshape(-1).float().cpu()
            if kind == "shuffle":
                new = flat[torch.randperm(flat.numel(), generator=g)]
            else:
                new = torch.randn(flat.numel(), generator=g) * flat.std() + flat.mean()
            p.copy_(new.view(p.shape).to(p.device, p.dtype))
            n += 1
    if n == 0:
        raise SteerscopeError("the model's blocks have no weight matrices to shuffle.")
    out.fingerprint = weights_fingerprint(out.model)
    return out
