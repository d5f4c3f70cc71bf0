"""Big-model placement through accelerate device maps: a model split in two parts (here: half the
blocks in memory, half offloaded to disk; on a GPU machine also cuda + cpu) gives the unsplit
model's logits, steered and unsteered, and every steering path works across the split."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORE_ARCHS, make_tiny_lm, rand_vec, split_map

from steerscope import Ablate, Add, Clamp, Positions, generate, load_model, steer
from steerscope.directions.vectors import SteeringVector, VectorSet
from steerscope.errors import SteerscopeError
from steerscope.models.activations import read_layer
from steerscope.models.hooks import count_hooks
from steerscope.models.loading import ModelConfig
from steerscope.models.placement import devices, parse_device_map, parse_max_memory


@pytest.fixture(params=CORE_ARCHS)
def pair(request, tmp_path):
    """(unsplit, split) loads of the same tiny checkpoint."""
    lm = make_tiny_lm(request.param)
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    whole = load_model(tmp_path / "ckpt")
    split = load_model(tmp_path / "ckpt", device_map=json.dumps(split_map(whole)), offload_folder=str(tmp_path / "off"))
    return whole, split


def _sae_clamp(lm):
    """SAE steering on the offloaded part of the model."""
    from steerscope.sae import SAE, ClampFeature, SAEConfig

    torch.manual_seed(0)
    return ClampFeature(SAE(SAEConfig(lm.d_model, 16, arch="topk", k=4, layer=lm.n_layers - 1)), feature=3, value=25.0)


def test_split_model_gives_identical_logits(pair):
    whole, split = pair
    assert "disk" in devices(split.model) and split.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in split.model.parameters())  # really offloaded
    assert split.fingerprint == whole.fingerprint  # read from the offloaded weights
    enc = whole.encode(["hello there", "a b"], chat=False)
    v = rand_vec(whole, rows=2)
    d = rand_vec(whole, seed=3)
    cases = [
        (),
        (Add(v, layer=whole.n_layers - 1, coef=torch.tensor([1.0, 2.0])),),  # per-row, on the offloaded part
        (Add(v[0], layer=0, positions=Positions.range(1, 3)),),
        (Ablate(d),),
        (Clamp(d, value=1.5, layer=whole.n_layers - 1),),
        (_sae_clamp(whole),),
    ]
    with torch.no_grad():
        for ivs in cases:
            with steer(whole, *ivs):
                a = whole.forward(**enc).logits
            with steer(split, *ivs):
                b = split.forward(**enc).logits
            assert torch.equal(a, b), f"{whole.model_type}: {ivs}"
    assert count_hooks(whole.model) == 0
    # accelerate's own hooks wrap forward(); steerscope's forward hooks are all gone
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in split.model.modules()) == 0


def test_generation_discovery_and_reads_across_the_split(pair, tmp_path):
    whole, split = pair
    vs = VectorSet.create(whole, rand_vec(whole, rows=2), [1, whole.n_layers - 1], "random")
    a = generate(whole, ["hello", "xyz"], vectors=vs, chat=False, max_new_tokens=8)
    b = generate(
        split, ["hello", "xyz"], vectors=VectorSet.load(vs.save(tmp_path / "v"), split), chat=False, max_new_tokens=8
    )
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    enc = whole.encode(["hello there"], chat=False)
    for L in (0, whole.n_layers - 1):
        assert torch.equal(
            read_layer(whole, L, enc["input_ids"], enc["attention_mask"]),
            read_layer(split, L, enc["input_ids"], enc["attention_mask"]),
        )
    from steerscope.models.layer_range import LayerRange

    theta = rand_vec(whole, rows=3)
    outs = []
    for lm in (whole, split):
        lr = LayerRange(lm, ["hello there", "ab"], 0, lm.n_layers - 1, chat=False)
        outs.append(lr.delta(theta))
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and outs[0].abs().sum() > 0


def test_orthogonalisation_refuses_offloaded_weights(pair):
    from steerscope.interventions.orthogonalize import orthogonalized_model

    whole, split = pair
    if whole.model_type not in ("llama", "qwen2", "gpt2", "gpt_neox"):
        pytest.skip("not orthogonalisable")
    with pytest.raises(SteerscopeError, match="offloads some to disk"):
        orthogonalized_model(split, rand_vec(whole))


def test_split_in_memory_orthogonalises_like_unsplit(tmp_path):
    """A device map that keeps everything resident (here both parts on cpu) orthogonalises."""
    from steerscope.interventions.orthogonalize import orthogonalized_model

    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    whole = load_model(tmp_path / "ckpt")
    split = load_model(tmp_path / "ckpt", device_map=json.dumps(split_map(whole, "cpu")))
    d = rand_vec(whole)
    enc = whole.encode(["hello"], chat=False)
    with torch.no_grad():
        a = orthogonalized_model(whole, d)(**enc).logits
        b = orthogonalized_model(split, d)(**enc).logits
    assert torch.equal(a, b)


def test_split_on_a_gpu(device, tmp_path):
    """cuda + cpu: the first blocks on the GPU, the rest on the CPU (close, not identical:
    different kernels)."""
    if device != "cuda":
        pytest.skip("needs a GPU to split across devices")
    lm = make_tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    whole = load_model(tmp_path / "ckpt")
    dm = {k: (0 if v == "cpu" and ".layers." not in k else v) for k, v in split_map(whole, "cpu").items()}
    split = load_model(tmp_path / "ckpt", device_map=json.dumps(dm))
    enc = whole.encode(["hello there"], chat=False)
    v = rand_vec(whole)
    with torch.no_grad(), steer(whole, Add(v, layer=2)):
        a = whole.forward(**enc).logits
    with torch.no_grad(), steer(split, Add(v, layer=2)):
        b = split.forward(**{k: t.to(split.device) for k, t in enc.items()}).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4)
    r = generate(split, ["hello"], vectors=[SteeringVector(v, 2, "v")], chat=False, max_new_tokens=6)
    assert len(r) == 2


def test_placement_flags_are_checked():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    with pytest.raises(SteerscopeError, match="use auto, balanced"):
        parse_device_map("everywhere")
    with pytest.raises(SteerscopeError, match="mapped to 'gpu7'"):
        parse_device_map('{"lm_head": "gpu7"}')
    with pytest.raises(SteerscopeError, match="either --device or --device-map"):
        ModelConfig(device_map="auto", device="cuda" if torch.cuda.is_available() else "cpu:0")
    with pytest.raises(SteerscopeError, match="only applies with --device-map"):
        ModelConfig(max_memory="0=1GiB")
    if not torch.cuda.is_available():
        with pytest.raises(SteerscopeError, match="needs a CUDA GPU"):
            ModelConfig(quantize="8bit").load()
