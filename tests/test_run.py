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
from steerscope.judging.cluster import cluster_texts
from steerscope.judging.vector_metrics import compute_vector_metrics, distinct_n
from steerscope.jobs.run import RunConfig, run

N_VEC = 3


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm("llama", chat=True)


@pytest.fixture(scope="module")
def cfg():
    return RunConfig(n_train=2, n_heldout=1, n_neutral=3, max_new_tokens=6, sweep_multiples=[0.5, 1, 2], sweep_top=2,
                     discover=DiscoverConfig.of(n_vectors=N_VEC, steps=5, R=2.0, source=0, target=2))


@pytest.fixture(scope="module")
def run_dir(lm, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    run(cfg, out, lm=lm)
    return out


def test_run_folder_contents(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "vectors", "completions.jsonl", "metrics.json", "report.html"}
    rows = [json.loads(l) for l in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == (2 * N_VEC + 1) * 3
    assert {r["set"] for r in rows} == {"learned", "random", "unsteered"} and {r["split"] for r in rows} == {"train", "heldout"}
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["vectors"]) == 2 * N_VEC and set(m["summary"]) == {"learned", "random"}
    assert len(m["sweep"]) == 2 and all(len(v) == 3 for v in m["sweep"].values())
    assert len(m["labels"]) == len(rows) == len(m["map"])
    learned = VectorSet.load(run_dir / "vectors" / "learned")
    control = VectorSet.load(run_dir / "vectors" / "random")
    assert torch.allclose(learned.vectors.norm(dim=-1), control.vectors.norm(dim=-1), atol=1e-5)  # matched norms


def test_resume_and_never_clobber(run_dir, lm, cfg):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "report.html"}
    run(cfg, run_dir, lm=lm)
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "report.html"}
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
    same = [ss.Completion(r.prompt_index, r.prompt, "a", 1, 1.0, r.text, r.token_ids, r.finish_reason) for r in res_zero]
    m0 = compute_vector_metrics(lm, VectorSet.create(lm, v[None], [1], "x", ids=["a"]), res_zero + same,
                                neutral=["Hi"], layer_range=None)
    assert m0["a"]["embed_distance"] == pytest.approx(0.0, abs=1e-6) and m0["a"]["changed"] == 0.0
    assert distinct_n([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5) and distinct_n([1, 2, 3, 4]) == 1.0


def test_clustering_groups_identical_completions():
    texts = ["The cat sat on the mat.", "Stocks fell sharply today.", "The cat sat on the mat.", "Stocks fell sharply today."]
    c = cluster_texts(texts)
    assert c.labels[0] == c.labels[2] and c.labels[1] == c.labels[3] and c.labels[0] != c.labels[1]
    assert {cl.typical for cl in c.clusters} == set(texts) and all(cl.size == 2 for cl in c.clusters)


def test_clustering_groups_capitals_and_other_languages_apart():
    """The embedder is uncased and English-only: capitals and French must still be behaviours of their own."""
    from steerscope.judging.surface import surface_group

    texts = ["The cat sat on the mat and looked at the birds.", "THE CAT SAT ON THE MAT AND LOOKED AT THE BIRDS.",
             "Le chat est sur le tapis et il regarde les oiseaux.", "La lumière de la lumière est très belle.",
             "Stocks fell sharply today in the morning.", "jrjrjr jrjr ****", "El perro es muy grande y come mucho."]
    assert [surface_group(t) for t in texts] == ["", "caps", "fr", "fr", "", "", "es"]
    c = cluster_texts(texts)
    assert c.labels[2] == c.labels[3]  # two French texts on unrelated topics: one behaviour
    assert len({c.labels[i] for i in (0, 1, 2, 6)}) == 4  # English, capitals, French, Spanish apart
    surf = {cl.id: cl.surface for cl in c.clusters}
    assert surf[c.labels[1]] == "written in capitals" and surf[c.labels[2]] == "in French"
    assert surf[c.labels[0]] == "" and surf[c.labels[5]] == ""  # degenerate text is no language


def test_report_in_a_real_browser(run_dir):
    from selenium.webdriver.common.by import By

    driver = chrome()
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, ".vector-card")) == 2 * N_VEC
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cluster-map circle")) == 3 * N_VEC  # learned completions
        assert len(driver.find_elements(By.CSS_SELECTOR, ".sweep-plot polyline")) == 2 * 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == 2 * N_VEC
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
            return [float(r.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v"))
                    for r in driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")]

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


def test_findings_are_learned_only_clusters_ranked_by_vectors():
    from steerscope.judging.findings import find_behaviours

    lm = tiny_lm("llama")
    texts = {0: "hello", 1: "bonjour", 2: "caps", 3: "noise"}

    def row(s, vid, p, c):
        return {"set": s, "vector_id": vid, "prompt_index": p, "prompt": f"prompt {p}", "split": "train" if p else "heldout",
                "text": texts[c], "token_ids": [5 + c, 6, 7]}

    rows = [row("unsteered", None, 0, 0), row("unsteered", None, 1, 0),
            row("learned", "a", 0, 1), row("learned", "b", 1, 1), row("learned", "c", 0, 1),  # 3 vectors, learned only
            row("learned", "d", 0, 2), row("learned", "d", 1, 2),  # 1 vector, learned only
            row("learned", "e", 0, 3), row("random", "r", 0, 3),  # random too: not a finding
            row("learned", "f", 1, 0)]  # same as unsteered: not a finding
    labels = [{"hello": 0, "bonjour": 1, "caps": 2, "noise": 3}[r["text"]] for r in rows]
    emb = torch.nn.functional.normalize(torch.eye(4)[labels] + 0.1, dim=-1)
    clusters = [{"id": i, "typical": t, "words": [t]} for i, t in texts.items()]
    found = find_behaviours(lm, rows, labels, clusters, emb)
    assert [f["typical"] for f in found] == ["bonjour", "caps"]
    assert found[0]["vectors"] == ["a", "b", "c"] and found[0]["n_vectors"] == 3 and found[1]["vectors"] == ["d"]
    assert found[0]["rank"] == 0 and found[0]["heldout"] == 2 and found[0]["prompts"] == [0, 1]
    assert found[0]["distance"] > 0.5 and all(torch.isfinite(torch.tensor(f["logprob"])) for f in found)
    assert find_behaviours(lm, rows, labels, clusters, emb, min_vectors=2)[0]["typical"] == "bonjour"
    assert len(find_behaviours(lm, rows, labels, clusters, emb, min_vectors=2)) == 1


def test_export_a_finding_as_a_vector_set(run_dir, lm, tmp_path):
    from steerscope.cli import main
    from steerscope.jobs.findings import export_finding

    m = json.loads((run_dir / "metrics.json").read_text())
    assert "findings" in m and all(set(f["vectors"]) <= set(m["vectors"]) for f in m["findings"])
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    learned = VectorSet.load(run / "vectors" / "learned")
    ids = learned.ids[1:3]
    m["findings"] = [{"rank": 0, "vectors": ids, "n_vectors": 2, "words": ["w"], "typical": "t", "completions": 2,
                      "distance": 0.5, "heldout": 0, "prompts": [0], "rows": []}]
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


def test_goldilocks_choice():
    from steerscope.judging.goldilocks import choose, moved_share

    rows = [{"multiple": 0.5, "R": 1, "learned": 0.0, "random": 0.0}, {"multiple": 1, "R": 2, "learned": 0.5, "random": 0.0},
            {"multiple": 2, "R": 4, "learned": 0.9, "random": 0.25}, {"multiple": 4, "R": 8, "learned": 1.0, "random": 1.0}]
    assert choose(rows)[0]["R"] == 4  # the largest R with a clear gap (random moved too much at 8)
    assert choose(rows, max_random=0.1)[0]["R"] == 2  # random moved too much at 4
    saturated = [dict(r, learned=1.0) for r in rows[:3]]  # learned move everything: the gap alone would pick R=1
    assert choose(saturated)[0]["R"] == 4 and "largest R" in choose(saturated)[1]
    small = [dict(r, learned=r["random"] + 0.1) for r in rows[:3]]  # no clear gap anywhere: the largest gap
    assert choose(small)[0]["R"] == 1 and "no multiple" in choose(small)[1]  # ties go to the smaller R
    assert choose([dict(rows[1], learned=0.6), dict(rows[2], learned=0.3)])[0]["R"] == 2  # R=4's gap is 0.05
    assert choose([dict(r, random=0.9) for r in rows])[0]["R"] == 1  # none qualifies: smallest, and says so
    assert "every multiple" in choose([dict(r, random=0.9) for r in rows])[1]
    C = ss.Completion
    comps = [C(0, "p", None, 0, 0.0, "a", [1], "length"), C(0, "p", "melbo-0", 1, 1.0, "b", [2], "length"),
             C(0, "p", "melbo-1", 1, 1.0, "a", [1], "length"), C(0, "p", "control-0", 1, 1.0, "c", [3], "length")]
    emb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0.8, 0.6, 0]])  # c is 0.2 away from a
    assert moved_share(comps, emb, 0.35, ["control-0"]) == {"learned": 0.5, "random": 0.0}


