"""Sparse autoencoders: planted-feature recovery, unit decoder, SAELens round trip, activation
buffer, steering with features (clamp keeps the error term)."""

import json

import pytest
import torch
from conftest import PROMPTS, tiny_lm

import steerscope as ss
from steerscope.models import record
from steerscope.sae import ActivationBuffer, SAEConfig, TrainConfig, tensor_batches, train_sae
from steerscope.sae.archs import SAE_ARCHS
from steerscope.sae.formats import load_saelens, save_saelens
from steerscope.sae.steering import ClampFeature, feature_vectors


def synthetic(n=20000, d=32, n_feat=64, active=3, seed=0):
    """Sparse combinations of 64 planted unit features in 32 dims (overcomplete), plus an offset."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n_feat, d, generator=g)
    F /= F.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(-1)[:, :active]
    coef = torch.zeros(n, n_feat).scatter(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return coef @ F * 3.0 + 1.0, F


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def trained(data):
    x, _ = data
    out = {}
    for arch in SAE_ARCHS.names():
        out[arch] = train_sae(
            tensor_batches(x, 256),
            SAEConfig(32, 128, arch=arch, k=4, l1_coef=1.0),
            TrainConfig(steps=2000, lr=1e-3, warmup_steps=50),
        )
    return out


@pytest.mark.parametrize("arch", SAE_ARCHS.names())
def test_recovers_planted_features(trained, data, arch):
    sae, hist = trained[arch]
    W = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    mmcs = float((data[1] @ W.detach().T).max(-1).values.mean())
    assert mmcs >= 0.9, f"{arch}: mean max cosine {mmcs:.3f}"
    if arch != "relu":
        assert hist.l0[-1] == pytest.approx(4.0, abs=0.5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_folded_sae_reads_raw_activations(trained, data, arch):
    sae, hist = trained[arch]
    x = data[0][:2000]
    with torch.no_grad():
        recon = sae(x).recon
    fvu = float((x - recon).square().sum(-1).mean() / (x - x.mean(0)).square().sum(-1).mean())
    assert fvu < 0.15
    # the decoder was unit-norm in training; folding the input scale divides it by that scale
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((128,), 1 / hist.input_scale), rtol=1e-4)


@pytest.mark.parametrize("arch", SAE_ARCHS.names())
def test_saelens_round_trip(trained, data, arch, tmp_path):
    sae, _ = trained[arch]
    save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["architecture"] == SAE_ARCHS[arch].saelens
    back = load_saelens(tmp_path / "sae")
    x = data[0][:500]
    with torch.no_grad():
        assert torch.allclose(sae(x).recon, back(x).recon, atol=1e-5)
    one = back(x[:1]).acts  # batchtopk's saved (JumpReLU) form does not depend on the batch
    assert torch.allclose(one, back(x[:7]).acts[:1], atol=1e-6)
    with pytest.raises(ss.SteerscopeError, match="already exists"):
        save_saelens(sae, tmp_path / "sae")


def test_bad_sae_config():
    with pytest.raises(ss.SteerscopeError, match="--arch must be one of"):
        SAEConfig(8, 16, arch="gated")
    with pytest.raises(ss.SteerscopeError, match="k must be"):
        SAEConfig(8, 16, k=0)


def test_activation_buffer_drops_first_tokens_and_refills():
    lm = tiny_lm("llama")
    texts = ["Hello there, how are you doing today?", "A second, slightly longer document with more words.", "Hi"]
    buf = ActivationBuffer(lm, texts, layer=1, batch_size=16, buffer_tokens=64, lm_batch=2, max_norm_multiple=None)
    batches = []
    for b in buf:
        batches.append(b)
        if len(batches) == 12:  # more than the buffer holds: it refilled (looping over the texts)
            break
    assert all(b.shape == (16, lm.d_model) for b in batches)
    assert buf.tokens_seen > 64  # more than one buffer's worth was read: it refilled
    per_pass = sum(len(lm.tokenizer(t)["input_ids"]) - 1 for t in texts)  # first token of each text dropped
    once = ActivationBuffer(lm, texts, layer=1, batch_size=1, buffer_tokens=10_000, loop=False, max_norm_multiple=None)
    served = sum(1 for _ in once)
    assert once.tokens_seen == per_pass and served + len(once.buf) == per_pass
    with torch.no_grad(), record(lm, [1]) as r:
        enc = lm.tokenizer([texts[0]], return_tensors="pt")
        lm.forward(enc["input_ids"])
    first = r[1][0, 0]
    assert not any((b == first).all(-1).any() for b in batches)


def test_activation_buffer_reads_long_texts_in_windows():
    """A text longer than `context` is read as consecutive windows, not truncated; each window's
    activations equal a forward pass over that window alone."""
    lm = tiny_lm("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 3  # 135 characters
    n = len(lm.tokenizer(text)["input_ids"])
    buf = ActivationBuffer(
        lm,
        [text, "Hi there"],
        layer=1,
        batch_size=1,
        buffer_tokens=10_000,
        context=40,
        loop=False,
        max_norm_multiple=None,
    )
    rows = torch.cat(list(buf) + [buf.buf])
    n_windows = -(-n // 40)
    assert buf.tokens_seen == (n - n_windows) + (len(lm.tokenizer("Hi there")["input_ids"]) - 1)
    ids = lm.tokenizer(text)["input_ids"]
    with torch.no_grad(), record(lm, [1]) as r:
        lm.forward(torch.tensor([ids[40:80]]))
    window = r[1][0, 1:]  # the second window, its first token dropped
    assert all((rows == w).all(-1).any() for w in window)


@pytest.fixture(scope="module")
def lm_sae():
    lm = tiny_lm("llama")
    texts = [p * 3 for p in PROMPTS] * 4
    sae, _ = train_sae(
        iter(ActivationBuffer(lm, texts, layer=1, batch_size=32, buffer_tokens=256, max_norm_multiple=None)),
        SAEConfig(lm.d_model, 64, arch="relu", l1_coef=0.1, layer=1, model_type="llama"),
        TrainConfig(steps=50, lr=1e-3, warmup_steps=5),
    )
    return lm, sae


def test_clamp_keeps_the_error_term(lm_sae):
    lm, sae = lm_sae
    enc = lm.encode(PROMPTS)
    with torch.no_grad(), record(lm, [1]) as base:
        lm.forward(**enc)
        x = base[1].clone()
    with torch.no_grad(), ss.steer(lm, ClampFeature(sae, feature=5, value=3.0)), record(lm, [1]) as r:
        logits = lm.forward(**enc).logits
        got = r[1]
    with torch.no_grad():
        flat = x.reshape(-1, lm.d_model)
        acts, _ = sae.encode(flat)
        edited = acts.clone()
        edited[:, 5] = 3.0
        expected = sae.decode(edited) + (flat - sae.decode(acts))  # reconstruction of the edit + the error term
    mask = enc["attention_mask"].bool().reshape(-1)
    assert (got.reshape(-1, lm.d_model)[mask] - expected[mask]).abs().max() < 1e-4
    with torch.no_grad():
        assert (logits - lm.forward(**enc).logits).abs().max() > 1e-3  # the edit changes the output


def test_feature_vectors_steer_with_a_coefficient_sweep(lm_sae):
    lm, sae = lm_sae
    vs = feature_vectors(lm, sae, [1, 2])
    assert vs.layers == [1, 1] and torch.allclose(vs.vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    res = ss.generate(
        lm, PROMPTS[:1], vectors=[vs[0]] * 3, coef=[0.0, 5.0, 50.0], max_new_tokens=5, include_unsteered=True
    )
    assert res[1].token_ids == res[0].token_ids  # coef 0 = unsteered
    with pytest.raises(ss.SteerscopeError, match="outside"):
        feature_vectors(lm, sae, [64])


def test_evaluation_and_baselines(lm_sae):
    from steerscope.sae.evaluate import baseline_dictionary, evaluate, sae_codec

    lm, sae = lm_sae
    texts = [p * 2 for p in PROMPTS] * 2
    ev = evaluate(lm, sae_codec(sae), texts, layer=1, n_latents=64)
    assert ev.n_tokens > 0 and 0 <= ev.dead_frac <= 1 and ev.l0 > 0 and ev.kl_spliced >= 0
    assert ev.ce_zero > ev.ce_clean  # zero-ablating the residual stream hurts
    # a perfect "dictionary" (identity) recovers all of the loss; zero recovers none
    ident = evaluate(lm, lambda x: (x, x), texts, layer=1)
    assert ident.ce_recovered == pytest.approx(1.0, abs=1e-4) and ident.fvu == pytest.approx(0.0, abs=1e-6)
    nothing = evaluate(lm, lambda x: (torch.zeros_like(x), torch.zeros_like(x)), texts, layer=1)
    assert nothing.ce_recovered == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(500, 32)
    for kind in ("pca", "ica", "random"):
        codes, recon = baseline_dictionary(kind, x, k=32)(x[:10])
        assert torch.allclose(recon, x[:10], atol=1e-3)  # full k: exact reconstruction
        codes, _ = baseline_dictionary(kind, x, k=4)(x[:10])
        assert ((codes != 0).sum(-1) == 4).all()


def test_top_activating_contexts(lm_sae):
    from steerscope.sae.features import render_features_page, top_contexts

    lm, sae = lm_sae
    texts = [p * 2 for p in PROMPTS]
    ctx, freq = top_contexts(lm, sae, texts, None, n_top=3, n_auto=4)
    assert len(ctx) == 4 and freq.shape == (64,)
    chosen = freq.argsort(descending=True)[:4].tolist()
    assert list(ctx) == chosen
    for cs in ctx.values():
        acts = [c.activation for c in cs]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts) and len(cs) <= 3
    # the best context's activation is the feature's maximum over all (non-first) tokens
    f = chosen[0]
    best = 0.0
    for t in texts:
        enc = lm.tokenizer([t], return_tensors="pt")
        with torch.no_grad(), record(lm, [1]) as r:
            lm.forward(enc["input_ids"])
            best = max(best, float(sae.encode(r[1][0, 1:].float())[0][:, f].max()))
    assert ctx[f][0].activation == pytest.approx(best, rel=1e-4)
    html = render_features_page(ctx, freq, "t")
    assert html.count('class="feature"') == 4 and "<mark>" in html and 'id="density"' in html


def test_activation_cache_shards(tmp_path):
    from steerscope.sae import cache_activations, shard_batches

    lm = tiny_lm("llama")
    texts = [p * 2 for p in PROMPTS] * 3
    n = cache_activations(
        ActivationBuffer(lm, texts, layer=1, lm_batch=2, max_norm_multiple=None), tmp_path / "acts", shard_tokens=50
    )
    shards = sorted((tmp_path / "acts").glob("acts-*.safetensors"))
    assert len(shards) == -(-n // 50) and not list((tmp_path / "acts").glob(".*tmp"))
    from safetensors.torch import load_file

    allx = torch.cat([load_file(str(s))["acts"] for s in shards])
    assert allx.shape == (n, lm.d_model)
    batches = [b for b, _ in zip(shard_batches(tmp_path / "acts", 16), range(10))]
    assert all(b.shape == (16, lm.d_model) for b in batches)
    rows = {tuple(r.tolist()) for r in allx}
    assert all(tuple(r.tolist()) in rows for b in batches for r in b)  # served rows come from the cache
    with pytest.raises(ss.SteerscopeError, match="already holds"):
        cache_activations(ActivationBuffer(lm, texts, layer=1), tmp_path / "acts")


class _Killed(Exception):
    pass


class _DiesAfter:
    """A batch source that raises after `n` batches, as if the run were killed; keeps `state_dict`."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise _Killed
        self.n -= 1
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, st):
        self.inner.load_state_dict(st)


