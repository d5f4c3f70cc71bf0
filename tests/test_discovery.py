"""Unsupervised discovery on tiny models: MELBO, Jacobian singular vectors, calibration, controls."""

import dataclasses

import pytest
import torch
from conftest import ALL_ARCHS, PROMPTS, finetuned, needs_base, rand_vec, tiny_lm

import steerscope as ss
from steerscope.checkpoint import Checkpoint
from steerscope.directions.discovery import (
    DISCOVERY,
    DiscoverConfig,
    calibrate_R,
    discover,
    jacobian_singular_vectors,
    random_control,
)
from steerscope.directions.discovery.baselines import random_directions
from steerscope.directions.discovery.jacobian import _jv, nonlinearity_ratio
from steerscope.directions.discovery.melbo import final_values, melbo_objective, plateaued, train_melbo
from steerscope.models import record
from steerscope.models.layer_range import LayerRange


def hook_steered(lm, lr, vec, layer=0, target=2):
    """Z_target with `vec` added at `layer` through an ordinary hooked forward: (P, T, d)."""
    with torch.no_grad(), ss.steer(lm, ss.Add(vec, layer=layer)), record(lm, [target]) as r:
        lm.forward(**lr.enc)
    return r[target]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layer_range_equals_hook_steering(arch):
    lm = tiny_lm(arch)
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    theta = torch.stack([rand_vec(lm, seed=i, scale=5) for i in range(2)])
    z = lr.run(theta)
    for k in range(2):
        ref = hook_steered(lm, lr, theta[k])
        assert (z[k * 3 : (k + 1) * 3][lr.valid] - ref[lr.valid]).abs().max() < 1e-5


