"""`steerscope bench`: compare steering methods on shipped or user concepts at matched side effects
(see `jobs.bench`)."""

from dataclasses import dataclass, field

from ..config import Config
from ._registry import command


def bench_config() -> type:
    from ..jobs.bench import BenchConfig

    @dataclass(frozen=True)
    class BenchCommand(Config):
        bench: BenchConfig = field(default_factory=BenchConfig)
        """the bench"""
        out: str = field(default="", metadata={"required": True})
        """bench folder; an existing bench with the same settings resumes"""
        force: bool = False
        """replace an existing bench with different settings"""

    return BenchCommand


@command(
    "bench",
    "compare steering methods on the same concepts at matched side effects, in one report",
    "For each concept (12 shipped, 6 by default, or your JSONL files): make each method's vector, measure "
    "detection AUROC, search each coefficient so the per-token KL to the unsteered model on neutral rollouts hits "
    "the budget, generate on held-out instructions and judge concept, relevance, fluency and selectivity "
    "(offline, or an OpenAI-compatible judge too), A/B steerability where items ship. Writes results.jsonl and "
    "report.html; rerun with the same --out to resume.",
    bench_config,
)
def cmd_bench(cfg) -> int:
    import json
    from pathlib import Path

    from ..jobs.bench import bench

    report = bench(cfg.bench, cfg.out, force=cfg.force)
    rows = [json.loads(l) for l in (Path(cfg.out) / "results.jsonl").read_text().splitlines() if l.strip()]
    score = {}
    for r in rows:
        if r["measure"] == "score" and r.get("multiplier") == 1.0 and r["value"] is not None:
            score.setdefault(r["method"], []).append(r["value"])
    for m, v in sorted(score.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"{m:>11}  mean score {sum(v) / len(v):.3f} over {len(v)} concepts")
    cast: dict = {}
    for r in rows:
        if r["measure"].startswith("cast_"):
            cast.setdefault(r["method"], {}).setdefault((r["variant"], r["measure"][5:]), []).append(r["value"])
    for m, v in cast.items():
        mean = {k: sum(x) / len(x) for k, x in v.items()}
        print(
            f"{m:>11}  conditional: selectivity gated {mean['gated', 'selectivity']:.2f}, ungated "
            f"{mean['ungated', 'selectivity']:.2f}; gate fired on {mean['gated', 'fired_on_topic']:.2f} of on-topic, "
            f"{mean['gated', 'fired_off_topic']:.2f} of off-topic prompts"
        )
    print(f"results: {Path(cfg.out, 'results.jsonl').resolve()}")
    print(f"report: {report.resolve()}")
    return 0
