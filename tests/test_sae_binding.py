"""The binding SAE (W_dec = [D ; D M]) on data planted with a known dictionary D* and slot map M*,
against a plain TopK SAE of the same size and L0 trained alike; SAELens round trip; three slots; CLI.

Measured (seed 0, d=16, n_base=32, 2 bound pairs per sample, k=4, 64 latents, 800 steps; the table is
printed by test_binding_on_bound_pairs; seeds 0-5 by benchmarks/binding_warm_start.py):
- from its random orthogonal start the binding SAE recovers D* (slot-1 match ~0.95) but NOT M*
  (relative error ~1.0): gradient descent lands in a local minimum where D M covers D* M* only
  partly (slot-2 match ~0.7, below plain TopK's ~0.8), with a worse FVU than TopK. On seeds 1 and 2
  it recovers neither (slot-1 0.56): the seed-0 D* is luck.
- started near M* (M* + noise of norm ~0.5 ||M*||) it moves towards M* (error ~0.35) and recovers the
  slot-2 atoms (~0.96), beating TopK on slot-2 recovery (TopK ~0.82) at a slightly lower FVU (0.167 vs
  0.174) with 768 decoder parameters to TopK's 1024. So M* is the better optimum of the objective
  (FVU 0.167 vs 0.201 for the random start); reaching it from a random start is the problem.
  (M = I at the start is worse still: slot-2 match ~0.70; 3000 steps or lr 1e-2 do not help.)
  On seeds 1 and 2 even this start does not learn D* (0.64 / 0.66); given D* as well, it keeps both (0.98).
- `--binding-init icp` (issue 34; sae/binding.py): a plain TopK SAE first (2400 steps), its atoms
  registered onto themselves by ICP + orthogonal Procrustes from 24000 random starts, then the same
  800 tied steps. Seed 0: M error 0.25; seeds 1-5 the search misses (M error ~1.0): a start lands in
  M*'s basin about once in 10-50 thousand at d = 16.
- `--binding-init match` (sae/binding.py `match_slot_map`): the same plain TopK SAE, its atoms sharpened
  by MOD with nonnegative OMP codes (cosine to the truth ~0.9 -> ~0.99), split into slots by a max-cut
  of their co-firing (this generator draws a sample's features of one slot without replacement, so
  same-slot atoms co-fire about half as often as chance, cross-slot ones at chance; with the OMP codes
  the cut gets 97-98 % of the atoms right on seeds 0-2), paired by sorted-inner-product fingerprints
  (Hungarian) whose largest mutually consistent subset is grown to all pairs, then Procrustes + ICP.
  Seed 0 (this test): M error 0.33, slot-1 / slot-2 0.951 / 0.956, FVU 0.163 against TopK with the same
  3200 steps in all: 0.928 / 0.926, FVU 0.152 (TopK keeps the lower FVU, with 1024 decoder parameters to
  768). All of seeds 0-2 (developed on) and 3-5 (measured after freezing): M error 0.20-0.33
  (benchmarks/results/binding_warm_start.json).
Also tried and dropped, on the raw TopK atoms (before MOD): growing correspondences from a true seed
pair; Gromov-Wasserstein matching of the Gram matrices; the slot partition from the TopK codes'
co-activation (agrees 0.52-0.64, chance 0.5: the TopK codes are too noisy); a soft, annealed ICP;
spectral matching of the Gram matrices (Leordeanu & Hebert 2005; ~0 true pairs) and canonical frames
from the slot second moments with third-moment signs (eigenvalue gaps too small), both also after MOD.
d > n_base (the brief's d=32, n_base=16) would not identify M at all: a linear map on the 16-dim span
of D* can send each D*_i to any D*_sigma(i) M*, so only the overcomplete case tests M.
"""

import json

import pytest
import torch
from conftest import PROMPTS

import steerscope as ss
from steerscope.cli import main
from steerscope.sae import BindingSAE, SAEConfig, TrainConfig, tensor_batches, train_sae
from steerscope.sae.binding import match_slot_map, refine_atoms
from steerscope.sae.formats import load_saelens, save_saelens

D_MODEL, N_BASE, PAIRS, STEPS = 16, 32, 2, 800


