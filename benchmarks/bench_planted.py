"""Does the default `steerscope run` find a planted behaviour? For each model organism
(steerscope.models.organisms) and each discovery method, run exactly what a new user would:

    steerscope run --model organism:NAME --method METHOD --out DIR

(no other knob; `--method` is left out for the default method) and report, from the run folder:
  learned   share of learned vectors whose completions show the behaviour (the organism's detector
            fires on at least half of the vector's completions, train and held-out prompts)
  random    the same for the matched-norm random vectors
  sig       whether the planted behaviour is a significant finding (a finding most of whose
            completions show it, with q <= the run's --alpha under the null model)
  rank      its rank among the significant findings (1 = the report's first), "-" if none
  nsig      how many significant findings the run reported; on the embedded model (--baseline),
            where nothing is planted, every one is a false positive
  wall      wall-clock seconds of the whole command (model load, discovery, generation, metrics, report)
Organisms are split (models.organisms): `--split tune` for the half defaults may be chosen on,
`--split heldout` for the half that only measures them; the halves are reported apart.
Targets (issue 32, float32): on the held-out half the planted behaviour is a significant finding in
the top 3 for >= 80 % of organisms and random = 0 %; at most 1 significant finding on the embedded
model; wall <= 180 s.

    python benchmarks/bench_planted.py                        # every organism x method
    python benchmarks/bench_planted.py --organisms french --methods dct melbo
    python benchmarks/bench_planted.py --methods default --seeds 0 1 2 -- --dtype bfloat16
    python benchmarks/bench_planted.py --methods default --baseline   # + the embedded model, no plant
    python benchmarks/bench_planted.py --methods melbo --baseline only
    python benchmarks/bench_planted.py --methods default --split heldout --baseline -- --dtype float32
Results go to benchmarks/results/planted.json (and the run folders under --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.organisms import ORGANISMS, SPLITS, ZOO  # noqa: E402

METHODS = ["default", "dct", "melbo", "jacobian", "random", "pca"]  # default: kl


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


VERSIONS = _versions()  # the runs are subprocesses of this same environment


def measure(run: Path, org) -> dict:
    detect = parse_metric(org.detector, None).fn  # text metrics need no model
    det = lambda text: bool(detect([text])[0])  # noqa: E731
    rows = [json.loads(l) for l in (run / "completions.jsonl").read_text().splitlines() if l.strip()]
    metrics = json.loads((run / "metrics.json").read_text())
    per_vec: dict[str, list[bool]] = {}
    for r in rows:
        if r["vector_id"] is not None:
            per_vec.setdefault(r["vector_id"], []).append(det(r["text"]))
    shows = {v: sum(h) >= len(h) / 2 for v, h in per_vec.items()}
    share = {
        s: sum(shows[v] for v, k in metrics["sets"].items() if k == s)
        / max(1, sum(k == s for k in metrics["sets"].values()))
        for s in ("learned", "random")
    }
    unsteered = [det(r["text"]) for r in rows if r["vector_id"] is None]
    found = metrics.get("findings") or []
    sig = [f for f in found if f.get("significant", True)]  # a run from before the null model: all of them
    planted = lambda f: sum(det(rows[i]["text"]) for i in f["rows"]) > len(f["rows"]) / 2  # noqa: E731
    rank = next((k + 1 for k, f in enumerate(sig) if planted(f)), None)
    cand = next((f for f in found if planted(f)), None)  # significant or not: how close it came
    cal = json.loads((run / "calibration.json").read_text())
    return {
        "learned": share["learned"],
        "random": share["random"],
        "unsteered": sum(unsteered) / max(1, len(unsteered)),
        "significant": rank is not None,
        "rank": rank,
        "top3": rank is not None and rank <= 3,
        "n_significant": len(sig),
        "findings": len(found),
        "planted_candidate": {k: cand[k] for k in ("q", "n_vectors", "reason") if k in cand} if cand else None,
        "top_finding_is_planted": bool(sig) and planted(sig[0]),
        "R": cal["chosen"],
        "R_multiple": cal["chosen"] / cal["calibrated"] if cal.get("calibrated") else None,
        "vectors_showing": sorted(v for v, s in shows.items() if s and metrics["sets"][v] == "learned"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organisms", nargs="*", default=None, help="default: every organism of --split")
    ap.add_argument(
        "--split",
        choices=["tune", "heldout", "all"],
        default="all",
        help="which half of the zoo (models.organisms SPLITS)",
    )
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--out", default="runs/planted")
    ap.add_argument("--results", default="benchmarks/results/planted.json")
    ap.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=[0],
        help="discovery seeds (--seed); one run each: how much a single run's share is luck",
    )
    ap.add_argument(
        "--baseline",
        nargs="?",
        const="also",
        choices=["also", "only"],
        help="also (or only) run each method and seed on the embedded model (no plant) and apply every "
        "organism's detector",
    )
    ap.add_argument(
        "extra", nargs=argparse.REMAINDER, help="after --: more flags for every run (not the default setting)"
    )
    a = ap.parse_args()
    if a.organisms is None:
        a.organisms = list(ZOO) if a.split == "all" else SPLITS[a.split]
    unknown = sorted(set(a.organisms) - set(ORGANISMS))
    if unknown:
        print(f"unknown organism(s) {', '.join(unknown)}; pick from {', '.join(ORGANISMS)}", file=sys.stderr)
        sys.exit(2)
    extra = [x for x in a.extra if x != "--"]
    slug = "".join(f"-{x.lstrip('-')}" for x in extra).replace("/", "_")  # flags in the folder name: no clobbering
    exe = shutil.which("steerscope") or str(Path(sys.executable).with_name("steerscope"))
    results = []
    print(
        f"{'organism':14s} {'split':7s} {'method':9s} {'seed':>4s} {'learned':>8s} {'random':>7s} {'unsteer':>8s} "
        f"{'sig':>5s} {'rank':>4s} {'nsig':>4s} {'R(xcal)':>8s} {'wall s':>7s}"
    )

    def save() -> None:
        """Merge with earlier invocations (a rerun of one row replaces that row only); after every run,
        so a killed benchmark keeps what it measured."""
        out = Path(a.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(out.read_text())["results"] if out.is_file() else []
        key = lambda r: (r["organism"], r.get("model", "organism"), r["method"], r.get("seed", 0))  # noqa: E731
        done = {key(r) for r in results}
        merged = [r for r in old if key(r) not in done] + results
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_command": " ".join(sys.argv), "results": merged}, indent=2) + "\n")
        tmp.replace(out)

    def one(model: str | None, tag: str, method: str, seed: int, orgs: list[str]) -> None:
        """One run (`model` None: the embedded model) measured with each organism's detector."""
        label = " ".join([method, *extra])  # one row per (organism, model, method and flags, seed)
        run = Path(a.out) / f"{tag}-{method}{slug}" if seed == 0 else Path(a.out) / f"{tag}-{method}{slug}-seed{seed}"
        cmd = [exe, "run", "--out", str(run), "--force"] + (["--model", model] if model else [])
        if method != "default":
            cmd += ["--method", method]
        cmd += extra + (["--seed", str(seed)] if seed else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        for name in orgs:
            org, where = ORGANISMS[name], "organism" if model else "embedded (no plant)"
            if proc.returncode:
                print(f"{name:10s} {method:9s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                results.append(
                    {
                        "organism": name,
                        "model": where,
                        "method": label,
                        "seed": seed,
                        "error": proc.stderr[-2000:],
                        "wall_s": wall,
                    }
                )
                continue
            r = {
                "organism": name,
                "model": where,
                "method": label,
                "seed": seed,
                "behaviour": org.behaviour,
                "kind": org.kind,
                "split": org.split,
                "wall_s": round(wall, 1),
                **measure(run, org),
                "versions": VERSIONS,
                "measured": time.strftime("%Y-%m-%d"),
            }
            results.append(r)
            mult = f"{r['R_multiple']:.2g}" if r["R_multiple"] else "given"
            shown = name if model else f"{name}@base"
            print(
                f"{shown:14s} {org.split:7s} {method:9s} {seed:4d} {r['learned']:8.0%} {r['random']:7.0%} "
                f"{r['unsteered']:8.0%} {str(r['significant']):>5s} {r['rank'] or '-':>4} {r['n_significant']:4d} "
                f"{mult:>8s} {wall:7.0f}",
                flush=True,
            )
        save()

    for name in a.organisms if a.baseline != "only" else []:
        for method, seed in [(m, s) for m in a.methods for s in a.seeds]:
            one(f"organism:{name}", name, method, seed, [name])
    if a.baseline:
        # The same runs on the embedded model, which has no plant: how often does discovery elicit
        # each organism's behaviour anyway? What a method finds on an organism beyond this rate is
        # the plant, not a mode the model already had.
        for method, seed in [(m, s) for m in a.methods for s in a.seeds]:
            one(None, "embedded", method, seed, a.organisms)
    print(f"wrote {a.results}")


if __name__ == "__main__":
    main()
