"""`steerscope bench` on the real SmolLM2-135M-Instruct (small configuration): the matched-KL
protocol holds on a real model, a supervised French vector makes French that the offline judge
sees, detection separates French from English, and the report renders in Chromium.
Screenshots go to $STEERSCOPE_SCREENSHOTS when set (else the test's tmp folder)."""

import json
import os
from pathlib import Path

import pytest

from steerscope.cli import main

pytestmark = pytest.mark.integration


def test_bench_on_smollm2(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--concepts",
        "french",
        "--methods",
        "diffmean,prompting",
        "--n-neutral",
        "4",
        "--max-new-tokens",
        "16",
        "--curve",
        "1,3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean score" in printed and "report:" in printed
    fr = json.loads((out / "concepts" / "french.json").read_text())
    r = fr["methods"]["diffmean"]
    assert r["kl_hit"] and abs(r["kl"] - 0.5) <= 0.05, r["kl_search"]
    assert r["kl_at"]["3.0"] > r["kl_at"]["1.0"]
    assert r["detection"]["auroc"] > 0.9 and r["detection"]["auroc_hard"] > 0.6, r["detection"]
    # French grows with strength in the offline judge's continuous score (MiniLM cosine to
    # French minus to non-French texts), from the unsteered answers up
    base, at1, at3 = fr["unsteered"]["concept_score"], r["at"]["1"]["concept_score"], r["at"]["3"]["concept_score"]
    assert base < at1 < at3, (base, at1, at3, [x["text"] for x in r["at"]["3"]["rows"]])
    assert fr["unsteered"]["concept_rate"] < 0.2 and r["at"]["3"]["concept_rate"] >= r["at"]["1"]["concept_rate"]
    assert fr["methods"]["prompting"]["kl"] > 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert {r["concept"] for r in rows} == {"french"} and all(r["kl_target"] == 0.5 for r in rows)
    assert main(argv) == 0  # a rerun resumes: nothing is rebuilt
    assert "concept:french ..." not in capsys.readouterr().err

    from conftest import chrome

    shots = Path(os.environ.get("STEERSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    driver = chrome(1300, 1000)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        assert driver.find_element("css selector", "h1").text.startswith("steerscope bench")
        assert len(driver.find_elements("css selector", "svg")) >= 2
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        driver.save_screenshot(str(shots / "bench-top.png"))
    finally:
        driver.quit()