def test_goldilocks_tries_the_largest_multiple_first_and_trains_probes_only_where_they_could_win(lm, monkeypatch):
    """The check stops at the first (largest) multiple that qualifies and trains no probes where
    random vectors alone moved too much; its choice is the one `choose` makes on every row."""
    import steerscope.judging.goldilocks as g

    # scripted shares (learned, random) per multiple, and the calibrated R stubbed to 10
    script = {0.5: (0.2, 0.0), 1.0: (0.9, 0.25), 2.0: (1.0, 0.6), 4.0: (1.0, 1.0)}
    trained = []
    monkeypatch.setattr(g, "calibrate_R", lambda *a, **k: (10.0, None))

    def fake_discover(lm_, prompts, cfg, **k):
        trained.append(cfg.R / 10.0)
        return VectorSet.create(lm_, torch.ones(cfg.n_vectors, lm_.d_model), 1, "fake")

    def fake_moved(lm_, prompts, base, vectors, control_ids, cfg, n, thr):
        m = vectors[0].vector.norm().item() / 10.0 if control_ids else trained[-1]
        return {"learned": script[round(m, 6)][0], "random": script[round(m, 6)][1]}

    monkeypatch.setattr(g, "discover", fake_discover)
    monkeypatch.setattr(g, "_moved", fake_moved)
    cfg = DiscoverConfig.of("kl", n_vectors=8, source=1, target=2)
    res = g.goldilocks_R(lm, ["a", "b"], cfg, layer_range=None, multiples=(0.5, 1.0, 2.0, 4.0), random_vectors=4)
    assert trained == [1.0]  # 4 and 2: random moved > 50 %, no probes; 1 qualifies; 0.5 is never tried
    assert [r["multiple"] for r in res.rows] == [1.0, 2.0, 4.0] and res.chosen == 10.0
    every = [{"multiple": m, "R": 10.0 * m, "learned": a, "random": b} for m, (a, b) in script.items()]
    assert g.choose(every)[0]["R"] == res.chosen and "not tried (0.5)" in res.reason
    # nothing qualifies: every multiple where random stayed low is trained, and the largest gap wins
    script.update({1.0: (0.3, 0.25), 0.5: (0.2, 0.0)})
    trained.clear()
    res = g.goldilocks_R(lm, ["a", "b"], cfg, layer_range=None, multiples=(0.5, 1.0, 2.0, 4.0), random_vectors=4)
    assert trained == [1.0, 0.5] and res.chosen == 5.0 and "no multiple" in res.reason
    # caps seed 1 at kl's layer 12 (README "Planted behaviours"): random vectors moved 53 % at 1x,
    # just over the 50 % allowed. With 0.5x on the list the check went down to it (and the run lost
    # the capitals it finds at 1x); the run's default multiples stop at the calibrated R.
    script.update({0.5: (0.75, 0.22), 1.0: (1.0, 0.53), 2.0: (1.0, 0.78)})
    assert g.goldilocks_R(lm, ["a", "b"], cfg, layer_range=None, multiples=(0.5, 1.0, 2.0), random_vectors=4).chosen == 5.0
    trained.clear()
    res = g.goldilocks_R(lm, ["a", "b"], cfg, layer_range=None, multiples=RunConfig().goldilocks, random_vectors=4)
    assert min(RunConfig().goldilocks) == 1.0 and res.chosen == 10.0 and trained == []


