"""The binding SAE (W_dec = [D ; D M]) on data planted with a known dictionary D* and slot map M*,
against a plain TopK SAE of the same size and L0 trained alike; SAELens round trip; three slots; CLI.

Measured (seed 0, d=16, n_base=32, 2 bound pairs per sample, k=4, 64 latents, 800 steps; the table is
printed by test_binding_on_bound_pairs):
- from its random orthogonal start the binding SAE recovers D* (slot-1 match ~0.95) but NOT M*
  (relative error ~1.0): gradient descent lands in a local minimum where D M covers D* M* only
  partly (slot-2 match ~0.7, below plain TopK's ~0.8), with a worse FVU than TopK;
- started near M* (M* + noise of norm ~0.5 ||M*||) it moves towards M* (error ~0.35) and recovers the
  slot-2 atoms (~0.96), beating TopK on slot-2 recovery (TopK ~0.82) at a slightly lower FVU (0.167 vs
  0.174) with 768 decoder parameters to TopK's 1024. So M* is the better optimum of the objective
  (FVU 0.167 vs 0.201 for the random start); reaching it from a random start is the open problem.
  (M = I at the start is worse still: slot-2 match ~0.70; 3000 steps or lr 1e-2 do not help.)
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


def _row(sae, x, D, M) -> dict:
    W = sae.W_dec.detach()
    binding = isinstance(sae, BindingSAE)
    with torch.no_grad():
        fvu = float((x - sae(x).recon).square().sum(-1).mean() / (x - x.mean(0)).square().sum(-1).mean())
    row = {
        "slot-1 match": _match(D, sae.D.detach() if binding else W),
        "slot-2 match": _match(D @ M, W[N_BASE:] if binding else W),
        "M rel. err": float("nan"),
        "FVU": fvu,
        "decoder params": sae.D.numel() + sae.M.numel() if binding else W.numel(),
    }
    if binding:  # up to one global scale: D M's row norms trade against the encoder's
        m = sae.M.detach()[0]
        c = float((m * M).sum() / m.square().sum())
        row["M rel. err"] = float((c * m - M).norm() / M.norm())
    return row


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
            rows[name] = _row(
                train_sae(tensor_batches(x, 128), SAEConfig(D_MODEL, 2 * N_BASE, arch=arch, **run), tcfg)[0], x, D, M
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
            rows["binding, M from M*+noise"] = _row(sae, x, D, M)
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


def test_cli_trains_a_binding_sae(tiny_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(p * 3 for p in PROMPTS * 4))
    argv = ["sae", "train", "--layer", "1", "--text", str(text), "--arch", "binding", "--slots", "3"]
    argv += ["--n-latents", "48", "--k", "4", "--steps", "10", "--batch-size", "32", "--buffer", "128"]
    assert main(argv + ["--out", str(tmp_path / "sae"), "--model", str(tiny_ckpt)]) == 0
    assert "binding SAE, 48 latents" in capsys.readouterr().out
    back = load_saelens(tmp_path / "sae")
    assert isinstance(back, BindingSAE) and back.M.shape[0] == 2


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from conftest import make_tiny_lm

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
