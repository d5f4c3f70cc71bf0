"""`steerscope serve` over HTTP on loopback: the OpenAI client, vectors by name and by upload,
limits, auth, bad requests that never touch other requests or leave a hook, and a bounded
mixed load."""

from __future__ import annotations

import base64
import gc
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_lm, rand_vec

from steerscope.cli import main
from steerscope.directions.llamacpp import export_gguf
from steerscope.directions.vectors import SteeringVector, VectorSet
from steerscope.errors import SteerscopeError
from steerscope.generation import generate
from steerscope.interventions.ops import Add
from steerscope.models.hooks import count_hooks
from steerscope.serving.app import Server
from steerscope.serving.config import ServeConfig

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent / "benchmarks")
)  # the load test is a harness, not in the wheel
from serve_loadtest import bad_bodies, mixed_load  # noqa: E402

PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def lm():
    lm = make_tiny_lm("llama", chat=True)
    lm.model.config.max_position_embeddings = 4096  # RoPE has no hard limit; room for the long requests below
    return lm


@pytest.fixture(scope="module")
def vs(lm):
    return VectorSet.create(lm, rand_vec(lm, rows=3, scale=6.0), [1, 1, 2], "random", ids=["a", "b", "c"])


@pytest.fixture(scope="module")
def server(lm, vs):
    with Server(lm, ServeConfig(port=0, max_tokens_limit=2000, max_body_kb=256, max_vectors_per_request=4)) as s:
        s.store.add("set", vs)
        s.store.add("one", VectorSet.create(lm, vs.vectors[:1], 1, "random", ids=["only"]))
        yield s


def _chat(prompt=PROMPT, **kw):
    return {"model": "steerscope", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, **kw}


def _ref(lm, vs, i=0, coef=1.0, prompt=PROMPT, chat=True, **kw):
    sv = vs[i]
    return generate(
        lm,
        [prompt],
        vectors=[SteeringVector(sv.vector, sv.layer, sv.id)],
        coef=coef,
        chat=chat,
        include_unsteered=False,
        max_new_tokens=16,
        **kw,
    )[0]


def test_openai_client_equals_generate(server, lm, vs):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    assert [m.id for m in client.models.list()] == [lm.model_id]
    ref = _ref(lm, vs, 1, coef=2.0)
    plain = generate(lm, [PROMPT], chat=True, max_new_tokens=16)[0]
    assert ref.token_ids != plain.token_ids  # the vector changes the output
    extra = {"steering": [{"vector": "set/b", "coef": 2.0}]}
    r = client.chat.completions.create(
        model="steerscope",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        temperature=0,
        extra_body=extra,
    )
    assert r.model_extra["steerscope"]["token_ids"] == ref.token_ids
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(
        model="steerscope",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        temperature=0,
        extra_body=extra,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [
        c.model_extra["steerscope"]["token_id"] for c in chunks if (c.model_extra or {}).get("steerscope")
    ] == ref.token_ids
    # /v1/completions: the raw prompt, no chat template
    raw = _ref(lm, vs, 0, coef=1.5, chat=False)
    c = client.completions.create(
        model="steerscope",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"steering": [{"vector": "one", "coef": 1.5}]},
    )
    assert c.choices[0].text == raw.text
    # no steering at all = the unsteered model
    u = client.chat.completions.create(
        model="steerscope", messages=[{"role": "user", "content": PROMPT}], max_tokens=16
    )
    assert u.choices[0].message.content == plain.text


def test_layer_positions_projection_and_sampling(server, lm, vs):
    from steerscope.interventions.positions import Positions

    body = _chat(
        steering=[{"vector": "set/a", "coef": 3.0, "layer": 2, "positions": "generated"}],
        projection="set/c",
        temperature=0.8,
        seed=5,
    )
    r = httpx.post(server.url + "/v1/chat/completions", json=body).json()
    ref = generate(
        lm,
        [PROMPT],
        vectors=[SteeringVector(vs[0].vector, 2, "a")],
        coef=3.0,
        positions=Positions.generated(),
        chat=True,
        include_unsteered=False,
        max_new_tokens=16,
        temperature=0.8,
        seed=5,
    )[0]
    assert r["steerscope"]["token_ids"] == ref.token_ids
    proj = r["steerscope"]["projections"]
    assert len(proj) == len(ref.token_ids) and all(isinstance(p, float) for p in proj) and len(set(proj)) > 1


