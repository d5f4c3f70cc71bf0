"""Metrics, KL, and selection by measured effect."""

import pytest
import torch
from conftest import PROMPTS, rand_vec, tiny_lm

import steerscope as ss
from steerscope.directions import VectorSet
from steerscope.generation import last_token_logits
from steerscope.judging import SelectConfig, kl_divergence, parse_metric, select
from steerscope.judging import selection as selection_mod
from steerscope.judging.metrics import Metric
from steerscope.judging.selection import mean_projection


def test_logodds_matches_definition():
    lm = tiny_lm("llama")
    m = parse_metric("logodds:a,b", lm)
    logits = torch.randn(3, 128)
    ids = sorted({lm.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("a", "b", " a", " b")})
    p = torch.softmax(logits.double(), -1)[:, ids].sum(-1)
    assert torch.allclose(m.score_logits(logits).double(), torch.log(p / (1 - p)), atol=1e-5)


def test_text_metrics():
    lm = tiny_lm("llama")
    assert parse_metric("refusal", lm).score_texts(["I'm sorry, I can't.", "Sure!"]).tolist() == [1.0, 0.0]
    assert parse_metric("substring:cat|dog", lm).score_texts(["A DOG ran", "fish"]).tolist() == [1.0, 0.0]
    assert parse_metric("regex:^No", lm).score_texts(["No way", "I say No"]).tolist() == [1.0, 0.0]
    s = parse_metric("sentiment", lm).score_texts(["I love this wonderful day!", "I hate this awful day."])
    assert s[0] > 0.5 and s[1] < -0.5
    with pytest.raises(ss.SteerscopeError, match="unknown metric"):
        parse_metric("vibes", lm)
    with pytest.raises(ss.SteerscopeError, match="needs an argument"):
        parse_metric("logodds", lm)


def test_kl():
    x = torch.randn(4, 50)
    assert torch.allclose(kl_divergence(x, x), torch.zeros(4), atol=1e-6)
    y = x.clone()
    y[:, 0] += 5
    assert (kl_divergence(x, y) > 0).all()


def test_last_token_logits_rows_equal_direct_steering():
    lm = tiny_lm("qwen2")
    vs = VectorSet.create(lm, rand_vec(lm, rows=2, scale=10), layers=[0, 2], method="x")
    batched = last_token_logits(lm, PROMPTS, vectors=vs, coef=1.5, include_unsteered=True)
    assert batched.shape == (3, len(PROMPTS), 128)
    enc = lm.encode(PROMPTS, chat=None)
    for k in range(2):
        with torch.no_grad(), ss.steer(lm, ss.Add.of(vs[k], coef=1.5)):
            direct = lm.forward(**enc).logits[:, -1]
        assert (batched[k + 1] - direct).abs().max() < 1e-5
        with torch.no_grad(), ss.steer(lm, ss.Ablate(vs[k].vector)):
            direct = lm.forward(**enc).logits[:, -1]
        abl = last_token_logits(lm, PROMPTS, vectors=vs, mode="ablate", include_unsteered=True)
        assert (abl[k + 1] - direct).abs().max() < 1e-5
        assert torch.equal(abl[0], batched[0])  # the unsteered row is untouched in both modes


def _planted_select(
    monkeypatch,
    mode,
    induce,
    bypass,
    kl_add,
    kl_abl,
    layers,
    base_b=0.0,
    base_a=None,
    logprob=None,
    random_kl=None,
    **cfg,
):
    """3-layer model with max_layer_frac=0.5: layer 2 counts as "too late". Completions are planted:
    `logprob` per candidate (default: all as natural as the unsteered replies, -1.0); the KL budget
    is 0.1 unless `kl_bound` is given (None: auto, from `random_kl`)."""
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=len(layers)), layers=layers, method="x")
    ids = vs.ids
    lps = logprob or [-1.0] * len(layers)

    def generated(lm, m, p, sub, md, cfg, want_lp):
        if sub is None:
            s = torch.tensor([base_a if base_a is not None and p == ["a"] else base_b])
            return s, torch.tensor([-1.0]) if want_lp else None
        vals = induce if md == "add" else bypass
        s = torch.tensor([vals[ids.index(i)] for i in sub.ids])
        return (None if m is None else s), (torch.tensor([lps[ids.index(i)] for i in sub.ids]) if want_lp else None)

    monkeypatch.setattr(selection_mod, "_generated", generated)
    monkeypatch.setattr(
        selection_mod, "_kl", lambda lm, n, vs, md, cfg: torch.tensor(kl_add if md == "add" else kl_abl)
    )
    monkeypatch.setattr(selection_mod, "_random_kl", lambda lm, n, cfg: list(random_kl or []))
    cfg.setdefault("kl_bound", 0.1)
    return select(
        lm, vs, "refusal", ["a"], ["b"], ["c"], SelectConfig(mode=mode, max_layer_frac=0.5, prefilter=None, **cfg)
    )


