"""Weight orthogonalisation equals hook ablation; llama.cpp GGUF control vectors round-trip."""

import numpy as np
import pytest
import torch
from conftest import PROMPTS, rand_vec, tiny_lm

import steerscope as ss
from steerscope.directions import VectorSet
from steerscope.directions.llamacpp import export_gguf, import_gguf, read_gguf
from steerscope.interventions.orthogonalize import orthogonalized_model, save_orthogonalized
from steerscope.models import load_model

LINEAR = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("arch", LINEAR)
def test_orthogonalised_weights_equal_hook_ablation(arch):
    lm = tiny_lm(arch)
    d = rand_vec(lm, seed=21)
    enc = lm.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        with ss.steer(lm, ss.Ablate(d)):
            hooked = lm.forward(**enc).logits
        base = lm.forward(**enc).logits
        edited = orthogonalized_model(lm, d)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        ortho = edited(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos).logits
    assert (ortho[mask] - hooked[mask]).abs().max() <= 1e-3
    assert (base[mask] - hooked[mask]).abs().max() > 1e-2  # the ablation is not a no-op


def test_tied_embeddings_are_untied_and_checkpoint_round_trips(tmp_path):
    lm = tiny_lm("gemma")  # gemma ties input and output embeddings
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    d = rand_vec(lm, seed=3)
    save_orthogonalized(lm, d, tmp_path / "ortho")
    back = load_model(tmp_path / "ortho")
    enc = lm.encode(PROMPTS)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        with ss.steer(lm, ss.Ablate(d)):
            hooked = lm.forward(**enc).logits
        ortho = back.forward(**enc).logits
    assert (ortho[mask] - hooked[mask]).abs().max() <= 1e-3
    # the original model is untouched
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    with pytest.raises(ss.SteerscopeError, match="already exists"):
        save_orthogonalized(lm, d, tmp_path / "ortho")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "olmo2"])
def test_post_norm_architectures_refuse(arch):
    with pytest.raises(ss.SteerscopeError, match="not exact"):
        orthogonalized_model(tiny_lm(arch), rand_vec(tiny_lm(arch)))


def test_gguf_round_trip_and_format(tmp_path):
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=2), layers=[1, 2], method="diffmean")
    path = export_gguf(vs, tmp_path / "cv.gguf", coef=2.0).path
    import gguf

    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "llama"
    assert r.get_field("controlvector.layer_count").contents() == 2
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.2"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in r.tensors)
    back = import_gguf(path, lm)
    assert back.layers == [1, 2]
    assert torch.allclose(back.vectors, vs.vectors * 2.0, atol=1e-6)
    hint, dirs = read_gguf(path)
    assert hint == "llama" and set(dirs) == {1, 2} and dirs[1].dtype == np.float32


def test_export_of_an_all_layer_extraction_leaves_out_layer_0(tmp_path):
    """Before: `extract` (every layer) then `export` stopped at layer 0. Now the valid layers are
    written and the result names what was left out."""
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=3), layers=[0, 1, 2], method="x")
    res = export_gguf(vs, tmp_path / "all.gguf")
    assert res.layers == [1, 2] and "layer 0" in res.left_out and "x-0" in res.left_out
    assert import_gguf(tmp_path / "all.gguf", lm).layers == [1, 2]


def test_gguf_refusals(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(ss.SteerscopeError, match="layer 0"):
        export_gguf(VectorSet.create(lm, rand_vec(lm), layers=0, method="x"), tmp_path / "a.gguf")
    with pytest.raises(ss.SteerscopeError, match="several vectors at layer"):
        export_gguf(VectorSet.create(lm, rand_vec(lm, rows=2), layers=[1, 1], method="x"), tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    vs = VectorSet.create(lm, rand_vec(lm, rows=2), layers=[1, 2], method="x")
    export_gguf(vs, tmp_path / "c.gguf", indices=[1])
    assert import_gguf(tmp_path / "c.gguf", lm).layers == [2]
    with pytest.raises(ss.SteerscopeError, match="already exists"):
        export_gguf(vs, tmp_path / "c.gguf")
    with pytest.raises(ss.ModelMismatchError, match="made for a llama model"):
        import_gguf(tmp_path / "c.gguf", tiny_lm("qwen2"))
    with pytest.raises(ss.ModelMismatchError, match="d_model"):
        import_gguf(tmp_path / "c.gguf", _wide())
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ss.SteerscopeError, match="not a GGUF file"):
        import_gguf(tmp_path / "junk.gguf", lm)


def _wide():
    """A llama with d_model 48."""
    from conftest import _tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerscope.models.lm import LM, weights_fingerprint

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = AutoModelForCausalLM.from_config(cfg).eval()
    return LM(m, _tokenizer(False), "wide", weights_fingerprint(m))
