"""Batched steered generation on tiny models."""

import pytest
import torch
from conftest import PROMPTS, make_tiny_lm, rand_vec, tiny_lm

import steerscope as ss
from steerscope.directions import VectorSet


def _vs(lm, k=4, scale=30.0):
    return VectorSet.create(lm, rand_vec(lm, rows=k, scale=scale), layers=[1, 1, 2, 0][:k], method="random")


def test_results_are_structured_and_ordered(lm):
    vs = _vs(lm)
    res = ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=5)
    assert len(res) == (len(vs) + 1) * len(PROMPTS)
    assert [r.vector_id for r in res[: len(PROMPTS)]] == [None] * len(PROMPTS)  # unsteered first
    assert [(r.vector_id, r.prompt_index) for r in res[len(PROMPTS) :]] == [
        (i, p) for i in vs.ids for p in range(len(PROMPTS))
    ]
    for r in res:
        assert r.prompt == PROMPTS[r.prompt_index] and isinstance(r.text, str) and r.finish_reason in ("eos", "length")
        assert len(r.token_ids) <= 5 and r.text == lm.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    steered = [r for r in res if r.vector_id is not None]
    assert any(r.token_ids != res[r.prompt_index].token_ids for r in steered)  # steering did something


def test_batched_equals_loop_over_vectors(lm):
    vs = _vs(lm)
    together = ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=6, include_unsteered=False)
    for i in range(len(vs)):
        alone = ss.generate(lm, PROMPTS, vectors=vs[i], max_new_tokens=6, include_unsteered=False)
        assert [r.token_ids for r in alone] == [r.token_ids for r in together if r.vector_id == vs.ids[i]]


def test_batch_size_does_not_change_results(lm):
    vs = _vs(lm)
    a = ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=6, batch_size=64)
    b = ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=6, batch_size=2)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_unsteered_row_equals_plain_generation(lm):
    plain = ss.generate(lm, PROMPTS, max_new_tokens=6)
    mixed = ss.generate(lm, PROMPTS, vectors=_vs(lm), max_new_tokens=6)
    assert [r.token_ids for r in plain] == [r.token_ids for r in mixed[: len(PROMPTS)]]


