"""`steerscope bench` mechanics on tiny models: the shipped concept set, every registered method
through the shared contract, KL matching of every vector arm, judges, A/B letter balancing, the
LLM judge over loopback, the adapter context, and resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from steerscope.directions.concepts import DEFAULT_CONCEPTS, SPLITS, builtin_names, load_concept, load_concepts
from steerscope.errors import SteerscopeError
from steerscope.jobs.bench import BenchConfig, BenchContext, bench
from steerscope.jobs.bench_methods import BENCH_METHODS, Arm
from steerscope.judging.concept_judges import EmbeddingJudge, ab_curve, ab_prompts, harmonic
from steerscope.judging.kl_match import KLMatchConfig, Rollouts

SMALL = dict(
    kl=KLMatchConfig(tokens=8), n_neutral=4, max_new_tokens=8, discover_vectors=4, layer=1, report_instructions=12
)


# ---- the concept set ------------------------------------------------------------------------
def test_report_instructions_are_topped_up_from_the_shared_pool_and_cells_get_intervals():
    from steerscope.directions.concepts import load_concepts, report_instructions, shared_instructions
    from steerscope.directions.data import load_prompts
    from steerscope.jobs.bench_eval import bootstrap_ci

    pool = shared_instructions()
    assert len(pool) >= 24 and not set(pool) & set(load_prompts("neutral"))
    for c in load_concepts(["all"]):
        rep = report_instructions(c, 24)
        own = {x for sp in c.instructions.values() for x in sp}
        assert len(rep) == 24 and rep[: len(c.instructions["report"])] == c.instructions["report"]
        assert len(set(rep)) == 24 and not set(rep[len(c.instructions["report"]) :]) & own  # no leak from choose
    lo, hi = bootstrap_ci([0.0] * 12 + [1.0] * 12)
    assert 0.25 < lo < 0.5 < hi < 0.75  # a 50 % rate over 24 instructions: about +-20 points
    assert bootstrap_ci([1.0]) is None and bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx([0.3, 0.3])


def test_shipped_concepts_meet_the_spec():
    names = builtin_names()
    assert len(names) >= 12 and set(DEFAULT_CONCEPTS) <= set(names)
    groups = set()
    all_pos = {}
    for c in load_concepts(["all"]):
        n = c.counts()
        assert n["positive"] >= 48 and n["negative"] + n["hard_negative"] >= 48 and n["hard_negative"] >= 12, (
            c.name,
            n,
        )
        assert n["instruction"] >= 10, c.name
        for kind, by_split in c.texts.items():  # splits are disjoint and all used
            seen = [t for s in SPLITS for t in by_split[s]]
            assert len(seen) == len(set(seen)) and all(by_split[s] for s in SPLITS), (c.name, kind)
        assert not set(c.instructions["choose"]) & set(c.instructions["report"])
        groups.add(c.group)
        all_pos[c.name] = set(c.pos("train") + c.pos("choose") + c.pos("report"))
    assert {"topic", "sentiment", "language", "style", "refusal", "persona"} <= groups
    assert sum(1 for c in load_concepts(["all"]) if len(c.ab) >= 10) >= 3
    for a in all_pos:  # no text is a positive of two concepts
        for b in all_pos:
            assert a == b or not all_pos[a] & all_pos[b]


def test_user_concepts_from_jsonl(tmp_path):
    rows = [{"kind": "meta", "concept": "tea", "description": "tea", "system_prompt": "Talk about tea."}]
    rows += [{"kind": "positive", "text": f"tea text {i}"} for i in range(8)]
    rows += [{"kind": "negative", "text": f"other text {i}", "split": "report" if i % 2 else "train"} for i in range(4)]
    rows += [{"kind": "instruction", "text": f"instruction {i}"} for i in range(4)]
    p = tmp_path / "tea.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_concept(str(p))
    assert c.name == "tea" and c.system_prompt == "Talk about tea."
    assert c.texts["negative"]["train"] == ["other text 0", "other text 2"]  # explicit splits win
    assert len(c.pos("train")) == 4 and len(c.instructions["report"]) == 3
    p.write_text(json.dumps({"kind": "positive", "text": "only"}) + "\n")
    with pytest.raises(SteerscopeError, match="lacks"):
        load_concept(str(p))
    with pytest.raises(SteerscopeError, match="given twice"):
        load_concepts(["joy", "joy"])


# ---- judges ---------------------------------------------------------------------------------
def test_embedding_judge_separates_held_out_texts():
    concepts = load_concepts(["all"])
    j = EmbeddingJudge(concepts)
    accs = {n: a.heldout_accuracy for n, a in j.axes.items()}
    assert min(accs.values()) >= 0.75, accs  # report-split texts, never used for centroids or thresholds
    s = j.scores(["Il fait beau, nous allons au marché.", "The striker scored in the final minute."])
    assert j.shows("french", s["french"]) == [True, False] and j.shows("sports", s["sports"]) == [False, True]


def test_harmonic_mean():
    assert harmonic([1.0, 1.0, 1.0]) == 1.0 and harmonic([0.0, 1.0, 1.0]) == 0.0
    assert abs(harmonic([0.5, 1.0, 1.0]) - 0.75) < 1e-9


def test_ab_letters_alternate_so_a_letter_bias_cancels():
    lm = make_tiny_lm("llama", chat=True)
    items = load_concept("joy").ab[:8]
    prompts, a_is = ab_prompts(items)
    assert a_is == [True, False] * 4 and all(items[i].behaviour in p for i, p in enumerate(prompts))
    # a vector that only pushes the letter "A": it raises P(behaviour) on even items and lowers
    # it on odd ones, so half the items are anti-steerable and the mean barely moves
    ida = lm.tokenizer.encode("A", add_special_tokens=False)[0]
    idb = lm.tokenizer.encode("B", add_special_tokens=False)[0]
    W = lm.model.get_output_embeddings().weight.detach()
    v = (W[ida] - W[idb]).float()
    res = ab_curve(lm, items, v, lm.n_layers - 1, [-1.0, 0.0, 1.0], unit=20.0 / float(v.norm()))
    per = torch.tensor(res["per_item"])  # (items, multipliers)
    assert (per[0::2, 2] > per[0::2, 0]).all() and (per[1::2, 2] < per[1::2, 0]).all()
    assert res["anti_steerable"] == 0.5
    assert abs(res["slope"]) < 0.5 * float((per[0::2, 2] - per[0::2, 0]).mean())


# ---- rollouts: prompting and adapters ---------------------------------------------------------
def test_prompted_and_model_kl():
    lm = make_tiny_lm("llama", chat=True)
    r = Rollouts(lm, ["Hello there", "How are you"], tokens=6)
    assert float(r.kl_model().max()) < 1e-6  # the model as it is: no side effect
    assert float(r.kl_prompted("Talk like a pirate.").mean()) > 1e-4
    assert r.kl_prompted("Talk like a pirate.").shape == r.base.shape[:1]


def test_adapter_in_place_restores_the_model(tmp_path):
    pytest.importorskip("peft")
    from steerscope.adapters.distill import DistillConfig, adapter_in_place, distill

    lm = make_tiny_lm("llama")
    enc = lm.encode(["hello there"], chat=False)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3)) * 8
    distill(
        lm,
        v,
        1,
        tmp_path / "a",
        DistillConfig(n_train=8, n_heldout=2, n_neutral=4, max_new_tokens=6, steps=30, lr=3e-3),
        progress=False,
    )
    with torch.no_grad():
        before = lm.forward(**enc).logits
        with adapter_in_place(lm, tmp_path / "a"):
            inside = lm.forward(**enc).logits
        after = lm.forward(**enc).logits
    assert torch.equal(before, after) and not torch.allclose(before, inside, atol=1e-4)
    assert not any("lora" in n for n, _ in lm.model.named_modules())


# ---- every registered method through the contract ---------------------------------------------
@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    lm = make_tiny_lm("llama", chat=True)
    out = tmp_path_factory.mktemp("bench") / "b"
    methods = [m for m in BENCH_METHODS.names() if m != "distill"]
    from steerscope.sae.formats import save_saelens
    from steerscope.sae.model import SAE, SAEConfig

    sae_dir = out.parent / "sae"
    save_saelens(SAE(SAEConfig(lm.d_model, 32, k=4, layer=1, model_type="llama")), sae_dir)
    cfg = BenchConfig(concepts=["joy", "french"], methods=methods, sae=str(sae_dir), sae_candidates=3, **SMALL)
    bench(cfg, out, lm=lm)
    return lm, cfg, out


def test_every_method_follows_the_arm_contract(small_bench):
    lm, cfg, out = small_bench
    from steerscope.checkpoint import JobFolder
    from steerscope.sae.formats import load_saelens

    ctx = BenchContext(
        cfg, JobFolder(out, "bench", cfg.to_dict()), lm, load_concepts(["joy"]), ["Hi", "Hello"], load_saelens(cfg.sae)
    )
    ctx.artifacts["discover"] = __import__("steerscope").VectorSet.load(out / "discovered", lm)
    for name in BENCH_METHODS.names():
        arm = BENCH_METHODS[name](ctx, ctx.concepts[0])
        assert isinstance(arm, Arm) and arm.method == name and arm.kind in ("vector", "prompt", "adapter", "skip")
        if arm.kind == "vector":
            assert arm.vector.shape == (lm.d_model,) and torch.isfinite(arm.vector).all() and arm.vector.norm() > 0
        if arm.kind == "skip":
            assert arm.info["skipped"]


def test_bench_matches_the_budget_and_writes_everything(small_bench):
    lm, cfg, out = small_bench
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    for c in ("joy", "french"):
        res = json.loads((out / "concepts" / f"{c}.json").read_text())
        vec = [m for m, r in res["methods"].items() if r["kind"] == "vector"]
        assert {"diffmean", "pca", "probe", "discovered"} <= set(vec)
        sae = res["methods"]["sae"]
        assert sae["kind"] == "vector" and sae["info"]["feature"] in sae["info"]["candidates"]
        assert len(sae["info"]["choose_effects"]) == 3 and sae["layer"] == 1
        for m in vec:
            r = res["methods"][m]
            assert r["kl_hit"] and abs(r["kl"] - cfg.kl.target) <= 0.1 * cfg.kl.target, (c, m, r["kl"])
            assert r["kl_at"]["0.5"] < r["kl_at"]["1.0"] < r["kl_at"]["2.0"]  # strength curve is monotone in KL
            assert 0 <= r["detection"]["auroc"] <= 1 and r["detection"]["roc"][0] == [0.0, 0.0]
            assert len(r["at"]["1"]["rows"]) == len(res["instructions"])
        assert res["methods"]["prompting"]["kl"] > 0
    from safetensors.torch import load_file

    t = load_file(str(out / "concepts" / "joy.safetensors"))
    assert set(t) >= {"diffmean", "pca", "probe", "sae", "discovered"} and t["diffmean"].shape == (lm.d_model,)
    keys = {
        "concept",
        "method",
        "measure",
        "value",
        "judge",
        "layer",
        "coef",
        "kl_target",
        "kl_quantile",
        "model_fingerprint",
        "dtype",
        "device",
    }
    assert rows and all(keys <= set(r) for r in rows)
    assert {r["measure"] for r in rows} >= {
        "score",
        "concept_rate",
        "selectivity",
        "relevance",
        "fluency_logprob",
        "detection_auroc",
        "detection_auroc_hard",
        "ab_slope",
        "ab_anti_steerable",
    }
    html = (out / "report.html").read_text()
    assert "Methods × concepts" in html and "Detection ROC" in html and "A/B steerability" in html


def test_bench_resumes_after_a_kill(tmp_path):
    """SIGKILL the bench once the first concept is saved; the rerun keeps that concept's artifact
    and gives the same results as an uninterrupted bench."""
    script = tmp_path / "b.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_tiny_lm
from steerscope.jobs.bench import BenchConfig, bench
from steerscope.judging.kl_match import KLMatchConfig
cfg = BenchConfig(concepts=["joy", "french", "sports"], methods=["diffmean", "prompting"],
                  kl=KLMatchConfig(tokens=8), n_neutral=4, max_new_tokens=8, layer=1)
bench(cfg, sys.argv[1], lm=make_tiny_lm("llama", chat=True))
""")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stderr=subprocess.PIPE, text=True)
    first = out / "concepts" / "joy.json"
    t0 = time.time()
    while not first.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert first.exists(), p.stderr.read() if p.poll() is not None else "timed out"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "results.jsonl").exists()
    stamp = first.stat().st_mtime_ns
    r = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "concept:joy ..." not in r.stderr and "concept:sports ..." in r.stderr
    assert first.stat().st_mtime_ns == stamp
    straight = tmp_path / "straight"
    r2 = subprocess.run(
        [sys.executable, str(script), str(straight)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r2.returncode == 0, r2.stderr
    strip = lambda p: [{k: v for k, v in json.loads(l).items()} for l in (p / "results.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(out) == strip(straight)


# ---- the LLM judge over loopback ----------------------------------------------------------------
class _Judge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system = body["messages"][0]["content"]
        score = "2" if "fluency" in system else "1" if "concept" in system else "0.5"
        if self.server.wordy and "fluency" in system:  # a judge that forgets to give a number
            score = "The response reads well."
        data = json.dumps({"choices": [{"message": {"content": score}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_a_missing_sae_is_a_visible_skip(tmp_path):
    lm = make_tiny_lm("llama", chat=True)
    bench(BenchConfig(concepts=["joy"], methods=["diffmean", "sae"], **SMALL), tmp_path / "b", lm=lm)
    res = json.loads((tmp_path / "b" / "concepts" / "joy.json").read_text())
    assert res["methods"]["sae"]["kind"] == "skip" and "--sae" in res["methods"]["sae"]["info"]["skipped"]
    rows = [json.loads(l) for l in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert any(r["method"] == "sae" and r["measure"] == "skipped" for r in rows)
    assert "skipped" in (tmp_path / "b" / "report.html").read_text()


def _judged_bench(folder, wordy: bool) -> list[dict]:
    srv = HTTPServer(("127.0.0.1", 0), _Judge)
    srv.wordy = wordy
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        lm = make_tiny_lm("llama", chat=True)
        cfg = BenchConfig(
            concepts=["joy"],
            methods=["diffmean"],
            judge_url=f"http://127.0.0.1:{srv.server_port}/v1",
            judge_model="stub",
            **{**SMALL, "discover_vectors": 1},
        )
        bench(cfg, folder, lm=lm)
    finally:
        srv.shutdown()
    return [json.loads(l) for l in (folder / "results.jsonl").read_text().splitlines()]


def test_llm_judge_ratings_reach_the_results(tmp_path):
    rows = _judged_bench(tmp_path / "b", wordy=False)
    llm = {r["measure"]: r["value"] for r in rows if r["measure"].startswith("llm_") and r["multiplier"] == 1.0}
    assert llm["llm_concept"] == 1.0 and llm["llm_fluency"] == 2.0 and llm["llm_instruction"] == 0.5
    assert abs(llm["llm_score"] - harmonic([1.0, 0.5, 2.0])) < 1e-9
    assert llm["llm_rated"] == 1.0
    assert all(r["judge"] == "LLM (stub)" for r in rows if r["measure"].startswith("llm_"))
    assert (tmp_path / "b" / "judge_cache.jsonl").is_file()


def test_llm_judge_without_numbers_is_counted_not_hidden(tmp_path):
    """A small judge model often answers without a number: the results and the report say how
    many completions were rated instead of showing a mean over the few that were."""
    rows = _judged_bench(tmp_path / "b", wordy=True)
    llm = {r["measure"]: r["value"] for r in rows if r["measure"].startswith("llm_") and r["multiplier"] == 1.0}
    assert llm["llm_rated"] == 0.0 and llm["llm_concept"] == 1.0
    assert llm["llm_score"] is None or math.isnan(llm["llm_score"])
    html = (tmp_path / "b" / "report.html").read_text()
    assert "completions with all three ratings" in html and ">0%<" in html


def test_distill_arm_trains_on_the_best_vector(tmp_path):
    pytest.importorskip("peft")
    lm = make_tiny_lm("llama", chat=True)
    cfg = BenchConfig(concepts=["joy"], methods=["diffmean", "probe", "distill"], distill_steps=30, **SMALL)
    bench(cfg, tmp_path / "b", lm=lm)
    res = json.loads((tmp_path / "b" / "concepts" / "joy.json").read_text())
    d = res["methods"]["distill"]
    assert d["kind"] == "adapter" and d["source_method"] in ("diffmean", "probe")
    assert (tmp_path / "b" / "adapters" / "joy" / "adapter_model.safetensors").is_file()
    assert d["kl"] > 0 and d["distill"]["reproduced_share"] > 0  # the adapter does part of what the vector does
    assert len(d["at"]["1"]["rows"]) == len(res["instructions"])
    assert not any("lora" in n for n, _ in lm.model.named_modules())


def test_sweep_headline_of_a_bench(small_bench):
    from steerscope.jobs.grid_sweep import headline

    lm, cfg, out = small_bench
    h = headline("bench", out)
    assert {"diffmean_score", "diffmean_concept_rate", "prompting_score"} <= set(h)
    assert all(0 <= v <= 1 for v in h.values())


def test_headline_marks_methods_within_noise_of_the_best():
    from steerscope.report.bench import _paired_gaps

    def concept(a, b):
        rows = lambda xs: [{"hm": x} for x in [0.0] + xs]  # noqa: E731  (one choose row first)
        return {
            "n_instructions": {"choose": 1},
            "methods": {"a": {"at": {"1": {"rows": rows(a)}}}, "b": {"at": {"1": {"rows": rows(b)}}}},
        }

    clear = _paired_gaps([concept([0.9, 0.8, 0.9, 0.85], [0.1, 0.0, 0.1, 0.05])], "a", ["a", "b"])
    mu, se, n = clear["b"]
    assert n == 4 and mu == pytest.approx(0.8) and mu > 2 * se  # the choose row is left out
    noisy = _paired_gaps([concept([0.9, 0.0, 0.5, 0.1], [0.0, 0.8, 0.4, 0.2])], "a", ["a", "b"])
    assert noisy["b"][0] < 2 * noisy["b"][1]
    assert clear["a"][0] == 0.0
