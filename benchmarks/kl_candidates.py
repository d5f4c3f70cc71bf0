"""Where does the default run miss a planted behaviour: in the candidates kl trains, or in which it keeps?

The default `steerscope run` (discovery method `kl`) trains 3 x 8 = 24 candidate vectors and
keeps 8 (README "Output KL"). bench_planted.py sees only the 8 kept. This script trains the same
24 candidates for each model organism and seed (the run's training prompts, seed, source layer and
settings, at the calibrated R times --multiple; the Goldilocks check chose 1 x in every default
organism run in benchmarks/results/planted.json), generates every candidate on the run's 4
prompts (2 training, 2 held-out, 32 tokens) and applies the organism's detector:

  pool      candidates showing the planted behaviour: the detector fires on at least 2 of their
            4 completions, the rule bench_planted.py applies to a vector
  partial   candidates showing it on exactly 1 of the 4
  kept      of the pool, how many the run's keep rule keeps (judging.keep: completions far from
            the unsteered ones, natural to the model) and the previous rule (`--keep-by method`:
            the most steered entropy)
The share bench_planted.py reports is about kept / 8, so a draw whose pool holds fewer than 2
cannot reach its 15 % target whatever the keep rule.

    python benchmarks/kl_candidates.py                              # 3 organisms x seeds 0 1 2
    python benchmarks/kl_candidates.py --organisms refuse --seeds 1 --multiple 1.5
    python benchmarks/kl_candidates.py --organisms refuse --source 16
    python benchmarks/kl_candidates.py --replay      # two layers' pools ranked together, offline
    python benchmarks/kl_candidates.py --replay melbo --extra 8   # kl's 24 + 8 of MELBO's, offline
    python benchmarks/kl_candidates.py --organisms refuse --method melbo      # MELBO's 24 instead
    python benchmarks/kl_candidates.py --organisms caps --seeds 2 --no-orthogonal --candidates 6 --texts
    python benchmarks/kl_candidates.py --organisms caps --seeds 2 --extra-train 2   # train on 4 prompts
    python benchmarks/kl_candidates.py --replay keep   # other keep rules on the rows with texts, offline
--no-orthogonal trains every candidate from its own start, not kept orthogonal to the others (a
candidate then depends only on its start, so the first 24 of 48 are exactly a draw of 24);
--extra-train N adds N training prompts after the 2 held-out ones (the 4 judged stay the same);
--texts stores every candidate's completions, to try other keep rules offline.
With --method melbo it trains 24 MELBO vectors instead (`steerscope run --method melbo`'s
settings: target layer n_layers - 8, 300 steps at most, the plateau rule; --steps and --lr-scale
change them), ranked by the same keep rules, to compare the two objectives' pools.
Results: benchmarks/results/kl_candidates.json (one row per organism, seed and setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.directions.discovery import DiscoverConfig, MelboConfig, calibrate_R, discover  # noqa: E402
from steerscope.directions.discovery.kl import KLConfig, output_kl_objective  # noqa: E402
from steerscope.generation import generate  # noqa: E402
from steerscope.jobs.run import RunConfig  # noqa: E402
from steerscope.judging.keep import completion_ranker  # noqa: E402
from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.layer_range import LayerRange  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS, ZOO  # noqa: E402


def draw(lm, org, seed: int, a: argparse.Namespace) -> dict:
    run = RunConfig()
    kl_default = run.discover.method_config
    n_keep = run.discover.n_vectors
    n = n_keep * a.candidates
    P = load_prompts(run.prompts)
    train, held = P[: run.n_train], P[run.n_train : run.n_train + run.n_heldout]
    # --extra-train: more training prompts, taken after the held-out ones (the 4 judged stay the same)
    fit = train + P[run.n_train + run.n_heldout : run.n_train + run.n_heldout + a.extra_train]
    own = {"steps": a.steps} if a.steps else {}
    if a.method == "kl":
        own.update(candidates=1, first_share=a.first_share, reply_tokens=kl_default.reply_tokens)
    if a.no_orthogonal:
        own["orthogonal"] = False
    # (MELBO trains every vector it keeps; its 24 here are what a pool of its candidates would hold.)
    cfg = DiscoverConfig.of(a.method, n_vectors=n, seed=seed, source=a.source, **own)
    s, t = cfg.resolve_layers(lm.n_layers)
    lr = LayerRange(lm, fit, s, t, chat=cfg.chat)
    R0, _ = calibrate_R(lr, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=seed)
    R = R0 * a.multiple
    if a.lr_scale is not None:  # the methods' auto lr is c * R / sqrt(d_model)
        cfg = dataclasses.replace(
            cfg, method_config=dataclasses.replace(cfg.method_config, lr=a.lr_scale * R / math.sqrt(lm.d_model))
        )
    t0 = time.time()
    # One kl call with candidates=1 and n vectors trains exactly the n candidates the run's kl call
    # (n_keep vectors x candidates) trains: same seed, same starts, same steps.
    vs = discover(lm, fit, dataclasses.replace(cfg, R=R), layer_range=lr, progress=False)
    train_s = time.time() - t0
    V = vs.vectors  # (n, d)
    ranker = completion_ranker(lm, fit, s, chat=cfg.chat)
    by_completions = ranker(V)
    objective = output_kl_objective(lm, lr, kl_default.reply_tokens, cfg.target_tokens, a.first_share)
    by_entropy = objective.entropy(V).float().cpu()
    keep = {
        name: set(score.argsort(descending=True, stable=True)[:n_keep].tolist())
        for name, score in (("completions", by_completions.float().cpu()), ("entropy", by_entropy))
    }
    prompts = train + held
    rows = generate(
        lm,
        prompts,
        vectors=V,
        layer=s,
        include_unsteered=False,
        max_new_tokens=run.max_new_tokens,
        chat=cfg.chat,
        progress=False,
    )  # vector by vector, prompt by prompt
    detect = parse_metric(org.detector, None).fn
    hits = [
        sum(bool(h) for h in detect([r.text for r in rows[i * len(prompts) : (i + 1) * len(prompts)]]))
        for i in range(n)
    ]
    pool = [i for i, h in enumerate(hits) if h >= len(prompts) / 2]
    U = torch.nn.functional.normalize(V.float(), dim=-1)
    cos = (U @ U.T).fill_diagonal_(0)  # (n, n)
    return {
        "organism": org.name,
        "seed": seed,
        "method": a.method,
        "steps": cfg.method_config.steps,
        "lr_scale": a.lr_scale,
        "source": s,
        "target": t,
        "R": round(R, 2),
        "R_multiple": a.multiple,
        "first_share": a.first_share,
        "candidates": n,
        "pool": len(pool),
        "partial": sum(h == 1 for h in hits),
        "kept_by_completions": sum(i in keep["completions"] for i in pool),
        "kept_by_entropy": sum(i in keep["entropy"] for i in pool),
        "hits_per_candidate": hits,
        # Per-candidate scores, so pools of several settings can be merged and re-ranked offline.
        "score_completions": [round(float(x), 4) for x in by_completions],
        "score_entropy": [round(float(x), 4) for x in by_entropy],
        "change": [round(x, 4) for x in ranker.last["change"]],
        "surprise": [round(x, 4) for x in ranker.last["surprise"]],
        "texts": [[r.text for r in rows[i * len(prompts) : (i + 1) * len(prompts)]] for i in range(n)]
        if a.texts
        else None,
        "unsteered": [
            r.text for r in generate(lm, prompts, max_new_tokens=run.max_new_tokens, chat=cfg.chat, progress=False)
        ]
        if a.texts
        else None,
        "train_s": round(train_s, 1),
        "extra_train": a.extra_train,
        "orthogonal": not a.no_orthogonal,
        "max_cos": round(float(cos.abs().max()), 3),
        "pool_max_cos": round(float(cos[pool][:, pool].abs().max()), 3) if len(pool) > 1 else None,
        "examples": {i: rows[i * len(prompts)].text[:80] for i in pool[:3]},
    }


def _setting(r: dict) -> tuple:
    """What makes two result rows the same measurement (rows from before --method read as kl at
    its default steps)."""
    return (
        r["organism"],
        r["seed"],
        r["source"],
        r["R_multiple"],
        r["first_share"],
        r["candidates"],
        r.get("method", "kl"),
        r.get("steps", KLConfig().steps),
        r.get("lr_scale"),
        r.get("orthogonal", True),
        r.get("extra_train", 0),
    )


def _merge(org: str, seed: int, a: dict, b: dict, extra: int, what: str) -> None:
    """Keep the 8 best of a's 24 and b's first `extra` by the run's completion score (the score
    looks at neither the layer nor the objective) and print how many planted candidates survive."""
    c = list(zip(a["score_completions"], a["hits_per_candidate"])) + list(
        zip(b["score_completions"][:extra], b["hits_per_candidate"][:extra])
    )
    c.sort(key=lambda x: -x[0])
    kept, pool = sum(h >= 2 for _, h in c[:8]), sum(h >= 2 for _, h in c)
    print(
        f"{org:9} seed {seed}: kl layer {a['source']} x24 + {what} x{extra}: pool {pool}, kept {kept} of 8 "
        f"(kl alone: kept {a['kept_by_completions']})"
    )


def replay(path: Path, other: str = "source16", extra: int = 12) -> None:
    """Offline: pool each kl draw's 24 candidates (at every source layer measured) with the first
    `extra` of another draw of the same organism and seed (`source16`: kl at source layer 16;
    `melbo`: MELBO's default 300 steps at the same layer) and keep the 8 best. An approximation:
    `extra` trained alone would not be exactly the first `extra` of 24 (training keeps them
    orthogonal to each other)."""
    rows = [
        r
        for r in json.loads(path.read_text())
        if "score_completions" in r
        and r["R_multiple"] == 1.0
        and r["candidates"] == 24
        and r.get("lr_scale") is None
        and _setting(r)[9:] == (True, 0)
    ]
    kl = {
        (r["organism"], r["seed"], r["source"]): r
        for r in rows
        if _setting(r)[6:8] == ("kl", KLConfig().steps) and r["first_share"] == KLConfig().first_share
    }
    melbo = {
        (r["organism"], r["seed"], r["source"]): r for r in rows if _setting(r)[6:8] == ("melbo", MelboConfig().steps)
    }
    for (org, seed, src), a in sorted(kl.items()):
        b = kl.get((org, seed, 16)) if other == "source16" else melbo.get((org, seed, src))
        if b is not None and b is not a:
            _merge(org, seed, a, b, extra, "kl layer 16" if other == "source16" else f"melbo layer {src}")


def _keep(score: np.ndarray, k: int, group: list | None = None, cap: int = 0) -> list[int]:
    """The k best by score; with `group` and `cap`, at most `cap` per group first, then the best
    of the rest to fill k."""
    order = np.argsort(-score, kind="stable").tolist()
    if group is None:
        return order[:k]
    kept, per = [], Counter()
    for i in order:
        if len(kept) < k and per[group[i]] < cap:
            kept.append(i)
            per[group[i]] += 1
    return kept + [i for i in order if i not in kept][: k - len(kept)]


def replay_keep(path: Path, n_train: int = 2, k: int = 8) -> None:
    """Offline, on the rows stored with --texts: how many planted candidates other keep rules
    keep, at 24, 32 and all of the row's candidates (with --no-orthogonal the first N of a draw
    are exactly a draw of N). Rules: the run's (judging.keep: embedding change - 0.2 x surprise,
    as stored); `surface`: the same, but a training completion whose surface group (judging.surface:
    capitals, another language) differs from the unsteered one's counts as changed by 1 (the
    uncased embedder cannot see capitals); `capM`: the run's score, at most M kept per behaviour
    cluster (judging.cluster on the candidates' first training completions)."""
    from steerscope.judging.cluster import cluster_texts
    from steerscope.judging.embed import embed
    from steerscope.judging.keep import NATURALNESS_WEIGHT
    from steerscope.judging.surface import surface_group

    for r in json.loads(path.read_text()):
        if not r.get("texts") or not r.get("unsteered"):
            continue
        hits, texts, base = np.array(r["hits_per_candidate"]), r["texts"], r["unsteered"][:n_train]
        T = [t for row in texts for t in row[:n_train]]
        e, eb = embed(T).view(len(texts), n_train, -1), embed(base)  # (n, P, 384), (P, 384)
        dist = (1 - (e * eb[None]).sum(-1)).numpy()  # (n, P)
        moved = np.array([[surface_group(t) != surface_group(b) for t, b in zip(row[:n_train], base)] for row in texts])
        surprise = np.array(r["surprise"])
        rules = {
            "run": np.array(r["score_completions"]),
            "surface": np.where(moved, 1.0, dist).mean(1) - NATURALNESS_WEIGHT * surprise,
        }
        out = []
        for n in sorted({24, 32, len(texts)}):
            labels = cluster_texts([row[0] for row in texts[:n]]).labels
            got = {name: sum(hits[i] >= 2 for i in _keep(sc[:n], k)) for name, sc in rules.items()}
            got.update({f"cap{m}": sum(hits[i] >= 2 for i in _keep(rules["run"][:n], k, labels, m)) for m in (1, 2, 3)})
            out.append(f"{n}: pool {int((hits[:n] >= 2).sum())}, kept " + " ".join(f"{a} {b}" for a, b in got.items()))
        print(f"{r['organism']:7} seed {r['seed']} layer {r['source']}: " + " | ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organisms", nargs="*", default=list(ZOO))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--multiple", type=float, default=1.0, help="R = this x the calibrated R (the run's check chose 1)")
    ap.add_argument(
        "--source",
        type=int,
        default=None,
        help="source layer (default: the method's auto layer: kl round(0.4 x n_layers), "
        "the run's; melbo round(n_layers / 4))",
    )
    ap.add_argument("--first-share", default=str(KLConfig().first_share), help="kl's --first-share (a number, or mean)")
    ap.add_argument("--candidates", type=int, default=KLConfig().candidates, help="candidates per vector kept")
    ap.add_argument("--method", default="kl", choices=("kl", "melbo"), help="which objective trains the 24")
    ap.add_argument("--steps", type=int, default=None, help="most training steps (default: the method's)")
    ap.add_argument(
        "--lr-scale",
        type=float,
        default=None,
        help="learning rate as c in c * R / sqrt(d_model) (default: the method's, 0.15 kl, 0.01 melbo)",
    )
    ap.add_argument(
        "--no-orthogonal",
        action="store_true",
        help="train the candidates from independent starts, not kept orthogonal to each other",
    )
    ap.add_argument(
        "--extra-train",
        type=int,
        default=0,
        help="train (and rank) on this many more prompts than the run's 2, taken after the 2 held-out ones",
    )
    ap.add_argument("--texts", action="store_true", help="store every candidate's completions in the row")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="model dtype (auto: the run's default; float32 to match `bench_planted.py -- --dtype float32`)",
    )
    ap.add_argument("--results", default="benchmarks/results/kl_candidates.json")
    ap.add_argument(
        "--replay",
        nargs="?",
        const="source16",
        choices=("source16", "melbo", "keep"),
        help="train nothing: merge each default draw's pool with 12 (--extra) of its --source 16 draw "
        "(or of its --method melbo draw) from --results and re-rank offline; keep: other keep rules "
        "on the rows stored with --texts",
    )
    ap.add_argument("--extra", type=int, default=12, help="with --replay: candidates taken from the other draw")
    a = ap.parse_args()
    if a.replay == "keep":
        return replay_keep(Path(a.results))
    if a.replay:
        return replay(Path(a.results), a.replay, a.extra)
    unknown = sorted(set(a.organisms) - set(ORGANISMS))
    if unknown:
        sys.exit(f"unknown organism(s) {', '.join(unknown)}; choose from {', '.join(ORGANISMS)}.")
    a.first_share = None if a.first_share == "mean" else float(a.first_share)
    path = Path(a.results)
    results = json.loads(path.read_text()) if path.is_file() else []
    print(
        f"{'organism':9} {'seed':>4} {'method':>6} {'steps':>5} {'source':>6} {'R(xcal)':>7} {'pool':>5} {'partial':>7} "
        f"{'kept(completions)':>17} {'kept(entropy)':>13} {'train s':>7}",
        flush=True,
    )
    for name in a.organisms:
        org = ORGANISMS[name]
        lm = load_model(f"organism:{name}", dtype=a.dtype)
        for seed in a.seeds:
            r = draw(lm, org, seed, a)
            r["machine_note"] = (
                "bfloat16 where the CPU multiplies it (the run's dtype auto)" if a.dtype == "auto" else a.dtype
            )
            results = [x for x in results if _setting(x) != _setting(r)]
            results.append(r)
            write_json_atomic(path, results)
            print(
                f"{name:9} {seed:>4} {a.method:>6} {r['steps']:>5} {r['source']:>6} {a.multiple:>7g} {r['pool']:>5} {r['partial']:>7} "
                f"{r['kept_by_completions']:>17} {r['kept_by_entropy']:>13} {r['train_s']:>7}",
                flush=True,
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
