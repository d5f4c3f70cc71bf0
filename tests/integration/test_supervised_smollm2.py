"""Supervised directions on the real SmolLM2-135M-Instruct."""

import pytest
import torch

import steerscope as ss
from steerscope.directions.data import load_contrast
from steerscope.directions.extract import ExtractConfig, extract
from steerscope.directions.llamacpp import export_gguf, import_gguf
from steerscope.interventions.orthogonalize import save_orthogonalized

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return ss.load_model()


@pytest.fixture(scope="module")
def sentiment_vs(smol):
    return extract(smol, load_contrast("sentiment"), ExtractConfig(read="mean", layers=[2, 12, 22]), progress=False)


def test_sentiment_direction_separates_at_middle_layers(sentiment_vs):
    stats = {s["layer"]: s for s in sentiment_vs.config.hyperparams["stats"]}
    assert stats[12]["probe_acc"] >= 0.9
    assert all(s["separation"] > 0 for s in stats.values())  # every direction points from negative to positive


def test_orthogonalised_smollm2_equals_hook_ablation(smol, sentiment_vs, tmp_path):
    d = sentiment_vs[1].vector
    save_orthogonalized(smol, d, tmp_path / "ortho")
    edited = ss.load_model(tmp_path / "ortho")
    enc = smol.encode(["Tell me about your weekend.", "What is the capital of France?"], chat=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        with ss.steer(smol, ss.Ablate(d)):
            hooked = smol.forward(**enc).logits
        ortho = edited.forward(**enc).logits
    assert (ortho[mask] - hooked[mask]).abs().max() <= 1e-3


def test_gguf_round_trip_real(smol, sentiment_vs, tmp_path):
    export_gguf(sentiment_vs, tmp_path / "s.gguf")
    back = import_gguf(tmp_path / "s.gguf", smol)
    assert back.layers == [2, 12, 22] and torch.allclose(back.vectors, sentiment_vs.vectors)
