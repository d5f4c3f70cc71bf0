"""`select` that picks the direction that works: a short list along the frontier, coherence, a KL
budget that fits the model, advice a user can follow, held-out evaluation (issue 36)."""

import json

import pytest
import torch
from conftest import PROMPTS, rand_vec, tiny_lm

import steerscope as ss
from steerscope.cli import main
from steerscope.config import config_from_dict
from steerscope.directions import VectorSet
from steerscope.judging import SelectConfig, select
from steerscope.judging import selection as selection_mod
from steerscope.judging.frontier import centred, flag_for, nondominated_layers, quantile, shortlist
from steerscope.judging.metrics import parse_metric


def test_nondominated_layers_and_a_shortlist_centred_on_the_budget():
    #        0: cheap, weak   1: moderate    2: dominated   3: breaks     4: breaks more
    pts = [(0.02, 0.5), (0.3, 2.0), (0.5, 1.0), (4.0, 8.0), (10.0, 10.0)]
    assert nondominated_layers(pts) == [[0, 1, 3, 4], [2]]
    assert centred([0, 1, 3, 4], pts, 0.1) == [0, 1, 3, 4]
    assert centred([0, 1, 3, 4], pts, 5.0) == [3, 4, 1, 0]  # just within, just beyond, next within, ...
    assert shortlist(pts, 2, 0.1) == [0, 1]  # the raw prefilter score would take 4 and 3
    assert shortlist(pts, 5, 0.1)[-1] == 2  # the next layer fills what is left
    assert quantile([0.0, 1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.6)


def test_flag_for_admits_the_point_and_nothing_beyond():
    assert flag_for([0.5], 0.3) == 0.3
    assert flag_for([0.5], 0.2831) == 0.29
    assert flag_for([0.2835], 0.2831) == 0.2831  # two digits would admit the next frontier point
    assert flag_for([], 6.71) == 6.8


FIELD = dict(  # the refusal fine-tune of issue 36; metric refusal, baseline A 0.88, B 0.17
    layers=[0, 1, 1, 2, 2, 1],
    kl=[0.02, 0.3, 6.7, 4.0, 10.0, 0.5],
    pre_effect=[0.5, 2.0, 9.0, 8.0, 10.0, 1.0],  # logit prefilter: breakers score highest
    bypass=[0.82, 0.20, 0.0, 0.0, 0.0, 0.7],  # refusal under ablation: gibberish "does not refuse"
    logprob=[-1.1, -1.4, -6.0, -5.0, -7.0, -1.2],  # unsteered replies: -1.0
)


def _field(monkeypatch, random_kl=(), mode="ablate", **cfg):
    """select() on FIELD with its scores planted: the prefilter, the completions' refusal rate and
    log-prob, and the KL. Returns (selection, the candidates that were generated for)."""
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=6), layers=FIELD["layers"], method="x")
    ids, generated = vs.ids, set()

    def logit_scores(lm, m, p, sub, md, cfg, desc):
        if sub is None:
            return torch.tensor([3.0 if p == ["a"] else 0.0])
        pre = [FIELD["pre_effect"][ids.index(i)] for i in sub.ids]
        return torch.tensor([3.0 - x if md == "ablate" else (x if mode == "add" else 1.0) for x in pre])

    def gen(lm, m, p, sub, md, cfg, want_lp):
        if sub is None:
            return torch.tensor([0.88 if p == ["a"] else 0.17]), torch.tensor([-1.0]) if want_lp else None
        generated.update(sub.ids)
        byp = [FIELD["bypass"][ids.index(i)] for i in sub.ids]  # in mode add, 1 - bypass is the induced refusal
        s = torch.tensor([x if md == "ablate" else (1.0 - x if mode == "add" else 0.5) for x in byp])
        return s, torch.tensor([FIELD["logprob"][ids.index(i)] for i in sub.ids]) if want_lp else None

    monkeypatch.setattr(selection_mod, "_logit_scores", logit_scores)
    monkeypatch.setattr(selection_mod, "_generated", gen)
    monkeypatch.setattr(
        selection_mod, "_kl", lambda lm, n, vs, md, cfg: torch.tensor([FIELD["kl"][i] for i in range(6)])
    )
    monkeypatch.setattr(selection_mod, "_random_kl", lambda lm, n, cfg: list(random_kl))
    cfg = SelectConfig(mode=mode, max_layer_frac=1.0, **cfg)
    return select(lm, vs, "refusal", ["a"], ["b"], ["c"], cfg), {ids.index(i) for i in generated}


