"""Requests a user could send that used to hurt the server or other users, one test each: huge
coefficients and vectors, a client that leaves a non-streamed request, cross-origin posts,
fields accepted and ignored, unseeded sampling, unbounded prompts, the tokenizer shared between
threads, temp paths in errors; and what was added alongside: logprobs, penalties, inline vectors,
/health."""

from __future__ import annotations

import base64
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope.directions.vectors import VectorSet
from steerscope.generation import generate
from steerscope.interventions.positions import ALL
from steerscope.models.hooks import hooks
from steerscope.serving.app import Server
from steerscope.serving.config import ServeConfig
from steerscope.serving.engine import Engine
from steerscope.serving.protocol import AddSpec, DoneEvent, GenRequest, RowSteering, TokenEvent

PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def lm():
    lm = make_tiny_lm("llama", chat=True)
    lm.model.config.max_position_embeddings = 4096  # RoPE has no hard limit; room for long requests
    return lm


@pytest.fixture(scope="module")
def vs(lm):
    return VectorSet.create(lm, rand_vec(lm, rows=2, scale=6.0), [1, 1], "random", ids=["a", "b"])


@pytest.fixture(scope="module")
def server(lm, vs):
    with Server(lm, ServeConfig(port=0, max_tokens_limit=2000, max_prompt_tokens=200)) as s:
        s.store.add("set", vs)
        yield s


def _chat(prompt=PROMPT, **kw):
    return {"model": "steerscope", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, **kw}


def _post(server, body, path="/v1/chat/completions", **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _error(r, status, *words):
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return msg


# ---- huge numbers ----------------------------------------------------------------------------------
def test_a_huge_coefficient_is_refused_naming_the_field(server):
    r = _post(server, _chat(steering=[{"vector": "set/a", "coef": 1e300}]))
    _error(r, 400, "`steering[0].coef`", "residual norm")
    assert _post(server, _chat(steering=[{"vector": "set/a", "coef": 2.0}])).status_code == 200


def _collect(engine, lm, prompt, steering, **kw):
    events, done = [], threading.Event()

    def sink(e):
        events.append(e)
        if isinstance(e, DoneEvent):
            done.set()

    ids = lm.encode([prompt], chat=False)["input_ids"][0].tolist()
    engine.submit(GenRequest(ids, steering, 8, sink, **kw))
    return events, done


@pytest.mark.parametrize("coef,words", [(1e300, "overflow"), (3e38, "non-finite")])
def test_a_row_that_overflows_fails_alone(lm, vs, coef, words):
    """Past validation (the engine used directly): a row whose coefficient does not fit float32
    (its prefill fails) or whose steered forward overflows to inf (non-finite logits) gets an
    error; the innocent row in the same batch decodes exactly as alone."""
    ref = generate(lm, [PROMPT], chat=False, max_new_tokens=8)[0].token_ids
    eng = Engine(lm, max_batch=4, window_s=0.05).start()
    try:
        bad, bad_done = _collect(eng, lm, "another prompt", RowSteering(adds=(AddSpec(vs.vectors[0], 1, coef, ALL),)))
        good, good_done = _collect(eng, lm, PROMPT, RowSteering())
        assert bad_done.wait(30) and good_done.wait(30)
    finally:
        eng.stop()
    assert bad[-1].finish_reason == "error" and words in bad[-1].error
    assert bad[-1].status == (422 if words == "non-finite" else 500)  # the request's own doing: a 4xx
    assert good[-1].finish_reason in ("stop", "length")
    assert [e.token_id for e in good if isinstance(e, TokenEvent) and e.token_id is not None] == ref


def test_a_failing_prefill_fails_only_its_request(lm, vs):
    """Two requests prefilled together, one whose steering cannot be built (a vector of the
    wrong size): the batch is retried row by row and only that request fails."""
    ref = generate(lm, [PROMPT], chat=False, max_new_tokens=8)[0].token_ids
    eng = Engine(lm, max_batch=4, window_s=0.05).start()
    try:
        bad, bad_done = _collect(eng, lm, "x", RowSteering(adds=(AddSpec(torch.ones(lm.d_model + 3), 1, 1.0, ALL),)))
        good, good_done = _collect(eng, lm, PROMPT, RowSteering())
        assert bad_done.wait(30) and good_done.wait(30)
    finally:
        eng.stop()
    assert bad[-1].finish_reason == "error"
    assert [e.token_id for e in good if isinstance(e, TokenEvent) and e.token_id is not None] == ref


def test_a_vector_with_a_huge_norm_is_refused_at_upload(server, lm):
    from dataclasses import asdict

    from safetensors.torch import save

    big = VectorSet.create(lm, torch.ones(1, lm.d_model), 1, "random")
    v = torch.full((1, lm.d_model), 1e30)  # finite in float32, norm overflows it
    blob = save({"vectors": v, "layers": torch.tensor([1])})
    r = httpx.post(
        server.url + "/v1/vectors",
        timeout=30,
        json={"name": "huge", "config": asdict(big.config), "safetensors": base64.b64encode(blob).decode()},
    )
    assert r.status_code == 400, r.text
    listing = httpx.get(server.url + "/v1/vectors")
    assert listing.status_code == 200 and "huge" not in {d["name"] for d in listing.json()["data"]}


def test_upload_errors_do_not_show_server_paths(server):
    r = httpx.post(
        server.url + "/v1/vectors",
        json={
            "name": "broken",
            "config": {"format_version": 1},
            "safetensors": base64.b64encode(b"not a file").decode(),
        },
    )
    msg = _error(r, 400, "rejected")
    assert "/tmp" not in msg and "steerscope-upload" not in msg


# ---- clients that leave ------------------------------------------------------------------------------
def test_a_non_streamed_request_whose_client_leaves_is_cancelled(server, lm):
    def slow(_a, _k):  # 5 ms a forward: 1500 tokens would take 7.5 s
        time.sleep(0.005)

    with hooks([(lm.arch.base, "observe", slow)]):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=_chat(max_tokens=1500, ignore_eos=True), timeout=0.5)
        t0 = time.monotonic()
        while server.engine.busy_rows and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        left = time.monotonic() - t0
    assert server.engine.busy_rows == 0 and left < 2.0, f"the row kept decoding for {left:.1f} s after its client left"


