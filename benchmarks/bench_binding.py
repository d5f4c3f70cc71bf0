"""The binding SAE against plain TopK SAEs on bound-pair sentences, SmolLM2-135M-Instruct (embedded); one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_binding.py [--layer 15] [--n-base 256] [--k 16] [--steps 400]
        [--binding-init random|icp|match] [--out FILE]

Corpus: two coloured shapes in a spatial relation ("the red cube is left of the blue sphere"), 8
colours x 6 shapes, both mention orders, one of 6 templates per sentence. A *bag* is the unordered
colour pair and shape pair ({red, blue}, {cube, sphere}); it has two bindings (red cube + blue sphere,
or blue cube + red sphere), each in two orders. The 420 bags are split 75 / 25 at random: SAEs train on
the residual stream (every token but the first) of the training bags' sentences, and are evaluated
on the held-out bags' sentences.

SAEs, all TopK encoders at the same k (L0), trained alike (`--steps` x 256 tokens):
    binding            n_latents = 2 x n_base, W_dec = [D ; D M]  (decoder params n_base d + d^2)
    topk, same n       the same n_latents                          (decoder params 2 n_base d)
    topk, same params  n_latents = decoder params of binding / d
Measured on the held-out sentences: FVU and CE loss recovered (`sae.evaluate.evaluate`), and a
binding probe: for each colour-shape conjunction (c, s) (48 of them), the held-out sentences whose
bag holds c and s, label "c is bound to s" (red cube + blue sphere) vs not (blue cube + red sphere).
Both classes have the same bag of words, so only a representation of the binding separates them.
One logistic regression per conjunction (scikit-learn, standardised features, C = 0.1) on the
codes at the last token, trained on the training bags and scored on the held-out bags; the same
probe on the raw activations is the ceiling. Writes benchmarks/results/binding.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import steerscope as ss  # noqa: E402
from benchmarks._env import machine, versions  # noqa: E402
from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.models.activations import read_layer  # noqa: E402
from steerscope.sae import SAEConfig, TrainConfig, tensor_batches, train_sae  # noqa: E402
from steerscope.sae.evaluate import evaluate, sae_codec  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "binding.json"
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["cube", "sphere", "cone", "pyramid", "cylinder", "ring"]
TEMPLATES = [
    "The {a} is left of the {b}.",
    "A {a} sits next to a {b}.",
    "I see a {a} and a {b}.",
    "There is a {a} above the {b}.",
    "On the table, a {a} lies beside a {b}.",
    "She put the {a} behind the {b}.",
]


def corpus(seed: int = 0, test_frac: float = 0.25):
    """Sentences as dicts {text, objs: ((colour, shape), (colour, shape)), bag, test}."""
    rng = random.Random(seed)
    bags = [(cp, sp) for cp in itertools.combinations(COLOURS, 2) for sp in itertools.combinations(SHAPES, 2)]
    rng.shuffle(bags)
    test = set(bags[: round(test_frac * len(bags))])
    rows = []
    for cp, sp in sorted(bags):
        for binding in ((sp[0], sp[1]), (sp[1], sp[0])):  # the two bindings of the bag
            objs = ((cp[0], binding[0]), (cp[1], binding[1]))
            for order in (objs, objs[::-1]):  # both mention orders
                a, b = (f"{c} {s}" for c, s in order)
                text = rng.choice(TEMPLATES).format(a=a, b=b)
                rows.append({"text": text, "objs": objs, "bag": (cp, sp), "test": (cp, sp) in test})
    return rows


@torch.no_grad()
def activations(lm, texts: list[str], layer: int, batch: int = 32):
    """(all tokens but each text's first (N_tok, d), last token of each text (N_text, d))."""
    toks, last = [], []
    for i in range(0, len(texts), batch):
        enc = lm.tokenizer(texts[i : i + batch], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
        h = read_layer(lm, layer, ids, mask).float().cpu()  # (B, T, d)
        m = mask.bool().cpu()
        keep = m & (m.long().cumsum(-1) > 1)
        toks.append(h[keep])
        # last real position, whichever side the tokenizer pads on
        pos = torch.where(m, torch.arange(m.shape[1]), -1).max(-1).values
        last.append(h[torch.arange(len(h)), pos])
    return torch.cat(toks), torch.cat(last)


def probe_accuracy(feats: torch.Tensor, rows: list[dict]) -> dict:
    """Mean held-out accuracy of one logistic regression per colour-shape conjunction."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = feats.double().numpy()
    correct = total = 0
    per = []
    for c, s in itertools.product(COLOURS, SHAPES):
        idx = [i for i, r in enumerate(rows) if c in r["bag"][0] and s in r["bag"][1]]
        y = [int((c, s) in rows[i]["objs"]) for i in idx]
        tr = [j for j, i in enumerate(idx) if not rows[i]["test"]]
        te = [j for j, i in enumerate(idx) if rows[i]["test"]]
        if not te or len({y[j] for j in tr}) < 2:
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(x[[idx[j] for j in tr]], [y[j] for j in tr])
        pred = clf.predict(x[[idx[j] for j in te]])
        hits = int(sum(int(p) == y[j] for p, j in zip(pred, te)))
        correct, total = correct + hits, total + len(te)
        per.append(hits / len(te))
    return {"accuracy": correct / total, "n_test": total, "n_probes": len(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=15, help="residual stream layer (SmolLM2-135M has 30)")
    ap.add_argument("--n-base", type=int, default=256, help="binding: base features (n_latents = 2 n_base)")
    ap.add_argument("--k", type=int, default=16, help="active latents per token, every SAE")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--eval-sentences", type=int, default=160, help="held-out sentences for FVU / CE recovered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--binding-init", default="random", choices=("random", "icp", "match"), help="how D, M start")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    lm = ss.load_model()
    rows = corpus(args.seed)
    train_rows = [r for r in rows if not r["test"]]
    test_rows = [r for r in rows if r["test"]]
    rows = train_rows + test_rows  # the order of `last`
    train_toks, last_train = activations(lm, [r["text"] for r in train_rows], args.layer)
    last = torch.cat([last_train, activations(lm, [r["text"] for r in test_rows], args.layer)[1]])
    print(
        f"{len(rows)} sentences ({len(train_rows)} train / {len(test_rows)} held-out bags' sentences), "
        f"{len(train_toks)} training tokens at layer {args.layer}",
        flush=True,
    )

    d = lm.d_model
    n_bind = 2 * args.n_base
    bind_params = args.n_base * d + d * d
    saes = {
        "binding": SAEConfig(d, n_bind, arch="binding", k=args.k),
        "topk, same n_latents": SAEConfig(d, n_bind, arch="topk", k=args.k),
        "topk, same decoder params": SAEConfig(d, round(bind_params / d), arch="topk", k=args.k),
    }
    tcfg = TrainConfig(
        steps=args.steps, warmup_steps=min(50, args.steps // 10), seed=args.seed, binding_init=args.binding_init
    )
    eval_texts = [
        r["text"] for r in random.Random(args.seed).sample(test_rows, min(args.eval_sentences, len(test_rows)))
    ]
    out: dict = {}
    for name, cfg in saes.items():
        sae, hist = train_sae(tensor_batches(train_toks, args.batch, seed=args.seed), cfg, tcfg)
        ev = evaluate(lm, sae_codec(sae), eval_texts, args.layer, n_latents=cfg.n_latents)
        with torch.no_grad():
            recon, codes = sae(last)[:2]
        dec = sum(p.numel() for n_, p in sae.named_parameters() if n_ in ("D", "M")) or sae.W_dec.numel()
        out[name] = {
            "n_latents": cfg.n_latents,
            "decoder_params": dec,
            "l0": ev.l0,
            "fvu": ev.fvu,
            "ce_recovered": ev.ce_recovered,
            "ce_clean_spliced_zero": [ev.ce_clean, ev.ce_spliced, ev.ce_zero],
            "kl_spliced": ev.kl_spliced,
            "dead_frac": ev.dead_frac,
            "train_fvu_last": hist.fvu[-1],
            "probe": probe_accuracy(codes, rows),
            "probe_on_reconstruction": probe_accuracy(recon, rows),
        }
        if cfg.arch == "binding":  # how much of the code at the last token sits in slot 2 (the D M rows)
            out[name]["slot2_share_of_active"] = float((codes[:, args.n_base :] > 0).sum() / (codes > 0).sum())
        print(f"{name}: {out[name]}", flush=True)
    out["raw activations"] = {"n_latents": d, "probe": probe_accuracy(last, rows)}

    print(
        "\n| features | latents | decoder params | L0 | FVU | CE recovered | spliced KL "
        "| binding probe on codes | on reconstruction |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        if "fvu" in r:
            cells = (
                f"{r['n_latents']} | {r['decoder_params']:,} | {r['l0']:.1f} | {r['fvu']:.3f} | "
                f"{r['ce_recovered']:.3f} | {r['kl_spliced']:.4f} | {r['probe']['accuracy']:.3f} | "
                f"{r['probe_on_reconstruction']['accuracy']:.3f}"
            )
        else:
            cells = f"{r['n_latents']} (d_model) | – | – | – | – | – | – | {r['probe']['accuracy']:.3f}"
        print(f"| {name} | {cells} |")
    n_te = out["raw activations"]["probe"]["n_test"]
    print(
        f"\nprobe: {n_te} held-out predictions over 48 conjunctions; chance 0.5 (both classes share the bag of words)"
    )
    write_json_atomic(
        Path(args.out),
        {
            "results": out,
            "setup": {
                "model": lm.model_id,
                "layer": args.layer,
                "sentences": len(rows),
                "held_out_sentences": len(test_rows),
                "training_tokens": len(train_toks),
                "eval_sentences": len(eval_texts),
                "k": args.k,
                "steps": args.steps,
                "batch": args.batch,
                "binding_init": args.binding_init,
            },
            "command": " ".join(["OMP_NUM_THREADS=1 python", "benchmarks/bench_binding.py", *sys.argv[1:]]),
            "machine": machine(),
            "versions": versions("sklearn"),
            "wall_s_not_a_benchmark": round(time.perf_counter() - t0),
            "measured": time.strftime("%Y-%m-%d"),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
