"""`steerscope refine`: search around good vectors for ones that show a behaviour more, with a
KL penalty on neutral prompts (see `jobs.refine`)."""

from dataclasses import dataclass, field

from ..config import Config
from ._registry import command


def refine_config() -> type:
    from ..jobs.refine import RefineConfig

    @dataclass(frozen=True)
    class RefineCommand(Config):
        refine: RefineConfig = field(default_factory=RefineConfig)
        """the search"""
        out: str = field(default="", metadata={"required": True})
        """refine folder; an existing one with the same settings resumes"""
        force: bool = False
        """replace an existing refine folder with different settings"""

    return RefineCommand


@command(
    "refine",
    "search around good vectors (local ES, CMA-ES, cross-entropy) for a scorer, with a KL penalty",
    "Start from chosen vectors (a folder from `findings --export`, a run's learned set; --ids or the --seeds best) "
    "and search near them, R annealed up and down, for vectors whose completions score higher while the KL to the "
    "unsteered model on neutral prompts stays within budget. One population is one batched generate call. Writes "
    "OUT/vectors (refined), refine.json and report.html (held-out comparison, growth with R, sparsity); rerun to resume.",
    refine_config,
)
def cmd_refine(cfg) -> int:
    import json
    from pathlib import Path

    from ..jobs.refine_job import refine

    report = refine(cfg.refine, cfg.out, force=cfg.force)
    ev = json.loads((Path(cfg.out) / "refine.json").read_text())
    h = ev["heldout"]
    print(
        f"{ev['split']} score: refined {h['refined']['score']:.2f} (KL {h['refined']['kl']:.2f}), seed "
        f"{ev['seed_id']} {h['seed']['score']:.2f} (KL {h['seed']['kl']:.2f}), unsteered {h['unsteered']['score']:.2f}"
    )
    print(f"train fitness: {ev['train']['seed_fitness']:.3f} -> {ev['train']['refined_fitness']:.3f}")
    print(
        f"vectors: {(Path(cfg.out) / 'vectors').resolve()}  (steerscope generate --vector {cfg.out}/vectors --index refined)"
    )
    print(f"report: {report.resolve()}")
    return 0
