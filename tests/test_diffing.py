"""Model-diffing discovery (`weightdiff`, `actdiff`): a planted rank-1 change to a model's
residual-writing weights is recovered from the weights and from the activations; identical
models, another architecture, a post-norm writer and a missing base are refused in one line."""

import json

import pytest
import torch
from conftest import PROMPTS, finetuned, make_tiny_lm, tiny_lm

from steerscope.cli import main
from steerscope.directions.discovery import DiscoverConfig, discover
from steerscope.errors import SteerscopeError


def _run(method, ft, base, n=2, source=1, **kw):
    cfg = DiscoverConfig.of(method, source=source, target=2, n_vectors=n, R=2.0, **kw)
    return discover(ft, PROMPTS, cfg, progress=False, base=base)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_weightdiff_recovers_the_planted_output_direction(arch):
    base = tiny_lm(arch)
    ft, u = finetuned(base, seed=4, scale=3.0, blocks=(0, 2))
    vs = _run("weightdiff", ft, base, n=4)
    cos = vs.vectors @ u / vs.vectors.norm(dim=-1)
    assert abs(float(cos[0])) > 0.999 and torch.allclose(vs.vectors[1], -vs.vectors[0])  # both signs
    assert abs(float(cos[2])) < 1e-4  # the next direction is orthogonal to it
    prov = vs.config.hyperparams["provenance"]
    assert prov[0]["block"] in (0, 2) and prov[0]["sigma"] == pytest.approx(3.0, rel=1e-3)
    assert [p["sign"] for p in prov] == [1, -1, 1, -1]
    assert vs.config.hyperparams["matrices_changed"] == 2


def test_actdiff_finds_the_direction_the_fine_tune_writes():
    base = make_tiny_lm("llama")  # not the shared one: output_hidden_states leaves transformers' hooks on it
    ft, u = finetuned(base, seed=4, scale=3.0, blocks=(0,))
    vs = _run("actdiff", ft, base, n=4, source=0)
    h = vs.config.hyperparams
    assert h["components"][:3] == [{"component": c, "sign": s} for c, s in (("mean", 1), ("mean", -1), ("pc1", 1))]
    assert h["mean_difference_norm"] > 0
    # the known answer: block 0's output (transformers' hidden_states[1]), fine-tune minus base,
    # averaged over every real token after each prompt's first
    enc = ft.encode(PROMPTS, chat=False)
    with torch.no_grad():
        hs = [m.model(**enc, output_hidden_states=True).hidden_states[1] for m in (ft, base)]
    mask = enc["attention_mask"].bool()
    keep = mask & (mask.long().cumsum(-1) > 1)
    want = (hs[0] - hs[1])[keep].mean(0)
    assert float(torch.cosine_similarity(vs.vectors[0], want, dim=0)) > 0.9999
    assert h["mean_difference_norm"] == pytest.approx(float(want.norm()), rel=1e-4)
    # the change is written along u and then passes through block 0's MLP: u lies mostly in the
    # span of the mean difference and the first component; a random direction does not
    dirs = vs.vectors[::2] / vs.vectors[::2].norm(dim=-1, keepdim=True)  # (2, d) mean, pc1
    r = torch.randn(base.d_model, generator=torch.Generator().manual_seed(0))
    assert float((dirs @ u).norm()) > 0.6 > 0.4 > float((dirs @ (r / r.norm())).norm())


@pytest.mark.parametrize("method", ["weightdiff", "actdiff"])
def test_model_diffing_refuses_what_it_cannot_compare(method):
    lm = tiny_lm("llama")
    with pytest.raises(SteerscopeError, match="nothing changed"):
        _run(method, lm, lm)
    with pytest.raises(SteerscopeError, match="--base MODEL"):
        _run(method, lm, None)
    with pytest.raises(SteerscopeError, match="not the fine-tune's architecture"):
        _run(method, lm, make_tiny_lm("llama", n_layers=4))


def test_weightdiff_fails_loudly_on_a_post_norm_writer():
    base = tiny_lm("gemma2")  # its blocks write into the residual stream through a norm
    with pytest.raises(SteerscopeError, match=r"not a linear map \(transformers \d"):
        _run("weightdiff", finetuned(base, blocks=())[0], base)


def test_cli_discover_weightdiff_with_a_base_folder(ckpt, tmp_path, capsys):
    base = make_tiny_lm("llama")  # the same weights as `ckpt`
    ft, u = finetuned(base, seed=2, scale=3.0, blocks=(1,))
    ft.model.save_pretrained(tmp_path / "ft")
    ft.tokenizer.save_pretrained(tmp_path / "ft")
    args = ["discover", "--model", str(tmp_path / "ft"), "--method", "weightdiff", "--source", "1", "--target", "2"]
    args += ["--n-vectors", "2", "--R", "2", "--out", str(tmp_path / "wd")]
    assert main(args + ["--base", str(ckpt)]) == 0
    cfg = json.loads((tmp_path / "wd" / "config.json").read_text())
    assert cfg["method"] == "weightdiff" and cfg["hyperparams"]["provenance"][0]["block"] == 1
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "wd2")]) == 2  # no --base for a model that is not an organism
    err = capsys.readouterr().err.strip()
    assert "--base MODEL" in err and "\n" not in err


def test_weightdiff_at_block_adds_each_vector_where_it_was_written():
    from steerscope.models.activations import residual_norms

    base = tiny_lm("llama")
    ft, u = finetuned(base, seed=4, scale=3.0, blocks=(0, 2))
    vs = _run("weightdiff", ft, base, n=4, source=1, at="block")
    blocks = [p["block"] for p in vs.config.hyperparams["provenance"]]
    assert vs.layers == blocks and set(blocks) <= {0, 2} and vs.config.hyperparams["at"] == "block"
    norms = residual_norms(ft)
    want = torch.tensor([2.0 * float(norms[b] / norms[1]) for b in blocks])
    assert torch.allclose(vs.vectors.norm(dim=-1), want, rtol=1e-4)
    assert abs(float(vs.vectors[0] @ u / vs.vectors[0].norm())) > 0.999
