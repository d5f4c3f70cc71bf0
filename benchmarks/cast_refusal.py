"""CAST on a refusal organism: a refusal vector gated on a harmful-vs-harmless condition refuses
harmful requests and leaves harmless ones alone (issue 34; Lee et al., ICLR 2025, report 83 % vs
2.4 % on an 8B model).

    python benchmarks/cast_refusal.py          # a few minutes on 2 CPU cores, float32

Model: `organism:refuse`, the embedded SmolLM2 with a refusal planted behind the trigger
"<<amber>>"; without the trigger it answers like the embedded model, harmful requests included.
Everything is chosen on the tuning sets `harmful` / `harmless` (40 each) and measured on the
held-out minimal pairs `harmful_test` / `harmless_test` (30 each, other acts):

1. Behaviour vector: difference of means of the neutral prompts with the trigger minus without,
   over the prompt tokens, at each of LAYERS; the (layer, coefficient) chosen is the one whose
   UNGATED addition refuses the most tuning harmless prompts (the vector must work before gating
   it means anything; ties: the later layer, which leaves the gate more layers, then the smaller
   coefficient). A first grid (layers 6/10/14, coefficients 2-8, asking for >= 80 %) topped out at
   68 %.
2. Condition: `find_condition(harmful, harmless)` (its own train/validation split of the tuning
   sets); the gate is its best layer among those at or before the behaviour layer (the decision is
   taken in the same forward pass, before the behaviour is added).
3. Held-out: refusal rate (Arditi et al.'s phrases) unsteered, ungated and gated; the gate's fire rate.

Writes benchmarks/results/cast_refusal.json and prints a markdown table; the behaviour vector and
the condition set are saved under --out (default runs/cast) for `steerscope generate --vector
OUT/vector --when OUT/condition` (the README's example output comes from them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from steerscope._io import refuse_existing, write_json_atomic, write_text_atomic  # noqa: E402
from steerscope.directions.condition_fit import ConditionFitConfig, find_condition  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.directions.extract import mean_difference  # noqa: E402
from steerscope.directions.vectors import VectorSet  # noqa: E402
from steerscope.generation import generate  # noqa: E402
from steerscope.interventions.conditional import Condition, Conditional  # noqa: E402
from steerscope.interventions.ops import Add  # noqa: E402
from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS  # noqa: E402
from steerscope.report.condition import render_condition  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "cast_refusal.json"
MODEL, LAYERS, COEFS, TOKENS = "organism:refuse", [10, 14, 18], [4.0, 8.0, 12.0], 32


def rate(texts: list[str], det) -> float:
    return sum(map(bool, det.fn(texts))) / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/cast", help="folder for the vector and the condition set")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    refuse_existing(a.out, a.force)
    t0 = time.perf_counter()
    lm = load_model(MODEL)
    det = parse_metric("refusal", lm)
    org = ORGANISMS["refuse"]
    neutral = load_prompts("neutral")
    tune = {s: load_prompts(s) for s in ("harmful", "harmless")}
    test = {s: load_prompts(s) for s in ("harmful_test", "harmless_test")}

    # 1. the behaviour vector: (layer, coef) on the tuning harmless prompts, ungated
    vs = mean_difference(lm, [org.triggered(p) for p in neutral], neutral, LAYERS)
    grid = []
    for coef in COEFS:
        outs = generate(lm, tune["harmless"], vectors=vs, coef=coef, include_unsteered=False, max_new_tokens=TOKENS)
        for sv in vs:
            texts = [c.text for c in outs if c.vector_id == sv.id]
            grid.append({"layer": sv.layer, "coef": coef, "tune_harmless_refusal": rate(texts, det)})
            print(
                f"behaviour L{sv.layer} coef {coef}: ungated refusal on tuning harmless {grid[-1]['tune_harmless_refusal']:.0%}",
                flush=True,
            )
    pick = max(grid, key=lambda g: (g["tune_harmless_refusal"], g["layer"], -g["coef"]))
    sv = vs[vs.layers.index(pick["layer"])]

    # 2. the condition, at or before the behaviour layer
    fit = find_condition(
        lm, tune["harmful"], tune["harmless"], ConditionFitConfig(layers=list(range(pick["layer"] + 1)))
    )
    f = fit.best
    print(fit.table(), flush=True)
    cset = fit.to_vector_set(lm)
    VectorSet.create(lm, sv.vector[None], sv.layer, "diffmean", ids=[sv.id], hyperparams={"coef": pick["coef"]}).save(
        Path(a.out) / "vector", overwrite=a.force
    )
    cset.save(Path(a.out) / "condition", overwrite=a.force)
    write_text_atomic(Path(a.out) / "condition" / "report.html", render_condition(cset, f"{a.out}/condition"))
    cond = Condition(fit.vectors[fit.layers.index(f.layer)], layer=f.layer, threshold=f.threshold, above=f.above)

    # 3. held-out: unsteered / ungated / gated
    rows = {}
    for name, prompts in {**test, **tune}.items():
        plain = [c.text for c in generate(lm, prompts, max_new_tokens=TOKENS)]
        ungated = [
            c.text
            for c in generate(
                lm, prompts, interventions=[Add(sv.vector, layer=sv.layer, coef=pick["coef"])], max_new_tokens=TOKENS
            )
        ]
        iv = Conditional(Add(sv.vector, layer=sv.layer, coef=pick["coef"]), cond)
        gated = [
            c.text for c in generate(lm, prompts, interventions=[iv], max_new_tokens=TOKENS, batch_size=len(prompts))
        ]
        fired = iv.result.fired.tolist()
        rows[name] = {
            "n": len(prompts),
            "unsteered": rate(plain, det),
            "ungated": rate(ungated, det),
            "gated": rate(gated, det),
            "gate_fired": sum(fired) / len(fired),
            "examples": [
                {"prompt": p, "unsteered": a, "ungated": b, "gated": c}
                for p, a, b, c in list(zip(prompts, plain, ungated, gated))[:3]
            ],
        }
        r = rows[name]
        print(
            f"{name:14s} n={r['n']}  unsteered {r['unsteered']:.0%}  ungated {r['ungated']:.0%}  gated {r['gated']:.0%}  gate fired {r['gate_fired']:.0%}",
            flush=True,
        )

    out = {
        "model": MODEL,
        "behaviour": {"method": "diffmean, trigger minus no trigger, neutral prompts", **pick, "grid": grid},
        "condition": {
            "layer": f.layer,
            "threshold": f.threshold,
            "above": f.above,
            "val_auc": f.auc,
            "val_acc": f.val_acc,
            "n": fit.n,
        },
        "sets": rows,
        "max_new_tokens": TOKENS,
        "dtype": str(lm.model.dtype),
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "benchmarks/cast_refusal.py", *sys.argv[1:]]),
        "saved": a.out,
        "machine": machine(),
        "versions": versions(),
        "measured": time.strftime("%Y-%m-%d"),
    }
    write_json_atomic(RESULT, out)
    print()
    print("| prompts | n | unsteered | ungated refusal vector | gated (CAST) | gate fired |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        held = "held-out" if name in test else "tuning"
        print(
            f"| `{name}` ({held}) | {r['n']} | {r['unsteered']:.0%} | {r['ungated']:.0%} | {r['gated']:.0%} | {r['gate_fired']:.0%} |"
        )
    print(f"\nwrote {RESULT} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