# ---- other origins ----------------------------------------------------------------------------------
def test_cross_origin_and_non_json_posts_are_refused_without_a_key(server):
    body = b'{"name": "x", "gguf": ""}'
    _error(
        httpx.post(server.url + "/v1/vectors", content=body, headers={"content-type": "text/plain"}),
        415,
        "application/json",
    )
    _error(_post(server, _chat(), headers={"Origin": "http://evil.example"}), 403, "cross-origin")
    _error(httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"}), 403, "loopback")
    assert _post(server, _chat(), headers={"Origin": server.url}).status_code == 200  # the playground's own calls


def test_with_a_key_other_origins_may_call(monkeypatch):
    lm = make_tiny_lm("llama", chat=True)  # not the module's model: another server decodes on that one
    monkeypatch.setenv("STEERSCOPE_HARDEN_KEY", "k")
    cfg = ServeConfig(port=0, api_key_env="STEERSCOPE_HARDEN_KEY")
    with Server(lm, cfg, api_key=cfg.check()) as s:
        h = {"Authorization": "Bearer k", "Origin": "https://notebook.example"}
        assert httpx.post(s.url + "/v1/chat/completions", json=_chat(), headers=h, timeout=60).status_code == 200
        assert (
            httpx.post(
                s.url + "/v1/chat/completions", json=_chat(), headers={"Origin": "https://x.example"}
            ).status_code
            == 401
        )


# ---- fields -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("logit_bias", {"5": 10}),
        ("response_format", {"type": "json_object"}),
        ("tools", []),
        ("tool_choice", "auto"),
        ("best_of", 2),
    ],
)
def test_unsupported_fields_are_refused_by_name(server, field, value):
    _error(_post(server, _chat(**{field: value})), 400, f"`{field}`", "not supported")