def bound_pairs(n=8000, d=D_MODEL, n_base=N_BASE, pairs=PAIRS, seed=0):
    """Each sample: `pairs` bound pairs (i, j) drawn at random, contributing a_i D*_i (slot 1) and
    b_j D*_j M* (slot 2), coefficients in [0.5, 2.5], plus noise of std 0.01. D*: unit atoms; M*:
    random orthogonal. Returns (x (n, d), D* (n_base, d), M* (d, d))."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_base, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    M = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    i = torch.rand(n, n_base, generator=g).argsort(-1)[:, :pairs]
    j = torch.rand(n, n_base, generator=g).argsort(-1)[:, :pairs]
    a = torch.zeros(n, n_base).scatter(1, i, torch.rand(n, pairs, generator=g) * 2 + 0.5)
    b = torch.zeros(n, n_base).scatter(1, j, torch.rand(n, pairs, generator=g) * 2 + 0.5)
    return a @ D + b @ (D @ M) + 0.01 * torch.randn(n, d, generator=g), D, M


def _match(true: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean over the true atoms of the max cosine to any learned row."""
    learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((true @ learned.T).max(-1).values.mean())


def slot_row(sae, x, D, M) -> dict:
    """Matched-atom cosines per slot, relative error of M (binding only), FVU, decoder parameters;
    under the better of the two slot labellings: the generator treats the slots alike, so a model
    may take slot 2 as its base (D ~ D* M*) and learn M*^-1 = M*^T."""
    W = sae.W_dec.detach()
    binding = isinstance(sae, BindingSAE)
    with torch.no_grad():
        fvu = float((x - sae(x).recon).square().sum(-1).mean() / (x - x.mean(0)).square().sum(-1).mean())
    best = None
    for Dt, Mt in ((D, M), (D @ M, M.T)):
        row = {
            "slot-1 match": _match(Dt, sae.D.detach() if binding else W),
            "slot-2 match": _match(Dt @ Mt, W[N_BASE:] if binding else W),
            "M rel. err": float("nan"),
            "FVU": fvu,
            "decoder params": sae.D.numel() + sae.M.numel() if binding else W.numel(),
        }
        if binding:  # up to one global scale: D M's row norms trade against the encoder's
            m = sae.M.detach()[0]
            c = float((m * Mt).sum() / m.square().sum())
            row["M rel. err"] = float((c * m - Mt).norm() / Mt.norm())
        if best is None or row["slot-1 match"] + row["slot-2 match"] > best["slot-1 match"] + best["slot-2 match"]:
            best = row
    return best


@pytest.fixture(scope="module")
def table():
    x, D, M = bound_pairs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than several on a busy machine
    rows = {}
    try:
        run = {"k": 2 * PAIRS}
        tcfg = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=20)
        for name, arch in (("binding", "binding"), ("topk", "topk")):
            rows[name] = slot_row(
                train_sae(tensor_batches(x, 128), SAEConfig(D_MODEL, 2 * N_BASE, arch=arch, **run), tcfg)[0], x, D, M
            )
        # --binding-init match: D and M from a plain TopK SAE's atoms (2400 steps), then the same 800 steps;
        # against TopK trained as many steps in all
        match = tcfg.replace(binding_init="match")
        rows["binding, match"] = slot_row(
            train_sae(tensor_batches(x, 128), SAEConfig(D_MODEL, 2 * N_BASE, arch="binding", **run), match)[0], x, D, M
        )
        total = tcfg.replace(steps=STEPS + match.binding_warm_steps)
        rows["topk, same total steps"] = slot_row(
            train_sae(tensor_batches(x, 128), SAEConfig(D_MODEL, 2 * N_BASE, arch="topk", **run), total)[0], x, D, M
        )
        # the same binding run, M started near M* instead of at a random rotation
        with pytest.MonkeyPatch.context() as mp:
            init = BindingSAE._init_decoder

            def near_truth(self, w, g):
                init(self, w, g)
                with torch.no_grad():
                    self.M[0].copy_(M + 0.5 * torch.randn(D_MODEL, D_MODEL, generator=g) / D_MODEL**0.5)
                return self.W_dec.detach().clone()

            mp.setattr(BindingSAE, "_init_decoder", near_truth)
            sae = train_sae(tensor_batches(x, 128), SAEConfig(D_MODEL, 2 * N_BASE, arch="binding", **run), tcfg)[0]
            rows["binding, M from M*+noise"] = slot_row(sae, x, D, M)
    finally:
        torch.set_num_threads(threads)
    return rows


