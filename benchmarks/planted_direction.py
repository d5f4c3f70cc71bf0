"""Why does discovery miss a planted behaviour? Measure the behaviour's own direction against the
discovery objective.

For each model organism (steerscope.models.organisms), with the trigger known (which discovery is
not told):
  1. the trigger direction u at the source layer the default run uses: the mean over prompt
     tokens of (activation with the trigger - without it), on 16 neutral prompts that the default
     run never uses (its train/held-out prompts are the first four);
  2. does u elicit the behaviour? the organism's detector on greedy completions of 4 other
     prompts, with u added at several multiples of the calibrated R;
  3. how does u score under the objective DCT/MELBO maximise, the norm of the mean change at the
     target layer's last 3 tokens on the run's 2 training prompts, next to the default run's 8
     DCT factors and 32 random directions of the same norm (all at the calibrated R)? And how
     close (|cosine|) do the DCT factors come to u? The same norms after per-dimension whitening
     are printed too.
If u elicits the behaviour but its objective value is near the random ones while the DCT factors
score several times higher, a norm-of-change objective ranks the planted direction low, and more
steps or more factors of the same objective will not find it.
  4. the same three (u, DCT factors, random) under the output-KL objective of discovery method
     `kl` (the run default): mean KL of the next-token distributions along the unsteered reply.

    python benchmarks/planted_direction.py [--organisms french caps] [--targets 16 22 26 29]
    python benchmarks/planted_direction.py --organisms refuse --source 16   # another source layer
Results: benchmarks/results/planted_direction.json (one entry per organism and source layer; a run replaces its own)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.directions.discovery import DiscoverConfig, calibrate_R, discover  # noqa: E402
from steerscope.directions.discovery.baselines import random_directions  # noqa: E402
from steerscope.directions.discovery.dct import _delta_bar  # noqa: E402
from steerscope.directions.discovery.kl import KLConfig, output_kl_objective  # noqa: E402
from steerscope.generation import generate  # noqa: E402
from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.activations import collect_activations  # noqa: E402
from steerscope.models.layer_range import LayerRange  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS, ZOO  # noqa: E402


def trigger_direction(lm, org, prompts: list[str], layer: int) -> torch.Tensor:
    """(d,) unit mean-over-tokens difference, triggered minus plain, at the output of `layer`."""
    a = collect_activations(lm, [org.triggered(p) for p in prompts], [layer], read="mean", chat=True)
    b = collect_activations(lm, prompts, [layer], read="mean", chat=True)
    d = (a - b).mean((0, 1))[0].float()  # (d,)
    return d / d.norm()


def measure(name: str, targets: list[int], multiples: list[float], source: int | None = None) -> dict:
    org = ORGANISMS[name]
    lm = load_model(f"organism:{name}")
    P = load_prompts("neutral")
    train, fit, test = P[:2], P[8:24], P[24:28]  # the run's training prompts; u's prompts; elicitation prompts
    cfg = DiscoverConfig.of("dct", n_vectors=8, source=source)
    s, t_default = cfg.resolve_layers(lm.n_layers)
    targets = [t for t in targets if t > s]
    u = trigger_direction(lm, org, fit, s)
    det = parse_metric(org.detector, lm).fn
    lr_ = LayerRange(lm, train, s, t_default)
    R0, _ = calibrate_R(lr_, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=cfg.seed)
    elicit = {}
    for m in multiples:
        texts = [
            c.text
            for c in generate(lm, test, vectors=(u * R0 * m)[None], layer=s, include_unsteered=False, max_new_tokens=32)
        ]
        elicit[m] = sum(map(bool, det(texts))) / len(texts)
        print(
            f"{name}: u at {m:g} x R ({R0 * m:.1f}): behaviour in {elicit[m]:.0%} of completions | {texts[0][:60]!r}",
            flush=True,
        )
    dct = discover(lm, train, dataclasses.replace(cfg, R=R0), layer_range=lr_, progress=False).vectors  # (8, d)
    V = dct / dct.norm(dim=-1, keepdim=True)
    rand = random_directions(32, lm.d_model, 3)
    rows = []
    for t in targets:
        lt = lr_ if t == t_default else LayerRange(lm, train, s, t)
        mask = lt.target_mask(cfg.target_tokens)
        # Per-dimension whitening: a change in units of each dimension's spread over the prompts'
        # tokens, so a few massive-activation dimensions cannot dominate the norm.
        sd = lt.z_target[lt.valid].float().std(0).clamp_min(1e-3)  # (d,)
        with torch.no_grad():
            f = lambda th, lt=lt, mask=mask: _delta_bar(lt, mask, R0 * th).norm(dim=-1)  # noqa: E731
            fw = lambda th, lt=lt, mask=mask, sd=sd: (_delta_bar(lt, mask, R0 * th) / sd).norm(dim=-1)  # noqa: E731
            fu, fd, fr = float(f(u[None])), f(V), f(rand)
            wu, wd, wr = float(fw(u[None])), fw(V), fw(rand)
        row = {
            "target": t,
            "trigger": round(fu, 2),
            "dct_median": round(float(fd.median()), 2),
            "dct_max": round(float(fd.max()), 2),
            "random_median": round(float(fr.median()), 2),
            "random_max": round(float(fr.max()), 2),
        }
        row["trigger_over_random"] = round(fu / row["random_median"], 2)
        row["dct_median_over_random"] = round(row["dct_median"] / row["random_median"], 2)
        row["whitened"] = {
            "trigger": round(wu, 2),
            "dct_median": round(float(wd.median()), 2),
            "random_median": round(float(wr.median()), 2),
        }
        rows.append(row)
        print(
            f"{name}: target {t}: |mean change| trigger {fu:.1f}, DCT median {row['dct_median']:.1f} "
            f"(max {row['dct_max']:.1f}), random median {row['random_median']:.1f} (max {row['random_max']:.1f}); "
            f"whitened {wu:.1f} / {float(wd.median()):.1f} / {float(wr.median()):.1f}",
            flush=True,
        )
    # The output-KL objective (discovery method `kl`, the run default) on the same training
    # prompts: mean KL of the next-token distributions along the unsteered greedy reply.
    okl = output_kl_objective(lm, lr_, KLConfig().reply_tokens, cfg.target_tokens)
    with torch.no_grad():
        ku, kd, kr = float(okl(R0 * u[None])), okl(R0 * V), okl(R0 * rand)
    kl_row = {
        "trigger": round(ku, 3),
        "dct_median": round(float(kd.median()), 3),
        "dct_max": round(float(kd.max()), 3),
        "random_median": round(float(kr.median()), 3),
        "random_max": round(float(kr.max()), 3),
        "trigger_over_random": round(ku / float(kr.median()), 1),
    }
    print(
        f"{name}: output KL (nats): trigger {ku:.3f}, DCT median {kl_row['dct_median']:.3f} (max {kl_row['dct_max']:.3f}), "
        f"random median {kl_row['random_median']:.3f} (max {kl_row['random_max']:.3f})",
        flush=True,
    )
    cos = (V @ u).abs()
    return {
        "organism": name,
        "source": s,
        "default_target": t_default,
        "R_calibrated": round(R0, 2),
        "elicits": {str(k): v for k, v in elicit.items()},
        "objective": rows,
        "output_kl": kl_row,
        "dct_max_abs_cosine_with_trigger": round(float(cos.max()), 3),
        "random_abs_cosine_scale": round(1 / lm.d_model**0.5, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organisms", nargs="*", default=list(ZOO))
    ap.add_argument("--targets", nargs="*", type=int, default=[16, 22, 26, 29])
    ap.add_argument("--multiples", nargs="*", type=float, default=[0.5, 1.0, 1.5, 2.0])
    ap.add_argument(
        "--source",
        type=int,
        default=None,
        help="source layer for u, the vectors and the objectives (default: round(n_layers / 4), dct's)",
    )
    ap.add_argument("--results", default="benchmarks/results/planted_direction.json")
    a = ap.parse_args()
    out = Path(a.results)
    # One entry per organism and source layer: a run replaces its own entries and keeps the others.
    old = json.loads(out.read_text()) if out.is_file() else {}
    results = [dict(r, command=r.get("command", old.get("command"))) for r in old.get("results", [])]
    for n in a.organisms:
        t0 = time.perf_counter()
        r = measure(n, a.targets, a.multiples, a.source)
        r.update(command=" ".join(sys.argv), wall_s=round(time.perf_counter() - t0, 1))
        results = [x for x in results if (x["organism"], x["source"]) != (n, r["source"])] + [r]
        write_json_atomic(out, {"results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
