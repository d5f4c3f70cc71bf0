"""VectorSet artifact: save/load round trip, model checks, bad files."""

import json

import pytest
import torch
from conftest import PROMPTS, make_tiny_lm, rand_vec, tiny_lm

import steerscope as ss
from steerscope.directions import VectorSet, mean_difference


def _set(lm, k=3):
    return VectorSet.create(lm, rand_vec(lm, rows=k), layers=[0, 1, 2][:k], method="random", hyperparams={"scale": 4.0})


def test_round_trip_gives_identical_steering(lm, tmp_path):
    vs = _set(lm)
    vs.extras["curve"] = torch.arange(5.0)
    vs.save(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    for key in (
        "model_id",
        "model_fingerprint",
        "d_model",
        "n_layers",
        "method",
        "hyperparams",
        "norms",
        "steerscope_version",
        "created_at",
        "layers",
        "ids",
    ):
        assert key in cfg
    back = VectorSet.load(tmp_path / "v", lm)
    assert torch.equal(back.vectors, vs.vectors) and back.layers == vs.layers and back.ids == vs.ids
    assert torch.equal(back.extras["curve"], torch.arange(5.0))
    enc = lm.encode(PROMPTS)
    with torch.no_grad():
        with ss.steer(lm, ss.Add.of(vs[1], coef=2.0)):
            a = lm.forward(**enc).logits
        with ss.steer(lm, ss.Add.of(back[1], coef=2.0)):
            b = lm.forward(**enc).logits
    assert torch.equal(a, b)


def test_never_overwrites_without_force(tmp_path):
    lm = tiny_lm("llama")
    _set(lm).save(tmp_path / "v")
    with pytest.raises(ss.SteerscopeError, match="already exists"):
        _set(lm).save(tmp_path / "v")
    other = VectorSet.create(lm, rand_vec(lm, seed=9), layers=2, method="other")
    other.save(tmp_path / "v", overwrite=True)
    assert VectorSet.load(tmp_path / "v").config.method == "other"
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no temporary folders left behind


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    vs = _set(lm)
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        vs.save(tmp_path / "v")
    assert list(tmp_path.iterdir()) == []


def test_vector_for_another_model_is_refused(tmp_path):
    a, b = tiny_lm("llama"), make_tiny_lm("llama", seed=123)  # same shapes, other weights
    _set(a).save(tmp_path / "v")
    with pytest.raises(ss.ModelMismatchError, match="fingerprint") as e:
        VectorSet.load(tmp_path / "v", b)
    assert "check_model=False" in str(e.value)
    VectorSet.load(tmp_path / "v", b, check_model=False)  # allowed on request
    c = make_tiny_lm("llama", n_layers=4)
    with pytest.raises(ss.ModelMismatchError, match="3 layers vs 4"):
        VectorSet.load(tmp_path / "v", c, check_model=False)
    gpt2 = tiny_lm("gpt2")
    _set(gpt2).save(tmp_path / "g")
    # same d_model (32) but another architecture: the fingerprint tells them apart
    with pytest.raises(ss.ModelMismatchError, match="tiny-gpt2"):
        VectorSet.load(tmp_path / "g", a)


def test_bad_vector_inputs():
    lm = tiny_lm("llama")
    with pytest.raises(ss.SteerscopeError, match="d_model is 32"):
        VectorSet.create(lm, torch.ones(31), layers=0, method="x")
    with pytest.raises(ss.SteerscopeError, match="NaN"):
        VectorSet.create(lm, torch.full((32,), float("nan")), layers=0, method="x")
    with pytest.raises(ss.LayerError, match="0..2"):
        VectorSet.create(lm, torch.ones(32), layers=5, method="x")
    with pytest.raises(ss.SteerscopeError, match="2 vectors but 3 layers"):
        VectorSet.create(lm, torch.ones(2, 32), layers=[0, 1, 2], method="x")


def test_damaged_folder_errors(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(ss.SteerscopeError, match="not a steerscope vector folder"):
        VectorSet.load(tmp_path)
    _set(lm).save(tmp_path / "v")
    (tmp_path / "v" / "vectors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ss.SteerscopeError, match="damaged"):
        VectorSet.load(tmp_path / "v")


def test_mean_difference_recovers_planted_direction():
    """Prompts that differ only in one token: the difference of means at layer 0 equals the
    difference of the mean activations computed by hand."""
    lm = tiny_lm("qwen2")
    pos, neg = ["good day", "good night"], ["bad day", "bad night"]
    vs = mean_difference(lm, pos, neg, layers=[0, 2], read="mean", chat=False)
    from steerscope.models import collect_activations

    manual = (
        collect_activations(lm, pos, [0, 2], read="mean")[:, 0].mean(0)
        - collect_activations(lm, neg, [0, 2], read="mean")[:, 0].mean(0)
    ).float()
    assert torch.allclose(vs.vectors, manual, atol=1e-5)
    assert vs.layers == [0, 2] and vs.vectors.norm(dim=-1).min() > 0
