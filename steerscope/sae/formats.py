"""SAELens folder layout: `cfg.json` + `sae_weights.safetensors`, one folder per site.

Tensors (float32): W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae), b_dec (d_in), and for
JumpReLU `threshold` (d_sae). cfg.json fields (SAELens names):
    architecture       "topk" (k in cfg), "jumprelu" (BatchTopK's inference form), "standard" (ReLU)
    d_in, d_sae, k     sizes and sparsity
    dtype, device      "float32", "cpu"
    binding            saved as "topk" with W_dec materialised, plus D (n_base, d_in) and M_1.. (d_in, d_in);
                       steerscope.arch "binding" and steerscope.slots rebuild W_dec = [D ; D M_1 ; ...]
    model_name         the model id; hook_name "blocks.{L}.hook_resid_post", hook_layer L
    apply_b_dec_to_input true (x - b_dec is encoded), normalize_activations "none" (the input
                       scaling used in training is folded into the weights)
    steerscope         {model_type, site, layer, version}: what steerscope needs to hook it again
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._io import atomic_dir
from .._version import __version__
from ..errors import SteerscopeError
from .archs import SAE_ARCHS, arch_by_saelens
from .model import SAE, SAEConfig


def save_saelens(sae: SAE, path: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    c = sae.cfg
    cfg = {
        "architecture": c.rule.saelens,
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        "k": c.k if c.rule.uses_k else None,
        "dtype": "float32",
        "device": "cpu",
        "model_name": c.model_id,
        "hook_name": f"blocks.{c.layer}.hook_{c.site}",
        "hook_layer": c.layer,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "steerscope": {
            "model_type": c.model_type,
            "site": c.site,
            "layer": c.layer,
            "version": __version__,
            "k": c.k,
            "l1_coef": c.l1_coef,
            "arch": c.arch,
            "slots": c.slots,
        },
    }
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    tensors.update(c.rule.extra_tensors(sae))
    with atomic_dir(Path(path), overwrite=overwrite) as tmp:
        save_file(
            {k: v.detach().float().contiguous() for k, v in tensors.items()}, str(tmp / "sae_weights.safetensors")
        )
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(path)


def load_saelens(path: str | Path) -> SAE:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
        raise SteerscopeError(f"{path} is not an SAE folder (needs cfg.json and sae_weights.safetensors).")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except ValueError as e:
        raise SteerscopeError(f"{path / 'cfg.json'} is not valid JSON ({e}); the SAE folder is damaged.") from None
    ss = cfg.get("steerscope", {})
    # steerscope's own arch name wins: a binding SAE is SAELens "topk" with a structured decoder
    arch = ss.get("arch") if ss.get("arch") in SAE_ARCHS else arch_by_saelens(cfg.get("architecture"))
    if arch is None:
        known = ", ".join(m.fn.saelens for _, m in SAE_ARCHS.items())
        raise SteerscopeError(f"{path}: architecture {cfg.get('architecture')!r} is not supported ({known}).")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SteerscopeError(
            f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it into the weights."
        )
    layer = ss.get("layer", cfg.get("hook_layer", -1))
    sae = SAE(
        SAEConfig(
            cfg["d_in"],
            cfg["d_sae"],
            arch=arch,
            k=cfg.get("k") or ss.get("k", 32),
            l1_coef=ss.get("l1_coef", 5.0),
            slots=ss.get("slots", 2),
            model_id=cfg.get("model_name", ""),
            model_type=ss.get("model_type", ""),
            layer=layer,
            site=ss.get("site", "resid_post"),
        )
    )
    try:
        t = load_file(str(path / "sae_weights.safetensors"))
        with torch.no_grad():
            own = dict(sae.named_parameters(recurse=False))  # W_dec is computed in a structured decoder
            for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
                if k in own:
                    own[k].copy_(t[k])
            sae.cfg.rule.load_extra(sae, t)
    except Exception as e:  # truncated file, missing tensor, wrong shape
        raise SteerscopeError(
            f"{path / 'sae_weights.safetensors'} does not hold this SAE's weights "
            f"({type(e).__name__}: {str(e)[:120]}); the folder is damaged."
        ) from None
    if not all(bool(torch.isfinite(getattr(sae, k)).all()) for k in ("W_enc", "W_dec", "b_enc", "b_dec")):
        raise SteerscopeError(f"{path}: the SAE weights contain NaN or inf values.")
    return sae.eval()
