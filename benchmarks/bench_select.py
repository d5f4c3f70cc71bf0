"""`select` at scale: time and peak memory of choosing a refusal direction among many candidates.

As a new user would run it: candidates from `extract --sets harmful harmless --read last:3`
(every layer: 3 x 30 = 90 on SmolLM2), the `refusal` text metric, N prompts per set, mode ablate.
Prints wall time, peak RSS (ru_maxrss) and the RSS growth while scoring, for the first K
candidates. The same script runs on older steerscope versions (it falls back to their spelling
`tail:3`), so before/after come from one script:

    python benchmarks/bench_select.py --candidates 90 --prompts 35
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_select.py --candidates 12 --prompts 35
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import steerscope as ss
from steerscope.directions.data import load_prompts, load_sets
from steerscope.directions.extract import ExtractConfig, extract
from steerscope.judging.selection import SelectConfig, select


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class Sampler:
    """Samples RSS every 0.2 s in a thread: the peak during one phase."""

    def __init__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=90, help="use the first K candidates (by layer, then position)")
    ap.add_argument("--prompts", type=int, default=35, help="prompts per set (A, B, neutral)")
    ap.add_argument("--metric", default="refusal")
    ap.add_argument("--mode", default="ablate")
    ap.add_argument(
        "--test-fraction", type=float, default=0.0, help="held-out share of A and B (versions that have it)"
    )
    args = ap.parse_args()
    lm = ss.load_model()
    data = load_sets("harmful", "harmless")
    old = ss.__version__.startswith("0.1.")
    cfg = ExtractConfig(read="tail:3" if old else "last:3", stats=False)  # steerscope 0.1 spelled it tail:3
    t0 = time.perf_counter()
    vs = extract(lm, data, cfg, progress=False)
    t_extract = time.perf_counter() - t0
    idx = sorted(range(len(vs)), key=lambda i: (vs.layers[i], vs.ids[i]))[: args.candidates]
    cand = ss.VectorSet.create(lm, vs.vectors[idx], [vs.layers[i] for i in idx], "x", ids=[vs.ids[i] for i in idx])
    n = args.prompts
    a, b, neutral = load_prompts("harmful")[:n], load_prompts("harmless")[:n], load_prompts("neutral")[:n]
    before = rss_mb()
    t0 = time.perf_counter()
    with Sampler() as mem:
        extra = {"test_fraction": args.test_fraction} if args.test_fraction else {}  # older versions lack it
        sel = select(lm, cand, args.metric, a, b, neutral, SelectConfig(mode=args.mode, **extra))
    dt = time.perf_counter() - t0
    print(sel.table())
    print(f"\nversion {ss.__version__}: {len(cand)} candidates x {n} prompts, metric {args.metric}, mode {args.mode}")
    print(f"extract {t_extract:.1f} s; select {dt:.1f} s ({dt / len(cand):.2f} s per candidate)")
    print(
        f"RSS before select {before:.0f} MB, peak during select {mem.peak:.0f} MB (growth {mem.peak - before:.0f} MB); "
        f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