def test_binding_on_bound_pairs(table):
    cols = list(table["binding"])
    print("\n| SAE | " + " | ".join(cols) + " |")
    for name, r in table.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    b, t, o = table["binding"], table["topk"], table["binding, M from M*+noise"]
    # what works: D* is recovered from a random start, as well as TopK recovers it
    assert b["slot-1 match"] > 0.9 and b["slot-1 match"] > t["slot-1 match"] - 0.03
    # what does not (yet): M* from a random start. If this fails, the SAE now finds M*: update the docs.
    assert b["M rel. err"] > 0.6 and b["slot-2 match"] < t["slot-2 match"]
    # M* is the better optimum: started near it, the binding SAE keeps it, recovers the slot-2 atoms,
    # and beats TopK on slot-2 recovery with fewer decoder parameters
    assert o["M rel. err"] < 0.45 and o["slot-2 match"] > 0.9
    assert o["slot-2 match"] > t["slot-2 match"] + 0.05 and o["FVU"] < b["FVU"] - 0.02
    assert o["FVU"] < t["FVU"] + 0.01  # no worse than TopK (measured 0.167 vs 0.174: too close to claim better)
    assert o["decoder params"] < t["decoder params"]
    # --binding-init match finds M* (measured: error 0.33, slot-1 / slot-2 0.951 / 0.956, FVU 0.163),
    # where the random start does not, and reaches the slot-2 atoms better than TopK with as many steps in
    # all (0.926; its FVU 0.152 is lower, with 1024 decoder parameters to 768)
    i, tt = table["binding, match"], table["topk, same total steps"]
    assert i["M rel. err"] < 0.45 and i["slot-1 match"] > 0.93 and i["slot-2 match"] > 0.93
    assert i["slot-2 match"] > max(t["slot-2 match"] + 0.1, tt["slot-2 match"] + 0.015)
    assert i["FVU"] < b["FVU"] - 0.03 and i["FVU"] < tt["FVU"] + 0.015


def test_match_finds_the_slot_map_where_icp_misses():
    """Seed 1: the icp search misses there (M error ~1.0, benchmarks/binding_warm_start.py); match does
    not search, it reads the slots and the pairing off the data and the atoms."""
    x, D, M = bound_pairs(seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SAEConfig(D_MODEL, 2 * N_BASE, arch="binding", k=2 * PAIRS)
        tcfg = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=20, binding_init="match")
        r = slot_row(train_sae(tensor_batches(x, 128), cfg, tcfg)[0], x, D, M)
    finally:
        torch.set_num_threads(threads)
    print(r)  # measured: M error 0.200, slot-1 / slot-2 0.949 / 0.953, FVU 0.155
    assert r["M rel. err"] < 0.35 and min(r["slot-1 match"], r["slot-2 match"]) > 0.93 and r["FVU"] < 0.18


