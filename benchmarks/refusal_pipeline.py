"""The refusal pipeline as a new user runs it, on a model that really refuses (issue 36).

    python benchmarks/refusal_pipeline.py                 # organism:refusal, float32, ~10-15 min on 2 CPU cores
    python benchmarks/refusal_pipeline.py --model embedded --out /tmp/p   # any other model

Runs the two default commands in subprocesses, exactly as the README shows them, and nothing else:

    steerscope extract --model M --sets harmful harmless --read last:3 --out OUT/vec
    steerscope select  --model M --vector OUT/vec --mode ablate --metric refusal --a harmful --b harmless \\
                       --test harmful_test harmless_test --plot OUT/select.html --table OUT/select.json

`harmful`/`harmless` (40 each) are what extract and select see; `harmful_test`/`harmless_test` (30
minimal pairs about other acts) only the held-out evaluation; the organism was trained on neither
(benchmarks/build_organisms.py). Prints the held-out table (baseline / ablation / orthogonalised on
harmful_test, baseline / addition on harmless_test, with coherence and examples), the targets, wall
time per command and the peak RSS of each (ru_maxrss of the child), and writes
benchmarks/results/refusal_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from steerscope._io import write_json_atomic  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "refusal_pipeline.json"
# Issue 36's targets: held-out refusal after ablation, coherent; held-out refusal induced by addition.
ABLATION_AT_MOST, ADDITION_AT_LEAST, MINUTES_AT_MOST = 0.10, 0.6, 15


def run(cmd: list[str]) -> dict:
    """Run one CLI command; its wall time and peak RSS (the largest child so far: each command is
    the only child running, and they grow, so the second reading is the second command's own)."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "steerscope", *cmd], check=True)
    return {
        "command": "steerscope " + " ".join(cmd),
        "wall_s": round(time.perf_counter() - t0, 1),
        "max_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism:refusal")
    ap.add_argument("--out", default="runs/refusal-pipeline", help="folder for the vectors, table and plot")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        sys.exit(f"{out} exists; remove it or give another --out")
    m = ["--model", a.model]
    steps = [
        run(["extract", *m, "--sets", "harmful", "harmless", "--read", "last:3", "--out", str(out / "vec")]),
        run(
            ["select", *m, "--vector", str(out / "vec"), "--mode", "ablate", "--metric", "refusal"]
            + ["--a", "harmful", "--b", "harmless", "--test", "harmful_test", "harmless_test"]
            + ["--plot", str(out / "select.html"), "--table", str(out / "select.json")]
        ),
    ]
    table = json.loads((out / "select.json").read_text())
    ho = table.get("heldout") or {}
    rows = {c["name"]: c for c in ho.get("conditions", [])}
    wall = sum(s["wall_s"] for s in steps)
    best = table.get("best")
    chosen = None if best is None else table["candidates"][best].get("id")

    def score(name: str) -> float | None:
        return rows[name]["score"] if name in rows else None

    abl, add = score("ablation"), score("addition")
    coherent = bool(rows.get("ablation", {}).get("coherent"))
    targets = {
        f"ablation on harmful_test <= {ABLATION_AT_MOST}, coherent": abl is not None
        and abl <= ABLATION_AT_MOST
        and coherent,
        f"addition on harmless_test >= {ADDITION_AT_LEAST}": add is not None and add >= ADDITION_AT_LEAST,
        f"whole pipeline <= {MINUTES_AT_MOST} min": wall <= 60 * MINUTES_AT_MOST,
    }
    print(f"\nchosen: {chosen} (budget {table.get('kl_budget')}, rule {table.get('kl_rule')})")
    print("| condition | prompts | refusal | log-prob | coherence |")
    print("|---|---|---|---|---|")
    for c in ho.get("conditions", []):
        coh = (
            "" if c.get("coherence") is None else f"{c['coherence']:+.2f}" + ("" if c["coherent"] else " (incoherent)")
        )
        print(f"| {c['name']} | {c['prompts']} | {c['score']:.2f} | {c['logprob']:.2f} | {coh} |")
    for k, ok in targets.items():
        print(f"{'met ' if ok else 'MISS'}  {k}")
    for s in steps:
        print(f"{s['wall_s']:7.1f} s  peak RSS {s['max_rss_mb_children']} MB  {s['command']}")
    write_json_atomic(
        RESULT,
        {
            "model": a.model,
            "steps": steps,
            "wall_s": round(wall, 1),
            "chosen": chosen,
            "kl_budget": table.get("kl_budget"),
            "kl_rule": table.get("kl_rule"),
            "heldout": ho,
            "targets": targets,
            "dtype": "float32",
            "command": " ".join(["python", "benchmarks/refusal_pipeline.py", *sys.argv[1:]]),
            "machine": machine(),
            "versions": versions(),
            "measured": time.strftime("%Y-%m-%d"),
        },
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