def test_continuous_batching_lets_a_short_request_overtake(server):
    """A short request sent while a long one decodes joins its batch and finishes first."""
    long_done = threading.Event()

    def long_request():
        httpx.post(server.url + "/v1/chat/completions", json=_chat(max_tokens=1500, ignore_eos=True), timeout=120)
        long_done.set()

    t = threading.Thread(target=long_request)
    t.start()
    t0 = time.monotonic()
    while server.engine.busy_rows == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.005)
    before = server.engine.stats["max_rows"]
    short = httpx.post(server.url + "/v1/chat/completions", json=_chat(max_tokens=3), timeout=60)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] <= 3
    overtook = not long_done.is_set()
    t.join(timeout=120)
    assert overtook, "the short request waited for the long one: rows did not join a running batch"
    assert server.engine.stats["max_rows"] >= 2 or before >= 2


def test_client_leaving_mid_stream_frees_its_row(server, lm):
    with httpx.Client(timeout=30) as c:
        with c.stream(
            "POST", server.url + "/v1/chat/completions", json=_chat(max_tokens=1500, ignore_eos=True, stream=True)
        ) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break
    t0 = time.monotonic()
    while server.engine.busy_rows and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert server.engine.busy_rows == 0, "the row kept decoding after its client left"
    assert httpx.post(server.url + "/v1/chat/completions", json=_chat()).status_code == 200