SHARED = ["Once upon a time, a cat", "Once upon a time, there was a much longer story", "Once upon a time, hi"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_prefix_replay_equals_hook_steering(arch):
    """Prompts that start alike: the prefix runs once per vector, the suffixes attend to its
    keys/values, and the result (values and gradients) is that of full rows."""
    lm = tiny_lm(arch)
    lr = LayerRange(lm, SHARED, 0, 2, chat=False)
    plain = LayerRange(lm, SHARED, 0, 2, chat=False, share_prefix=False)
    assert lr.shared_prefix == len("Once upon a time, ") and plain.shared_prefix == 0, lr.prefix_skipped
    theta = torch.stack([rand_vec(lm, seed=i, scale=5) for i in range(2)])
    z = lr.run(theta)
    for k in range(2):
        ref = hook_steered(lm, lr, theta[k])
        assert (z[k * 3 : (k + 1) * 3][lr.valid] - ref[lr.valid]).abs().max() < 1e-4
    valid = lr.valid.repeat(2, 1)
    t1, t2 = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    lr.run(t1)[valid].square().sum().backward()
    plain.run(t2)[valid].square().sum().backward()
    assert torch.allclose(t1.grad, t2.grad, rtol=1e-4, atol=1e-4 * float(t2.grad.abs().max()))


@pytest.mark.parametrize("broken", ["raises", "differs"])
def test_shared_prefix_falls_back_when_replay_differs(monkeypatch, broken):
    import steerscope.models.layer_range as lrm

    real = lrm.PrefixKV.update
    if broken == "raises":  # ignores the prefix: shapes no longer match the mask
        monkeypatch.setattr(lrm.PrefixKV, "update", lambda self, k, v, i, kw=None: (k, v))
    else:  # runs, but with the prefix values perturbed
        monkeypatch.setattr(
            lrm.PrefixKV,
            "update",
            lambda self, k, v, i, kw=None: real(self, k, v * 1.5 if self.mode == "prefix" else v, i),
        )
    lm = tiny_lm("llama")
    lr = LayerRange(lm, SHARED, 0, 2, chat=False)
    assert lr._want_prefix > 0 and lr.shared_prefix == 0  # the self-check refused it
    theta = rand_vec(lm, rows=1, scale=3)
    assert (lr.run(theta)[lr.valid] - hook_steered(lm, lr, theta[0])[lr.valid]).abs().max() < 1e-5


def test_objective_follows_the_paper_definition():
    """Norm over d_model per token (not over tokens), target = output of block t, p and q."""
    lm = tiny_lm("qwen2")
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    theta = rand_vec(lm, rows=2, scale=3)
    p, q = 4.0, 2.0
    got = melbo_objective(lr.delta(theta), lr.valid.float(), 2, p, q)
    with torch.no_grad(), record(lm, [2]) as base:
        lm.forward(**lr.enc)
        z0 = base[2].clone()
    for k in range(2):
        with torch.no_grad(), ss.steer(lm, ss.Add(theta[k], layer=0)), record(lm, [2]) as r:
            lm.forward(**lr.enc)
        total = 0.0
        for i in range(len(PROMPTS)):
            toks = lr.valid[i]
            total += float(((r[2][i][toks] - z0[i][toks]).norm(dim=-1) ** p).sum() ** (1 / q))
        assert abs(float(got[k].detach()) - total) / total < 1e-4


def test_melbo_increases_objective_keeps_norm_and_orthogonality():
    lm = tiny_lm("llama")
    vs = discover(
        lm, PROMPTS, DiscoverConfig.of("melbo", source=0, target=2, n_vectors=4, R=2.0, steps=40), progress=False
    )
    curves = vs.extras["curves"]
    assert (final_values(curves) > curves[:, 0] * 1.1).all()
    assert torch.allclose(vs.vectors.norm(dim=-1), torch.full((4,), 2.0), atol=1e-4)
    G = vs.vectors @ vs.vectors.T
    assert (G - torch.diag(torch.diag(G))).abs().max() < 1e-4
    assert vs.layers == [0] * 4 and vs.config.hyperparams["target"] == 2


def test_melbo_beats_random_on_its_objective():
    lm = tiny_lm("gpt2")
    cfg = DiscoverConfig.of("melbo", source=0, target=2, n_vectors=3, R=2.0, steps=40)
    vs = discover(lm, PROMPTS, cfg, progress=False)
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    with torch.no_grad():
        learned = melbo_objective(lr.delta(vs.vectors), lr.valid.float(), 3, 2.0, 1.0)
        rnd = random_control(lm, vs)
        control = melbo_objective(lr.delta(rnd.vectors), lr.valid.float(), 3, 2.0, 1.0)
    assert learned.min() > control.max()
    assert torch.allclose(rnd.vectors.norm(dim=-1), vs.vectors.norm(dim=-1), atol=1e-5)


def test_resume_gives_the_same_vectors(tmp_path):
    lm = tiny_lm("llama")
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    kw = dict(n_vectors=4, R=2.0, steps=12, chunk=2, seed=3, checkpoint_every=4)
    straight, c1, _ = train_melbo(lr, **kw)

    class Killed(Exception):
        pass

    def kill(chunk, step):
        if chunk == 1 and step == 6:
            raise Killed

    ck = Checkpoint(tmp_path / "ckpt", "key", "MELBO run")
    with pytest.raises(Killed):
        train_melbo(lr, checkpoint=ck, callback=kill, **kw)
    assert (tmp_path / "ckpt" / "state.json").is_file()
    ran = []
    resumed, c2, _ = train_melbo(lr, checkpoint=ck, callback=lambda c, s: ran.append((c, s)), **kw)
    assert torch.allclose(straight, resumed, atol=1e-6) and torch.allclose(c1, c2, atol=1e-4)
    # it resumed: chunk 0 was done, chunk 1 restarts from its step-4 checkpoint, not from scratch
    assert ran == [(1, s) for s in range(4, 12)]
    with pytest.raises(ss.SteerscopeError, match="different MELBO run"):
        train_melbo(lr, checkpoint=Checkpoint(tmp_path / "ckpt", "other", "MELBO run"), **kw)


@pytest.mark.parametrize(
    "arch,prompts", [("llama", PROMPTS[:2]), ("gpt2", PROMPTS[:2]), ("gemma2", PROMPTS[:2]), ("llama", SHARED[:2])]
)
def test_jacobian_matches_dense_svd(arch, prompts):
    lm = tiny_lm(arch)
    lr = LayerRange(lm, prompts, 0, 2, chat=False)
    assert bool(lr.shared_prefix) == (prompts is SHARED[:2] or prompts == SHARED[:2])
    res = jacobian_singular_vectors(lr, 3, iters=200, tol=1e-6)
    mask = lr.valid.float()
    from steerscope.models.layer_range import eager_attention

    with eager_attention(lm):
        lr.capture()
        # d_model forward-mode passes build the explicit Jacobian (reverse mode would need one per output)
        J = torch.autograd.functional.jacobian(
            lambda th: (lr.delta(th[None]) * mask[..., None]).reshape(-1),
            torch.zeros(lm.d_model),
            vectorize=True,
            strategy="forward-mode",
        )
    lr.capture()
    _, S, Vh = torch.linalg.svd(J.detach().double())
    for i in range(3):
        assert abs(float(res.vectors[i].double() @ Vh[i])) >= 0.99, f"singular vector {i}"
        assert abs(float(res.singular_values[i]) - float(S[i])) / float(S[i]) < 1e-3
    assert res.converged


def test_calibrated_R_hits_the_ratio():
    lm = tiny_lm("llama")
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    R, trace = calibrate_R(lr, target_ratio=0.5)
    V = random_directions(8, lm.d_model, 0)
    mask = lr.valid.float()
    from steerscope.models.layer_range import eager_attention

    with eager_attention(lm):
        lr.capture()
        JV = _jv(lr, V, mask)
    lr.capture()
    with torch.no_grad():
        assert abs(nonlinearity_ratio(lr, R, V, JV, mask) - 0.5) < 0.03
        assert nonlinearity_ratio(lr, R / 10, V, JV, mask) < 0.5 < nonlinearity_ratio(lr, R * 10, V, JV, mask)
    assert lm.model.config._attn_implementation == "sdpa"  # restored


FAST = {
    "melbo": {"steps": 5},
    "jacobian": {"power_iters": 5},
    "dct": {"dct_iters": 3},
    "kl": {"steps": 5, "reply_tokens": 3},
}


@pytest.mark.parametrize("method", DISCOVERY.names())
def test_every_method_gives_orthogonal_vectors_at_norm_R(method):
    """Iterates over the registry: a new discovery method is checked here without being listed."""
    lm = tiny_lm("qwen2")
    cfg = DiscoverConfig.of(method=method, source=0, target=2, n_vectors=4, R=3.0, **FAST.get(method, {}))
    # model-diffing methods (a `base` setting) compare lm with a changed copy of it
    base = finetuned(lm, blocks=(0, 1))[0] if needs_base(method) else None
    vs = discover(lm, PROMPTS, cfg, progress=False, base=base)
    assert (
        vs.config.method == method
        and len(vs) == 4
        and vs.config.hyperparams["method_config"] is not None
        or DISCOVERY.get(method).config is None
    )
    assert torch.allclose(vs.vectors.norm(dim=-1), torch.full((4,), 3.0), atol=1e-4)
    # distinct directions are orthogonal; a method may return a direction with both signs (+-v)
    cos = (vs.vectors @ vs.vectors.T / 9.0).abs()
    off = cos - torch.diag(torch.diag(cos))
    assert ((off < 1e-4) | ((off - 1).abs() < 1e-4)).all()
    assert torch.linalg.matrix_rank(vs.vectors) >= 2


def test_pca_finds_the_top_component():
    lm = tiny_lm("llama")
    vs = discover(lm, PROMPTS, DiscoverConfig.of(method="pca", source=1, target=2, n_vectors=2, R=1.0), progress=False)
    lr = LayerRange(lm, PROMPTS, 1, 2, chat=False)
    x = lr.h_source[lr.valid].double()
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    assert abs(float(vs.vectors[0].double() @ evecs[:, -1])) > 0.999


def test_discovery_bad_input():
    lm = tiny_lm("llama")
    with pytest.raises(ss.SteerscopeError, match="must come after"):
        discover(lm, PROMPTS, DiscoverConfig.of("melbo", source=2, target=1, R=1.0), progress=False)
    with pytest.raises(ss.SteerscopeError, match="unknown discovery method"):
        discover(lm, PROMPTS, DiscoverConfig.of(method="dreaming"), progress=False)
    with pytest.raises(ss.SteerscopeError, match="do not fit"):
        discover(
            lm, PROMPTS, DiscoverConfig.of("melbo", source=0, target=2, n_vectors=40, R=1.0, steps=1), progress=False
        )
    with pytest.raises(ss.LayerError):
        discover(lm, PROMPTS, DiscoverConfig.of("melbo", source=0, target=7, R=1.0), progress=False)
    with pytest.raises(ss.SteerscopeError, match="target tokens"):
        discover(
            lm, PROMPTS, DiscoverConfig.of("melbo", source=0, target=2, R=1.0, target_tokens="first"), progress=False
        )


def test_last_k_target_tokens():
    lm = tiny_lm("llama")
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    m = lr.target_mask("last:2")
    assert (m.sum(-1) == 2).all() and (m & ~lr.valid).sum() == 0 and m[:, -2:].all()


def test_discovery_computes_no_weight_gradients():
    """Gradients flow to the vectors only; weights keep requires_grad and get no .grad (a graph
    through the weights made the Jacobian iteration grow by GBs per step on SmolLM2)."""
    from steerscope.directions.discovery.melbo import train_melbo

    lm = tiny_lm("llama")
    for p in lm.model.parameters():
        p.grad = None
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    train_melbo(lr, n_vectors=2, R=1.0, steps=3)
    jacobian_singular_vectors(lr, 2, iters=3)
    assert all(p.grad is None and p.requires_grad for p in lm.model.parameters())


def test_dct_increases_its_causal_objective_and_returns_orthonormal_factors():
    lm = tiny_lm("llama")
    vs = discover(
        lm,
        PROMPTS,
        DiscoverConfig.of("dct", source=0, target=2, n_vectors=4, R=2.0, dct_iters=6, init="random"),
        progress=False,
    )
    obj = vs.config.hyperparams["objective"]
    assert obj[-1] > obj[0]  # OGI raised sum_l u_l . Delta(R v_l) from the random start
    V = vs.vectors / 2.0
    assert torch.allclose(V @ V.T, torch.eye(4), atol=1e-4)
    alpha = vs.config.hyperparams["alpha"]
    assert all(a * a >= b * b - 1e-9 for a, b in zip(alpha, alpha[1:]))  # ranked by alpha^2
    assert vs.extras["output_directions"].shape == (4, lm.d_model)


def test_dct_beats_random_directions_on_the_causal_term():
    """Each DCT factor moves the target layer (along its own u) more than random vectors of norm R do."""
    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of("dct", source=0, target=2, n_vectors=3, R=2.0, dct_iters=8)
    vs = discover(lm, PROMPTS, cfg, progress=False)
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    from steerscope.directions.discovery.dct import _delta_bar

    mask = lr.target_mask("last:3")
    with torch.no_grad():
        learned = _delta_bar(lr, mask, vs.vectors).norm(dim=-1)
        rnd = _delta_bar(lr, mask, random_control(lm, vs).vectors).norm(dim=-1)
    assert learned.mean() > rnd.mean()


def test_jacobian_returns_both_signs_of_each_singular_vector():
    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of("jacobian", source=0, target=2, n_vectors=5, R=2.0, power_iters=30)
    vs = discover(lm, PROMPTS, cfg, progress=False)
    V = vs.vectors
    assert torch.allclose(V[0], -V[1]) and torch.allclose(V[2], -V[3]) and len(vs) == 5
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    top = jacobian_singular_vectors(lr, 3, iters=30, target_tokens="last:3").vectors
    for i in range(3):  # pairs are the singular vectors in order
        assert abs(float(V[2 * i] @ top[i])) / 2.0 > 0.99
    sv = vs.config.hyperparams["singular_values"]
    assert sv[0] == sv[1] >= sv[2] == sv[3] >= sv[4]
    one = discover(
        lm,
        PROMPTS,
        DiscoverConfig.of("jacobian", source=0, target=2, n_vectors=3, R=2.0, both_signs=False),
        progress=False,
    )
    assert (one.vectors @ one.vectors.T - 4 * torch.eye(3)).abs().max() < 1e-3


def test_plateau_rule():
    flat = torch.ones(2, 100)
    rising = torch.linspace(1, 10, 100).expand(2, 100)
    assert plateaued(flat, 39, 20, 0.01) and not plateaued(rising, 39, 20, 0.01)
    assert not plateaued(flat, 38, 20, 0.01)  # only checked at window ends
    assert not plateaued(flat, 19, 20, 0.01)  # needs two full windows
    assert not plateaued(flat, 39, 20, 0.0)  # 0 turns it off
    lm = tiny_lm("llama")
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    full = train_melbo(lr, n_vectors=2, R=2.0, steps=400, seed=1)
    early = train_melbo(lr, n_vectors=2, R=2.0, steps=400, seed=1, plateau=0.01, window=10)
    assert full.steps_run == [400] and early.steps_run[0] < 400 and early.steps_run[0] % 10 == 0
    n = early.steps_run[0]
    assert early.curves[:, n:].isnan().all() and not early.curves[:, :n].isnan().any()
    assert torch.equal(final_values(early.curves), early.curves[:, n - 1])
    # it stopped on a plateau: the full run gains little after that point
    f = final_values(full.curves)
    assert ((f - early.curves[:, n - 1]) / f).max() < 0.1


@pytest.mark.parametrize("sigma", ["linear", "quadratic", "exp"])
def test_dct_nonlinearities_raise_their_objective(sigma):
    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of(
        "dct", source=0, target=2, n_vectors=3, R=1.0, dct_iters=8, init="random", sigma=sigma, dct_tol=0
    )
    vs = discover(lm, PROMPTS, cfg, progress=False)
    obj = vs.config.hyperparams["objective"]
    assert obj[-1] > obj[0] and vs.config.hyperparams["iterations"] == 8
    assert torch.allclose(vs.vectors @ vs.vectors.T, torch.eye(3), atol=1e-4)


def test_linear_dct_finds_the_top_singular_vectors_of_the_averaged_jacobian():
    """Odd-part OGI at a small R is power iteration on the Jacobian of the prompt-averaged change."""
    from steerscope.directions.discovery.dct import _delta_bar
    from steerscope.models.layer_range import eager_attention

    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of(
        "dct", source=0, target=2, n_vectors=2, R=0.01, dct_iters=60, init="random", sigma="linear", dct_tol=0
    )
    vs = discover(lm, PROMPTS, cfg, progress=False)
    lr = LayerRange(lm, PROMPTS, 0, 2, chat=False)
    mask = lr.target_mask("last:3")
    with eager_attention(lm):
        lr.capture()
        J = torch.autograd.functional.jacobian(
            lambda th: _delta_bar(lr, mask, th[None])[0],
            torch.zeros(lm.d_model),
            vectorize=True,
            strategy="forward-mode",
        )
    lr.capture()
    _, S, Vh = torch.linalg.svd(J.detach().double())
    assert S[1] > 1.2 * S[2]  # a gap, so the top-2 subspace is well defined
    proj = (vs.vectors.double() / 0.01) @ Vh[:2].T
    assert torch.linalg.svdvals(proj).min() > 0.95


def test_dct_stops_early_when_the_objective_flattens():
    lm = tiny_lm("llama")
    vs = discover(
        lm,
        PROMPTS,
        DiscoverConfig.of("dct", source=0, target=2, n_vectors=2, R=1.0, dct_iters=50, dct_tol=0.05),
        progress=False,
    )
    assert vs.config.hyperparams["iterations"] < 50


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_kl_objective_equals_a_hooked_forward(arch):
    """The objective of kl.py: KL(steered || unsteered) of the next-token distributions along the
    unsteered greedy reply, computed here from two ordinary hooked forwards of prompt + reply."""
    from steerscope.directions.discovery.kl import output_kl_objective

    lm = tiny_lm(arch)
    lr0 = LayerRange(lm, PROMPTS[:2], 0, 2, chat=False)
    obj = output_kl_objective(lm, lr0, reply_tokens=3, target_tokens="last:3")
    texts = obj.lr.prompts
    heads = [
        lm.tokenizer.decode(lm.encode([p], chat=False)["input_ids"][0]) for p in PROMPTS[:2]
    ]  # as a run encodes them
    assert all(t.startswith(h) and len(t) > len(h) for t, h in zip(texts, heads))  # the replies were appended
    theta = rand_vec(lm, seed=4, scale=3.0)[None]  # (1, d)
    with torch.no_grad():
        got = float(obj(theta)[0])
        total, n, h_total, kls = 0.0, 0, 0.0, []
        for t, h in zip(texts, heads):
            n_prompt = int(lm.encode([h], formatted=True)["attention_mask"].sum())
            enc = lm.encode([t], formatted=True)
            base = torch.log_softmax(lm.forward(**enc).logits[0].float(), -1)
            with ss.steer(lm, ss.Add(theta[0], layer=0)):
                st = torch.log_softmax(lm.forward(**enc).logits[0].float(), -1)
            kl = (st.exp() * (st - base)).sum(-1)[n_prompt - 1 :]  # last prompt token onwards
            ent = -(st.exp() * st).sum(-1)[n_prompt - 1 :]
            total, n = total + float(kl.sum()), n + kl.numel()
            h_total += float(ent.sum())
            kls.append(kl)
    assert n > 2 and abs(got - total / n) <= 1e-4 * max(1.0, total / n)
    assert abs(float(obj.entropy(theta)[0]) - h_total / n) <= 1e-4 * max(1.0, h_total / n)
    # kl's default weighting: per prompt, half on the reply's first token, half on the rest; prompts equal.
    weighted = output_kl_objective(lm, lr0, reply_tokens=3, target_tokens="last:3", first_share=0.5)
    want = sum(0.5 * float(kl[0]) + 0.5 * float(kl[1:].mean()) for kl in kls) / len(kls)
    with torch.no_grad():
        assert abs(float(weighted(theta)[0]) - want) <= 1e-4 * max(1.0, want)
        assert abs(float(weighted(theta)[0]) - got) > 1e-6  # a different objective, not the mean again


def test_position_weights_give_every_row_the_same_weight_and_its_first_position_its_share():
    from steerscope.directions.discovery.kl import position_weights

    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)  # 4, 2 and 1 positions
    w = position_weights(mask, 0.5)
    assert w.shape == (7,) and abs(float(w.sum()) - 1) < 1e-6
    rows = torch.split(w, [4, 2, 1])
    assert all(abs(float(r.sum()) - 1 / 3) < 1e-6 for r in rows)
    assert torch.allclose(rows[0], torch.tensor([1 / 6, 1 / 18, 1 / 18, 1 / 18]))
    assert torch.allclose(rows[1], torch.tensor([1 / 6, 1 / 6]))
    assert torch.allclose(position_weights(mask, None), torch.full((7,), 1 / 7))


