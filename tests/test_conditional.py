"""Conditional steering (CAST, Lee et al. 2025): a row whose prompt meets the condition is steered
exactly like the plain behaviour, any other row exactly like no steering; the decision is taken
once on the prompt pass and latched through cached and uncached decoding; a mixed batch gives each
row what it gets alone; the exposed scores match an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CORE_ARCHS, rand_vec, tiny_lm

from steerscope.errors import SteerscopeError
from steerscope.interventions import INTERVENTIONS, Ablate, Add, Condition, Conditional, steer
from steerscope.models import count_hooks, record
from steerscope.models.compat import with_cache

PROMPTS = ["x", "a b c", "hello there friend", "the quick brown fox jumps over it"]  # 1 to 32 tokens
N_NEW = 6
C_LAYER, B_LAYER = 0, 1  # condition read at block 0's output, behaviour added at block 1's output


def _greedy(lm, prompts, ivs, use_cache=True):
    """(tokens (B, N_NEW), logits (B, N_NEW, vocab)); without a cache the prompt lengths are pinned
    (every step is a full pass, as `generate` does)."""
    enc = lm.encode(prompts)
    plen = None if use_cache else enc["attention_mask"].sum(-1)
    with torch.no_grad(), steer(lm, *ivs, prompt_len=plen):
        out = lm.model.generate(
            **enc,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            top_k=None,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    T = enc["input_ids"].shape[1]
    return out.sequences[:, T:], torch.stack(out.logits, dim=1).float()


def _mean_hidden(lm, prompts, layer):
    """(B, d) mean of block `layer`'s output (= hidden_states[layer + 1], test_record_matches_hidden_states)
    over each row's real tokens after the first (the attention sink the gate leaves out; a one-token
    prompt keeps it): independent of the Conditional's hooks. (Not output_hidden_states:
    transformers then leaves its own hooks on the shared tiny models, which the hook-leak tests count.)"""
    enc = lm.encode(prompts)
    with torch.no_grad(), record(lm, [layer]) as acts:
        lm.forward(**enc)
    hs = acts[layer]  # (B, T, d)
    m = enc["attention_mask"].bool()
    real = [hs[b][m[b]].float() for b in range(len(prompts))]  # (T_b, d) each
    return torch.stack([(r[1:] if len(r) > 1 else r).mean(0) for r in real])


def _scores(lm, prompts, c, layer):
    mean = _mean_hidden(lm, prompts, layer)
    return F.cosine_similarity(mean, torch.as_tensor(c).float().expand_as(mean), dim=-1)  # (B,)


def _same(a, b, where):
    assert a[0].tolist() == b[0].tolist(), where + ": tokens differ"
    assert (a[1] - b[1]).abs().max() < 1e-5, where + ": logits differ"


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_fired_row_equals_plain_behaviour_and_unfired_equals_none(arch, use_cache):
    lm = tiny_lm(arch)
    c, vec = rand_vec(lm, seed=3), rand_vec(lm, seed=7, scale=12.0)
    for p in PROMPTS:
        s = float(_scores(lm, [p], c, C_LAYER)[0])
        plain = _greedy(lm, [p], [Add(vec, layer=B_LAYER)], use_cache)
        none = _greedy(lm, [p], [], use_cache)
        assert (plain[1] - none[1]).abs().max() > 1e-3, "the behaviour changes nothing (vacuous test)"
        for thr, want, name in ((s - 0.05, plain, "fires"), (s + 0.05, none, "does not fire")):
            iv = Conditional(Add(vec, layer=B_LAYER), Condition(c, C_LAYER, threshold=thr))
            _same(_greedy(lm, [p], [iv], use_cache), want, f"{arch} {p!r} {name}")
            assert iv.result.fired.tolist() == [thr < s]


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_mixed_batch_equals_each_row_alone(arch):
    """Per-row conditions, thresholds and behaviour vectors in one left-padded batch: each row
    equals its own prompt run alone (no cache), whether it fires or not."""
    lm = tiny_lm(arch)
    B = len(PROMPTS)
    dirs, vecs = rand_vec(lm, seed=4, rows=B), rand_vec(lm, seed=8, scale=12.0, rows=B)  # (B, d)
    s = torch.stack([_scores(lm, [p], dirs[i], C_LAYER)[0] for i, p in enumerate(PROMPTS)])  # (B,)
    fire = torch.tensor([i % 2 == 0 for i in range(B)])
    thr = torch.where(fire, s - 0.05, s + 0.05)  # (B,)

    def make(rows):
        return Conditional(Add(vecs[rows], layer=B_LAYER), Condition(dirs[rows], C_LAYER, threshold=thr[rows]))

    refs = [_greedy(lm, [p], [make(slice(i, i + 1))], use_cache=False) for i, p in enumerate(PROMPTS)]
    for i in range(B):  # a fired row alone is the plain behaviour, an unfired one no steering
        plain = _greedy(lm, [PROMPTS[i]], [Add(vecs[i], layer=B_LAYER)] if fire[i] else [], use_cache=False)
        _same(refs[i], plain, f"{arch} row {i} alone")
    for use_cache in (True, False):
        iv = make(slice(None))
        got = _greedy(lm, PROMPTS, [iv], use_cache)
        assert iv.result.fired.tolist() == fire.tolist()
        for i in range(B):
            where = f"{arch} cache={use_cache} row {i} ({PROMPTS[i]!r})"
            assert got[0][i].tolist() == refs[i][0][0].tolist(), where + ": batched tokens differ from alone"
            assert (got[1][i] - refs[i][1][0]).abs().max() < 1e-4, where + ": batched logits differ from alone"


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_latched_decision_reentered_per_step(arch):
    """The server's pattern: the prefill decides, every decode step enters `steer` anew with the
    decision passed as `latched`; the tokens equal one `generate` under one `steer` block. Without
    the latch a decode step cannot decide (it has not seen the prompt) and says so."""
    from transformers import DynamicCache

    lm = tiny_lm(arch)
    B = len(PROMPTS)
    dirs, vecs = rand_vec(lm, seed=4, rows=B), rand_vec(lm, seed=8, scale=12.0, rows=B)
    s = _scores(lm, PROMPTS, dirs[0], C_LAYER)
    thr = torch.where(torch.tensor([True, False, True, False]), s - 0.05, s + 0.05)
    cond = Condition(dirs[0], C_LAYER, threshold=thr)
    want = _greedy(lm, PROMPTS, [Conditional(Add(vecs, layer=B_LAYER), cond)])
    enc = lm.encode(PROMPTS)
    ids, mask, plen = enc["input_ids"], enc["attention_mask"], enc["attention_mask"].sum(-1)
    cache, toks = DynamicCache(), []
    first = Conditional(Add(vecs, layer=B_LAYER), cond)
    with torch.no_grad():
        with steer(lm, first, prompt_len=plen):
            nxt = lm.forward(ids, mask, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1)
        for _ in range(N_NEW - 1):
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            step = Conditional(Add(vecs, layer=B_LAYER), cond, latched=first.result.fired)
            with steer(lm, step, prompt_len=plen):
                nxt = lm.forward(nxt[:, None], mask, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1)
        toks.append(nxt)
        assert torch.stack(toks, 1).tolist() == want[0].tolist()
        with pytest.raises(SteerscopeError, match="did not see"):
            with steer(lm, Conditional(Add(vecs, layer=B_LAYER), cond), prompt_len=plen):
                lm.forward(
                    nxt[:, None],
                    torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1),
                    **with_cache(lm.model, cache),
                )
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_decision_is_latched_on_the_prompt(arch, use_cache):
    """c = the prompt's own mean hidden state, so the prompt scores 1 while the generated tokens
    (alone, or the mean over prompt + generated text) score lower; the threshold sits between, so
    a gate recomputed after the prompt would flip. Latched, `above` fires for the whole generation and `above=False`
    never does."""
    lm = tiny_lm(arch)
    p = PROMPTS[3]
    c = _mean_hidden(lm, [p], C_LAYER)[0]
    vec = rand_vec(lm, seed=7, scale=12.0)
    plain = _greedy(lm, [p], [Add(vec, layer=B_LAYER)], use_cache)
    none = _greedy(lm, [p], [], use_cache)
    # What a recomputation on the generated tokens would see, in both runs; the threshold splits it
    # from the prompt's score.
    seen = []
    for run in (plain, none):
        enc = lm.encode([p])
        seq = torch.cat([enc["input_ids"], run[0]], 1)
        with torch.no_grad(), record(lm, [C_LAYER]) as acts:
            lm.forward(seq)
        hs = acts[C_LAYER][0].float()  # (T, d)
        gen = F.cosine_similarity(hs[enc["input_ids"].shape[1] :], c[None], dim=-1)  # per generated token
        full = F.cosine_similarity(hs[1:].mean(0), c, dim=0)
        seen += [float(gen.max()), float(full)]
    assert max(seen) < 1 - 1e-3, seen
    thr = (1 + max(seen)) / 2
    up = Conditional(Add(vec, layer=B_LAYER), Condition(c, C_LAYER, threshold=thr))
    _same(_greedy(lm, [p], [up], use_cache), plain, f"{arch} above: latched firing")
    assert up.result.fired.tolist() == [True] and float(up.result.scores[0, 0]) > thr
    down = Conditional(Add(vec, layer=B_LAYER), Condition(c, C_LAYER, threshold=thr, above=False))
    _same(_greedy(lm, [p], [down], use_cache), none, f"{arch} above=False: latched not firing")
    assert down.result.fired.tolist() == [False]


def test_scores_match_an_independent_computation(lm):
    """Two conditions at layers 0 and 1, behaviour at 2, a left-padded batch: scores = cos(mean of
    hidden_states[L + 1] over the row's tokens, c); held/fired follow the thresholds."""
    c0, c1 = rand_vec(lm, seed=11), rand_vec(lm, seed=12)
    iv = Conditional(
        Add(rand_vec(lm, seed=7), layer=2),
        [Condition(c0, 0, threshold=0.0), Condition(c1, 1, threshold=0.1, above=False)],
        combine="or",
    )
    enc = lm.encode(PROMPTS)
    with torch.no_grad(), steer(lm, iv):
        lm.forward(**enc)
    want = torch.stack([_scores(lm, PROMPTS, c0, 0), _scores(lm, PROMPTS, c1, 1)], -1)  # (B, 2)
    assert iv.result.scores.shape == (len(PROMPTS), 2)
    assert (iv.result.scores - want).abs().max() < 1e-5
    held = torch.stack([want[:, 0] > 0.0, want[:, 1] < 0.1], -1)
    assert iv.result.held.tolist() == held.tolist()
    assert iv.result.fired.tolist() == held.any(-1).tolist()
    assert len(set(map(tuple, iv.result.scores.tolist()))) == len(PROMPTS)  # not one value for all rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_above_false_and_or_combination(arch):
    lm = tiny_lm(arch)
    p = PROMPTS[2]
    c0, c1, vec = rand_vec(lm, seed=21), rand_vec(lm, seed=22), rand_vec(lm, seed=7, scale=12.0)
    s0, s1 = float(_scores(lm, [p], c0, 0)[0]), float(_scores(lm, [p], c1, 1)[0])
    plain = _greedy(lm, [p], [Add(vec, layer=2)])
    none = _greedy(lm, [p], [])
    holds = Condition(c0, 0, threshold=s0 + 0.05, above=False)  # score below threshold: holds
    fails = Condition(c1, 1, threshold=s1 - 0.05, above=False)  # score above threshold: fails
    cases = [
        ([holds], "and", plain, [True]),
        ([fails], "and", none, [False]),
        ([holds, fails], "and", none, [True, False]),
        ([holds, fails], "or", plain, [True, False]),
        ([fails, fails], "or", none, [False, False]),
    ]
    for conds, combine, want, held in cases:
        iv = Conditional(Add(vec, layer=2), conds, combine=combine)
        _same(_greedy(lm, [p], [iv]), want, f"{arch} {combine} {held}")
        assert iv.result.held[0].tolist() == held


def test_any_intervention_as_behaviour(lm):
    """The behaviour may be any intervention (here an ablation at layer 2, read at layer 1)."""
    enc = lm.encode(PROMPTS)
    d = rand_vec(lm, seed=5)
    c = rand_vec(lm, seed=6)
    s = _scores(lm, PROMPTS, c, 1)
    with torch.no_grad():
        with steer(lm, Ablate(d, layer=2)):
            plain = lm.forward(**enc).logits
        with steer(lm):
            none = lm.forward(**enc).logits
        thr = torch.sort(s).values[1:3].mean()  # some rows above, some below
        iv = Conditional(Ablate(d, layer=2), Condition(c, 1, threshold=thr))
        with steer(lm, iv):
            got = lm.forward(**enc).logits
    fired = s > thr
    assert 0 < int(fired.sum()) < len(PROMPTS)
    assert iv.result.fired.tolist() == fired.tolist()
    m = enc["attention_mask"].bool()
    for i in range(len(PROMPTS)):
        want = plain if fired[i] else none
        assert (got[i][m[i]] - want[i][m[i]]).abs().max() < 1e-5, f"row {i}"
    assert (plain - none)[m].abs().max() > 1e-3


def test_bad_configurations_fail_with_one_clear_line():
    lm = tiny_lm("llama")
    c, v = rand_vec(lm, seed=1), rand_vec(lm, seed=2)
    cases = [  # (build and enter, message)
        (lambda: Conditional(Add(v, layer=1), Condition(c, 2)), r"condition layer <= 1"),
        (lambda: Conditional(Add(v, layer=1, kind="resid_pre"), Condition(c, 1)), r"condition layer <= 1"),
        (lambda: Conditional(Ablate(v), Condition(c, 0)), r"condition layer <= 0"),  # everywhere: layer 0's input
        (lambda: Conditional(Add(v, layer=1), Condition(torch.zeros(lm.d_model), 0)), "zero norm"),
        (lambda: Conditional(Add(v, layer=1), Condition(c, 0, threshold=float("nan"))), "NaN"),
        (lambda: Conditional(Add(v, layer=1), Condition(c, 0), combine="xor"), "'and' or 'or'"),
        (lambda: Conditional(Add(v, layer=1), []), "at least one Condition"),
        (lambda: Conditional(Add(v, layer=1), Condition(rand_vec(lm, rows=2), 0)), "per-row condition direction"),
        (lambda: Conditional(Add(v, layer=1), Condition(c, 9)), "layer"),
    ]
    enc = lm.encode(PROMPTS[:3])
    for build, msg in cases:
        with pytest.raises(SteerscopeError, match=msg) as e:
            with torch.no_grad(), steer(lm, build()):
                lm.forward(**enc)
        assert "\n" not in str(e.value), str(e.value)
        assert count_hooks(lm.model) == 0


def test_registered():
    assert INTERVENTIONS.get("conditional").fn is Conditional