def test_chat_logprobs_are_the_models_own(server, lm):
    r = _post(server, _chat(logprobs=True, top_logprobs=3)).json()
    ids = r["steerscope"]["token_ids"]
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == len(ids) and all(len(c["top_logprobs"]) == 3 for c in content)
    # an independent computation: one plain forward over prompt + completion
    prompt = lm.encode([PROMPT], chat=True)["input_ids"]
    full = torch.cat([prompt, torch.tensor([ids])], dim=1)
    with torch.no_grad():
        lsm = torch.log_softmax(lm.forward(full).logits[0].float(), dim=-1)
    P = prompt.shape[1]
    for j, (tok, c) in enumerate(zip(ids, content)):
        assert math.isclose(c["logprob"], float(lsm[P - 1 + j, tok]), abs_tol=1e-4)
        assert math.isclose(c["top_logprobs"][0]["logprob"], float(lsm[P - 1 + j].max()), abs_tol=1e-4)
        assert c["token"] == lm.tokenizer.decode([tok])
    with pytest.raises(AssertionError):  # and the check above can fail: shifted by one position
        assert math.isclose(content[1]["logprob"], float(lsm[P - 1, ids[1]]), abs_tol=1e-4)


def test_completion_logprobs_and_streamed_logprobs(server):
    r = _post(server, {"prompt": PROMPT, "max_tokens": 6, "logprobs": 2}, path="/v1/completions").json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(r["steerscope"]["token_ids"])
    assert all(len(t) <= 2 and v <= 0 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=_chat(logprobs=True, stream=True)) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: {")]
    import json

    chunks = [json.loads(line[6:]) for line in lines]
    with_lp = [c for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert with_lp and all(c["choices"][0]["logprobs"]["content"][0]["logprob"] <= 0 for c in with_lp)


def _greedy_with_penalties(lm, presence, frequency, n):
    """A reference decoder: full forward each step, OpenAI's penalties over generated tokens."""
    ids = lm.encode([PROMPT], chat=True)["input_ids"]
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = lm.forward(ids).logits[0, -1].float()
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        nxt = int(logits.argmax())
        if nxt == lm.tokenizer.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_presence_and_frequency_penalties(server, lm):
    plain = _post(server, _chat(max_tokens=16)).json()["steerscope"]["token_ids"]
    r = _post(server, _chat(max_tokens=16, presence_penalty=1.5, frequency_penalty=1.0)).json()["steerscope"][
        "token_ids"
    ]
    assert r == _greedy_with_penalties(lm, 1.5, 1.0, 16)
    assert r != plain
    _error(_post(server, _chat(presence_penalty=3)), 400, "presence_penalty")


def test_sampling_without_a_seed_draws_one_and_returns_it(server):
    body = _chat(temperature=1.0, max_tokens=16)
    a, b = (_post(server, body).json() for _ in range(2))
    assert a["steerscope"]["seed"] != b["steerscope"]["seed"]
    again = _post(server, {**body, "seed": a["steerscope"]["seed"]}).json()
    assert again["steerscope"]["token_ids"] == a["steerscope"]["token_ids"]
    assert _post(server, _chat(temperature=0)).json()["steerscope"]["seed"] == 0


def test_prompt_length_and_context_are_limited(server, lm):
    _error(_post(server, _chat(prompt="word " * 100)), 400, "at most 200", "--max-prompt-tokens")
    old = lm.model.config.max_position_embeddings
    lm.model.config.max_position_embeddings = 64
    try:
        _error(_post(server, _chat(max_tokens=60)), 400, "context of 64 tokens")
    finally:
        lm.model.config.max_position_embeddings = old


class _WatchedTokenizer:
    """Delegates to a tokenizer and counts calls that overlap in time."""

    def __init__(self, tok):
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "_active", 0)
        object.__setattr__(self, "overlaps", 0)
        object.__setattr__(self, "_count_lock", threading.Lock())

    def __getattr__(self, name):
        attr = getattr(self._tok, name)
        if name not in ("decode", "__call__", "apply_chat_template", "encode"):
            return attr

        def watched(*a, **k):
            with self._count_lock:
                object.__setattr__(self, "_active", self._active + 1)
                if self._active > 1:
                    object.__setattr__(self, "overlaps", self.overlaps + 1)
            try:
                time.sleep(0.0005)
                return attr(*a, **k)
            finally:
                with self._count_lock:
                    object.__setattr__(self, "_active", self._active - 1)

        return watched

    def __call__(self, *a, **k):
        return self.__getattr__("__call__")(*a, **k)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)