def test_selection_rules(monkeypatch):
    # candidate 0: best bypass but KL too high; 1: fine; 2: better bypass, fine; 3: best of all but last layer
    sel = _planted_select(
        monkeypatch,
        "ablate",
        induce=[1.0, 1.0, 1.0, 1.0],
        bypass=[-9.0, -1.0, -2.0, -10.0],
        kl_add=[0.0] * 4,
        kl_abl=[0.5, 0.05, 0.05, 0.0],
        layers=[0, 1, 1, 2],
    )
    assert sel.best == 2
    assert "KL" in sel.candidates[0].reason and "last 50" in sel.candidates[3].reason
    assert "*" in sel.table() and "selected: x-2" in sel.table()
    sel = _planted_select(
        monkeypatch,
        "add",
        induce=[0.5, 2.0, 3.0, 5.0],
        bypass=[0.0] * 4,
        kl_add=[0.01, 0.01, 0.2, 0.01],
        kl_abl=[0.0] * 4,
        layers=[0, 1, 1, 2],
        base_b=1.0,
    )
    assert sel.best == 1  # 0 does not induce (0.5 <= baseline 1.0), 2 KL too high, 3 last layer
    assert sel.candidates[0].reason == "adding does not induce"
    sel = _planted_select(
        monkeypatch,
        "add",
        induce=[0.0] * 4,
        bypass=[0.0] * 4,
        kl_add=[1.0] * 4,
        kl_abl=[1.0] * 4,
        layers=[0, 1, 1, 2],
        base_b=1.0,
    )
    assert sel.best is None and "selected: none" in sel.table()


def test_selection_end_to_end_on_tiny_model(tmp_path):
    lm = tiny_lm("gpt2")
    target = 40  # a token id; the metric is its log-probability at the last position
    metric = Metric("logp40", "logits", lambda logits: torch.log_softmax(logits, -1)[:, target])
    W = lm.model.get_output_embeddings().weight.detach()
    push = W[target] / W[target].norm() * 30  # towards token 40 in unembedding space
    vs = VectorSet.create(lm, torch.stack([push, -push, rand_vec(lm)]), layers=[2, 2, 1], method="x")
    sel = select(lm, vs, metric, PROMPTS, PROMPTS, PROMPTS, SelectConfig(mode="add", kl_bound=100, max_layer_frac=1.0))
    assert sel.candidates[0].induce > sel.baseline_b > sel.candidates[1].induce
    assert sel.best == 0 and all(c.kl_add >= 0 and c.kl_ablate is None for c in sel.candidates)
    sel.save(tmp_path / "t.json")
    assert (tmp_path / "t.json").read_text().count('"id"') == 3


def test_clamp_to_mean_projection_of_set_a():
    lm = tiny_lm("llama")
    d = rand_vec(lm, seed=8)
    value = mean_projection(lm, PROMPTS, d, layer=1)
    from steerscope.models import collect_activations

    acts = collect_activations(lm, PROMPTS, [1])[:, 0, 0].float()
    assert abs(value - float((acts @ (d / d.norm())).mean())) < 1e-5
    enc = lm.encode(["Another prompt"])
    from steerscope.models import record

    with torch.no_grad(), ss.steer(lm, ss.Clamp(d, value=value, layer=1)), record(lm, [1]) as r:
        lm.forward(**enc)
    assert torch.allclose(r[1][0] @ (d / d.norm()), torch.full((r[1].shape[1],), value), atol=1e-4)


def test_pareto_frontier_and_knee():
    from steerscope.judging.selection import knee, pareto_frontier

    pts = [(0.1, 0.1), (0.2, 0.5), (0.3, 0.4), (1.0, 0.6), (0.05, 0.0), (2.0, 0.62)]
    front = pareto_frontier(pts)
    assert front == [4, 0, 1, 3, 5]  # (0.3, 0.4) is dominated by (0.2, 0.5)
    assert knee(pts, front) == 1  # most of the gain for little KL


