"""`steerscope run --when`: every vector, learned and random, steers a prompt only if the prompt
meets the condition (CAST). The gated rows of an unfired prompt are its unsteered completion, the
scorers are split by the gate, metrics.json and the report say which prompts fired; bad flags are
refused before any work."""

import json

import pytest
import torch
from conftest import make_tiny_lm, rand_vec
from test_when import condition_set

from steerscope.directions.data import load_prompts
from steerscope.directions.discovery import DiscoverConfig
from steerscope.directions.vectors import SteeringVector
from steerscope.errors import SteerscopeError
from steerscope.generation import generate
from steerscope.interventions import Condition
from steerscope.jobs.run import RunConfig, run


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm("llama", chat=True)


def _cfg(**kw) -> RunConfig:
    return RunConfig(
        n_train=2,
        n_heldout=2,
        n_neutral=3,
        max_new_tokens=6,
        sweep_top=0,
        n_random=3,
        n_samples=1,
        scorers=["refusal", "regex:[a-m]"],
        discover=DiscoverConfig.of("melbo", n_vectors=2, steps=5, R=6.0, source=1, target=2),
        **kw,
    )


def test_run_when_gates_every_vector_on_its_prompt(lm, tmp_path):
    prompts = load_prompts("neutral")[:4]  # the run's 2 train + 2 held-out prompts
    c = rand_vec(lm, seed=3)
    # each prompt's score as the run's encoding sees it (a condition that always holds)
    probe = generate(lm, prompts, vectors=[SteeringVector(rand_vec(lm, seed=1), 1, "p")], include_unsteered=False,
                     when=Condition(c, 0, -2.0), max_new_tokens=1, progress=False)  # fmt: skip
    scores = sorted(r.gate_score for r in probe)
    thr = (scores[1] + scores[2]) / 2  # two prompts fire, two do not
    assert scores[2] - scores[1] > 1e-4
    condition_set(lm, torch.stack([c, rand_vec(lm, seed=4)]), [0, 2], [thr, 0.0]).save(tmp_path / "cond")
    out = tmp_path / "gated"
    run(_cfg(when=str(tmp_path / "cond")), out, lm=lm)
    m = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(l) for l in (out / "completions.jsonl").read_text().splitlines()]
    fired = {p["prompt_index"]: p["fired"] for p in m["gate"]["prompts"]}
    expect = {r.prompt_index: r.gate_score > thr for r in probe}
    assert fired == expect and m["gate"]["fired"] == 2 and m["gate"]["layer"] == 0
    base = {r["prompt_index"]: r["token_ids"] for r in rows if r["set"] == "unsteered"}
    steered = [r for r in rows if r["set"] in ("learned", "random")]
    assert len(steered) == (2 + 3) * 4 and all(r["gate_fired"] == expect[r["prompt_index"]] for r in steered)
    # an unfired prompt's steered rows are its unsteered completion, token for token
    assert all(r["token_ids"] == base[r["prompt_index"]] for r in steered if not r["gate_fired"])
    # the gate is not a no-op: some fired row differs from its unsteered completion
    assert any(r["token_ids"] != base[r["prompt_index"]] for r in steered if r["gate_fired"])
    for vid, v in m["vectors"].items():
        for s in ("refusal", "regex:[a-m]"):
            on, off = v[f"score:{s}@fired"], v[f"score:{s}@unfired"]
            mine = [r for r in steered if r["vector_id"] == vid]
            assert on == on and off == off and len(mine) == 4  # both sides have rows: numbers, not NaN
    html = (out / "report.html").read_text()
    assert 'id="gate"' in html and "2 of 4 prompts" in html and "gate did not fire: unsteered" in html
    # without --when: no gate anywhere
    run(_cfg(), tmp_path / "plain", lm=lm)
    m0 = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert m0["gate"] is None and not any("@fired" in k for v in m0["vectors"].values() for k in v)
    assert 'id="gate"' not in (tmp_path / "plain" / "report.html").read_text()


def test_run_when_refuses_bad_flags_before_any_work(lm, tmp_path):
    condition_set(lm, torch.stack([rand_vec(lm, seed=3), rand_vec(lm, seed=4)]), [0, 2], [0.0, 0.0]).save(
        tmp_path / "cond"
    )
    cases = [
        (dict(when_layer=0), "need --when"),
        (dict(when=str(tmp_path / "nope")), "--when"),
        (dict(when=str(tmp_path / "cond"), when_layer=1), "--when-layer"),  # no vector at layer 1
        (dict(when=str(tmp_path / "cond"), when_layer=2), "source layer 1"),  # read after the vectors are added
        (dict(when=str(tmp_path / "nochat")), "without the chat template"),  # the run encodes with it
    ]
    condition_set(lm, torch.stack([rand_vec(lm, seed=3)] * 2), [0, 2], [0.0, 0.0], chat=False).save(tmp_path / "nochat")
    for kw, words in cases:
        with pytest.raises(SteerscopeError, match=words):
            run(_cfg(**kw), tmp_path / "bad", lm=lm)
        assert not (tmp_path / "bad").exists(), kw  # refused before the run folder exists
