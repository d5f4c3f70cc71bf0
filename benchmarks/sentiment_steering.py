"""Supervised steering end to end on the embedded SmolLM2-135M-Instruct: a sentiment direction
from the shipped pairs, its layer chosen by measured effect, judged on held-out neutral prompts.

    python benchmarks/sentiment_steering.py [--coef 12] [--read mean] [--dtype bfloat16] [--out DIR]

1. extract: difference of means (positive - negative) of the 60 shipped sentiment pairs, every
   layer, chat template applied;
2. select: add each candidate (coef * v, all positions) to the first 20 neutral prompts, score the
   40-token greedy completions with VADER, keep candidates within the KL bound and outside the
   last 20 % of layers, take the best;
3. evaluate on the other 20 neutral prompts (held out): mean VADER compound of 40-token greedy
   completions steered vs unsteered, and KL(base || steered) of the next-token distribution at
   the last prompt position.
Target (issue 3): mean compound rises by >= 0.4.
"""

from __future__ import annotations

import argparse
import time

import steerscope as ss
from steerscope.directions.data import load_contrast, load_prompts
from steerscope.directions.extract import ExtractConfig, extract
from steerscope.generation import last_token_logits
from steerscope.judging import SelectConfig, kl_divergence, select
from steerscope.judging.metrics import sentiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coef", type=float, default=12.0)
    ap.add_argument("--read", default="mean")
    ap.add_argument("--method", default="diffmean")
    ap.add_argument("--kl-bound", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--extract-chat",
        choices=["yes", "no"],
        default="yes",
        help="apply the chat template to the pairs when extracting (no: raw sentences)",
    )
    ap.add_argument("--out", help="save the selected vector here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = ss.load_model(dtype=args.dtype)
    neutral = load_prompts("neutral")
    sel_prompts, test_prompts = neutral[:20], neutral[20:]
    vs = extract(
        lm,
        load_contrast("sentiment"),
        ExtractConfig(
            method=args.method, read=args.read, stats=False, chat=None if args.extract_chat == "yes" else False
        ),
    )
    late = int(0.8 * lm.n_layers)
    candidates = ss.VectorSet.create(
        lm, vs.vectors[:late], vs.layers[:late], vs.config.method, ids=vs.ids[:late], hyperparams=vs.config.hyperparams
    )
    metric = sentiment()
    cfg = SelectConfig(mode="add", coef=args.coef, kl_bound=args.kl_bound, max_new_tokens=args.tokens)
    sel = select(lm, candidates, metric, sel_prompts, sel_prompts, sel_prompts, cfg)
    print(sel.table())
    best = sel.best_candidate
    if best is None:
        raise SystemExit("no candidate passed the filters")
    sv = candidates[best.id]

    res = ss.generate(lm, test_prompts, vectors=sv, coef=args.coef, max_new_tokens=args.tokens, progress=False)
    base = [r for r in res if r.vector_id is None]
    steered = [r for r in res if r.vector_id is not None]
    b = metric.score_texts([r.text for r in base])
    s = metric.score_texts([r.text for r in steered])
    logits = last_token_logits(lm, test_prompts, vectors=sv, coef=args.coef, include_unsteered=True)
    kl = kl_divergence(logits[0], logits[1])
    print(
        f"\nheld-out neutral prompts ({len(test_prompts)}), {args.tokens} greedy tokens, {args.dtype}, "
        f"{sv.id} x {args.coef:g} (|v| = {float(sv.vector.norm()):.2f}):"
    )
    print(
        f"  mean VADER compound: unsteered {b.mean():.3f}, steered {s.mean():.3f}, change {s.mean() - b.mean():+.3f} (target >= +0.4)"
    )
    print(f"  KL(base || steered) at the last prompt position: mean {kl.mean():.3f}, max {kl.max():.3f} nats")
    for r0, r1 in list(zip(base, steered))[:4]:
        print(f"\n  prompt: {r0.prompt}\n    unsteered: {r0.text[:150]!r}\n    steered:   {r1.text[:150]!r}")
    if args.out:
        ss.VectorSet.create(
            lm,
            sv.vector[None],
            [sv.layer],
            vs.config.method,
            ids=[sv.id],
            hyperparams={**vs.config.hyperparams, "selection": sel.to_dict(), "coef": args.coef},
        ).save(args.out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