def test_kl_discovery_raises_its_objective_and_beats_random():
    from steerscope.directions.discovery.kl import output_kl_objective

    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of(
        "kl", source=0, target=2, n_vectors=3, R=3.0, steps=25, plateau=0.0, reply_tokens=4, candidates=1
    )  # training alone: selection is the next test
    vs = discover(lm, PROMPTS, cfg, progress=False)
    curves = vs.extras["curves"]
    assert (final_values(curves) > curves[:, 0] * 1.1).all()
    lr0 = LayerRange(lm, PROMPTS, 0, 2)
    obj = output_kl_objective(lm, lr0, reply_tokens=4, target_tokens="last:3")
    with torch.no_grad():
        learned, control = obj(vs.vectors), obj(random_control(lm, vs).vectors)
    assert learned.min() > control.max()


def test_kl_discovery_keeps_the_candidates_whose_steered_replies_keep_most_entropy():
    """Without a ranking from the caller, kl trains `candidates` x n_vectors vectors and keeps the
    n_vectors whose steered next-token distributions keep the most entropy, in training order."""
    from steerscope.directions.discovery.kl import output_kl_objective

    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of(
        "kl", source=0, target=2, n_vectors=2, R=3.0, steps=4, plateau=0.0, reply_tokens=3, candidates=3
    )
    vs = discover(lm, PROMPTS[:2], cfg, progress=False)
    h = vs.config.hyperparams
    ent, kept = h["candidate_score"], h["kept"]
    assert (
        len(vs) == 2 and h["candidates"] == 6 and len(ent) == 6 and kept == sorted(kept) and h["kept_by"] == "entropy"
    )
    assert min(ent[i] for i in kept) >= max(e for i, e in enumerate(ent) if i not in kept)
    obj = output_kl_objective(lm, LayerRange(lm, PROMPTS[:2], 0, 2), reply_tokens=3, target_tokens="last:3")
    got = obj.entropy(vs.vectors)  # the kept vectors are the candidates the entropies were measured on
    assert torch.allclose(got, torch.tensor([ent[i] for i in kept]), atol=1e-3)
    assert len(vs.extras["curves"]) == 2
    one = discover(
        lm,
        PROMPTS[:2],
        dataclasses.replace(cfg, method_config=dataclasses.replace(cfg.method_config, candidates=1)),
        progress=False,
    )
    assert "kept" not in one.config.hyperparams and len(one) == 2