def test_the_field_case_short_lists_the_moderate_candidate_and_advises_a_flag_that_selects_it(monkeypatch):
    sel, generated = _field(monkeypatch, kl_bound=0.1, shortlist=2)
    assert generated == {0, 1}  # the old rule generated for 0 and 4 (KL 10)
    assert sel.best == 0 and sel.candidates[1].effect == pytest.approx(0.68)
    assert "barely beats" in sel.warning and "x-1" in sel.warning and sel.advice in sel.warning
    # the KL is float32 (0.3000000119): --kl-bound 0.3 would leave it out, 0.31 admits it
    assert sel.advice == "--kl-bound 0.31 (or --choose x-1)"
    bound = float(sel.advice.split()[1])
    followed, _ = _field(monkeypatch, kl_bound=bound, shortlist=2)  # the user follows the advice
    assert followed.best == 1 and followed.warning == ""
    by_id, _ = _field(monkeypatch, kl_bound=0.1, shortlist=2, choose="x-1")
    assert by_id.best == 1


def test_incoherent_candidates_are_marked_and_never_chosen_or_recommended(monkeypatch):
    sel, generated = _field(monkeypatch, kl_bound=20.0, shortlist=6)
    assert generated == set(range(6))
    for i in (2, 3, 4):  # the breakers: most refusal removed, on broken text
        c = sel.candidates[i]
        assert c.coherent is False and not c.kept and not c.frontier and "incoherent" in c.reason
        assert c.effect == pytest.approx(0.88)
    assert sel.best == 1  # the most effective coherent candidate, though 2-4 "remove" more refusal
    knee, _ = _field(monkeypatch, choose="knee", kl_bound=20.0, shortlist=6)
    assert knee.best_candidate.coherent is True
    weak, _ = _field(monkeypatch, kl_bound=0.1, shortlist=6)
    assert "x-1" in weak.warning and "x-2" not in weak.warning and "incoherent" in weak.warning
    table = weak.table()
    assert "coherence" in table and "excluded from the choice and the advice" in table
    forced, _ = _field(monkeypatch, kl_bound=20.0, shortlist=2, choose="x-4")
    assert forced.best == 4 and "incoherent" in forced.warning


def test_the_auto_budget_is_a_quantile_of_the_random_directions_kl(monkeypatch):
    sel, generated = _field(monkeypatch, random_kl=[0.05, 0.1, 0.2, 0.3, 0.4], shortlist=2)
    assert sel.kl_budget == pytest.approx(quantile([0.05, 0.1, 0.2, 0.3, 0.4], 0.9))
    assert "90th percentile" in sel.kl_rule and "5 random directions" in sel.kl_rule
    assert 1 in generated and sel.best == 1 and sel.warning == ""
    assert "KL budget 0.36" in sel.table()
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["kl_budget"] == pytest.approx(0.36) and d["random_kl"] == [0.05, 0.1, 0.2, 0.3, 0.4]


def test_in_mode_add_the_auto_budget_is_the_knee_of_the_coherent_frontier(monkeypatch):
    sel, generated = _field(monkeypatch, mode="add", shortlist=6)
    assert sel.kl_rule.startswith("auto: the KL of the frontier's knee") and sel.random_kl == []
    assert sel.kl_budget == pytest.approx(0.3) and sel.best == 1  # the incoherent 2-4 are not the knee
    assert sel.candidates[1].kl_add == pytest.approx(0.3) and sel.candidates[1].kl_ablate is None


