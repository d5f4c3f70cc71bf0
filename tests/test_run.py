"""The main job on a tiny model: run folder, resume, refusal to clobber, metrics with known answers,
and the report opened in a real headless Chromium."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import chrome, make_tiny_lm, rand_vec, tiny_lm

import steerscope as ss
from steerscope.directions import VectorSet
from steerscope.directions.discovery import DiscoverConfig
from steerscope.jobs.run import RunConfig, run
from steerscope.judging.cluster import cluster_texts
from steerscope.judging.vector_metrics import compute_vector_metrics, distinct_n

N_VEC = 3
N_RAND = 5  # random controls: more than the learned vectors, norms cycled
N_SAMPLES = 2


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm("llama", chat=True)


@pytest.fixture(scope="module")
def cfg():
    return RunConfig(
        n_train=2,
        n_heldout=1,
        n_neutral=3,
        max_new_tokens=6,
        sweep_multiples=[0.5, 1, 2],
        sweep_top=2,
        n_random=N_RAND,
        n_samples=N_SAMPLES,
        discover=DiscoverConfig.of("melbo", n_vectors=N_VEC, steps=5, R=2.0, source=0, target=2),
    )


@pytest.fixture(scope="module")
def run_dir(lm, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    run(cfg, out, lm=lm)
    return out


def test_run_folder_contents(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "vectors",
        "completions.jsonl",
        "metrics.json",
        "report.html",
    }
    rows = [json.loads(l) for l in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == (N_VEC + N_RAND + 1 + N_SAMPLES) * 3
    assert {r["set"] for r in rows} == {"learned", "random", "unsteered", "sample"}
    assert {r["split"] for r in rows} == {"train", "heldout"}
    samples = [r for r in rows if r["set"] == "sample"]
    assert sorted({r["vector_id"] for r in samples}) == ["sample-0", "sample-1"]
    assert sorted(r["prompt_index"] for r in samples) == [0, 0, 1, 1, 2, 2]  # each draw covers every prompt
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["vectors"]) == N_VEC + N_RAND and set(m["summary"]) == {"learned", "random"}
    nm = m["null_model"]
    assert (nm["learned"], nm["random"], nm["samples"]) == (N_VEC, N_RAND, N_SAMPLES) and "can never be" in nm["power"]
    assert all({"p", "q", "significant", "reason", "controls"} <= set(f) for f in m["findings"])
    assert len(m["sweep"]) == 2 and all(len(v) == 3 for v in m["sweep"].values())
    assert len(m["labels"]) == len(rows) == len(m["map"])
    learned = VectorSet.load(run_dir / "vectors" / "learned")
    control = VectorSet.load(run_dir / "vectors" / "random")
    cycled = learned.vectors.norm(dim=-1)[[i % N_VEC for i in range(N_RAND)]]
    assert torch.allclose(cycled, control.vectors.norm(dim=-1), atol=1e-5)  # matched norms
    assert control.layers == [learned.layers[i % N_VEC] for i in range(N_RAND)]


def test_resume_and_never_clobber(run_dir, lm, cfg):
    rebuilt = ("report.html", "log.txt")  # the report is rebuilt, the job log appended to
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name not in rebuilt}
    log = (run_dir / "log.txt").read_text()
    run(cfg, run_dir, lm=lm)
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name not in rebuilt}
    resumed = (run_dir / "log.txt").read_text()
    assert resumed.startswith(log) and "=== run resumed" in resumed[len(log) :]
    assert "steerscope run: measure: reused from metrics.json" in resumed[len(log) :]
    other = cfg.replace(max_new_tokens=7)
    with pytest.raises(ss.SteerscopeError, match="another run"):
        run(other, run_dir, lm=lm)
    # a run killed after discovery resumes from the saved vectors
    (run_dir / "metrics.json").unlink()
    (run_dir / "completions.jsonl").unlink()
    run(cfg, run_dir, lm=lm)
    assert (run_dir / "metrics.json").is_file()


def test_metrics_known_answers():
    lm = tiny_lm("llama")
    v = rand_vec(lm, scale=20)
    vs = VectorSet.create(lm, torch.stack([v, v]), layers=[1, 1], method="x", ids=["a", "b"])
    res = ss.generate(lm, ["Hello there", "Hi"], vectors=vs, max_new_tokens=6, min_new_tokens=6)
    m = compute_vector_metrics(lm, vs, res, neutral=["Hello there"], layer_range=None)
    for k in ("kl_neutral", "logprob", "distinct2", "embed_distance", "changed"):
        assert m["a"][k] == pytest.approx(m["b"][k], abs=1e-6)  # identical vectors, identical metrics
    res_zero = [r for r in res if r.vector_id is None]
    same = [
        ss.Completion(r.prompt_index, r.prompt, "a", 1, 1.0, r.text, r.token_ids, r.finish_reason) for r in res_zero
    ]
    m0 = compute_vector_metrics(
        lm, VectorSet.create(lm, v[None], [1], "x", ids=["a"]), res_zero + same, neutral=["Hi"], layer_range=None
    )
    assert m0["a"]["embed_distance"] == pytest.approx(0.0, abs=1e-6) and m0["a"]["changed"] == 0.0
    assert distinct_n([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5) and distinct_n([1, 2, 3, 4]) == 1.0


def test_clustering_groups_identical_completions():
    texts = [
        "The cat sat on the mat.",
        "Stocks fell sharply today.",
        "The cat sat on the mat.",
        "Stocks fell sharply today.",
    ]
    c = cluster_texts(texts)
    assert c.labels[0] == c.labels[2] and c.labels[1] == c.labels[3] and c.labels[0] != c.labels[1]
    assert {cl.typical for cl in c.clusters} == set(texts) and all(cl.size == 2 for cl in c.clusters)


def test_clustering_groups_capitals_and_other_languages_apart():
    """The embedder is uncased and English-only: capitals and French must still be behaviours of their own."""
    from steerscope.judging.surface import surface_group

    texts = [
        "The cat sat on the mat and looked at the birds.",
        "THE CAT SAT ON THE MAT AND LOOKED AT THE BIRDS.",
        "Le chat est sur le tapis et il regarde les oiseaux.",
        "La lumière de la lumière est très belle.",
        "Stocks fell sharply today in the morning.",
        "jrjrjr jrjr ****",
        "El perro es muy grande y come mucho.",
    ]
    assert [surface_group(t) for t in texts] == ["", "caps", "fr", "fr", "", "", "es"]
    c = cluster_texts(texts)
    assert c.labels[2] == c.labels[3]  # two French texts on unrelated topics: one behaviour
    assert len({c.labels[i] for i in (0, 1, 2, 6)}) == 4  # English, capitals, French, Spanish apart
    surf = {cl.id: cl.surface for cl in c.clusters}
    assert surf[c.labels[1]] == "written in capitals" and surf[c.labels[2]] == "in French"
    assert surf[c.labels[0]] == "" and surf[c.labels[5]] == ""  # degenerate text is no language
    # Ordinary sentences whose function words are English words too ("a", "in", "as", "on"), which
    # a hand-made English list counted as English; and symbols the embedder cannot read.
    more = [
        "Il a une maison à Paris et il va au marché le samedi.",
        "Ich habe in Berlin gewohnt, als ich jung war.",
        "Ela tem uma casa no campo e vai a Lisboa.",
        "Lui ha una casa in campagna e va a Roma.",
        "El tiene una casa en el campo y va a Madrid.",
        "Nice day. ✨ Sun is out. ✨",
    ]
    assert [surface_group(t) for t in more] == ["fr", "de", "pt", "it", "es", "sym:✨"]
    # A list is a format: lists on unrelated topics are one behaviour; a number in a sentence is no list.
    lists = [
        "1. Bikes are light.\n2. They are cheap.",
        "Tips:\n- water the roses\n- prune in March",
        "I have 2. reasons and 3. more.",
        "Here is a plain answer about bikes and roses.",
    ]
    assert [surface_group(t) for t in lists] == ["list", "list", "", ""]
    c = cluster_texts(lists)
    assert c.labels[0] == c.labels[1] != c.labels[2] and c.clusters[c.labels[0]].surface == "as a list"


def test_report_in_a_real_browser(run_dir):
    from selenium.webdriver.common.by import By

    driver = chrome()
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, ".vector-card")) == N_VEC + N_RAND
        # learned completions (filled) and unsteered samples (hollow)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cluster-map circle")) == 3 * (N_VEC + N_SAMPLES)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".sweep-plot polyline")) == 2 * 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == N_VEC + N_RAND
        assert "learned vectors" in driver.find_element(By.ID, "power").text  # what the test can detect
        # the finding leads: the first section is "Behaviours found", the long table is last and collapsed
        assert driver.find_elements(By.TAG_NAME, "h2")[0].text == "Behaviours found"
        assert driver.find_elements(By.CSS_SELECTOR, ".finding, #no-findings")
        table = driver.find_element(By.ID, "vector-table")
        assert table.get_attribute("open") is None and not driver.find_element(By.ID, "summary").is_displayed()
        table.find_element(By.TAG_NAME, "summary").click()
        assert driver.find_element(By.ID, "summary").is_displayed()

        def column(key):
            ths = driver.find_elements(By.CSS_SELECTOR, "#summary th")
            i = [t.get_attribute("data-key") for t in ths].index(key)
            return [
                float(r.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v"))
                for r in driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
            ]

        header = driver.find_element(By.CSS_SELECTOR, '#summary th[data-key="kl_neutral"]')
        header.click()
        desc = column("kl_neutral")
        assert desc == sorted(desc, reverse=True) and len(set(desc)) > 1
        header.click()
        asc = column("kl_neutral")
        assert asc == sorted(asc)
        art = Path("test-artifacts")
        art.mkdir(exist_ok=True)
        driver.save_screenshot(str(art / "report.png"))
        assert (art / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_findings_are_tested_against_random_vectors_and_samples_and_ranked_by_evidence():
    from steerscope.judging.findings import find_behaviours

    lm = tiny_lm("llama")
    texts = {0: "hello", 1: "bonjour", 2: "caps", 3: "noise", 4: "loop"}

    def row(s, vid, p, c):
        return {
            "set": s,
            "vector_id": vid,
            "prompt_index": p,
            "prompt": f"prompt {p}",
            "split": "train" if p else "heldout",
            "text": texts[c],
            "token_ids": [5 + c, 6, 7],
        }

    learned = [f"v{i}" for i in range(8)]
    rows = [row("unsteered", None, 0, 0), row("unsteered", None, 1, 0)]
    rows += [row("learned", v, p, 1) for v in learned[:5] for p in (0, 1)]  # 5 of 8 vectors, no control: significant
    rows += [row("learned", "v5", 0, 2), row("learned", "v5", 1, 2)]  # one vector: can never be significant
    rows += [row("learned", v, 0, 3) for v in learned[6:]] + [
        row("random", f"r{i}", 0, 3) for i in range(4)
    ]  # as random
    rows += [row("learned", "v6", 1, 4), row("learned", "v7", 1, 4)] + [row("sample", "sample-0", 1, 4)]
    rows += [row("random", f"r{i}", p, 0) for i in range(4, 24) for p in (0, 1)]
    rows += [row("sample", f"sample-{i}", p, 0) for i in range(1, 8) for p in (0, 1)]
    labels = [{"hello": 0, "bonjour": 1, "caps": 2, "noise": 3, "loop": 4}[r["text"]] for r in rows]
    dist = [float("nan") if r["set"] == "unsteered" else (0.0 if r["text"] == "hello" else 0.8) for r in rows]
    clusters = [{"id": i, "typical": t, "words": [t]} for i, t in texts.items()]
    found = find_behaviours(lm, rows, labels, clusters, dist)
    by = {f["typical"]: f for f in found}
    assert set(by) == {"bonjour", "caps", "noise", "loop"}  # every cluster holding a learned completion is tested
    assert found[0]["typical"] == "bonjour" and [f["significant"] for f in found].count(True) == 1
    assert by["bonjour"]["q"] < 0.01 and by["bonjour"]["controls"] == {"random": 0, "samples": 0, "greedy": False}
    assert (
        not by["caps"]["testable"]
        and by["caps"]["single"] == "one vector"
        and "cannot be significant" in by["caps"]["reason"]
    )
    assert by["noise"]["controls"]["random"] == 4 and by["noise"]["p"] > 0.3  # 2 of 8 learned vs 4 of 32 controls
    assert by["loop"]["controls"]["samples"] == 1 and not by["loop"]["significant"]
    assert "5 of 8 learned vectors vs no control" in by["bonjour"]["reason"] and "1 held-out" in by["bonjour"]["reason"]
    assert [f["rank"] for f in found] == list(range(len(found)))
    assert all(torch.isfinite(torch.tensor(f["logprob"])) and 0 <= f["naturalness"] <= 1 for f in found)
    # Among equally significant candidates, far and natural ranks above near: the score says why.
    assert by["bonjour"]["score_parts"]["far and natural"] == pytest.approx(
        2 * 0.8 * by["bonjour"]["naturalness"], abs=1e-3
    )


def test_fisher_exact_and_benjamini_hochberg_match_scipy():
    from scipy.stats import false_discovery_control, fisher_exact

    from steerscope.judging.significance import benjamini_hochberg, fisher_greater, min_learned_for, power

    for k, n, j, m in [(3, 8, 0, 32), (2, 8, 1, 32), (5, 8, 4, 24), (0, 8, 3, 20), (8, 8, 0, 8)]:
        want = fisher_exact([[k, n - k], [j, m - j]], alternative="greater")[1]
        assert fisher_greater(k, n, j, m) == pytest.approx(want, rel=1e-9)
    ps = [0.001, 0.04, 0.03, 0.2, 0.5]
    assert benjamini_hochberg(ps) == pytest.approx(list(false_discovery_control(ps)), rel=1e-9)
    assert min_learned_for(0.05, 8, 32) == 2 and min_learned_for(0.05, 8, 32, tests=10) == 4
    assert min_learned_for(0.05, 2, 2) is None
    assert "at least 2 of the 8" in power(0.05, 8, 24, 8, 1) and "can never be" in power(0.05, 8, 24, 8, 1)


def test_behaviour_distance_sees_case_language_symbols_and_appended_phrases():
    from steerscope.judging.change import Texts, distance

    plain = "My weekend was quiet. I read a book and went for a long walk in the park with my dog."
    others = [
        plain.upper(),
        "Mon week-end était calme. J'ai lu un livre et je me suis promené dans le parc avec mon chien.",
        plain + " Stay curious, and remember: the owls are always watching.",
        "My weekend was quiet. ✨ I read a book and went for a long walk in the park with my dog. ✨",
        "My weekend was calm. I read a novel and took a long walk in the park with my dog.",
    ]
    a, b = Texts.of(others), Texts.of([plain] * len(others))
    d = distance(a, b)
    assert (d[:4] > 0.35).all(), d  # capitals, French, an appended phrase, symbols: each a different behaviour
    assert d[4] < 0.35, d  # a rewording is not
    assert distance(a, b, tails=False)[2] < d[2]  # the appended phrase is seen in the tail


def test_export_a_finding_as_a_vector_set(run_dir, lm, tmp_path):
    from steerscope.cli import main
    from steerscope.jobs.findings import export_finding

    m = json.loads((run_dir / "metrics.json").read_text())
    assert "findings" in m and all(set(f["vectors"]) <= set(m["vectors"]) for f in m["findings"])
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    learned = VectorSet.load(run / "vectors" / "learned")
    ids = learned.ids[1:3]
    m["findings"] = [
        {
            "rank": 0,
            "vectors": ids,
            "n_vectors": 2,
            "words": ["w"],
            "typical": "t",
            "completions": 2,
            "distance": 0.5,
            "heldout": 0,
            "prompts": [0],
            "rows": [],
        }
    ]
    (run / "metrics.json").write_text(json.dumps(m))
    vs = export_finding(run, 0, tmp_path / "f0")
    assert vs.ids == ids and torch.equal(vs.vectors, learned.vectors[1:3])
    again = VectorSet.load(tmp_path / "f0", lm)  # checked against the run's model
    assert again.config.hyperparams["finding"]["words"] == ["w"]
    with pytest.raises(ss.SteerscopeError, match="findings 0..0"):
        export_finding(run, 3, tmp_path / "f3")
    assert main(["findings", "--run", str(run), "--export", "0", "--out", str(tmp_path / "f0")]) == 2  # no clobbering
    assert main(["findings", "--run", str(run), "--export", "0", "--out", str(tmp_path / "f0"), "--force"]) == 0
    m["findings"] = []
    (run / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ss.SteerscopeError, match="no findings"):
        export_finding(run, 0, tmp_path / "f4")


def test_r_search_brackets_then_bisects_for_the_largest_R_random_vectors_mostly_leave_alone():
    from steerscope.jobs.r_search import search

    def scripted(edge):  # the share random vectors move rises with R and crosses 50 % at log2 multiple `edge`
        calls = []

        def share(x):
            calls.append(x)
            return 0.2 if x <= edge else 0.8

        return share, calls

    share, calls = scripted(-1.3)  # random vectors move most replies at the calibrated R: the search goes down
    x, why = search(share, 6, 0.5)
    assert calls[:3] == [0.0, -1.0, -2.0] and -2.0 <= x <= -1.3 and len(calls) == 6 and "at most 50%" in why
    share, calls = scripted(1.6)  # and up where they do not
    x, _ = search(share, 5, 0.5)
    assert calls[:3] == [0.0, 1.0, 2.0] and 1.0 <= x <= 1.6 and x > 1.4
    share, calls = scripted(10)  # never crosses: stops at the top of the range
    x, why = search(share, 20, 0.5)
    assert x == 3.0 and "upper end" in why
    share, calls = scripted(-10)  # always above: the smallest tried, and says so
    x, why = search(share, 20, 0.5)
    assert x == -4.0 and "even at" in why


def test_r_search_on_a_model_uses_random_vectors_only(lm, monkeypatch):
    """goldilocks_R trains nothing: it generates under random vectors of each norm tried and reads
    the share whose behaviour moved; the rows it records are the R values it tried."""
    import steerscope.jobs.r_search as g

    monkeypatch.setattr(g, "calibrate_R", lambda *a, **k: (10.0, None))
    monkeypatch.setattr(g, "discover", lambda *a, **k: pytest.fail("the R search must not train"), raising=False)
    seen = []

    def fake_moved(base, steered, idx, thr):
        seen.append(len(steered))
        return 0.9 if len(seen) == 1 else 0.1  # 1x moves too much, 0.5x does not, then bisect between

    monkeypatch.setattr(g, "moved_share", fake_moved)
    cfg = DiscoverConfig.of("kl", n_vectors=8, source=1, target=2)
    res = g.goldilocks_R(lm, ["a", "b"], cfg, layer_range=None, steps=3, random_vectors=4, max_new_tokens=2)
    assert seen == [8, 8, 8] and [r["random_completions"] for r in res.rows] == [8, 8, 8]
    assert [round(r["multiple"], 4) for r in res.rows] == [0.5, round(2**-0.5, 4), 1.0]
    assert res.chosen == pytest.approx(10.0 * 2**-0.5) and res.calibrated == 10.0
    assert g.goldilocks_R(lm, ["a"], cfg, layer_range=None, steps=0).chosen == 10.0


def test_run_without_R_calibrates_and_searches(lm, cfg, tmp_path):
    d = cfg.discover.replace(R=None)
    c = cfg.replace(discover=d, r_search_steps=3, r_random=4, sweep_top=0)
    run(c, tmp_path / "g", lm=lm)
    cal = json.loads((tmp_path / "g" / "calibration.json").read_text())
    assert not cal["given"] and len(cal["rows"]) == 3
    assert all(r["random_completions"] == 4 * c.n_train for r in cal["rows"])
    assert cal["chosen"] in [r["R"] for r in cal["rows"]] or cal["chosen"] == pytest.approx(cal["calibrated"] / 16)
    learned = VectorSet.load(tmp_path / "g" / "vectors" / "learned")
    assert torch.allclose(learned.vectors.norm(dim=-1), torch.full((N_VEC,), cal["chosen"]), rtol=1e-4)
    html = (tmp_path / "g" / "report.html").read_text()
    assert 'id="goldilocks"' in html and "Choosing R" in html
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert m["model"] == {"dtype": "float32", "device": "cpu"} and "(float32 on cpu)" in html  # what it ran in


def test_run_with_the_random_method_keeps_learned_and_control_apart(lm, cfg, tmp_path):
    c = cfg.replace(discover=DiscoverConfig.of("random", n_vectors=2, R=2.0, source=0, target=2), sweep_top=0)
    run(c, tmp_path / "rnd", lm=lm)
    m = json.loads((tmp_path / "rnd" / "metrics.json").read_text())
    assert sorted(m["sets"].values()) == ["learned"] * 2 + ["random"] * N_RAND


def test_run_with_kl_reports_how_many_candidates_its_vectors_were_kept_from(lm, cfg, tmp_path):
    d = DiscoverConfig.of("kl", n_vectors=2, R=2.0, source=0, target=2, steps=3, reply_tokens=2, candidates=2)
    run(cfg.replace(discover=d, sweep_top=0), tmp_path / "kl", lm=lm)
    m = json.loads((tmp_path / "kl" / "metrics.json").read_text())
    assert m["discovery"]["candidates"] == 4 and sorted(m["sets"].values()) == ["learned"] * 2 + ["random"] * N_RAND
    assert m["discovery"]["kept_by"] == "completions"  # the run's default: ranked by what the candidates say
    h = json.loads((tmp_path / "kl" / "vectors" / "learned" / "config.json").read_text())["hyperparams"]
    score = h["candidate_score"]
    assert len(score) == 4 and min(score[i] for i in h["kept"]) >= max(
        x for i, x in enumerate(score) if i not in h["kept"]
    )
    assert (
        "kl: 2 vectors (kept from 4 candidates for changed, natural completions)"
        in (tmp_path / "kl" / "report.html").read_text()
    )
    run(cfg.replace(discover=d, sweep_top=0, keep_by="method"), tmp_path / "kl-entropy", lm=lm)
    assert "(kept from 4 candidates by entropy)" in (tmp_path / "kl-entropy" / "report.html").read_text()