def _resume_matches(make_source, cfg, tmp_path, steps=50, every=20, die=37):
    tcfg = TrainConfig(steps=steps, warmup_steps=5)
    whole, hist_whole = train_sae(make_source(), cfg, tcfg)
    with pytest.raises(_Killed):
        train_sae(_DiesAfter(make_source(), die), cfg, tcfg, checkpoint_dir=tmp_path / "ck", checkpoint_every=every)
    from steerscope.sae import load_checkpoint

    assert (
        load_checkpoint(tmp_path / "ck", cfg, tcfg)["step"] == (die // every) * every
    )  # the last checkpoint before the kill
    resumed, hist = train_sae(make_source(), cfg, tcfg, checkpoint_dir=tmp_path / "ck", checkpoint_every=every)
    assert len(hist.fvu) == steps and hist.fvu == hist_whole.fvu
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("arch", SAE_ARCHS.names())
def test_resume_tensor_source_equals_uninterrupted(data, arch, tmp_path):
    _resume_matches(lambda: tensor_batches(data[0][:3000], 128), SAEConfig(32, 64, arch=arch, k=4), tmp_path)


def test_resume_activation_buffer_and_shards(tmp_path):
    from steerscope.sae import cache_activations, shard_batches

    lm = tiny_lm("llama")
    texts = [p * 3 for p in PROMPTS] * 4
    cfg = SAEConfig(lm.d_model, 64, k=4)

    def mk():
        return ActivationBuffer(
            lm, texts, layer=1, batch_size=32, buffer_tokens=256, lm_batch=2, max_norm_multiple=None
        )

    _resume_matches(mk, cfg, tmp_path / "buffer", steps=30, every=10, die=25)
    cache_activations(
        ActivationBuffer(lm, texts, layer=1, lm_batch=2, max_norm_multiple=None), tmp_path / "acts", shard_tokens=100
    )
    _resume_matches(lambda: shard_batches(tmp_path / "acts", 32), cfg, tmp_path / "shards", steps=30, every=10, die=25)


def test_resume_refuses_other_settings_and_plain_iterators(data, tmp_path):
    cfg = SAEConfig(32, 64, k=4)
    with pytest.raises(_Killed):
        train_sae(
            _DiesAfter(tensor_batches(data[0], 128), 15),
            cfg,
            TrainConfig(steps=40),
            checkpoint_dir=tmp_path,
            checkpoint_every=10,
        )
    with pytest.raises(ss.SteerscopeError, match="different SAE training run"):
        train_sae(tensor_batches(data[0], 128), SAEConfig(32, 64, k=8), TrainConfig(steps=40), checkpoint_dir=tmp_path)
    with pytest.raises(ss.SteerscopeError, match="resumable batch source"):
        train_sae(iter([data[0][:128]] * 5), cfg, TrainConfig(steps=5), checkpoint_dir=tmp_path / "x")
    texts = [p * 3 for p in PROMPTS]
    lm = tiny_lm("llama")
    buf = ActivationBuffer(lm, texts, layer=1, batch_size=8, buffer_tokens=64, max_norm_multiple=None)
    next(buf)
    st = buf.state_dict()
    with pytest.raises(ss.SteerscopeError, match="text source differs"):
        ActivationBuffer(lm, texts[::-1], layer=1, batch_size=8, buffer_tokens=64).load_state_dict(st)
