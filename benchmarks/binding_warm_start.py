"""Can the binding SAE find its slot map M from no knowledge of it? `--binding-init icp` against the
random start, on the synthetic bound-pairs check of tests/test_sae_binding.py over several seeds; one run.

    OMP_NUM_THREADS=1 python benchmarks/binding_warm_start.py [--seeds 0,1,2,3,4,5] [--restarts N] [--warm-steps N]

Seeds 0-2 are the ones `match` was developed on; 3-5 were measured after it was frozen (M error 0.222 /
0.248 / 0.237); robustness fixes found on SmolLM2 later moved them by <= 0.007 (the JSON holds the
final code's run: 0.222 / 0.248 / 0.239).

Per seed (data `bound_pairs(seed=...)`: 32 unit atoms D* in 16 dims, random orthogonal M*; 64
latents, k = 4, lr 3e-3, batch 128, as in the test):
    binding, random M             the binding SAE from its default start, 800 steps
    topk 800 / topk 800+W         plain TopK, 800 steps, and as many steps as the icp row in all
    binding, --binding-init icp   a plain TopK SAE (W = --warm-steps), its atoms registered onto
                                  themselves (`sae.binding.icp_slot_map`, --restarts random starts),
                                  then the binding SAE from that D and M, 800 steps
    binding, --binding-init match the same plain TopK SAE, its atoms sharpened (MOD), split into slots
                                  by co-firing and paired by inner products (`sae.binding.match_slot_map`),
                                  then the binding SAE from that D and M, 800 steps
    binding, M* + noise           the reference: M started at M* + noise of norm ~0.5 ||M*||, 800 steps
Matched-atom cosines and the relative error of M are taken under the better of the two slot
labellings (the generator treats the slots alike, so a model may take slot 2 as its base, learning
M*^-1 = M*^T). Writes benchmarks/results/binding_warm_start.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_sae_binding import D_MODEL, N_BASE, bound_pairs, slot_row  # noqa: E402

from steerscope._io import write_json_atomic  # noqa: E402
from steerscope.sae import BindingSAE, SAEConfig, TrainConfig, tensor_batches, train_sae  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "binding_warm_start.json"


def started(x: torch.Tensor, D0: torch.Tensor | None, M0: torch.Tensor) -> BindingSAE:
    """The binding SAE trained as in the test (800 steps) from M = M0 (and D = D0 unless None)."""
    init = BindingSAE._init_decoder

    def warm(self, w, g):
        init(self, w, g)
        with torch.no_grad():
            if D0 is not None:
                self.D.copy_(D0)
            self.M[0].copy_(M0)
        return self.W_dec.detach().clone()

    BindingSAE._init_decoder = warm
    try:
        cfg = SAEConfig(D_MODEL, 2 * N_BASE, arch="binding", k=4)
        return train_sae(tensor_batches(x, 128), cfg, TrainConfig(steps=800, lr=3e-3, warmup_steps=20))[0]
    finally:
        BindingSAE._init_decoder = init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--restarts", type=int, default=TrainConfig.binding_restarts)
    ap.add_argument("--warm-steps", type=int, default=TrainConfig.binding_warm_steps)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = lambda n: TrainConfig(steps=n, lr=3e-3, warmup_steps=20)  # noqa: E731  (the test's settings)
    cfg = lambda arch: SAEConfig(D_MODEL, 2 * N_BASE, arch=arch, k=4)  # noqa: E731
    out = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        x, D, M = bound_pairs(seed=seed)
        rows = {"binding, random M": slot_row(train_sae(tensor_batches(x, 128), cfg("binding"), t(800))[0], x, D, M)}
        rows["topk 800"] = slot_row(train_sae(tensor_batches(x, 128), cfg("topk"), t(800))[0], x, D, M)
        total = 800 + args.warm_steps
        rows[f"topk {total}"] = slot_row(train_sae(tensor_batches(x, 128), cfg("topk"), t(total))[0], x, D, M)
        icp = t(800).replace(binding_init="icp", binding_warm_steps=args.warm_steps, binding_restarts=args.restarts)
        rows["binding, --binding-init icp"] = slot_row(
            train_sae(tensor_batches(x, 128), cfg("binding"), icp)[0], x, D, M
        )
        match = t(800).replace(binding_init="match", binding_warm_steps=args.warm_steps)
        rows["binding, --binding-init match"] = slot_row(
            train_sae(tensor_batches(x, 128), cfg("binding"), match)[0], x, D, M
        )
        # the reference: M started near the truth (as in the test), D from the default start
        near = M + 0.5 * torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(seed)) / D_MODEL**0.5
        rows["binding, M started at M* + noise"] = slot_row(started(x, None, near), x, D, M)
        for name, r in rows.items():
            out.append({"seed": seed, "sae": name, **r})
    cols = ["slot-1 match", "slot-2 match", "M rel. err", "FVU"]
    print("\n| seed | SAE | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for r in out:
        cells = " | ".join(f"{r[c]:.3f}" if c in r and r[c] == r[c] else "–" for c in cols)
        print(f"| {r['seed']} | {r['sae']} | {cells} |")
    write_json_atomic(
        RESULTS,
        {
            "results": out,
            "command": " ".join(["OMP_NUM_THREADS=1 python", "benchmarks/binding_warm_start.py", *sys.argv[1:]]),
            "versions": f"torch {torch.__version__}",
            "measured": time.strftime("%Y-%m-%d"),
        },
    )


if __name__ == "__main__":
    main()
