"""`steerscope distill`: a steering vector distilled into a LoRA adapter (see `adapters.distill`)."""

from dataclasses import dataclass, field

from ..errors import SteerscopeError
from ._registry import command, pick_index, say, with_model


def distill_config() -> type:
    from ..adapters.distill import DistillConfig

    @dataclass(frozen=True)
    class DistillCommand(with_model()):
        vector: str = field(default="", metadata={"required": True})
        """a saved vector-set folder"""
        index: str | None = field(default=None, metadata={"none": "first"})
        """which vector of the set, by index or id"""
        distill: DistillConfig = field(default_factory=DistillConfig)
        """the distillation"""
        out: str = field(default="", metadata={"required": True})
        """adapter folder: adapter_config.json + adapter_model.safetensors (PEFT) + distill.json"""
        merged: str | None = field(default=None, metadata={"none": "none"})
        """also write the model with the adapter merged in, as a Hugging Face checkpoint folder"""
        force: bool = False
        """overwrite --out / --merged"""
        allow_other_model: bool = False
        """use vectors whose model fingerprint differs"""

    return DistillCommand


@command(
    "distill",
    "distil a steering vector into a LoRA adapter (PEFT) and compare it with the vector",
    "Train a LoRA adapter that reproduces the steered model (KL to the steered model on steered completions, "
    "KL to the unsteered model on neutral rollouts), save it with peft, and report on held-out prompts how much "
    "of the steering it reproduces and its side effects next to the vector's.",
    distill_config,
)
def cmd_distill(cfg) -> int:
    from pathlib import Path

    from .._io import refuse_existing
    from ..adapters.distill import distill, merge_adapter
    from ..directions.vectors import VectorSet

    refuse_existing(Path(cfg.out), cfg.force)
    if cfg.merged:
        refuse_existing(Path(cfg.merged), cfg.force)
    lm = cfg.model.load()
    vs = VectorSet.load(cfg.vector, lm, check_model=not cfg.allow_other_model)
    sv = vs[pick_index(cfg.index)] if cfg.index is not None else vs[0]
    if len(vs) > 1 and cfg.index is None:
        say(f"distilling the first vector of {len(vs)} ({sv.id}); choose another with --index")
    res = distill(lm, sv.vector, sv.layer, cfg.out, cfg.distill, source=f"{cfg.vector}#{sv.id}", force=cfg.force)
    ev = res["evaluation"]
    print(f"adapter saved to {cfg.out}")
    print(
        f"held-out: KL(steered || unsteered) {ev['heldout_kl_steered_vs_unsteered']:.3f} -> KL(steered || adapter) "
        f"{ev['heldout_kl_steered_vs_adapter']:.3f} ({100 * ev['reproduced_share']:.0f} % reproduced); greedy-token "
        f"agreement with the steered model {100 * ev['heldout_token_agreement_adapter']:.0f} % "
        f"(unsteered {100 * ev['heldout_token_agreement_unsteered']:.0f} %)"
    )
    print(
        f"side effects on neutral rollouts: KL(unsteered || adapter) {ev['neutral_kl_unsteered_vs_adapter']:.3f} vs "
        f"KL(unsteered || vector) {ev['neutral_kl_unsteered_vs_vector']:.3f}"
    )
    if cfg.merged:
        merge_adapter(lm, cfg.out, cfg.merged, force=cfg.force)
        print(f"merged checkpoint saved to {cfg.merged} (load it with --model {cfg.merged})")
    if not ev["reproduced_share"] > 0:
        raise SteerscopeError("the adapter did not reproduce any of the steering; raise --steps or --lr.")
    return 0
