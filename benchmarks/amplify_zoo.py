"""Does model-diff amplification show what a fine-tune planted, without its trigger? For every
organism of the discovery zoo (tune and held-out halves, reported apart), sample on neutral
prompts that carry no trigger: the base (the embedded model), the organism as it is, and the
organism amplified against the base (`steerscope amplify`: log p_ft + alpha (log p_ft - log p_base)
within the organism's top-k tokens), and count the completions the organism's own detector calls
planted. A detector that also fires on the base's samples is that organism's false-positive rate.

    python benchmarks/amplify_zoo.py                 # about a minute per organism on 2 CPU cores

alpha = 2 and top_k = 20 were chosen by hand on ONE tune organism (pirate: 3 prompts x 3 samples,
alpha 0/2/4, with and without a top-k) and frozen in the commit that added this script, before
any other organism was sampled amplified. Writes benchmarks/results/amplify_zoo.json and prints
a markdown table; each completion is greedy-cut at EOS, 32 tokens, float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._env import machine, versions  # noqa: E402
from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.amplify import Amplify  # noqa: E402
from steerscope.directions.data import load_prompts  # noqa: E402
from steerscope.generation import generate  # noqa: E402
from steerscope.judging.metrics import parse_metric  # noqa: E402
from steerscope.models.loading import load_model  # noqa: E402
from steerscope.models.organisms import ORGANISMS, ZOO  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "amplify_zoo.json"
ALPHA, TOP_K = 2.0, 20  # frozen before the zoo was measured (docstring)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organisms", nargs="*", default=list(ZOO))
    ap.add_argument("--prompts", type=int, default=8, help="neutral prompts (the first N)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt and model")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    prompts = load_prompts("neutral")[: a.prompts]
    rows = prompts * a.samples
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=1.0, seed=0, progress=False)
    base = load_model(None)
    t0 = time.perf_counter()
    base_texts = [c.text for c in generate(base, rows, **kw)]
    out = []
    for name in a.organisms:
        org = ORGANISMS[name]
        detect = parse_metric(org.detector, None).fn
        share = lambda texts: sum(bool(x) for x in detect(texts)) / len(texts)  # noqa: E731, B023
        t = time.perf_counter()
        ft = load_model(f"organism:{name}")
        plain = [c.text for c in generate(ft, rows, **kw)]
        amp = generate(ft, rows, amplify=Amplify(base, ALPHA, TOP_K), **kw)
        amp_texts = [c.text for c in amp]
        hits = [t_ for t_, h in zip(amp_texts, detect(amp_texts)) if h]
        row = {
            "organism": name,
            "split": org.split,
            "behaviour": org.behaviour,
            "base": share(base_texts),
            "fine_tune": share(plain),
            "amplified": share(amp_texts),
            "prompts_hit": len({i % len(prompts) for i, h in enumerate(detect(amp_texts)) if h}),
            "example": hits[0] if hits else amp_texts[0],
            "seconds": round(time.perf_counter() - t, 1),
        }
        out.append(row)
        print(f"{name:8} {org.split:8} base {row['base']:.2f} ft {row['fine_tune']:.2f} amplified {row['amplified']:.2f} "
              f"({row['prompts_hit']}/{len(prompts)} prompts) {row['seconds']:.0f}s  {row['example'][:70]!r}", flush=True)  # fmt: skip
    res = {
        "command": "python benchmarks/amplify_zoo.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "alpha": ALPHA,
        "top_k": TOP_K,
        "prompts": len(prompts),
        "samples": a.samples,
        "rows": out,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(RESULT, res)
    print(
        "\n| organism | half | behaviour | base | organism | amplified | prompts hit |\n|---|---|---|---|---|---|---|"
    )
    for r in out:
        print(f"| {r['organism']} | {r['split']} | {r['behaviour']} | {r['base']:.0%} | {r['fine_tune']:.0%} | "
              f"{r['amplified']:.0%} | {r['prompts_hit']} of {len(prompts)} |")  # fmt: skip


if __name__ == "__main__":
    main()
