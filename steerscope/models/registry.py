"""Architecture registry and typed sites.

Layer convention (the one meaning of "layer L" everywhere in steerscope):
    layer L  =  the residual stream at the OUTPUT of decoder block L  (0-based)
             =  transformers' `hidden_states[L + 1]` for L < n_layers - 1.
transformers applies the final norm to its last `hidden_states` entry, so for the last block the
two differ; steerscope always reads the block output through hooks, never `hidden_states`.

Sites (`Site(layer, kind)`):
    resid_post  output of block L (default; what llama.cpp control vectors steer)
    resid_pre   input of block L (= resid_post of L-1; block 0 input = embeddings)
    attn_out    output of the module that writes attention into the residual stream of block L
    mlp_out     the same for the MLP
For post-norm blocks (gemma2/3, olmo2) the writer is the post-norm, since its output is what is
added to the residual; for the others it is the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from ..errors import LayerError, SteerscopeError, UnknownArchitectureError

SiteKind = Literal["resid_post", "resid_pre", "attn_out", "mlp_out"]
SITE_KINDS: tuple[str, ...] = ("resid_post", "resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths for one architecture.

    `base` is the decoder stack that receives `input_ids`/`attention_mask`; `layers` the
    ModuleList of blocks; `attn_out`/`mlp_out` are relative to a block; `embed` and `final_norm`
    are relative to the top model.
    """

    base: str
    layers: str
    embed: str
    attn_out: str
    mlp_out: str
    final_norm: str
    lm_head: str = "lm_head"


_LLAMA_LIKE = ArchSpec(
    base="model",
    layers="model.layers",
    embed="model.embed_tokens",
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
)
_POST_NORM = ArchSpec(
    base="model",
    layers="model.layers",
    embed="model.embed_tokens",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    final_norm="model.norm",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "olmo2": _POST_NORM,
    "gpt2": ArchSpec(
        base="transformer",
        layers="transformer.h",
        embed="transformer.wte",
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": ArchSpec(
        base="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
    ),
}


def register_architecture(model_type: str, spec: ArchSpec, *, replace: bool = False) -> None:
    """Teach steerscope a new `config.model_type`. Example::

    register_architecture("mymodel", ArchSpec(base="model", layers="model.layers",
        embed="model.embed_tokens", attn_out="self_attn.o_proj", mlp_out="mlp.down_proj",
        final_norm="model.norm"))
    """
    if model_type in ARCHITECTURES and not replace:
        raise SteerscopeError(f"architecture {model_type!r} is already registered; pass replace=True to override it.")
    ARCHITECTURES[model_type] = spec


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(part)
        mod = getattr(mod, part)
    return mod


@dataclass(frozen=True)
class Site:
    """A place in the residual stream: `Site(layer=12)` is the output of block 12."""

    layer: int
    kind: SiteKind = "resid_post"


class Arch:
    """An `ArchSpec` resolved once against one model instance."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        spec = ARCHITECTURES.get(model_type)
        if spec is None:
            raise UnknownArchitectureError(
                f"unknown architecture {model_type!r}; known: {', '.join(sorted(ARCHITECTURES))}. "
                "Register it with steerscope.models.register_architecture("
                f"{model_type!r}, ArchSpec(base=..., layers=..., embed=..., attn_out=..., mlp_out=..., final_norm=...))."
            )
        self.model_type: str = model_type
        self.spec = spec
        try:
            self.base = _get(model, spec.base)
            self.blocks: nn.ModuleList = _get(model, spec.layers)  # type: ignore[assignment]
            self.embed = _get(model, spec.embed)
            self.final_norm = _get(model, spec.final_norm)
            self.attn_out = [_get(b, spec.attn_out) for b in self.blocks]
            self.mlp_out = [_get(b, spec.mlp_out) for b in self.blocks]
        except AttributeError as e:
            raise UnknownArchitectureError(
                f"the registered layout for {model_type!r} does not match this model (no submodule {e}); "
                "this transformers version may have renamed it; re-register with register_architecture(..., replace=True)."
            ) from None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> int:
        """Return `layer` if valid (negative counts from the end), else raise listing the range."""
        n = self.n_layers
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise LayerError(f"layer must be an int in 0..{n - 1}, got {layer!r}.")
        if not -n <= layer < n:
            raise LayerError(
                f"layer {layer} is out of range: this model has {n} layers, valid layers are 0..{n - 1} (or -{n}..-1)."
            )
        return layer % n

    def resolve(self, site: Site) -> tuple[nn.Module, Literal["pre", "post"]]:
        """The module to hook for `site` and whether the hook is a forward pre-hook or a forward hook."""
        layer = self.check_layer(site.layer)
        if site.kind == "resid_post":
            return self.blocks[layer], "post"
        if site.kind == "resid_pre":
            return self.blocks[layer], "pre"
        if site.kind == "attn_out":
            return self.attn_out[layer], "post"
        if site.kind == "mlp_out":
            return self.mlp_out[layer], "post"
        raise SteerscopeError(f"unknown site kind {site.kind!r}; valid kinds: {', '.join(SITE_KINDS)}.")