def test_match_steps_on_planted_atoms():
    """The pieces of `match_slot_map` on exact atoms: the co-firing cut splits the slots, and the
    pairing and Procrustes give M* (up to the slot labelling: M* or its inverse M*^T)."""
    x, D, M = bound_pairs(n=4000, seed=0)
    W = torch.cat([D, D @ M])[torch.randperm(2 * N_BASE, generator=torch.Generator().manual_seed(0))]
    Dm, Mm, score = match_slot_map(x, W, 2 * PAIRS, refine_iters=2)
    err = min(float((Mm - M).norm()), float((Mm - M.T).norm())) / float(M.norm())
    assert err < 0.05 and score > 0.99
    # each learned slot-1 atom is a true atom of a single slot
    cos = Dm @ torch.cat([D, D @ M]).T  # (n_base, 2 n_base)
    best = cos.max(-1)
    assert float(best.values.min()) > 0.99 and len(set((best.indices // N_BASE).tolist())) == 1
    # an atom no sample picks keeps its direction instead of becoming 0 (then NaN once normalised in D)
    eye3 = torch.eye(3)
    R = refine_atoms(torch.cat([eye3[:1] * 2, eye3[1:2]]).repeat(10, 1), eye3, 1, iters=2)  # e3 is never picked
    assert torch.isfinite(R).all() and torch.allclose(R, eye3)
    # a random orthogonal M is not recovered from atoms whose two halves are unrelated: low score
    W2 = torch.cat([D, torch.nn.functional.normalize(torch.randn(N_BASE, D_MODEL), dim=-1)])
    assert match_slot_map(x, W2, 2 * PAIRS, refine_iters=0)[2] < 0.95


def test_binding_structure_round_trip_and_three_slots(tmp_path):
    x, _, _ = bound_pairs(n=600)
    sae, hist = train_sae(
        tensor_batches(x, 64), SAEConfig(D_MODEL, 48, arch="binding", k=4, slots=3), TrainConfig(steps=30)
    )
    assert sae.D.shape == (16, D_MODEL) and sae.M.shape == (2, D_MODEL, D_MODEL)
    # the decoder is the tied structure, also after folding the input scale into it
    W = sae.W_dec.detach()
    assert torch.allclose(W, torch.cat([sae.D, sae.D @ sae.M[0], sae.D @ sae.M[1]]).detach())
    assert torch.allclose(sae.D.norm(dim=-1), torch.full((16,), 1 / hist.input_scale), rtol=1e-4)
    save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 48
    assert cfg["steerscope"]["arch"] == "binding" and cfg["steerscope"]["slots"] == 3
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "D", "M_1", "M_2"} and torch.equal(t["W_dec"], W)
    back = load_saelens(tmp_path / "sae")
    assert isinstance(back, BindingSAE) and back.cfg.slots == 3
    assert torch.equal(back.M, sae.M) and torch.equal(back.D, sae.D)
    with torch.no_grad():
        assert torch.allclose(back(x[:100]).recon, sae(x[:100]).recon, atol=1e-6)
    t["W_dec"] = t["W_dec"] + 0.1  # a W_dec that is not [D ; D M]: refused, not silently replaced
    save_file(t, str(tmp_path / "sae" / "sae_weights.safetensors"))
    with pytest.raises(ss.SteerscopeError, match="damaged"):
        load_saelens(tmp_path / "sae")


def test_binding_config_errors():
    with pytest.raises(ss.SteerscopeError, match="multiple of --slots"):
        SAEConfig(8, 15, arch="binding", k=2)
    with pytest.raises(ss.SteerscopeError, match="only to --arch binding"):
        SAEConfig(8, 16, arch="topk", k=2, slots=3)
    with pytest.raises(ss.SteerscopeError, match="--slots"):
        SAEConfig(8, 16, arch="binding", k=2, slots=1)
    x, _, _ = bound_pairs(n=600)  # match pairs two slots only: a third is refused before any training
    with pytest.raises(ss.SteerscopeError, match="splits the atoms into two slots"):
        train_sae(
            tensor_batches(x, 64),
            SAEConfig(D_MODEL, 48, arch="binding", k=4, slots=3),
            TrainConfig(steps=5, binding_init="match"),
        )


def test_cli_trains_a_binding_sae(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(p * 3 for p in PROMPTS * 4))
    argv = ["sae", "train", "--layer", "1", "--text", str(text), "--arch", "binding", "--slots", "3"]
    argv += ["--n-latents", "48", "--k", "4", "--steps", "10", "--batch-size", "32", "--buffer", "128"]
    argv += ["--binding-init", "icp", "--binding-warm-steps", "5", "--binding-restarts", "8"]  # the warm start runs
    assert main(argv + ["--out", str(tmp_path / "sae"), "--model", str(ckpt)]) == 0
    assert "binding SAE, 48 latents" in capsys.readouterr().out
    # match pairs two slots: with three it refuses in one line (exit 2) before training anything
    bad = [a if a != "icp" else "match" for a in argv] + ["--out", str(tmp_path / "bad"), "--model", str(ckpt)]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "splits the atoms into two slots" in err and "\n" not in err and not (tmp_path / "bad").exists()
    back = load_saelens(tmp_path / "sae")
    assert isinstance(back, BindingSAE) and back.M.shape[0] == 2
    # `sae eval` evaluates it like any SAE: the same numbers as a plain TopK SAE holding its
    # materialised W_dec (what SAELens would load from the folder)
    out = tmp_path / "eval.json"
    argv = ["sae", "eval", "--sae", str(tmp_path / "sae"), "--text", str(text), "--json", str(out)]
    assert main(argv + ["--model", str(ckpt)]) == 0
    ev = json.loads(out.read_text())["sae"]
    assert 0 < ev["l0"] <= 4 and 0 <= ev["fvu"] < 1.5 and ev["ce_zero"] > ev["ce_clean"]
    from steerscope.sae import SAE
    from steerscope.sae.evaluate import evaluate, sae_codec

    plain = SAE(back.cfg.replace(arch="topk", slots=2))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(plain, name).copy_(getattr(back, name))
        plain.W_dec.copy_(back.W_dec)
    lm = ss.load_model(str(ckpt))
    texts = text.read_text().split("\n\n")[:8]
    a = evaluate(lm, sae_codec(back), texts, back.cfg.layer).to_dict()
    b = evaluate(lm, sae_codec(plain), texts, back.cfg.layer).to_dict()
    assert a["n_tokens"] == b["n_tokens"] > 0
    assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in ("l0", "fvu", "ce_spliced", "kl_spliced"))