def test_random_kl_ablates_seeded_random_directions():
    lm = tiny_lm("llama")
    cfg = SelectConfig(kl_random=3)
    a = selection_mod._random_kl(lm, PROMPTS, cfg)
    assert len(a) == 3 and all(x >= 0 for x in a) and a == selection_mod._random_kl(lm, PROMPTS, cfg)
    assert max(a) > 0  # ablating a direction changes the tiny model's next token at least a little


def test_an_unknown_choose_id_is_one_clear_error():
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=2), layers=[0, 1], method="x")
    with pytest.raises(ss.SteerscopeError, match="neither budget, knee nor a candidate id"):
        select(lm, vs, "logodds:a", PROMPTS, PROMPTS, PROMPTS, SelectConfig(choose="x-9"))


def test_coherence_on_the_tiny_model_zero_vector_is_as_natural_as_the_baseline():
    """A zero vector's completions are the unsteered ones (coherence exactly 0); a huge vector's
    are far less natural to the unsteered model."""
    lm = tiny_lm("llama")
    vecs = torch.stack([torch.zeros(lm.d_model), rand_vec(lm, seed=3, scale=400.0)])
    vs = VectorSet.create(lm, vecs, layers=[1, 1], method="x")
    cfg = SelectConfig(max_new_tokens=8)
    _, base = selection_mod._generated(lm, None, PROMPTS, None, "add", cfg, True)
    _, lp = selection_mod._generated(lm, None, PROMPTS, vs, "add", cfg, True)
    assert base.shape == (1,) and lp.shape == (2,)
    assert float(lp[0]) == pytest.approx(float(base[0]), abs=1e-6)
    assert float(lp[1]) < float(base[0]) - 1.0


def test_heldout_evaluation_orthogonalised_matches_ablation(tmp_path):
    lm = tiny_lm("llama")
    vs = VectorSet.create(lm, rand_vec(lm, rows=2, scale=30.0), layers=[0, 1], method="x")
    prompts = PROMPTS + ["Tell me a story", "What is two plus two", "Name a colour"]
    cfg = SelectConfig(mode="ablate", choose="x-1", test_fraction=0.5, max_new_tokens=6, examples=2)
    sel = select(lm, vs, "logodds:a,e", prompts, prompts, prompts, cfg)
    ho = sel.heldout
    assert [c.name for c in ho.conditions] == ["baseline A", "ablation", "orthogonalised", "baseline B", "addition"]
    assert ho.n_a == ho.n_b == 3 and "held out" in ho.source
    c = {x.name: x for x in ho.conditions}
    assert abs(c["orthogonalised"].score - c["ablation"].score) < 1e-3  # the weights reproduce the hooks
    assert c["ablation"].score != pytest.approx(c["baseline A"].score)
    # the baseline and the addition recomputed directly on the held-out prompts
    from steerscope.judging.heldout import split

    test_a, test_b = split(prompts, 0.5, 0)[1], split(prompts, 0.5, 1)[1]
    assert [e["prompt"] for e in c["baseline A"].examples] == test_a[:2] and c["baseline A"].coherence is None
    # coherence against the less natural baseline of the two sets, for every steered row
    ref = min(c["baseline A"].logprob, c["baseline B"].logprob)
    for name in ("ablation", "orthogonalised", "addition"):
        assert c[name].coherence == pytest.approx(c[name].logprob - ref) and c["baseline B"].coherence is None
    m = parse_metric("logodds:a,e", lm)
    with torch.no_grad():
        direct = m.score_logits(lm.forward(**lm.encode(test_a, chat=None)).logits[:, -1]).mean()
        with ss.steer(lm, ss.Add.of(vs[1], coef=1.0)):
            added = m.score_logits(lm.forward(**lm.encode(test_b, chat=None)).logits[:, -1]).mean()
    assert c["baseline A"].score == pytest.approx(float(direct), abs=1e-4)
    assert c["addition"].score == pytest.approx(float(added), abs=1e-4)
    text = sel.table()
    assert "held-out" in text and "orthogonalised" in text
    sel.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["heldout"]["conditions"][2]["name"] == "orthogonalised"
    from steerscope.report.selection import render_selection

    html = render_selection(sel)
    assert "Held-out evaluation of x-1" in html and "orthogonalised" in html and "http" not in html


