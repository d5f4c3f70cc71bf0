"""The README's audit table (benchmarks/bench_audit.py -> results/audit.json), rendered by
benchmarks/readme_tables.py and printed by bench_audit itself: one home for its format."""

from __future__ import annotations

from pathlib import Path

from benchmarks._tables import load, table

METHODS = ["finetune", "weightdiff", "actdiff", "base", "sample", "amplify"]
SPLITS = ("tune", "heldout", None)  # None: the embedded model audited against itself


def _cell(x: dict, clean: bool) -> str:
    if x.get("status") != "ran":
        return x.get("status", "—")
    if clean:
        return f"{x['nsig']} sig"
    if x["hit"]:
        return f"**#{x['rank']}**"
    return f"#{x['rank']} (of {x['nsig']})" if x["sig"] else f"no ({x['nsig']} sig)"


def rows_table(results: list[dict]) -> str:
    rows = []
    for split in SPLITS:
        got = [r for r in results if r.get("split") == split]
        for r in got:
            if "error" in r:
                rows.append([r["organism"], split or "—", "failed"] + [""] * (len(METHODS) + 1))
                continue
            cells = [_cell(r["methods"].get(m, {}), split is None) for m in METHODS + ["audit"]]
            rows.append([r["organism"], split or "—", *cells, f"{r['wall_s']:.0f} s"])
        ok = [r for r in got if "methods" in r]
        if split and ok:
            rate = [
                f"{sum(r['methods'].get(m, {}).get('hit', False) for r in ok)} / {len(ok)}" for m in METHODS + ["audit"]
            ]
            rows.append([f"**{split} half: planted, significant, top 3**", "", *rate, ""])
    head = ["organism", "half", *METHODS, "audit (merged)", "wall"]
    return table(head, rows)


def audit_bench(results: Path) -> str:
    return rows_table(load(results, "audit.json")["results"])
