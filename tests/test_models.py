"""Loading, the architecture registry, the default-model cache checks, bad input."""

import json

import pytest
import torch
from conftest import ALL_ARCHS, PROMPTS, make_tiny_lm, tiny_lm

import steerscope as ss
from steerscope.models import ARCHITECTURES, ArchSpec, load_model, register_architecture
from steerscope.models.embedded import CACHE_FORMAT, MANIFEST, _cache_valid
from steerscope.models.lm import weights_fingerprint
from steerscope.models.registry import Arch


def test_registry_covers_the_required_architectures():
    assert set(ALL_ARCHS) <= set(ARCHITECTURES)


def test_unknown_architecture_says_how_to_register():
    lm = tiny_lm("llama")
    lm.model.config.model_type = "brand_new"
    try:
        with pytest.raises(ss.UnknownArchitectureError, match="register_architecture"):
            Arch(lm.model)
        register_architecture("brand_new", ARCHITECTURES["llama"])
        assert Arch(lm.model).n_layers == 3
        with pytest.raises(ss.SteerscopeError, match="already registered"):
            register_architecture("brand_new", ARCHITECTURES["llama"])
        register_architecture(
            "brand_new",
            ArchSpec(
                base="model",
                layers="model.nope",
                embed="model.embed_tokens",
                attn_out="self_attn.o_proj",
                mlp_out="mlp.down_proj",
                final_norm="model.norm",
            ),
            replace=True,
        )
        with pytest.raises(ss.UnknownArchitectureError, match="does not match"):
            Arch(lm.model)
    finally:
        lm.model.config.model_type = "llama"
        ARCHITECTURES.pop("brand_new", None)


def test_layer_errors_list_the_valid_range():
    lm = tiny_lm("llama")
    with pytest.raises(ss.LayerError, match=r"valid layers are 0\.\.2"):
        lm.check_layer(3)
    assert lm.check_layer(-1) == 2
    with pytest.raises(ss.LayerError):
        ss.Add(torch.ones(32), layer=7).sites(lm)


def test_local_checkpoint_round_trip(tmp_path):
    lm = make_tiny_lm("qwen2")
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    assert back.fingerprint == lm.fingerprint and back.n_layers == 3 and back.d_model == 32
    enc = lm.encode(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(lm.forward(**enc).logits, back.forward(**enc).logits, atol=1e-6)
    half = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fingerprint == lm.fingerprint  # same weights, other dtype


def test_fingerprint_changes_with_weights():
    a = make_tiny_lm("llama")
    fp = weights_fingerprint(a.model)
    with torch.no_grad():
        a.model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert weights_fingerprint(a.model) != fp


def test_bad_model_paths(tmp_path):
    with pytest.raises(ss.ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ss.ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ss.ModelLoadError, match="does not download"):
        load_model("some-org/not-a-cached-model")
    with pytest.raises(ss.SteerscopeError, match="unknown dtype"):
        load_model(tmp_path / "empty", dtype="float8")


def test_auto_dtype_is_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    from steerscope.jobs.run import RunConfig
    from steerscope.models.device import auto_dtype, parse_dtype

    for caps, want in [
        ({"avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": True, "avx512_bf16": False}, torch.bfloat16),
        ({"avx512_bf16": False, "avx2": True}, torch.float32),
        ({}, torch.float32),
    ]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert auto_dtype("cpu") == want and parse_dtype("auto", "cpu") == want, caps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for ok, want in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda ok=ok: ok)
        assert auto_dtype("cuda:0") == want
    assert auto_dtype("meta") == torch.float32
    # every command, the main job too, keeps float32 unless told (README "Planted behaviours")
    assert RunConfig().model.dtype == "float32" and ss.ModelConfig().dtype == "float32"


def test_cache_validity_check(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_text("{}")
    assert not _cache_valid(tmp_path)  # no manifest: a build that died half-way
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}))
    assert _cache_valid(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not _cache_valid(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    assert not _cache_valid(tmp_path)


def test_positions_parse():
    P = ss.Positions
    assert P.parse("all") == P.all() and P.parse("generated") == P.generated()
    assert P.parse("2:5") == P.range(2, 5) and P.parse("3:") == P.range(3) and P.parse("last:4") == P.prompt_tail(4)
    for bad in ("sometimes", "5:2", "last:0", "tail:4", "a:b"):
        with pytest.raises(ss.SteerscopeError):
            P.parse(bad)


def test_eos_ids_read_the_generation_config_then_the_tokenizer():
    """One home for the EOS set: an int, a list (instruct models stop on several), or None
    (the tokenizer's EOS), and empty when neither names one."""
    lm = make_tiny_lm("llama")
    gc = lm.model.generation_config
    assert lm.eos_ids == frozenset({2})
    gc.eos_token_id = [2, 7]
    assert lm.eos_ids == frozenset({2, 7})
    gc.eos_token_id = None
    assert lm.eos_ids == frozenset({lm.tokenizer.eos_token_id}) == frozenset({2})
    lm.tokenizer = type("NoEos", (), {"eos_token_id": None, "pad_token_id": 0})()
    assert lm.eos_ids == frozenset()


def test_left_pad_puts_every_row_at_the_end():
    lm = tiny_lm("llama")
    ids, mask = lm.left_pad([[5, 6, 7], torch.tensor([9]), []])
    pad = lm.tokenizer.pad_token_id
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 9], [pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long and ids.device == lm.device
    with pytest.raises(ss.SteerscopeError, match="no sequences"):
        lm.left_pad([])


def test_last_logits_decides_logits_to_keep_by_signature_and_never_retries():
    """A model class whose forward takes no `logits_to_keep` gets the full logits sliced (the
    same numbers); a TypeError raised inside a forward is the caller's error, not a cue to run
    the forward again (a retry would append to a KV cache twice)."""
    from steerscope.models.compat import accepts
    from steerscope.models.lm import LM

    lm = tiny_lm("llama")
    enc = lm.encode(PROMPTS)
    assert accepts(lm.model, "logits_to_keep")
    full = lm.forward(**enc).logits  # (B, T, V)
    base = type(lm.model)

    class NoKeep(base):  # a forward without the keyword (older or custom model classes)
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            assert "logits_to_keep" not in kw
            return base.forward(
                self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw
            )

    model = make_tiny_lm("llama").model
    model.__class__ = NoKeep
    plain = LM(model, lm.tokenizer, model_id="no-keep", fingerprint="")
    assert not accepts(plain.model, "logits_to_keep")
    assert torch.equal(plain.last_logits(**enc, k=3), full[:, -3:])
    assert torch.allclose(lm.last_logits(**enc, k=3), full[:, -3:], atol=1e-5)

    calls = []

    def boom(module, args):
        calls.append(1)
        raise TypeError("a bug inside the forward")

    h = lm.arch.blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(TypeError, match="a bug inside"):
            lm.last_logits(**enc)
    finally:
        h.remove()
    assert len(calls) == 1  # the forward ran once: no retry without logits_to_keep