def test_selection_page_shows_budget_rule_winner_and_incoherent(monkeypatch):
    from steerscope.report.selection import render_selection

    sel, _ = _field(monkeypatch, random_kl=[0.05, 0.1, 0.2, 0.3, 0.4], shortlist=6)
    html = render_selection(sel)
    assert "KL budget 0.36 (auto)" in html and "90th percentile" in html
    assert "x-1  (chosen)" in html and "incoherent" in html and html.count('stroke="#f28e2b"') == 3
    assert "--test-fraction" in html  # no held-out prompts: the page says how to get them


def test_a_select_config_saved_before_coherence_loads_without_the_check():
    old = {"mode": "ablate", "coef": 1.0, "kl_bound": 0.1, "choose": "budget", "max_layer_frac": 0.8}
    cfg = config_from_dict(SelectConfig, old)
    assert cfg.incoherent_below is None and cfg.kl_bound == 0.1 and cfg.test_fraction == 0.0
    assert SelectConfig().incoherent_below == 1.5 and SelectConfig().kl_bound is None


def test_cli_select_with_held_out_sets_and_choose_by_id(ckpt, tmp_path, capsys):
    m = ["--model", str(ckpt)]
    p = tmp_path / "p.txt"
    p.write_text("Hello\nHow are you\nTell me more\nGood morning\n")
    q = tmp_path / "q.txt"
    q.write_text("Name a fruit\nCount to three\n")
    assert main(["extract", "--sets", str(p), str(q), "--layers", "0:2", "--out", str(tmp_path / "c"), *m]) == 0
    base = ["select", "--vector", str(tmp_path / "c"), "--metric", "logodds:a,e", "--a", str(p), "--b", str(q)]
    base += ["--neutral", str(p), "--mode", "ablate", "--max-new-tokens", "4", "--kl-random", "2", *m]
    capsys.readouterr()
    argv = [*base, "--choose", "diffmean-L1", "--test", str(q), str(p), "--table", str(tmp_path / "t.json")]
    assert main([*argv, "--plot", str(tmp_path / "s.html")]) == 0
    out = capsys.readouterr()
    assert "KL budget" in out.err and "90th percentile" in out.err and "selected: diffmean-L1" in out.out
    assert "held-out (--test sets; 2 A and 4 B prompts" in out.out and "orthogonalised" in out.out
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["heldout"]["vector_id"] == "diffmean-L1" and t["kl_rule"].startswith("auto")
    assert "Held-out evaluation" in (tmp_path / "s.html").read_text()
    assert main([*base, "--choose", "nope"]) == 2
    assert "neither budget, knee nor a candidate id" in capsys.readouterr().err
    assert main([*base, "--test", str(q), str(p), "--test-fraction", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_coherence_reference_is_the_less_natural_baseline():
    """A refusal model's canned refusals (A) are far more natural to it than its answers (B); an
    ablation that turns refusals into answers is judged against the answers."""
    from steerscope.judging.heldout import reference_logprob

    assert float(reference_logprob(torch.tensor([-0.07]), torch.tensor([-0.29]))[0]) == pytest.approx(-0.29)
    assert reference_logprob(-0.5, -0.2) == -0.5 and reference_logprob(None, -0.2) == -0.2
