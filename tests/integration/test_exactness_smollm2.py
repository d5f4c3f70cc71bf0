"""Exactness on the embedded SmolLM2, as a user meets it: the CLI, the main job and the server.
`make test-latest` runs this file (with the invariance family) against the newest releases.

Each test repeats a failure seen under transformers 5.25 before positions were read from the
cache it passes: a short prompt's steered output changed when a longer prompt shared its batch,
and 13 of 16 concurrent steered server requests differed from the same requests sent alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import steerscope as ss
from steerscope.cli import main
from steerscope.serving.app import Server
from steerscope.serving.config import ServeConfig

pytestmark = pytest.mark.integration

LONG = "Write a long and detailed paragraph about the history of the bicycle in Europe."


@pytest.fixture(scope="module")
def smol():
    return ss.load_model()


@pytest.fixture(scope="module")
def happy_dir(smol, tmp_path_factory):
    vs = ss.directions.mean_difference(
        smol,
        ["I love this, it is wonderful", "What a joyful day"],
        ["I hate this, it is awful", "What a miserable day"],
        [8],
        chat=False,
    )
    return vs.save(tmp_path_factory.mktemp("vec") / "happy")


def _cli(capsys, *args) -> list[dict]:
    assert main(["generate", *args, "--max-new-tokens", "16", "--json"]) == 0
    return [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.strip()]


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_cli_short_prompt_is_unchanged_by_a_longer_neighbour(capsys, happy_dir, positions):
    args = ["--vector", str(happy_dir), "--coef", "-12", "--positions", positions]
    rows = _cli(capsys, *args, "--prompt", "Hi")
    alone = [r for r in rows if r["vector_id"] is not None]
    plain = [r for r in rows if r["vector_id"] is None]  # generate prints the unsteered row too
    both = [r for r in _cli(capsys, *args, "--prompt", "Hi", "--prompt", LONG) if r["vector_id"] is not None]
    assert both[0]["prompt"] == "Hi" and both[0]["token_ids"] == alone[0]["token_ids"]
    assert alone[0]["token_ids"] != plain[0]["token_ids"], "the vector changed nothing (a vacuous match)"


def test_server_rows_equal_requests_sent_alone(smol, happy_dir):
    """16 steered requests at once, distinct coefficients and prompt lengths: each equals itself
    sent alone (every row joins or shares a batch with the others)."""
    import openai

    prompts = ["Hi", "Tell me about your weekend.", LONG, "What is two plus two?"]
    reqs = [(prompts[i % 4], float(c)) for i, c in enumerate(torch.linspace(-8, 8, 16).tolist())]
    with Server(smol, ServeConfig(port=0, max_batch=16)) as s:
        s.store.load_path(happy_dir)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-")

        def ask(req):
            p, c = req
            r = client.completions.create(
                model="steerscope",
                prompt=p,
                max_tokens=12,
                temperature=0,
                extra_body={"steering": [{"vector": "happy", "coef": c}]},
            )
            return r.model_extra["steerscope"]["token_ids"]

        alone = [ask(r) for r in reqs]
        with ThreadPoolExecutor(16) as ex:
            together = list(ex.map(ask, reqs))
        assert s.engine.stats["max_rows"] > 1 and s.engine.stats["errors"] == 0
    same = sum(a == b for a, b in zip(alone, together))
    assert same == len(reqs), (
        f"{len(reqs) - same} of {len(reqs)} concurrent requests differ from the same request alone"
    )
    assert len({tuple(a) for a in alone}) > 4  # the coefficients change the output


def test_run_smoke(tmp_path):
    """The main job end to end, tiny: it completes and writes its report."""
    from steerscope.directions.discovery import DiscoverConfig
    from steerscope.jobs.run import RunConfig, run

    cfg = RunConfig(
        n_train=2,
        n_heldout=1,
        n_neutral=2,
        max_new_tokens=8,
        sweep_multiples=[1.0],
        sweep_top=1,
        discover=DiscoverConfig.of("melbo", n_vectors=2, steps=5, R=4.0),
    )
    report = run(cfg, tmp_path / "run")
    assert report.is_file() and json.loads((tmp_path / "run" / "metrics.json").read_text())["vectors"]