def test_the_tokenizer_is_never_used_by_two_threads_at_once(vs):
    lm = make_tiny_lm("llama", chat=True)
    lm.tokenizer = _WatchedTokenizer(lm.tokenizer)
    with Server(lm, ServeConfig(port=0)) as s:
        s.store.add("set", vs)
        with ThreadPoolExecutor(12) as ex:
            codes = list(
                ex.map(lambda i: _post(s, _chat(prompt=f"{PROMPT} {i}", max_tokens=10)).status_code, range(24))
            )
    assert codes == [200] * 24
    assert lm.tokenizer.overlaps == 0, f"{lm.tokenizer.overlaps} tokenizer calls overlapped another thread's"


# ---- inline vectors and health --------------------------------------------------------------------------
def _b64(v: torch.Tensor) -> str:
    return base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode()


def test_inline_vectors_equal_stored_ones_and_are_not_stored(server, vs):
    before = httpx.get(server.url + "/v1/vectors").json()
    named = _post(server, _chat(steering=[{"vector": "set/b", "coef": 2.0}])).json()["steerscope"]["token_ids"]
    inline = _post(server, _chat(steering=[{"vector": {"data": _b64(vs.vectors[1]), "layer": 1}, "coef": 2.0}])).json()
    assert inline["steerscope"]["token_ids"] == named
    ablated = _post(server, _chat(steering=[{"ablate": {"data": _b64(vs.vectors[0])}}]))
    assert ablated.status_code == 200
    assert httpx.get(server.url + "/v1/vectors").json() == before
    _error(
        _post(server, _chat(steering=[{"vector": {"data": _b64(vs.vectors[1][:5]), "layer": 1}}])),
        400,
        "`steering[0].vector.data`",
        "float32",
    )
    _error(_post(server, _chat(steering=[{"vector": {"data": _b64(vs.vectors[1])}}])), 400, "layer")
    nan = vs.vectors[1].clone()
    nan[0] = float("nan")
    _error(_post(server, _chat(steering=[{"vector": {"data": _b64(nan), "layer": 1}}])), 400, "NaN")
    _error(
        _post(server, _chat(steering=[{"vector": {"data": _b64(vs.vectors[1] * 1e6), "layer": 1}}])),
        400,
        "residual norm",
    )


def test_health(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_openai_nulls_are_accepted_and_errors_name_the_field_meant(server, vs):
    ok = _post(
        server,
        _chat(
            stream=None,
            logprobs=None,
            presence_penalty=None,
            frequency_penalty=None,
            ignore_eos=None,
            n=None,
            seed=None,
            temperature=None,
            top_p=None,
        ),
    )
    assert ok.status_code == 200, ok.text
    bad_layer = {"vector": {"data": _b64(vs.vectors[1]), "layer": "3"}}
    _error(_post(server, _chat(steering=[bad_layer])), 400, "`steering[0].vector.layer`")
    _error(_post(server, _chat(Foo=1)), 400, "`Foo` is not supported")
    _error(_post(server, _chat(temperature="0.5")), 400, "`temperature`")


def test_malformed_origins_and_hosts_are_refused_not_crashed(server):
    _error(_post(server, _chat(), headers={"Origin": "http://[::1"}), 403, "cross-origin")
    _error(httpx.get(server.url + "/v1/models", headers={"Host": "[::1]evil.example"}), 403, "loopback")
    _error(httpx.get(server.url + "/v1/models", headers={"Host": "localhost:80x"}), 403, "loopback")
    assert httpx.get(server.url + "/v1/models", headers={"Host": "localhost:1234"}).status_code == 200