def test_run_without_R_calibrates_and_checks_multiples(lm, cfg, tmp_path):
    d = cfg.discover.replace(R=None)
    c = cfg.replace(discover=d, goldilocks=[1.0, 3.0], goldilocks_vectors=2, sweep_top=0)
    run(c, tmp_path / "g", lm=lm)
    cal = json.loads((tmp_path / "g" / "calibration.json").read_text())
    tried = [r["multiple"] for r in cal["rows"]]
    assert not cal["given"] and tried in ([3.0], [1.0, 3.0])  # 1 is tried only when 3 does not qualify
    # more random vectors than probes: the random share is the one the rule thresholds
    n_rand = min(16, lm.d_model)
    for r in cal["rows"]:
        assert r["random_completions"] == n_rand * c.n_train
        trained = r["random"] <= 0.5  # probes only where random vectors alone did not move too much
        assert (r["learned"] is not None, r["learned_completions"]) == (trained, 2 * c.n_train if trained else 0)
    assert cal["chosen"] in [r["R"] for r in cal["rows"]]
    assert cal["calibrated"] == pytest.approx(cal["rows"][-1]["R"] / 3.0)
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
    assert sorted(m["sets"].values()) == ["learned"] * 2 + ["random"] * 2


def test_run_with_kl_reports_how_many_candidates_its_vectors_were_kept_from(lm, cfg, tmp_path):
    d = DiscoverConfig.of("kl", n_vectors=2, R=2.0, source=0, target=2, steps=3, reply_tokens=2, candidates=2)
    run(cfg.replace(discover=d, sweep_top=0), tmp_path / "kl", lm=lm)
    m = json.loads((tmp_path / "kl" / "metrics.json").read_text())
    assert m["discovery"]["candidates"] == 4 and sorted(m["sets"].values()) == ["learned"] * 2 + ["random"] * 2
    assert m["discovery"]["kept_by"] == "completions"  # the run's default: ranked by what the candidates say
    h = json.loads((tmp_path / "kl" / "vectors" / "learned" / "config.json").read_text())["hyperparams"]
    score = h["candidate_score"]
    assert len(score) == 4 and min(score[i] for i in h["kept"]) >= max(x for i, x in enumerate(score) if i not in h["kept"])
    assert "kl: 2 vectors (kept from 4 candidates for changed, natural completions)" in (tmp_path / "kl" / "report.html").read_text()
    run(cfg.replace(discover=d, sweep_top=0, keep_by="method"), tmp_path / "kl-entropy", lm=lm)
    assert "(kept from 4 candidates by entropy)" in (tmp_path / "kl-entropy" / "report.html").read_text()
