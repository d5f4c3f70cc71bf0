"""The main job on a tiny model: run folder, resume, refusal to clobber, metrics with known answers,
and the report opened in a real headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm, rand_vec, tiny_lm

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


def _chrome():
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run does).")
        pytest.skip("no chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1300,2000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(chromedriver), options=opts)


def test_report_in_a_real_browser(run_dir):
    from selenium.webdriver.common.by import By

    driver = _chrome()
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, ".vector-card")) == 2 * N_VEC
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cluster-map circle")) == 3 * N_VEC  # learned completions
        assert len(driver.find_elements(By.CSS_SELECTOR, ".sweep-plot polyline")) == 2 * 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == 2 * N_VEC

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
