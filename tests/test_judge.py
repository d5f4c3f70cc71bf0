"""The judge client against a local OpenAI-compatible server on 127.0.0.1 (normal, slow, failing)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steerscope.errors import SteerscopeError
from steerscope.judging.judge import Judge


class Handler(BaseHTTPRequestHandler):
    calls: list[dict] = []
    mode = {"value": "ok"}

    def log_message(self, *a):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.calls.append({"body": body, "auth": self.headers.get("Authorization")})
        mode = Handler.mode["value"]
        if mode == "fail" or (mode == "flaky" and len(Handler.calls) == 1):
            self.send_response(500)
            self.end_headers()
            return
        if mode == "slow" and len(Handler.calls) == 1:
            time.sleep(1.0)  # longer than the client's timeout; the retry answers fast
        text = body["messages"][1]["content"]
        reply = "7" if "weird" in text else "Score: 2"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def server():
    Handler.calls = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_scores_caches_and_sends_key(server, tmp_path, monkeypatch):
    Handler.mode["value"] = "ok"
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    j = Judge(server, "judge-model", key_env="MY_JUDGE_KEY", cache_path=tmp_path / "cache.jsonl", timeout=5)
    assert j.score("p", "a weird reply") == 7.0 and j.score("p", "normal") == 2.0
    assert Handler.calls[0]["auth"] == "Bearer sekret" and Handler.calls[0]["body"]["model"] == "judge-model"
    j.score("p", "a weird reply")
    assert len(Handler.calls) == 2  # cached in memory
    j2 = Judge(server, "judge-model", cache_path=tmp_path / "cache.jsonl")
    assert j2.score("p", "normal") == 2.0 and len(Handler.calls) == 2  # cached on disk
    m = j.metric()
    assert m.score_texts(["a weird reply"], ["p"]).tolist() == [7.0]


def test_identical_completions_of_different_prompts_are_judged_against_their_own_prompt(server):
    """Before: prompts were looked up by completion text, so the second prompt was never sent."""
    Handler.mode["value"] = "ok"
    m = Judge(server, "m", timeout=5).metric()
    m.score_texts(["same answer", "same answer"], ["first prompt", "second prompt"])
    sent = [c["body"]["messages"][1]["content"] for c in Handler.calls]
    assert any("first prompt" in s for s in sent) and any("second prompt" in s for s in sent)


def test_slow_response_times_out_then_retries(server):
    Handler.mode["value"] = "slow"
    j = Judge(server, "m", timeout=0.3, retries=2, backoff=0.01)
    assert j.score("p", "normal") == 2.0 and len(Handler.calls) >= 2 and j.failures == 0


def test_failing_server_gives_none_not_an_exception(server):
    Handler.mode["value"] = "fail"
    j = Judge(server, "m", timeout=1, retries=2, backoff=0.01)
    assert j.score("p", "x") is None and len(Handler.calls) == 3 and j.failures == 1
    Handler.mode["value"] = "flaky"
    Handler.calls = []
    assert Judge(server, "m", retries=1, backoff=0.01).score("p", "x") == 2.0


def test_bad_url():
    with pytest.raises(SteerscopeError, match="http"):
        Judge("ftp://x", "m")


def test_judge_scores_appear_in_a_run(server, tmp_path):
    """`steerscope run --judge-url ...` on a tiny model: every vector gets a judge score, cached per completion."""
    import json

    from conftest import make_tiny_lm

    from steerscope.directions.discovery import DiscoverConfig
    from steerscope.jobs.run import RunConfig, run

    Handler.mode["value"] = "ok"
    cfg = RunConfig(
        n_train=1,
        n_heldout=1,
        n_neutral=2,
        max_new_tokens=4,
        sweep_multiples=[1.0],
        sweep_top=1,
        scorers=[],
        judge_url=server,
        judge_model="tiny-judge",
        judge_rubric="Score 0-10.",
        discover=DiscoverConfig.of("melbo", n_vectors=2, steps=2, R=1.0, source=0, target=2),
    )
    run(cfg, tmp_path / "r", lm=make_tiny_lm("llama", chat=True))
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert all(v["score:judge:tiny-judge"] == 2.0 for v in m["vectors"].values())
    assert Handler.calls[0]["body"]["messages"][0]["content"] == "Score 0-10."
    assert (tmp_path / "r" / "judge_cache.jsonl").is_file()


def test_every_job_builds_its_judge_from_the_same_fields(server, tmp_path, monkeypatch):
    """run, refine and bench name a judge by the same config fields; `judge_from` is the one
    place they become a Judge: no URL, no judge; a URL needs a model unless the job has a default
    (run: "judge"); the rubric, key and cache reach the requests."""
    from steerscope.jobs.bench import BenchConfig
    from steerscope.jobs.refine import RefineConfig
    from steerscope.jobs.run import RunConfig
    from steerscope.judging.concept_judges import RUBRICS, LLMJudge
    from steerscope.judging.judge import DEFAULT_RUBRIC, judge_from

    assert judge_from(RunConfig()) is None and judge_from(BenchConfig()) is None and judge_from(RefineConfig()) is None
    for cfg in (RefineConfig(judge_url=server), BenchConfig(judge_url=server)):
        with pytest.raises(SteerscopeError, match="--judge-model"):
            judge_from(cfg)
    assert judge_from(RunConfig(judge_url=server), default_model="judge").model == "judge"
    with pytest.raises(SteerscopeError, match="http"):
        judge_from(RunConfig(judge_url="ftp://x", judge_model="m"))

    Handler.mode["value"] = "ok"
    monkeypatch.setenv("K", "sekret")
    j = judge_from(
        RefineConfig(judge_url=server, judge_model="m", judge_rubric="Rate French.", judge_key_env="K"),
        tmp_path / "cache.jsonl",
    )
    assert j.score("p", "a weird reply") == 7.0 and (tmp_path / "cache.jsonl").is_file()
    sent = Handler.calls[-1]
    assert sent["body"]["messages"][0]["content"] == "Rate French." and sent["auth"] == "Bearer sekret"
    assert judge_from(RunConfig(judge_url=server, judge_model="m")).rubric == DEFAULT_RUBRIC  # no --judge-rubric

    # bench's AxBench judge: one copy of the base judge per axis, each with its own rubric, sharing the cache
    llm = LLMJudge(judge_from(BenchConfig(judge_url=server, judge_model="b", judge_key_env="K"), tmp_path / "b.jsonl"))
    Handler.calls = []
    (row,) = llm.rate(type("C", (), {"description": "joy"})(), ["p"], ["normal"])
    systems = {c["body"]["messages"][0]["content"] for c in Handler.calls}
    assert systems == {RUBRICS["concept"].format(concept="joy"), RUBRICS["instruction"], RUBRICS["fluency"]}
    assert {c["body"]["model"] for c in Handler.calls} == {"b"} and {c["auth"] for c in Handler.calls} == {
        "Bearer sekret"
    }
    assert row["score"] is not None and len((tmp_path / "b.jsonl").read_text().splitlines()) == 3
    assert llm.name == "LLM (b)"
