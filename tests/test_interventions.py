"""Contract table: every intervention runs through the same checks on every core architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ALL_ARCHS, PROMPTS, rand_vec, tiny_lm

import steerscope as ss
from steerscope.interventions import INTERVENTIONS, Ablate, Add, Clamp, Condition, Conditional, Positions
from steerscope.models import Site, count_hooks, hooks, record
from steerscope.sae import ClampFeature

NOTHING = Positions.range(10_000)  # selects no token


def _sae(lm):
    """A random TopK SAE reading layer 1 of the tiny model (for the ClampFeature row)."""
    from steerscope.sae import SAE, SAEConfig

    torch.manual_seed(0)
    return SAE(SAEConfig(lm.d_model, 16, arch="topk", k=4, layer=1))


# name -> factory(lm, positions, rows=None) -> intervention; `layer` = first layer it touches.
CASES = {
    "add": (lambda lm, pos, rows=None: Add(rand_vec(lm, rows=rows), layer=1, coef=2.0, positions=pos), 1),
    "add_resid_pre": (
        lambda lm, pos, rows=None: Add(rand_vec(lm, rows=rows), layer=2, kind="resid_pre", positions=pos),
        1,
    ),
    "add_mlp_out": (lambda lm, pos, rows=None: Add(rand_vec(lm, rows=rows), layer=1, kind="mlp_out", positions=pos), 1),
    "ablate_one": (lambda lm, pos, rows=None: Ablate(rand_vec(lm, rows=rows), layer=1, positions=pos), 1),
    "ablate_all": (lambda lm, pos, rows=None: Ablate(rand_vec(lm, rows=rows), positions=pos), 0),
    "clamp": (
        lambda lm, pos, rows=None: Clamp(
            rand_vec(lm, rows=rows), value=torch.linspace(-3, 3, rows) if rows else 2.5, layer=1, positions=pos
        ),
        1,
    ),
    "sae_clamp": (lambda lm, pos, rows=None: ClampFeature(_sae(lm), feature=3, value=25.0, positions=pos), 1),
    # CAST: the condition read at layer 0; per-row thresholds -1 / 1 / -1 make row 1 never fire
    # (cos > 1 is impossible) while rows 0 and 2 always do, so a batch mixes gated and steered rows.
    "conditional": (
        lambda lm, pos, rows=None: Conditional(
            Add(rand_vec(lm, rows=rows), layer=1, coef=2.0, positions=pos),
            Condition(
                rand_vec(lm, seed=9), layer=0, threshold=torch.tensor([-1.0, 1.0, -1.0])[:rows] if rows else -1.0
            ),
        ),
        1,
    ),
    "combo": (
        lambda lm, pos, rows=None: [
            Ablate(rand_vec(lm, seed=5), layer=2, positions=pos),
            Add(rand_vec(lm, rows=rows), layer=1, coef=3.0, positions=pos),
        ],
        1,
    ),
}


def test_every_registered_intervention_has_a_row():
    """A new intervention registered in INTERVENTIONS fails here until it joins the table."""
    lm = tiny_lm("llama")
    made = {
        type(iv).__name__
        for f, _ in CASES.values()
        for iv in (lambda x: x if isinstance(x, list) else [x])(f(lm, Positions.all()))
    }
    assert {m.fn.__name__ for _, m in INTERVENTIONS.items()} <= made


def logits(lm, enc, *interventions):
    with torch.no_grad(), ss.steer(lm, *interventions):
        return lm.forward(**enc).logits


@pytest.fixture(scope="module")
def enc_by_arch():
    return {mt: tiny_lm(mt).encode(PROMPTS) for mt in ALL_ARCHS}


@pytest.mark.parametrize("case", CASES)
def test_steering_changes_output(lm, case, enc_by_arch):
    """Guards against silent no-ops: every intervention changes the logits."""
    enc = enc_by_arch[lm.model_type]
    base = logits(lm, enc)
    steered = logits(lm, enc, CASES[case][0](lm, Positions.all()))
    assert (steered - base).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_selecting_no_position_is_identical(lm, case, enc_by_arch):
    enc = enc_by_arch[lm.model_type]
    assert torch.equal(logits(lm, enc), logits(lm, enc, CASES[case][0](lm, NOTHING)))


def test_zero_vector_is_identical(any_lm, enc_by_arch):
    enc = enc_by_arch[any_lm.model_type]
    zero = torch.zeros(any_lm.d_model)
    assert torch.equal(logits(any_lm, enc), logits(any_lm, enc, Add(zero, layer=1, coef=5.0)))


@pytest.mark.parametrize("case", CASES)
def test_layers_before_site_untouched(lm, case, enc_by_arch):
    enc = enc_by_arch[lm.model_type]
    factory, first = CASES[case]
    before = list(range(first))
    if not before:
        pytest.skip("touches layer 0")
    with torch.no_grad(), record(lm, before) as a:
        lm.forward(**enc)
        a = dict(a)
    with torch.no_grad(), ss.steer(lm, factory(lm, Positions.all())), record(lm, before) as b:
        lm.forward(**enc)
    for l in before:
        assert torch.equal(a[l], b[l])


def _proj(x, d):
    return x @ (d / d.norm())


def test_ablation_leaves_zero_projection(any_lm, enc_by_arch):
    lm, enc = any_lm, enc_by_arch[any_lm.model_type]
    d = rand_vec(lm, seed=7)
    valid = enc["attention_mask"].bool()
    with torch.no_grad(), ss.steer(lm, Ablate(d, layer=1)), record(lm, [1]) as acts:
        lm.forward(**enc)
    assert _proj(acts[1], d)[valid].abs().max() < 1e-5
    # everywhere: every block input and output has no component along d
    with (
        torch.no_grad(),
        ss.steer(lm, Ablate(d)),
        record(lm, range(lm.n_layers)) as post,
        record(lm, range(lm.n_layers), kind="resid_pre") as pre,
    ):
        lm.forward(**enc)
    for l in range(lm.n_layers):
        assert _proj(post[l], d)[valid].abs().max() < 1e-4
        assert _proj(pre[l], d)[valid].abs().max() < 1e-4


def test_clamp_sets_projection(lm, enc_by_arch):
    enc = enc_by_arch[lm.model_type]
    d = rand_vec(lm, seed=3)
    with torch.no_grad(), ss.steer(lm, Clamp(d, value=1.5, layer=2)), record(lm, [2]) as acts:
        lm.forward(**enc)
    valid = enc["attention_mask"].bool()
    assert torch.allclose(_proj(acts[2], d)[valid], torch.full((int(valid.sum()),), 1.5), atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_per_row_batch_equals_each_row_alone(lm, case):
    """Row i of a left-padded batch, steered by parameter row i, equals that prompt run alone."""
    factory = CASES[case][0]
    batch_iv = factory(lm, Positions.all(), rows=len(PROMPTS))
    enc = lm.encode(PROMPTS)
    batched = logits(lm, enc, batch_iv)
    mask = enc["attention_mask"].bool()
    for i, p in enumerate(PROMPTS):
        alone_iv = _row(batch_iv, i)
        one = logits(lm, lm.encode([p]), alone_iv)[0]
        assert (batched[i][mask[i]] - one).abs().max() <= 1e-5, f"row {i}"


def _row(iv, i):
    """The same intervention with every per-row parameter reduced to row i."""
    if isinstance(iv, list):
        return [_row(x, i) for x in iv]
    if isinstance(iv, Conditional):
        conds = [iv.condition] if isinstance(iv.condition, Condition) else list(iv.condition)
        conds = [_row(c, i) for c in conds]
        return Conditional(_row(iv.behaviour, i), conds, combine=iv.combine, positions=iv.positions)
    kw = {f.name: getattr(iv, f.name) for f in dataclasses.fields(iv) if f.init}
    for k in ("vector", "direction", "value", "coef", "strength", "threshold"):
        v = kw.get(k)
        if (
            isinstance(v, torch.Tensor)
            and v.dim() >= 1
            and v.shape[0] == len(PROMPTS)
            and (k in ("value", "coef", "strength", "threshold") or v.dim() == 2)
        ):
            kw[k] = v[i]
    return type(iv)(**kw)


@pytest.mark.parametrize("case", CASES)
def test_left_padding_invariance(lm, case):
    """A shared intervention gives the same logits for a prompt alone and left-padded in a batch."""
    iv = CASES[case][0](lm, Positions.all())
    short = "Hi"
    enc = lm.encode([short, PROMPTS[1]])
    padded = logits(lm, enc, iv)[0][enc["attention_mask"][0].bool()]
    alone = logits(lm, lm.encode([short]), iv)[0]
    assert (padded - alone).abs().max() <= 1e-5


# ---- cached decoding: positions must be right in every decode step --------------------------
def _reference_logits(lm, seqs, attn, vec, layer, select):
    """Full, uncached forward with a hand-written hook that adds `vec` where `select` (B, T) is
    True. Independent of steerscope's position tracking."""

    def hook(_m, _a, out):
        if isinstance(out, tuple):  # transformers < 5.2x: blocks return (hidden, ...)
            return (out[0] + select[..., None].to(out[0].dtype) * vec, *out[1:])
        return out + select[..., None].to(out.dtype) * vec

    h = lm.arch.blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.forward(seqs, attn).logits
    finally:
        h.remove()


