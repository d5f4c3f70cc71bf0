"""`steerscope refine` on tiny models: every registered method improves its fitness over the seeds
and keeps candidates on the annealed sphere, the KL penalty is charged and respected, a killed
search replays its saved generations, and the analysis helpers measure what they say."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope.directions.refine import REFINE_METHODS, Start, k90, on_sphere, schedule, sparsity
from steerscope.directions.vectors import VectorSet
from steerscope.jobs import refine as R
from steerscope.jobs.refine import RefineConfig
from steerscope.jobs.refine_job import refine
from steerscope.judging.metrics import Metric

# A smooth text scorer for a character-level tiny model: the share of vowels in the completion.
VOWELS = Metric("vowels", "text", lambda texts: [sum(ch in "aeiouAEIOU" for ch in t) / max(1, len(t)) for t in texts])
SMALL = dict(n_train=3, n_heldout=2, max_new_tokens=8, n_neutral=3, kl_tokens=6, generations=4, population=6)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_lm("llama")


@pytest.fixture(scope="module")
def seeds(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds") / "vecs"
    VectorSet.create(tiny, rand_vec(tiny, seed=3, scale=6.0, rows=5), layers=1, method="x").save(d)
    return d


def _cfg(folder, **kw) -> RefineConfig:
    return RefineConfig(vectors=str(folder), **(SMALL | kw))


@pytest.mark.parametrize("method", REFINE_METHODS.names())
def test_every_method_beats_its_seeds_on_the_annealed_sphere(tiny, seeds, tmp_path, method):
    cfg = _cfg(seeds, method=method, seeds=3, kl_weight=0.0, anneal=[1.0, 1.5, 0.7])
    report = refine(cfg, tmp_path / "r", lm=tiny, scorer=VOWELS)
    ev = json.loads((tmp_path / "r" / "refine.json").read_text())
    hist = ev["train"]["history"]
    assert len(hist) == cfg.generations and all(len(h["fitness"]) == cfg.population for h in hist)
    assert ev["train"]["refined_fitness"] > ev["train"]["seed_fitness"], hist
    vs = VectorSet.load(tmp_path / "r" / "vectors", tiny)
    assert vs.ids[0] == "refined" and {"refined-Rx0.7", "refined-Rx1", "refined-Rx1.5"} <= set(vs.ids)
    R0 = ev["R_seed"]
    for i, m in ((vs.ids.index("refined-Rx1.5"), 1.5), (vs.ids.index("refined-Rx0.7"), 0.7)):
        assert float(vs.vectors[i].norm()) == pytest.approx(R0 * m, rel=1e-4)
    assert [h["mult"] for h in hist] == schedule([1.0, 1.5, 0.7], cfg.generations)
    seeds_json = json.loads((tmp_path / "r" / "seeds.json").read_text())
    assert len(seeds_json["ids"]) == 3 and len(seeds_json["all"]) == 5
    assert seeds_json["kl_budget"] == pytest.approx(
        statistics.median(r["kl"] for r in seeds_json["all"])
    )  # the default
    assert [r["fitness"] for r in seeds_json["all"]] == sorted((r["fitness"] for r in seeds_json["all"]), reverse=True)
    html = report.read_text()
    assert "Held-out completions" in html and "keep their magnitude" in html and "<svg" in html


def test_the_kl_penalty_is_charged_and_respected(tiny, seeds, tmp_path):
    free = _cfg(seeds, method="local", kl_weight=0.0, kl_budget=0.0, generations=5, anneal=[1.0, 2.0])
    tight = _cfg(seeds, method="local", kl_weight=50.0, kl_budget=0.05, generations=5, anneal=[1.0, 2.0])
    refine(free, tmp_path / "free", lm=tiny, scorer=VOWELS)
    refine(tight, tmp_path / "tight", lm=tiny, scorer=VOWELS)
    f = json.loads((tmp_path / "free" / "refine.json").read_text())
    t = json.loads((tmp_path / "tight" / "refine.json").read_text())
    for h in t["train"]["history"]:  # fitness = score - weight * max(0, KL - budget), exactly
        for fit, s, k in zip(h["fitness"], h["score"], h["kl"]):
            assert fit == pytest.approx(s - 50.0 * max(0.0, k - 0.05), abs=1e-5)

    def best_kl(ev):
        hist = ev["train"]["history"]
        best = ev["train"]["refined_fitness"]
        return min(k for h in hist for fit, k in zip(h["fitness"], h["kl"]) if fit == pytest.approx(best))

    assert best_kl(t) < best_kl(f)
    assert t["heldout"]["refined"]["kl"] <= f["heldout"]["refined"]["kl"]


@pytest.mark.parametrize("method", ["cma", "local"])
def test_a_killed_search_replays_its_saved_generations(tiny, seeds, tmp_path, monkeypatch, method):
    cfg = _cfg(seeds, method=method, seeds=3, generations=3)
    refine(cfg, tmp_path / "r", lm=tiny, scorer=VOWELS)
    first = VectorSet.load(tmp_path / "r" / "vectors", tiny).vectors.clone()
    # as if killed after the search checkpoint but before the vectors were written
    import shutil

    shutil.rmtree(tmp_path / "r" / "vectors")
    (tmp_path / "r" / "refine.json").unlink()
    calls = []
    real = R.Evaluator.measure
    monkeypatch.setattr(R.Evaluator, "measure", lambda self, v, p: calls.append(len(v)) or real(self, v, p))
    refine(cfg, tmp_path / "r", lm=tiny, scorer=VOWELS)
    assert calls == [2], calls  # only the held-out comparison (seed + refined) ran again
    assert torch.equal(VectorSet.load(tmp_path / "r" / "vectors", tiny).vectors, first)


def test_helpers():
    assert k90(torch.eye(10)[3]) == 1
    assert k90(torch.ones(10)) == 9
    x = on_sphere(torch.randn(4, 7), 2.5)
    assert torch.allclose(x.norm(dim=-1), torch.full((4,), 2.5))
    assert schedule([1.0, 2.0], 5) == [1.0, 1.0, 1.0, 2.0, 2.0] and schedule([1.0], 3) == [1.0] * 3
    sae = type("S", (), {"W_dec": torch.eye(6)})()
    sp = sparsity({"one": torch.eye(6)[2], "spread": torch.ones(6)}, sae)
    assert sp["one"]["sae_k90"] == 1 and sp["spread"]["sae_k90"] == 6 and sp["one"]["sae_top"][0] == [2, 1.0]


def test_span_methods_refuse_one_seed(tiny, seeds):
    from steerscope.errors import SteerscopeError

    start = Start(torch.randn(1, tiny.d_model), ["a"], [0.0], 1, 1.0)
    for m in ("cma", "cem"):
        with pytest.raises(SteerscopeError, match="at least 2"):
            REFINE_METHODS[m](None, start, RefineConfig(vectors="x"))


@pytest.mark.parametrize("method", REFINE_METHODS.names())
def test_methods_search_with_any_fitness_callable(method):
    """The methods need no model: given a plain callable as the fitness (here the cosine to a
    hidden direction in the seeds' span), each one climbs it, keeps every candidate at the
    scheduled radius, and repeats itself exactly under the same seed."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    seeds = torch.randn(3, 16, generator=g)  # (k, d)
    target = seeds.T @ torch.tensor([0.2, 1.0, -0.7])  # (d,) in the span, away from every seed
    target = target / target.norm()
    start = Start(seeds[[0, 1, 2]] * 2.0, ["a", "b", "c"], [0.0] * 3, 1, float((seeds[0] * 2.0).norm()))
    settings = SimpleNamespace(generations=12, population=8, sigma=0.3, anneal=[1.0, 1.5, 1.0], seed=0)

    def run():
        seen = []

        def fitness(cands: torch.Tensor, mult: float) -> torch.Tensor:
            assert torch.allclose(cands.norm(dim=-1), torch.full((len(cands),), start.R * mult), rtol=1e-4)
            f = cands @ target / cands.norm(dim=-1)  # (P,) cosine to the hidden direction
            seen.append((mult, f))
            return f

        REFINE_METHODS[method](fitness, start, settings)
        return seen

    seen = run()
    assert [m for m, _ in seen] == schedule(settings.anneal, settings.generations)
    first = float(torch.nn.functional.cosine_similarity(start.vectors[0], target, 0))
    assert max(float(f.max()) for _, f in seen) > first + 0.1
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, run()))


def test_a_judge_can_be_the_fitness(tmp_path):
    from steerscope.jobs.refine_job import default_scorer

    m = default_scorer(
        RefineConfig(
            vectors="x",
            judge_url="http://127.0.0.1:9/v1",
            judge_model="m",
            judge_rubric="Rate how French the response is, 0 to 10.",
        ),
        tmp_path,
    )
    assert m.name == "judge:m" and m.needs_prompts and m.kind == "text"
    assert default_scorer(
        RefineConfig(vectors="x", model=__import__("steerscope").ModelConfig(model="organism:caps"))
    ).startswith("regex:")
