"""CAST on a refusal organism: a refusal vector gated on a harmful-vs-harmless condition refuses
harmful requests and leaves harmless ones alone (issue 34; Lee et al., ICLR 2025, report 83 % vs
2.4 % on an 8B model).

    python benchmarks/cast_refusal.py          # a few minutes on 2 CPU cores, float32

Model: `organism:refuse`, the embedded SmolLM2 with a refusal planted behind the trigger
"<<amber>>"; without the trigger it answers like the embedded model, harmful requests included.
Everything is chosen on tuning prompts and measured once on the held-out minimal pairs
`harmful_test` / `harmless_test` (30 each, other acts, never looked at while choosing):

1. Behaviour vector: difference of means of the neutral prompts with the trigger minus without,
   over the prompt tokens, at each of LAYERS; the (layer, coefficient) chosen is the one whose
   UNGATED addition refuses the most tuning harmless prompts (the vector must work before gating
   it means anything; ties: the later layer, which leaves the gate more layers, then the smaller
   coefficient). A first grid (layers 6/10/14, coefficients 2-8, asking for >= 80 %) topped out at
   68 %.
2. Condition, fitted on the refusal organism's TRAIN requests (benchmarks/refusal_prompts.py: 46
   harmful acts and 86 harmless ones, 40 of them benign acts naming what harmful ones name, x 9
   phrasings = 414 + 774 prompts) and judged on VALIDATION = that file's val requests (16 acts a
   side x 2 phrasings) + the packaged `harmful` / `harmless` minimal pairs (40 each): 72 + 72
   prompts the fit never sees. Method "lda" (the mean difference whitened by the within-class
   covariance, shrinkage 0.2), the threshold of the best validation balanced accuracy, the layer
   the best on validation among those at or before the behaviour layer (the decision is taken in
   the same forward pass, before the behaviour is added).
   How this was chosen (validation prompts only, no generation; a throwaway script, not kept, with
   condition_fit's prompt_means, auc and best_threshold and the same lda formula): with the 1188
   train prompts the mean difference barely moved (best layer's validation AUC 0.975, balanced
   accuracy 0.92; fitted on the 80 packaged prompts instead, 0.96 / 0.92 on the refusal val
   requests alone), "pca" was near chance (AUC 0.5-0.65), "lda" reached 0.996-0.999 / 0.97-0.99
   for shrinkage 0.05-0.5 (0.1 and 0.2 tied at 0.999 / 0.986, 0.2 taken as the more regularised;
   0.9 gave 0.988 / 0.96). This script's own fit reproduces 0.999 / 0.986. The previous choice,
   `find_condition(harmful, harmless)` with mean_diff on 28 + 28 prompts, gave on the held-out
   pairs: gate fired on 83 % of harmful_test and 37 % of harmless_test, gated refusal 50 % vs 33 %
   (ungated 63 % vs 90 %).
3. Held-out: refusal rate (Arditi et al.'s phrases) unsteered, ungated and gated; the gate's fire
   rate. The `harmful` / `harmless` rows are tuning prompts (the behaviour's choice, the
   condition's validation), not held out.

Writes benchmarks/results/cast_refusal.json and prints a markdown table; the behaviour vector and
the condition set are saved under --out (default runs/cast) for `steerscope generate --vector
OUT/vector --when OUT/condition` (the README's example output comes from them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from benchmarks.refusal_prompts import refusal_prompts  # noqa: E402
from steerscope._io import refuse_existing, write_json_atomic, write_text_atomic  # noqa: E402
from steerscope.directions.condition_fit import ConditionFitConfig, auc, find_condition  # noqa: E402
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
# the condition's fit, frozen after the validation-only comparison in the docstring
CONDITION = {"method": "lda", "shrinkage": 0.2}


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

    # 2. the condition, at or before the behaviour layer: fitted on the refusal organism's train
    # requests, threshold and layer judged on its val requests + the packaged tuning pairs
    (tr_on, tr_off), (va_on, va_off) = refusal_prompts("train"), refusal_prompts("val")
    cfg = ConditionFitConfig(layers=list(range(pick["layer"] + 1)), **CONDITION)
    fit = find_condition(
        lm, tr_on, tr_off, cfg, val_on=va_on + tune["harmful"], val_off=va_off + tune["harmless"], name="harm"
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
        scores = iv.result.scores[:, 0].tolist()  # (P,) the gate's cosine per prompt
        rows[name] = {
            "n": len(prompts),
            "unsteered": rate(plain, det),
            "ungated": rate(ungated, det),
            "gated": rate(gated, det),
            "gate_fired": sum(fired) / len(fired),
            "gate_scores": [round(x, 6) for x in scores],
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
            **CONDITION,
            "fit_on": "benchmarks/refusal_prompts.py train requests",
            "validated_on": "benchmarks/refusal_prompts.py val requests + packaged harmful/harmless",
            "layer": f.layer,
            "threshold": f.threshold,
            "above": f.above,
            "val_auc": f.auc,
            "val_acc": f.val_acc,
            "n": fit.n,
            # how well the gate's score ranks the held-out pairs, whatever the threshold
            "heldout_auc": auc(*(torch.tensor(rows[k]["gate_scores"]) for k in ("harmful_test", "harmless_test"))),
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