def test_kl_discovery_keeps_the_candidates_the_callers_ranking_prefers():
    """A caller's `rank` (the run's: by completions) replaces the entropy rule; it sees every
    candidate, unit-norm-free, and the kept ones are its top scores, in training order."""
    lm = tiny_lm("llama")
    cfg = DiscoverConfig.of(
        "kl", source=0, target=2, n_vectors=2, R=3.0, steps=3, plateau=0.0, reply_tokens=3, candidates=3
    )
    seen = []

    def rank(vectors):  # prefer candidates 4 and 1
        seen.append(vectors.clone())
        return torch.tensor([0.0, 5.0, 1.0, 2.0, 9.0, -1.0])

    vs = discover(lm, PROMPTS[:2], cfg, progress=False, rank=rank)
    h = vs.config.hyperparams
    assert h["kept"] == [1, 4] and h["kept_by"] == "completions" and h["candidate_score"][4] == 9.0
    assert len(seen) == 1 and seen[0].shape == (6, lm.d_model)
    assert torch.allclose(vs.vectors.float(), seen[0][[1, 4]].float())
    assert torch.allclose(seen[0].norm(dim=-1), torch.full((6,), 3.0), atol=1e-3)


def test_auto_source_layer_is_the_methods_own_and_an_explicit_one_wins():
    """kl puts its vectors at round(0.4 x n_layers) (layer 12 of SmolLM2's 30), the other methods
    at round(n_layers / 4); `--source N` overrides either; a target layer always follows."""
    assert DiscoverConfig.of("kl").resolve_layers(30) == (12, 22)
    assert DiscoverConfig.of("melbo").resolve_layers(30) == (8, 22)
    for method in DISCOVERY.names():
        own = getattr(DISCOVERY.get(method).config, "source_fraction", 0.25)
        assert DiscoverConfig.of(method).resolve_layers(30) == (round(30 * own), 22), method
        assert DiscoverConfig.of(method, source=5).resolve_layers(30) == (5, 22)
        for n in (2, 3, 4):  # tiny models: the source stays below the last layer
            s, t = DiscoverConfig.of(method).resolve_layers(n)
            assert 0 <= s < t < n, (method, n, s, t)