def test_weak_winner_warns_and_names_the_better_frontier_candidate(monkeypatch):
    """The refusal case from the field: the candidate within the KL budget barely moves refusal
    (0.84 -> 0.76) while a frontier candidate at KL 0.3 takes it to 0.20."""
    sel = _planted_select(
        monkeypatch,
        "ablate",
        induce=[1.0] * 4,
        bypass=[0.76, 0.2, 0.9, 0.1],
        kl_add=[0.0] * 4,
        kl_abl=[0.05, 0.3, 0.02, 0.0],
        layers=[0, 1, 1, 2],
        base_b=0.0,
        base_a=0.84,
    )
    assert sel.best == 0 and [c.frontier for c in sel.candidates] == [True, True, True, False]
    assert "barely beats" in sel.warning and "x-1" in sel.warning and "--kl-bound" in sel.warning
    wide = _planted_select(
        monkeypatch,
        "ablate",
        induce=[1.0] * 4,
        bypass=[0.76, 0.2, 0.9, 0.1],
        kl_add=[0.0] * 4,
        kl_abl=[0.05, 0.3, 0.02, 0.0],
        layers=[0, 1, 1, 2],
        base_b=0.0,
        base_a=0.84,
        kl_bound=0.5,
    )
    assert wide.best == 1 and wide.warning == ""
    same = _planted_select(
        monkeypatch,
        "ablate",
        induce=[1.0] * 4,
        bypass=[0.0] * 4,
        kl_add=[0.0] * 4,
        kl_abl=[0.01] * 4,
        layers=[0, 1, 1, 2],
        base_b=0.0,
        base_a=0.0,
    )
    assert "does not measure this behaviour" in same.warning


def test_selection_plot_page(monkeypatch):
    from steerscope.report.selection import render_selection

    sel = _planted_select(
        monkeypatch,
        "ablate",
        induce=[1.0] * 4,
        bypass=[0.76, 0.2, 0.9, 0.1],
        kl_add=[0.0] * 4,
        kl_abl=[0.05, 0.3, 0.02, 0.0],
        layers=[0, 1, 1, 2],
        base_b=0.0,
        base_a=0.84,
    )
    html = render_selection(sel)
    assert html.count("<circle") == 3 and "<polyline" in html and "KL budget 0.1" in html and "barely beats" in html
    assert "http" not in html.replace("http://www.w3.org", "")  # nothing fetched


def test_completion_ranker_scores_change_minus_weighted_surprise_of_each_candidates_completions():
    """judging.keep: a candidate's score is the behaviour distance (judging.change: meaning, tail,
    case, surface group) of its greedy completions from the unsteered ones minus
    NATURALNESS_WEIGHT x their surprise under the unsteered model, recomputed here from separate
    generate / distance / log-prob calls. A zero vector changes nothing."""
    from conftest import PROMPTS, rand_vec, tiny_lm

    import steerscope as ss
    from steerscope.judging.change import Texts, distance
    from steerscope.judging.keep import NATURALNESS_WEIGHT, completion_ranker
    from steerscope.judging.vector_metrics import completion_logprobs

    lm = tiny_lm("llama")
    prompts = PROMPTS[:2]
    vecs = torch.stack([torch.zeros(lm.d_model), rand_vec(lm, seed=1, scale=30.0), rand_vec(lm, seed=2, scale=30.0)])
    ranker = completion_ranker(lm, prompts, 1, max_new_tokens=6)
    score = ranker(vecs)
    assert score.shape == (3,)
    base = ss.generate(lm, prompts, max_new_tokens=6)
    for k in range(3):
        steered = ss.generate(lm, prompts, vectors=vecs[k : k + 1], layer=1, include_unsteered=False, max_new_tokens=6)
        change = float(distance(Texts.of([c.text for c in steered]), Texts.of([c.text for c in base])).mean())
        lp = completion_logprobs(lm, prompts, [c.token_ids for c in steered])
        want = change + NATURALNESS_WEIGHT * sum(x if x == x else -10.0 for x in lp) / len(lp)
        assert abs(float(score[k]) - want) < 1e-4, (k, float(score[k]), want)
        assert ranker.last["texts"][k] == [c.text for c in steered]
    assert abs(ranker.last["change"][0]) < 1e-5  # the zero vector's completions are the unsteered ones
    assert max(ranker.last["change"][1:]) > 0.01  # a large push moves at least one of them
