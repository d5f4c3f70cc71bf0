"""`steerscope distill`: a LoRA adapter (PEFT) trained on a steered model reproduces a planted
steering effect on held-out prompts, loads with peft, merges into a checkpoint, and leaves the
caller's model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope import load_model
from steerscope.adapters.distill import DistillConfig, distill, merge_adapter
from steerscope.cli import main
from steerscope.directions.vectors import VectorSet
from steerscope.models.hooks import count_hooks

peft = pytest.importorskip("peft")
CFG = DistillConfig(n_train=16, n_heldout=6, n_neutral=8, max_new_tokens=12, steps=120, lr=3e-3, rank=8, batch=8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    lm = make_tiny_lm("llama")
    v = rand_vec(lm, scale=8.0)
    enc = lm.encode(["hello there"], chat=False)
    with torch.no_grad():
        before = lm.forward(**enc).logits
    res = distill(lm, v, 1, d / "adapter", CFG, progress=False)
    return lm, v, d, res, enc, before


def test_adapter_reproduces_the_steering(planted):
    lm, v, d, res, enc, before = planted
    ev = res["evaluation"]
    assert ev["reproduced_share"] > 0.5, ev
    assert ev["heldout_token_agreement_adapter"] > ev["heldout_token_agreement_unsteered"] + 0.2, ev
    curve = res["curve"]
    assert curve[-1]["kl_to_steered"] < 0.5 * curve[0]["kl_to_steered"]
    saved = json.loads((d / "adapter" / "distill.json").read_text())
    assert saved["evaluation"] == ev and saved["config"]["steps"] == CFG.steps


def test_callers_model_is_untouched(planted):
    lm, v, d, res, enc, before = planted
    with torch.no_grad():
        assert torch.equal(lm.forward(**enc).logits, before)
    assert not any("lora" in n for n, _ in lm.model.named_modules()) and count_hooks(lm.model) == 0


def test_adapter_loads_with_peft_and_merges(planted):
    from peft import PeftModel

    lm, v, d, res, enc, before = planted
    ref = make_tiny_lm("llama")  # same seed: the same base weights
    adapted = PeftModel.from_pretrained(ref.model, str(d / "adapter"))
    with torch.no_grad():
        a = adapted(**enc).logits
    assert not torch.allclose(a, before)
    merged_dir = merge_adapter(lm, d / "adapter", d / "merged")
    merged = load_model(merged_dir)
    with torch.no_grad():
        b = merged.forward(**enc).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_cli_distill_and_bad_input(tmp_path, capsys):
    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    VectorSet.create(lm, rand_vec(lm, scale=8.0), 1, "x").save(tmp_path / "vec")
    argv = [
        "distill",
        "--model",
        str(tmp_path / "ckpt"),
        "--vector",
        str(tmp_path / "vec"),
        "--out",
        str(tmp_path / "ad"),
        "--n-train",
        "8",
        "--n-heldout",
        "4",
        "--n-neutral",
        "4",
        "--max-new-tokens",
        "8",
        "--steps",
        "40",
        "--lr",
        "3e-3",
    ]
    assert main(argv + ["--merged", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "reproduced" in out and (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "m" / "config.json").is_file()
    assert main(argv) == 2 and "--force" in capsys.readouterr().err  # nothing is overwritten
    bad = argv[:-2] + ["--lr", "3e-3", "--target-modules", "no_such_proj"]
    bad[bad.index(str(tmp_path / "ad"))] = str(tmp_path / "ad2")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--target-modules" in err
