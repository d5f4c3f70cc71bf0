"""The methods `steerscope bench` compares: the `BENCH_METHODS` family.

Each method is `fn(ctx, concept) -> Arm`: a steering vector at a layer (matched to the KL budget
by the bench), a system prompt (prompting), or a LoRA adapter (distillation). A method that
cannot run for a concept returns `Arm.skip(reason)`, which the report shows instead of a number.
    diffmean     mean(positives) - mean(negatives) at the bench layer (ActAdd / CAA)
    pca          top principal component of the centred train activations (repeng's pca_center:
                 the concept texts are not paired, so PCA of differences does not apply)
    probe        logistic-regression probe weights
    sae          the SAE feature (decoder row) with the largest effect on the concept at the
                 matched KL, among the features most active on positives vs negatives
                 (Arad et al. 2025: rank by output effect, not input activation); needs --sae
    discovered   the discovered vector (DCT by default, or --discovered) nearest to the concept's
                 diffmean direction (cosine, either sign)
    prompting    a system prompt asking for the concept (no strength to match; its KL is reported)
    distill      a LoRA adapter trained on the steered generations of the concept's best vector
                 (highest choose-split concept rate at the matched KL), `adapters.distill`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Family
from ..directions.data import from_sets
from ..directions.extract import ExtractConfig, extract

BENCH_METHODS: Family = Family("bench_methods", "bench method")
VECTOR_METHODS = ("diffmean", "pca", "probe", "sae", "discovered")


@dataclass
class Arm:
    method: str
    kind: str  # "vector" | "prompt" | "adapter" | "skip"
    vector: torch.Tensor | None = None  # (d_model,)
    layer: int | None = None
    system: str | None = None
    adapter: str | None = None  # folder of a PEFT adapter
    info: dict[str, Any] = field(default_factory=dict)
    detector: Callable[[list[str]], list[float]] | None = None  # texts -> scores; default: max projection

    @classmethod
    def skip(cls, method: str, reason: str) -> Arm:
        return cls(method, "skip", info={"skipped": reason})


def _extract(ctx, concept, method: str) -> torch.Tensor:
    data = from_sets(concept.pos("train"), concept.neg("train"), name=concept.name)
    vs = extract(
        ctx.lm, data, ExtractConfig(method=method, layers=[ctx.layer], chat=False, stats=False), progress=False
    )
    return vs[0].vector.float()


@BENCH_METHODS.register("diffmean")
def diffmean_arm(ctx, concept) -> Arm:
    """mean(positives) - mean(negatives) at the bench layer (ActAdd / CAA)."""
    return Arm("diffmean", "vector", _extract(ctx, concept, "diffmean"), ctx.layer)


@BENCH_METHODS.register("pca")
def pca_arm(ctx, concept) -> Arm:
    """Top principal component of the centred train activations, signed and scaled like diffmean."""
    return Arm("pca", "vector", _extract(ctx, concept, "pca_center"), ctx.layer, info={"extractor": "pca_center"})


@BENCH_METHODS.register("probe")
def probe_arm(ctx, concept) -> Arm:
    """Logistic-regression probe weights, signed and scaled like diffmean."""
    return Arm("probe", "vector", _extract(ctx, concept, "probe"), ctx.layer)


@torch.no_grad()
def _sae_acts(lm, sae, texts: list[str]) -> torch.Tensor:
    """(n, n_latents) max-over-tokens latent activations (first token skipped, as in detection)."""
    from ..models.activations import read_layer

    out = []
    for i in range(0, len(texts), 16):
        enc = lm.encode(texts[i : i + 16], chat=False)
        h = read_layer(lm, sae.cfg.layer, enc["input_ids"], enc["attention_mask"]).float()  # (B, T, d)
        acts = sae.encode(h.to(next(sae.parameters()).device))[0]  # (B, T, n_latents)
        valid = enc["attention_mask"].bool().to(acts.device)
        valid[:, :] &= valid.long().cumsum(-1) > 1  # skip each text's first token
        out.append(acts.masked_fill(~valid[..., None], 0.0).amax(1).cpu())
    return torch.cat(out)


@BENCH_METHODS.register("sae")
def sae_arm(ctx, concept) -> Arm:
    """The SAE feature whose decoder row moves the concept most at the matched KL."""
    sae = ctx.sae
    if sae is None:
        return Arm.skip("sae", "no SAE given (--sae DIR, e.g. one trained with `steerscope sae train`)")
    diff = _sae_acts(ctx.lm, sae, concept.pos("train")).mean(0) - _sae_acts(ctx.lm, sae, concept.neg("train")).mean(0)
    cands = diff.topk(ctx.cfg.sae_candidates).indices.tolist()
    # rank by output effect: concept score of steered completions at the matched KL
    dirs = [sae.W_dec.detach()[f].float().cpu() for f in cands]
    dirs = [d / d.norm() for d in dirs]
    effects = ctx.output_effects(concept, dirs, sae.cfg.layer)
    i = max(range(len(cands)), key=lambda j: effects[j])
    f, d = cands[i], dirs[i]
    layer = sae.cfg.layer

    def detector(texts: list[str]) -> list[float]:
        return _sae_acts(ctx.lm, sae, texts)[:, f].tolist()

    return Arm(
        "sae",
        "vector",
        d * float(diff[f].clamp_min(1e-6)),
        layer,
        info={
            "feature": f,
            "candidates": cands,
            "choose_effects": [round(e, 4) for e in effects],
            "activation_gap": float(diff[f]),
        },
        detector=detector,
    )


@BENCH_METHODS.register("discovered")
def discovered_arm(ctx, concept) -> Arm:
    """The discovered vector (either sign) nearest the concept's diffmean direction."""
    vs = ctx.discovered
    if vs is None or len(vs) == 0:
        return Arm.skip("discovered", "no discovered vectors")
    ref = _extract(ctx, concept, "diffmean")
    best = None
    for sv in vs:
        v = sv.vector.float()
        cos = float(v @ ref / (v.norm() * ref.norm()).clamp_min(1e-12))
        for sign in (1, -1):
            if best is None or sign * cos > best[0]:
                best = (sign * cos, sign, sv)
    cos, sign, sv = best
    return Arm(
        "discovered",
        "vector",
        sign * sv.vector.float(),
        sv.layer,
        info={
            "vector_id": sv.id,
            "sign": sign,
            "cosine_to_diffmean": round(cos, 4),
            "pool": len(vs),
            "method": vs.config.method,
        },
    )


@BENCH_METHODS.register("prompting")
def prompting_arm(ctx, concept) -> Arm:
    """A system prompt asking for the concept."""
    return Arm("prompting", "prompt", system=concept.system_prompt)


@BENCH_METHODS.register("distill")
def distill_arm(ctx, concept) -> Arm:
    """A LoRA adapter distilled from the best vector; trained by the bench after the vector arms
    (it needs their results), so this only announces the arm."""
    return Arm("distill", "adapter")
