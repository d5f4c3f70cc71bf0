"""Learned MELBO vectors vs random vectors of the same norm on SmolLM2-135M-Instruct.

    python benchmarks/melbo_vs_random.py [--vectors 16] [--steps 100] [--prompts 2] [--R 4]

Trains K MELBO vectors (R calibrated from the model), draws K orthogonal random vectors with the
same norms, and counts distinct greedy completions under each set on the same prompts (the
comparison of Mack & Turner 2024: random vectors mostly leave completions unchanged).
"""

from __future__ import annotations

import argparse
import time

import steerscope as ss
from steerscope.directions.data import load_prompts
from steerscope.directions.discovery import DiscoverConfig, discover, random_control


def distinct(results, unsteered) -> tuple[int, int]:
    """(distinct completions, completions that differ from the unsteered one)."""
    return len({r.text for r in results}), sum(r.text != unsteered[r.prompt_index].text for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", default=None, help="SOURCE:TARGET")
    ap.add_argument("--dtype", default="float32", help="float32: bfloat16 rounding alone changes greedy text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--R", type=float, default=4.0, help="vector norm (0: calibrate)")
    ap.add_argument("--ratio", type=float, default=0.5, help="nonlinearity ratio for the calibrated R")
    args = ap.parse_args()
    lm = ss.load_model(dtype=args.dtype)
    prompts = load_prompts("neutral")[: args.prompts]
    s, t = (int(x) for x in args.layers.split(":")) if args.layers else (None, None)
    t0 = time.perf_counter()
    vs = discover(
        lm,
        prompts,
        DiscoverConfig.of(
            "melbo",
            n_vectors=args.vectors,
            steps=args.steps,
            source=s,
            target=t,
            seed=args.seed,
            R=args.R or None,
            calibrate_ratio=args.ratio,
        ),
    )
    train_s = time.perf_counter() - t0
    h = vs.config.hyperparams
    control = random_control(lm, vs, seed=args.seed + 1)
    base = ss.generate(lm, prompts, max_new_tokens=args.tokens)
    learned = ss.generate(lm, prompts, vectors=vs, max_new_tokens=args.tokens, include_unsteered=False)
    rand = ss.generate(lm, prompts, vectors=control, max_new_tokens=args.tokens, include_unsteered=False)
    n = len(learned)
    dl, cl = distinct(learned, base)
    dr, cr = distinct(rand, base)
    print(
        f"MELBO: {len(vs)} vectors, layer {h['source']} -> {h['target']}, R = {h['R']:.3g} ({f'calibrated, ratio {args.ratio:g}' if not args.R else 'given'}), "
        f"{args.steps} steps, {len(prompts)} prompts, {args.dtype}: trained in {train_s:.0f} s"
    )
    print(f"distinct greedy completions ({args.tokens} tokens) over {n} (vector, prompt) pairs:")
    print(f"  learned MELBO: {dl} distinct, {cl} differ from unsteered")
    print(f"  random, same norms: {dr} distinct, {cr} differ from unsteered")
    for r in [r for r in learned if r.prompt_index == 0][:6]:
        print(f"  {r.vector_id}: {r.text[:110]!r}")


if __name__ == "__main__":
    main()