@pytest.mark.parametrize("positions", ["generated", "prompt", "range", "prompt_tail"])
def test_decode_step_positions(lm, positions):
    pos = {
        "generated": Positions.generated(),
        "prompt": Positions.prompt(),
        "range": Positions.range(3, 14),
        "prompt_tail": Positions.prompt_tail(2),
    }[positions]
    vec = rand_vec(lm, seed=11, scale=8.0)
    enc = lm.encode(["Hi", "Hello there friend"])
    T, n_new = enc["input_ids"].shape[1], 6
    with torch.no_grad(), ss.steer(lm, Add(vec, layer=1, positions=pos)):
        out = lm.model.generate(
            **enc,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    seqs = out.sequences
    attn = torch.cat([enc["attention_mask"], torch.ones(2, seqs.shape[1] - T, dtype=torch.long)], 1)
    abs_pos = attn.cumsum(-1) - 1
    plen = enc["attention_mask"].sum(-1, keepdim=True)
    select = {
        "generated": abs_pos >= plen,
        "prompt": abs_pos < plen,
        "range": (abs_pos >= 3) & (abs_pos < 14),
        "prompt_tail": (abs_pos < plen) & (abs_pos >= plen - 2),
    }[positions] & attn.bool()
    ref = _reference_logits(lm, seqs, attn, vec, 1, select)
    for s, step_logits in enumerate(out.logits):
        assert (step_logits - ref[:, T - 1 + s]).abs().max() < 1e-4, f"decode step {s}"
    # and the steering did something in the cached run (not a vacuous match)
    plain = _reference_logits(lm, seqs, attn, torch.zeros_like(vec), 1, select)
    assert (ref - plain).abs().max() > 1e-3


# ---- hooks never leak --------------------------------------------------------------------------
def test_no_hook_left_after_success_and_errors(lm):
    enc = lm.encode(PROMPTS)
    assert count_hooks(lm.model) == 0
    with ss.steer(lm, Add(rand_vec(lm), layer=1), Ablate(rand_vec(lm))):
        assert count_hooks(lm.model) > 0
        lm.forward(**enc)
    assert count_hooks(lm.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ss.steer(lm, Add(rand_vec(lm), layer=1)):
            raise RuntimeError("boom")
    assert count_hooks(lm.model) == 0
    # an error half-way through registration: two hooks registered, the third spec is invalid
    block = lm.arch.blocks[0]
    with pytest.raises(ValueError):
        with hooks([(block, "post", lambda x: x), (block, "pre", lambda x: x), (block, "sideways", lambda x: x)]):
            pass
    assert count_hooks(lm.model) == 0
    # a bad intervention after a good one: nothing stays registered
    with pytest.raises(ss.LayerError):
        with ss.steer(lm, Add(rand_vec(lm), layer=1), Add(rand_vec(lm), layer=99)):
            pass
    assert count_hooks(lm.model) == 0
    # an error raised inside a hook during the forward pass
    with pytest.raises(ss.SteerscopeError, match="per-row"):
        with ss.steer(lm, Add(rand_vec(lm, rows=2), layer=1)):
            lm.forward(**enc)  # batch of 3, vector rows 2
    assert count_hooks(lm.model) == 0


def test_hooks_do_not_modify_in_place(lm):
    """A tensor captured before the steering hook keeps its values."""
    enc = lm.encode(PROMPTS)
    captured = {}

    def keep(x):
        captured["x"] = x
        captured["copy"] = x.clone()
        return x

    with (
        torch.no_grad(),
        hooks([(lm.arch.blocks[1], "post", keep)]),
        ss.steer(lm, Add(rand_vec(lm), layer=1), Ablate(rand_vec(lm))),
    ):
        lm.forward(**enc)
    assert torch.equal(captured["x"], captured["copy"])


def test_composition_order_at_one_site(lm):
    """At one site, interventions run in the order given: clamp-then-add != add-then-clamp."""
    enc = lm.encode(PROMPTS)
    d = rand_vec(lm, seed=2)
    a, c = Add(d, layer=1, coef=2.0), Clamp(d, value=0.0, layer=1)
    with torch.no_grad(), ss.steer(lm, a, c), record(lm, [1]) as r1:
        lm.forward(**enc)
        p1 = _proj(r1[1], d)
    assert p1[enc["attention_mask"].bool()].abs().max() < 1e-5  # clamp ran last
    with torch.no_grad(), ss.steer(lm, c, a), record(lm, [1]) as r2:
        lm.forward(**enc)
        p2 = _proj(r2[1], d)
    assert torch.allclose(
        p2[enc["attention_mask"].bool()],
        torch.full_like(p2[enc["attention_mask"].bool()], 2.0 * d.norm().item()),
        atol=1e-4,
    )


def test_gradients_flow_to_vector(lm):
    """Interventions are differentiable in their parameters (needed by MELBO and friends)."""
    enc = lm.encode(PROMPTS[:1])
    v = rand_vec(lm).requires_grad_(True)
    with ss.steer(lm, Add(v, layer=1)):
        lm.forward(**enc).logits.square().mean().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_site_resolution_and_registry(any_lm):
    arch = any_lm.arch
    for kind in ("resid_post", "resid_pre", "attn_out", "mlp_out"):
        mod, hook_kind = arch.resolve(Site(1, kind))
        assert mod is not None and hook_kind in ("pre", "post")
    with pytest.raises(ss.SteerscopeError, match="unknown site kind"):
        arch.resolve(Site(1, "nowhere"))  # type: ignore[arg-type]


def test_record_matches_hidden_states(any_lm):
    """layer L = hidden_states[L+1] for L < n_layers - 1 (transformers normalises the last entry)."""
    enc = any_lm.encode(PROMPTS)
    with torch.no_grad(), record(any_lm, range(any_lm.n_layers)) as acts:
        hs = any_lm.forward(**enc, output_hidden_states=True).hidden_states
    for l in range(any_lm.n_layers - 1):
        assert torch.equal(acts[l], hs[l + 1])


@pytest.mark.parametrize("case", CASES)
def test_padding_positions_never_steered(lm, case):
    """At every site an intervention hooks, pad positions leave the hook exactly as they came in.

    (Compared at the hook, not at later layers: transformers lets fully-masked pad queries attend
    to real tokens in some attention paths, so later pad activations legitimately depend on them.)
    """
    from steerscope.interventions import StepState

    enc = lm.encode(PROMPTS)
    pad = ~enc["attention_mask"].bool()
    iv = CASES[case][0](lm, Positions.all())
    sites = [(m, k) for x in (iv if isinstance(iv, list) else [iv]) for m, k, _ in x.hook_specs(lm, StepState())]
    before, after = {}, {}

    def keep(store, j):
        def fn(x):
            store[j] = x
            return x

        return fn

    with (
        torch.no_grad(),
        hooks([(m, k, keep(before, j)) for j, (m, k) in enumerate(sites)]),
        ss.steer(lm, iv),
        hooks([(m, k, keep(after, j)) for j, (m, k) in enumerate(sites)]),
    ):
        lm.forward(**enc)
    assert len(before) == len(sites) == len(after)
    changed = False
    for j in range(len(sites)):
        # hooks on one module run in registration order, so "after" sees the steered tensor
        first, second = before[j], after[j]
        assert torch.equal(first[pad], second[pad]), f"site {j}"
        changed |= not torch.equal(first[~pad], second[~pad])
    assert changed  # the hook did steer the real tokens
