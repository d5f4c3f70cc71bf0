"""The main job end to end on the real SmolLM2-135M-Instruct, small configuration."""

import json

import pytest

from steerscope.directions.discovery import DiscoverConfig
from steerscope.jobs.run import RunConfig, run

pytestmark = pytest.mark.integration


def test_full_run_on_smollm2(tmp_path):
    cfg = RunConfig(
        n_train=2,
        n_heldout=1,
        n_neutral=4,
        max_new_tokens=16,
        sweep_multiples=[1.0, 2.0],
        sweep_top=1,
        n_random=4,
        n_samples=2,
        discover=DiscoverConfig.of("melbo", n_vectors=4, steps=20, R=4.0),
    )
    report = run(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(m["vectors"]) == 8 and m["discovery"]["source"] == 8 and m["discovery"]["target"] == 22
    assert all(v["kl_neutral"] >= 0 and v["logprob"] < 0 for v in m["vectors"].values())
    assert m["summary"]["learned"]["completions"] == 12 and len(m["clusters"]) >= 1
    assert m["null_model"]["samples"] == 2 and all(0 <= f["q"] <= 1 for f in m["findings"])
    html = report.read_text()
    assert (
        html.count('class="card vector-card') == 8
        and "<svg" in html
        and "http" not in html.split("<body>")[1].split("Run configuration")[0]
    )