def test_greedy_is_deterministic_and_sampling_is_seeded():
    lm = tiny_lm("llama")
    vs = _vs(lm)
    assert ss.generate(lm, PROMPTS, vectors=vs, max_new_tokens=8) == ss.generate(
        lm, PROMPTS, vectors=vs, max_new_tokens=8
    )
    s1 = ss.generate(lm, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    s2 = ss.generate(lm, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    s3 = ss.generate(lm, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
    assert s1 == s2 and s1 != s3


def test_generated_only_positions_leave_the_first_token():
    """Steering only generated tokens cannot change the first new token (it is predicted from
    the prompt pass), but changes later ones."""
    lm = tiny_lm("gpt2")
    vs = _vs(lm, k=4, scale=60.0)
    base = ss.generate(lm, PROMPTS, max_new_tokens=8)
    gen = ss.generate(
        lm, PROMPTS, vectors=vs, positions=ss.Positions.generated(), max_new_tokens=8, include_unsteered=False
    )
    for r in gen:
        assert r.token_ids[0] == base[r.prompt_index].token_ids[0]
    assert any(r.token_ids != base[r.prompt_index].token_ids for r in gen)


def test_chat_template_applied_when_present():
    lm = make_tiny_lm("llama", chat=True)
    assert lm.format_prompt("hi") == "<user>hi<assistant>"
    assert lm.format_prompt("hi", chat=False) == "hi"
    assert lm.format_prompt("hi", system="be nice") == "<system>be nice<user>hi<assistant>"
    assert lm.encode(["hi"], chat=None)["input_ids"].shape[1] > lm.encode(["hi"], chat=False)["input_ids"].shape[1]
    with pytest.raises(ss.SteerscopeError, match="no chat template"):
        tiny_lm("llama").format_prompt("hi", chat=True)


def test_shared_interventions_apply_to_every_row():
    lm = tiny_lm("llama")
    d = rand_vec(lm, seed=4)
    base = ss.generate(lm, PROMPTS, max_new_tokens=6)
    abl = ss.generate(lm, PROMPTS, max_new_tokens=6, interventions=[ss.Add(d * 40, layer=1)])
    assert [r.token_ids for r in base] != [r.token_ids for r in abl]


def test_bad_generation_inputs():
    lm = tiny_lm("llama")
    with pytest.raises(ss.SteerscopeError, match="empty"):
        ss.generate(lm, [])
    with pytest.raises(ss.SteerscopeError, match="empty"):
        ss.generate(lm, [""])
    with pytest.raises(ss.LayerError, match="valid layers are 0..2"):
        ss.generate(lm, PROMPTS, vectors=torch.ones(32), layer=3)
    with pytest.raises(ss.SteerscopeError, match="d_model is 32"):
        ss.generate(lm, PROMPTS, vectors=torch.ones(16), layer=1)
    with pytest.raises(ss.SteerscopeError, match="NaN"):
        ss.generate(lm, PROMPTS, vectors=torch.tensor([float("inf")] * 32), layer=1)
    with pytest.raises(ss.SteerscopeError, match="need layer"):
        ss.generate(lm, PROMPTS, vectors=torch.ones(32))
    with pytest.raises(ss.SteerscopeError, match="3 coefficients for 2 vectors"):
        ss.generate(lm, PROMPTS, vectors=torch.ones(2, 32), layer=1, coef=[1, 2, 3])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_last_token_logits_with_a_shared_prefix_equal_plain_rows(arch, mode):
    """Chat prompts share the template's prefix: computing it once per vector and letting the
    suffixes attend to its cache gives the plain batch's logits."""
    from conftest import make_tiny_lm

    from steerscope.generation import _SharedPrefix, last_token_logits

    lm = make_tiny_lm(arch, chat=True)
    prompts = ["Hello there", "A much longer prompt here", "Hi", "What is this?"]
    vs = ss.VectorSet.create(lm, torch.randn(3, lm.d_model) * 3, layers=[0, 1, 2], method="x")
    sp = _SharedPrefix(lm, prompts, True, None)
    assert sp.ok and sp.split.C >= 4  # "<user>" is shared
    kw = dict(vectors=vs, mode=mode, include_unsteered=True, chat=True, batch_size=5)
    shared = last_token_logits(lm, prompts, **kw)
    plain = last_token_logits(lm, prompts, share_prefix=False, **kw)
    assert (shared - plain).abs().max() < 1e-4
    assert not torch.allclose(plain[1], plain[0])  # the vectors do something
    # and the shared path itself (not a fallback) produced them
    from steerscope.generation import _per_row, _variants

    variants = _variants(lm, vs, None, 1.0, True)
    rows = [(vi, pi) for vi in range(len(variants)) for pi in range(len(prompts))]
    ivs = lambda rs: _per_row(lm, [variants[vi] for vi, _ in rs], ss.Positions.all(), mode)  # noqa: E731
    with torch.no_grad():
        direct = sp._shared(rows, ivs)
    assert sp.ok and (direct - plain.reshape(-1, plain.shape[-1])).abs().max() < 1e-4


def test_last_token_scores_do_not_keep_whole_logit_tensors_alive():
    """steerscope 0.1 kept `logits[:, -1].float()` per batch: a view (float() of fp32 is a no-op)
    holding each batch's whole (B, T, vocab) tensor, so `select` grew by ~300 MB per batch on
    SmolLM2. Each kept result must own only its own numbers."""
    from steerscope.generation import last_position_logits, last_token_logits

    lm = tiny_lm("llama")
    lg = last_position_logits(lm, lm.encode(PROMPTS))
    assert lg.untyped_storage().nbytes() == lg.numel() * lg.element_size()
    kept = []
    vs = ss.VectorSet.create(lm, torch.randn(4, lm.d_model), layers=[1] * 4, method="x")
    last_token_logits(lm, PROMPTS, vectors=vs, batch_size=2, reduce=lambda l, _: kept.append(l) or l[:, 0])
    assert all(k.untyped_storage().nbytes() == k.numel() * k.element_size() for k in kept)


def test_per_row_grouping_gives_each_row_only_its_own_steering():
    """`interventions.rows.per_row` (the one grouping used by `generate` and the server): a
    row's two additions at one layer and positions go to two interventions (slots); rows that ask
    for nothing get zero vectors and coefficients, and ablation strength 0."""
    from steerscope.interventions.ops import Ablate, Add
    from steerscope.interventions.rows import AblateSpec, AddSpec, RowSteering, per_row

    d, A = 8, ss.Positions.all()
    v = torch.randn(4, d)
    rows = [
        RowSteering(adds=(AddSpec(v[0], 2, 1.5, A), AddSpec(v[1], 2, 2.0, A))),
        RowSteering(adds=(AddSpec(v[2], 0, 3.0, A),), ablations=(AblateSpec(v[3], A),)),
        RowSteering(),
    ]
    ivs = per_row(rows, d)
    assert [type(i) for i in ivs] == [Ablate, Add, Add, Add]  # ablations first, then adds by layer
    abl, add0, add2a, add2b = ivs
    assert abl.strength.tolist() == [0.0, 1.0, 0.0]
    assert add0.layer == 0 and add0.coef.tolist() == [0.0, 3.0, 0.0] and torch.equal(add0.vector[1], v[2])
    assert add2a.coef.tolist() == [1.5, 0.0, 0.0] and add2b.coef.tolist() == [2.0, 0.0, 0.0]
    assert torch.equal(add2a.vector[0], v[0]) and torch.equal(add2b.vector[0], v[1])
    assert not add2a.vector[1:].any() and not add2b.vector[1:].any()


def test_prefix_split_cuts_and_maps_back():
    """`models.prefix.PrefixSplit`: the shared prefix, each row's own tokens left-padded (a subset
    exactly as if padded on its own), and the index back to the original layout."""
    from steerscope.models.prefix import PrefixSplit, mismatch

    lm = make_tiny_lm("llama", chat=True)
    prompts = ["Hello there", "A much longer prompt here", "Hi"]
    enc = lm.encode(prompts, chat=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    sp = PrefixSplit.find(ids, mask)
    assert sp is not None and sp.C >= 4 and PrefixSplit.find(ids[:1], mask[:1]) is None
    own = [ids[i][mask[i].bool()][sp.C :] for i in range(3)]
    for rows in ([0, 2], [1], [2, 1, 0]):
        suf, full = sp.suffixes(rows)
        ref_ids, ref_mask = lm.left_pad([own[i] for i in rows])
        assert torch.equal(suf, ref_ids) and torch.equal(full[:, sp.C :], ref_mask) and bool(full[:, : sp.C].all())
    suf, _ = sp.suffixes()
    both = torch.cat([sp.prefix[None].expand(3, -1), suf], dim=1)  # [prefix | suffix] layout
    back = both.gather(1, sp.gather_index())
    assert torch.equal(back[mask.bool()], ids[mask.bool()])
    x = torch.randn(3, 5)
    assert mismatch(x, x, torch.float32) is None
    assert "relative error" in mismatch(x * 1.01, x, torch.float32) and mismatch(x * 1.01, x, torch.bfloat16) is None
    assert mismatch(x * float("nan"), x, torch.bfloat16) is not None
