"""README tables of the refusal organism and what is measured on it (rendered by readme_tables.py):

- refusal-organism: refusal_organism.json (`python benchmarks/build_organisms.py refusal --check`)
- cast-refusal: cast_refusal.json (`python benchmarks/cast_refusal.py`)
- cast-france: cast_france_kl{T}.json (`python benchmarks/cast_france.py --target T`, T in FRANCE_TARGETS)
- refusal-pipeline: refusal_pipeline.json (`python benchmarks/refusal_pipeline.py`)
"""

from __future__ import annotations

from pathlib import Path

from benchmarks._tables import TableError, load, pct, table

# What each prompt set of the organism's check is, in the README's words.
REFUSAL_SETS = {
    "val_harmful": "validation harmful (32: held-out acts of the build)",
    "val_harmless": "validation harmless (32)",
    "harmful": "`harmful` (40: extract and select see these)",
    "harmless": "`harmless` (40)",
    "harmful_test": "`harmful_test` (30: held out from everything)",
    "harmless_test": "`harmless_test` (30)",
}


def _hits(c: dict) -> str:
    return f"{pct(c['rate'])} ({c['hits']} of {c['n']})"


def refusal_organism(results: Path) -> str:
    d = load(results, "refusal_organism.json")
    if set(d["sets"]) != set(REFUSAL_SETS):
        raise TableError(f"refusal_organism.json has sets {sorted(d['sets'])}, the table names {sorted(REFUSAL_SETS)}")
    rows = [[REFUSAL_SETS[k], _hits(d["sets"][k]["embedded"]), _hits(d["sets"][k]["organism"])] for k in REFUSAL_SETS]
    return table(["prompts", "embedded model refuses", "organism:refusal refuses"], rows)


def cast_refusal(results: Path) -> str:
    d = load(results, "cast_refusal.json")
    rows = []
    for name, r in d["sets"].items():
        held = "held out" if name.endswith("_test") else "tuning"
        rows.append(
            [f"`{name}` ({held}, {r['n']})", pct(r["unsteered"]), pct(r["ungated"]), pct(r["gated"])]
            + [pct(r["gate_fired"])]
        )
    head = ["prompts", "unsteered", "refusal vector, ungated", "gated (CAST)", "gate fired"]
    return table(head, rows)


FRANCE_TARGETS = (0.5, 2, 4)  # the bench's KL budgets measured (0.5: its default)


def cast_france(results: Path) -> str:
    rows = []
    for t in FRANCE_TARGETS:
        d = load(results, f"cast_france_kl{t:g}.json")
        v, coef = d["values"], d["behaviour"]["coef"]
        for var in ("unsteered", "ungated", "gated"):
            fired = f"{pct(v['gated.fired_on_topic'])} / {pct(v['gated.fired_off_topic'])}" if var == "gated" else ""
            rows.append(
                [f"{t:g} nats (coef {coef:.2f})", var, pct(v[f"{var}.rate_on_topic"]), pct(v[f"{var}.rate_off_topic"])]
                + [f"{v[f'{var}.selectivity']:+.2f}", fired]
            )
    head = [
        "KL budget",
        "variant",
        "French, on-topic (24)",
        "French, off-topic (24)",
        "selectivity",
        "gate fired on / off",
    ]
    return table(head, rows)


def refusal_pipeline(results: Path) -> str:
    d = load(results, "refusal_pipeline.json")
    rows = []
    for c in d["heldout"]["conditions"]:
        coh = (
            "" if c.get("coherence") is None else f"{c['coherence']:+.2f}" + ("" if c["coherent"] else " (incoherent)")
        )
        ex = (c.get("examples") or [{}])[0]
        sample = f"{ex.get('prompt', '')[:48]} → {ex.get('text', '')[:70]}".replace("|", "\\|").replace("\n", " ")
        rows.append([c["name"], f"{c['prompts']}", f"{c['score']:.2f}", coh, sample])
    return table(["held out", "prompts", "refusal", "coherence (nats)", "first example"], rows)


def amplify_zoo(results: Path) -> str:
    """benchmarks/amplify_zoo.py: plant share of base, organism and amplified samples per organism."""
    d = load(results, "amplify_zoo.json")
    rows = [
        [r["organism"], r["split"], r["behaviour"], pct(r["base"]), pct(r["fine_tune"]), pct(r["amplified"])]
        + [f"{r['prompts_hit']} of {d['prompts']}"]
        for r in d["rows"]
    ]
    n = d["prompts"] * d["samples"]
    return table(
        [
            "organism",
            "half",
            "planted behaviour",
            f"base ({n})",
            f"organism ({n})",
            f"amplified ×{d['alpha']:g}",
            "prompts hit",
        ],
        rows,
    )
