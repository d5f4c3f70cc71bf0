"""Integration tests on the real embedded SmolLM2-135M-Instruct (dequantised once, then cached)."""

import shutil

import pytest
import torch

import steerscope as ss
from steerscope.directions import VectorSet, mean_difference
from steerscope.models.embedded import MANIFEST, default_cache_dir

pytestmark = pytest.mark.integration

PROMPTS = ["Tell me about your weekend.", "What should I cook tonight?"]


@pytest.fixture(scope="module")
def smol():
    return ss.load_model()


@pytest.fixture(scope="module")
def love(smol):
    return mean_difference(
        smol,
        ["I love you, you are wonderful", "love and joy"],
        ["I hate you, you are awful", "hate and anger"],
        layers=[6],
        chat=False,
    )


def test_loads_from_cache(smol):
    folder = default_cache_dir()
    assert (folder / MANIFEST).is_file() and smol.source == str(folder)
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    again = ss.load_model()
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp  # served from the cache, not rebuilt
    assert again.fingerprint == smol.fingerprint
    assert (smol.model_type, smol.n_layers, smol.d_model, smol.has_chat_template) == ("llama", 30, 576, True)


def test_corrupt_cache_is_detected_and_rebuilt(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path))
    target = default_cache_dir()
    shutil.copytree(smol.source, target)
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # a partial copy
    lm = ss.load_model()
    assert (target / "model.safetensors").stat().st_size > 1_000_000
    enc = smol.encode(PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(lm.forward(**enc).logits, smol.forward(**enc).logits)


def test_steered_generation_differs(smol, love):
    res = ss.generate(smol, PROMPTS, vectors=love, coef=4.0, max_new_tokens=24)
    base, steered = res[:2], res[2:]
    assert all(b.vector_id is None for b in base) and all(s.vector_id == love.ids[0] for s in steered)
    assert all(b.text != s.text for b, s in zip(base, steered))
    again = ss.generate(smol, PROMPTS, vectors=love, coef=4.0, max_new_tokens=24)
    assert [r.token_ids for r in again] == [r.token_ids for r in res]  # greedy is deterministic


def test_per_row_batch_equals_alone_on_real_model(smol):
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(2, smol.d_model, generator=g) * 3
    enc = smol.encode(PROMPTS, chat=True)
    with torch.no_grad(), ss.steer(smol, ss.Add(vecs, layer=8)):
        batched = smol.forward(**enc).logits
    mask = enc["attention_mask"].bool()
    for i, p in enumerate(PROMPTS):
        with torch.no_grad(), ss.steer(smol, ss.Add(vecs[i], layer=8)):
            alone = smol.forward(**smol.encode([p], chat=True)).logits[0]
        assert (batched[i][mask[i]] - alone).abs().max() < 1e-4


def test_vector_file_round_trip(smol, love, tmp_path):
    love.save(tmp_path / "love")
    back = VectorSet.load(tmp_path / "love", smol)
    assert torch.equal(back.vectors, love.vectors) and back.config.model_fingerprint == smol.fingerprint
    assert back.config.model_id == "SmolLM2-135M-Instruct" and back.config.d_model == 576
    from conftest import tiny_lm  # tests/ is on sys.path through its conftest

    with pytest.raises(ss.ModelMismatchError, match="d_model 576 vs 32"):
        VectorSet.load(tmp_path / "love", tiny_lm("llama"))


def test_cli_on_default_model(capsys):
    from steerscope.cli import main

    assert main(["info"]) == 0
    assert "valid layer indices 0..29" in capsys.readouterr().out
