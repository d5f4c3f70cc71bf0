"""Every layer on every available device: tensors are created on the model's device, SAEs move to
the activations' device. On a machine without a GPU the CUDA rows are skipped."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, finetuned, needs_base, tiny_on

import steerscope as ss
from steerscope.directions.data import from_pairs
from steerscope.directions.discovery import DISCOVERY, DiscoverConfig, discover, random_control
from steerscope.directions.extract import ExtractConfig, extract
from steerscope.judging.selection import SelectConfig, select
from steerscope.judging.vector_metrics import compute_vector_metrics
from steerscope.models.layer_range import LayerRange
from steerscope.sae import SAE_ARCHS, ActivationBuffer, ClampFeature, SAEConfig, TrainConfig, train_sae
from steerscope.sae.evaluate import evaluate, sae_codec


def test_steer_generate_and_metrics(device):
    lm = tiny_on("llama", device)
    v = torch.randn(2, lm.d_model)
    vs = ss.VectorSet.create(lm, v, layers=[1, 1], method="x")
    res = ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=4, temperature=1.0)
    assert len(res) == 3 * len(PROMPTS)
    lr = LayerRange(lm, PROMPTS, 0, 2)
    m = compute_vector_metrics(lm, vs, res, neutral=PROMPTS[:1], layer_range=lr)
    assert all(x["kl_neutral"] >= 0 for x in m.values())


@pytest.mark.parametrize("method", DISCOVERY.names())
def test_every_discovery_method(device, method):
    lm = tiny_on("llama", device)
    cfg = DiscoverConfig.of(
        method,
        source=0,
        target=2,
        n_vectors=2,
        R=1.5,
        **({"steps": 3} if method == "melbo" else {}),
        **({"power_iters": 3} if method == "jacobian" else {}),
    )
    base = finetuned(lm)[0] if needs_base(method) else None
    vs = discover(lm, PROMPTS, cfg, progress=False, base=base)
    assert vs.vectors.device.type == "cpu" and torch.allclose(vs.vectors.norm(dim=-1), torch.full((2,), 1.5), atol=1e-4)
    random_control(lm, vs)


def test_calibrated_R(device):
    lm = tiny_on("llama", device)
    vs = discover(lm, PROMPTS, DiscoverConfig.of("random", source=0, target=2, n_vectors=2), progress=False)
    assert vs.config.hyperparams["calibration"]["R"] > 0


def test_extract_and_select(device):
    lm = tiny_on("gpt2", device)
    data = from_pairs(["good day", "good night"], ["bad day", "bad night"])
    vs = extract(lm, data, ExtractConfig(layers=[1, 2], method="probe"), progress=False)
    sel = select(lm, vs, "logodds:a,e", PROMPTS, PROMPTS, PROMPTS, SelectConfig(kl_bound=1e3, max_layer_frac=1.0))
    assert len(sel.candidates) == 2


@pytest.mark.parametrize("arch", SAE_ARCHS.names())
def test_sae_train_eval_and_clamp(device, arch):
    lm = tiny_on("llama", device)
    texts = ["Hello there, how are you doing today?", "The cat sat on the mat."] * 4
    buf = ActivationBuffer(lm, texts, 1, batch_size=16, buffer_tokens=64)
    sae, _ = train_sae(buf, SAEConfig(lm.d_model, 16, arch=arch, k=2, layer=1), TrainConfig(steps=4, device=device))
    assert sae.W_dec.device.type == torch.device(device).type
    evaluate(lm, sae_codec(sae), texts[:2], 1)
    with torch.no_grad(), ss.steer(lm, ClampFeature(sae, feature=0, value=2.0)):
        lm.forward(**lm.encode(PROMPTS))
