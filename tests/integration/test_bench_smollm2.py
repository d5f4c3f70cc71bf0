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
    argv = ["bench", "--concepts", "french,sports", "--methods", "diffmean,probe,prompting", "--n-neutral", "8",
            "--max-new-tokens", "24", "--curve", "0.5,1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean score" in printed and "report:" in printed
    fr = json.loads((out / "concepts" / "french.json").read_text())
    for m in ("diffmean", "probe"):
        r = fr["methods"][m]
        assert r["kl_hit"] and abs(r["kl"] - 0.5) <= 0.05, r["kl_search"]
        assert r["detection"]["auroc"] > 0.9, r["detection"]["auroc"]
    d = fr["methods"]["diffmean"]["at"]
    assert fr["unsteered"]["concept_rate"] < 0.2
    assert d["1"]["concept_rate"] >= fr["unsteered"]["concept_rate"] + 0.3, [x["text"] for x in d["1"]["rows"]]
    assert d["1"]["concept_rate"] >= d["0.5"]["concept_rate"]  # more strength, more French
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert {r["concept"] for r in rows} == {"french", "sports"} and all(r["kl_target"] == 0.5 for r in rows)
    assert main(argv) == 0  # a rerun resumes: nothing is rebuilt
    assert "concept:french ..." not in capsys.readouterr().err

    from conftest import chrome

    shots = Path(os.environ.get("STEERSCOPE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    driver = chrome(1300, 1000)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        assert driver.find_element("css selector", "h1").text.startswith("steerscope bench")
        assert len(driver.find_elements("css selector", "svg")) >= 4
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        driver.save_screenshot(str(shots / "bench-top.png"))
    finally:
        driver.quit()
