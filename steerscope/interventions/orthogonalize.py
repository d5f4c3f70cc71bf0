"""Weight orthogonalisation (Arditi et al. 2024, sec. 4.1): bake "ablate r everywhere" into the
weights by projecting r out of every matrix that writes to the residual stream,

    W_out <- W_out - r r^T W_out      (and b <- b - r r^T b)

for the token (and position) embeddings, every attention output projection and every MLP output
projection. The edited model's logits equal those of `Ablate(r)` through hooks on the original.

Exact only where every residual writer is linear: llama, mistral, qwen2, qwen3, gemma, phi3,
gpt2, gpt_neox. gemma2/gemma3/olmo2 apply a norm (with an elementwise gain) after the projection,
and no weight edit removes a direction from a norm's output; those raise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from .._io import atomic_dir
from .._tensors import as_rows
from ..errors import SteerscopeError

_LINEAR_WRITERS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox"}


def _project_out(module: nn.Module, r: torch.Tensor) -> None:
    """In place on a *copy* of the model: remove r from the module's output space."""
    from transformers.pytorch_utils import Conv1D

    W = module.weight
    if W.device.type == "meta":
        raise SteerscopeError(
            "weight orthogonalisation needs every weight in memory, but this model offloads some to "
            "disk; load it without disk offload (e.g. --device-map auto with enough --max-memory)."
        )
    r64 = r.to(W.device, torch.float64)  # each weight on its own device when the model is split
    w = W.data.to(torch.float64)
    if isinstance(module, nn.Embedding):  # (vocab, d): rows are written to the stream
        w = w - torch.outer(w @ r64, r64)
    elif isinstance(module, Conv1D):  # gpt2 stores (in, out)
        w = w - torch.outer(w @ r64, r64)
    elif isinstance(module, nn.Linear):  # (out = d, in)
        w = w - torch.outer(r64, r64 @ w)
    else:
        raise SteerscopeError(
            f"cannot orthogonalise a {type(module).__name__}; only Linear, Conv1D and Embedding writers are supported."
        )
    W.data.copy_(w.to(W.dtype))
    b = getattr(module, "bias", None)
    if b is not None and not isinstance(module, nn.Embedding):
        b64 = b.data.to(torch.float64)
        b.data.copy_((b64 - r64 * (r64 @ b64)).to(b.dtype))


def orthogonalized_model(lm, direction) -> nn.Module:
    """A deep copy of `lm.model` with `direction` projected out of every residual writer."""
    if lm.model_type not in _LINEAR_WRITERS:
        raise SteerscopeError(
            f"weight orthogonalisation is not exact for {lm.model_type}: its residual writers are post-norms; "
            f"use Ablate(direction) through hooks instead (exact for: {', '.join(sorted(_LINEAR_WRITERS))})."
        )
    r = as_rows(direction, lm.d_model, "direction", unit=True)[0].to(lm.device)
    model = copy.deepcopy(lm.model)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        # Tied embeddings (e.g. SmolLM2): the unembedding must keep the original weights.
        out_emb.weight = nn.Parameter(in_emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    blocks = model.get_submodule(lm.arch.spec.layers)
    writers = (
        [in_emb]
        + [b.get_submodule(lm.arch.spec.attn_out) for b in blocks]
        + [b.get_submodule(lm.arch.spec.mlp_out) for b in blocks]
    )
    if lm.model_type == "gpt2":
        writers.append(model.get_submodule("transformer.wpe"))  # learned positions are added to the stream too
    with torch.no_grad():
        for m in writers:
            _project_out(m, r)
    return model


def save_orthogonalized(lm, direction, out: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face checkpoint folder (safetensors, config, tokenizer) of the edited model."""
    model = orthogonalized_model(lm, direction)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return Path(out)