def _bad_table(server, vs, lm):
    other = make_tiny_lm("llama", seed=1)
    other_vs = VectorSet.create(other, vs.vectors[:1], 1, "random")
    nan_vs = VectorSet.create(lm, vs.vectors[:1], 1, "random")
    return [
        ("malformed JSON", "post", "/v1/chat/completions", b"{oops", 400, "not valid JSON"),
        ("body not an object", "post", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        (
            "unknown vector",
            "post",
            "/v1/chat/completions",
            _chat(steering=[{"vector": "nope"}]),
            400,
            "unknown vector 'nope'",
        ),
        ("set needs an id", "post", "/v1/chat/completions", _chat(steering=[{"vector": "set"}]), 400, "set/ID"),
        (
            "no such id",
            "post",
            "/v1/chat/completions",
            _chat(steering=[{"vector": "set/zz"}]),
            400,
            "no vector with id",
        ),
        (
            "NaN coefficient",
            "post",
            "/v1/chat/completions",
            json.dumps(_chat(steering=[{"vector": "one", "coef": float("nan")}])).encode(),
            400,
            "finite number",
        ),
        (
            "infinite coefficient",
            "post",
            "/v1/chat/completions",
            json.dumps(_chat(steering=[{"vector": "one", "coef": float("inf")}])).encode(),
            400,
            "finite number",
        ),
        (
            "layer out of range",
            "post",
            "/v1/chat/completions",
            _chat(steering=[{"vector": "one", "layer": 9}]),
            400,
            "0..2",
        ),
        (
            "bad positions",
            "post",
            "/v1/chat/completions",
            _chat(steering=[{"vector": "one", "positions": "up"}]),
            400,
            "positions",
        ),
        (
            "unknown steering key",
            "post",
            "/v1/chat/completions",
            _chat(steering=[{"vector": "one", "scale": 2}]),
            400,
            "`steering[0].scale` is not supported",
        ),
        ("too many vectors", "post", "/v1/chat/completions", _chat(steering=[{"vector": "one"}] * 5), 400, "allows 4"),
        ("max_tokens over the limit", "post", "/v1/chat/completions", _chat(max_tokens=5000), 400, "max_tokens"),
        ("n > 1", "post", "/v1/chat/completions", _chat(n=2), 400, "n=1"),
        ("bad temperature", "post", "/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
        ("no messages", "post", "/v1/chat/completions", {"model": "steerscope"}, 400, "messages"),
        ("unknown model", "post", "/v1/chat/completions", {**_chat(), "model": "gpt-9"}, 404, "not served"),
        ("prompt list", "post", "/v1/completions", {"prompt": ["a", "b"]}, 400, "one non-empty string"),
        ("body too large", "post", "/v1/chat/completions", _chat(prompt="x" * 300_000), 413, "larger than 256 KiB"),
        ("upload: other model", "post", "/v1/vectors", _upload("o", other_vs), 400, "fingerprint"),
        ("upload: NaN values", "post", "/v1/vectors", _upload("n", nan_vs, nan=True), 400, "NaN"),
        ("upload: wrong shape", "post", "/v1/vectors", _upload("w", nan_vs, d=lm.d_model * 2), 400, "shape"),
        (
            "upload: pickle",
            "post",
            "/v1/vectors",
            {"name": "p", "config": {}, "safetensors": base64.b64encode(b"\x80\x04\x95").decode()},
            400,
            "rejected",
        ),
        ("upload: not base64", "post", "/v1/vectors", {"name": "p", "gguf": "!!"}, 400, "base64"),
        ("upload: bad name", "post", "/v1/vectors", {"name": "../x", "gguf": ""}, 400, "name"),
        ("upload: name taken", "post", "/v1/vectors", _upload("set", nan_vs), 409, "exists"),
        ("delete: unknown", "delete", "/v1/vectors/nope", None, 404, "no vector set"),
    ]


def _upload(name, vs, nan=False, d=None):
    from safetensors.torch import save

    v = vs.vectors.clone()
    if nan:
        v[0, 0] = float("nan")
    if d is not None:
        v = torch.zeros(v.shape[0], d)
    blob = save({"vectors": v, "layers": torch.tensor(vs.config.layers)})
    from dataclasses import asdict

    return {"name": name, "config": asdict(vs.config), "safetensors": base64.b64encode(blob).decode()}


def test_bad_requests_get_clear_errors_and_change_nothing(server, lm, vs):
    fresh = make_tiny_lm("llama", chat=True)  # same seed: the same weights
    enc = lm.encode(["probe text"], chat=False)
    table = _bad_table(server, vs, lm)
    with httpx.Client(timeout=30) as c:
        for name, method, path, body, status, words in table:
            kw = (
                {}
                if body is None
                else (
                    {"content": body, "headers": {"content-type": "application/json"}}
                    if isinstance(body, bytes)
                    else {"json": body}
                )
            )
            r = c.request(method.upper(), server.url + path, **kw)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
            err = r.json()["error"]
            assert words in err["message"], f"{name}: {err['message']}"
            assert "\n" not in err["message"]
    assert count_hooks(lm.model) == 0
    with torch.no_grad():
        assert torch.equal(lm.forward(**enc).logits, fresh.forward(**enc).logits)  # bit-identical


def test_vectors_upload_use_and_delete(server, lm, vs, tmp_path):
    c = httpx.Client(base_url=server.url, timeout=30)
    up = _upload("mine", VectorSet.create(lm, vs.vectors[2:], 2, "random", ids=["x"]))
    assert c.post("/v1/vectors", json=up).status_code == 201
    names = {d["name"] for d in c.get("/v1/vectors").json()["data"]}
    assert {"set", "one", "mine"} <= names
    r = c.post("/v1/chat/completions", json=_chat(steering=[{"vector": "mine", "coef": 1.0}])).json()
    assert r["choices"][0]["message"]["content"] == _ref(lm, vs, 2).text
    assert c.post("/v1/vectors", json={**up, "replace": True}).status_code == 201
    # a llama.cpp control vector: the bare name steers every layer it has, as llama.cpp does
    gg = export_gguf(VectorSet.create(lm, vs.vectors[:2], [1, 2], "random"), tmp_path / "ctrl.gguf").path
    r = c.post("/v1/vectors", json={"name": "ctrl", "gguf": base64.b64encode(gg.read_bytes()).decode()})
    assert r.status_code == 201, r.text
    got = c.post("/v1/chat/completions", json=_chat(steering=[{"vector": "ctrl", "coef": 1.0}])).json()
    ref = generate(
        lm,
        [PROMPT],
        interventions=[Add(vs.vectors[0], layer=1), Add(vs.vectors[1], layer=2)],
        chat=True,
        max_new_tokens=16,
    )[0]
    assert got["steerscope"]["token_ids"] == ref.token_ids
    one = c.post("/v1/chat/completions", json=_chat(steering=[{"vector": "ctrl/direction.1"}])).json()
    assert one["steerscope"]["token_ids"] != ref.token_ids  # both layers, not one
    for name in ("mine", "ctrl"):
        assert c.delete(f"/v1/vectors/{name}").status_code == 200
    r = c.post("/v1/chat/completions", json=_chat(steering=[{"vector": "mine"}]))
    assert r.status_code == 400 and "unknown vector" in r.json()["error"]["message"]


def test_queue_limit_answers_429(lm, vs):
    with Server(lm, ServeConfig(port=0, max_batch=1, max_queue=1, max_tokens_limit=2000)) as s:
        s.store.add("set", vs)
        codes = []

        def hit():
            codes.append(
                httpx.post(
                    s.url + "/v1/chat/completions", json=_chat(max_tokens=300, ignore_eos=True), timeout=120
                ).status_code
            )

        ts = [threading.Thread(target=hit) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


def test_api_key_and_host_rules(lm, monkeypatch, capsys):
    monkeypatch.setenv("STEERSCOPE_TEST_KEY", "s3cret")
    cfg = ServeConfig(port=0, api_key_env="STEERSCOPE_TEST_KEY")
    with Server(lm, cfg, api_key=cfg.check()) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/").status_code == 200  # the page itself; its API calls send the key
    with pytest.raises(SteerscopeError, match="without an API key"):
        ServeConfig(host="0.0.0.0").check()
    assert ServeConfig(host="0.0.0.0", api_key_env="STEERSCOPE_TEST_KEY").check() == "s3cret"
    monkeypatch.delenv("STEERSCOPE_TEST_KEY")
    for argv, words in (
        (["serve", "--host", "0.0.0.0"], "without an API key"),
        (["serve", "--api-key-env", "STEERSCOPE_TEST_KEY"], "empty or unset"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err


def test_mixed_load_no_errors_no_leaks(server, lm):
    """A few hundred good, streamed, cancelled and bad requests: no 5xx, every bad one a clear
    4xx, and afterwards no row, cache, hook or request object left behind."""
    from steerscope.serving.detok import Row

    good = _chat(max_tokens=6, steering=[{"vector": "set/a", "coef": 2.0}])
    assert len(bad_bodies(good)) >= 8
    res = mixed_load(server.url, good, n=300, concurrency=16, seconds=240)
    assert res.server_errors == 0 and not res.unexpected, res.unexpected[:3]
    assert sum(res.outcomes.values()) == 300
    assert {"good", "streamed", "cancelled"} <= set(res.outcomes) and res.outcomes["bad:400"] > 0
    t0 = time.monotonic()
    while server.engine.busy_rows and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert server.engine.busy_rows == 0 and server.engine.cache is None and server.engine.inbox.qsize() == 0
    assert count_hooks(lm.model) == 0
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Row], "request rows are still referenced"
    with pytest.raises(SteerscopeError, match="loopback"):
        mixed_load("http://10.0.0.1:8000", good, n=1)


def test_port_in_use_is_one_clear_error(lm):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(SteerscopeError, match="port in use"):
            Server(lm, ServeConfig(port=port)).start()
    assert count_hooks(lm.model) == 0
