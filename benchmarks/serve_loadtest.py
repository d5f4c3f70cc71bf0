"""A bounded load generator for a steerscope server on loopback (tests and benchmarks).

`mixed_load` sends a fixed number of requests with a fixed concurrency and a wall-clock limit:
good requests (streamed and not), requests whose client leaves mid-stream, and bad requests.
It refuses any URL that is not loopback: it is for checking our own server, never anyone else's.

A harness, not part of the package (it needs httpx, which the `serve` extra does not bring):
`benchmarks/bench_serve.py` and `tests/test_serve_http.py` import it from this folder. The
loopback hosts are the server's own (`steerscope.serving.config.LOOPBACK`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

from steerscope.errors import SteerscopeError
from steerscope.serving.config import LOOPBACK


def check_loopback(url: str) -> None:
    if urlparse(url).hostname not in LOOPBACK:
        raise SteerscopeError(f"load tests target loopback only, not {url}; start the server on 127.0.0.1.")


@dataclass
class LoadResult:
    outcomes: Counter = field(default_factory=Counter)  # "good", "streamed", "cancelled", "bad:<status>", ...
    server_errors: int = 0  # 5xx answers or error events in a stream
    unexpected: list[str] = field(default_factory=list)  # first few surprises, for the failure message
    seconds: float = 0.0


def bad_bodies(good: dict) -> list[tuple[bytes | dict, int]]:
    """(body, expected status) pairs that must be refused with a 4xx."""
    import json

    msgs = good["messages"] if "messages" in good else None
    base = {k: v for k, v in good.items() if k != "steering"}
    vec = good["steering"][0]["vector"]
    return [
        (b"{not json", 400),
        ({**base, "steering": [{"vector": "no-such-vector", "coef": 1}]}, 400),
        (json.dumps({**base, "steering": [{"vector": vec, "coef": float("nan")}]}).encode(), 400),  # a bare NaN literal
        ({**base, "steering": [{"vector": vec, "coef": "4"}]}, 400),
        ({**base, "max_tokens": 10**7}, 400),
        ({**base, "steering": [{"vector": vec, "layer": 10**4}]}, 400),
        ({**base, "steering": [{"vector": vec, "positions": "sideways"}]}, 400),
        ({**base, "steering": [{"vector": vec, "coef": 1}] * 1000}, 400),
        ({**base, "n": 3}, 400),
        ({"messages": "hello"} if msgs is not None else {"prompt": 7}, 400),
    ]


async def _one(client, path: str, kind: str, body, expect: int, res: LoadResult, headers: dict) -> None:
    import json

    # raw bytes (malformed JSON, bare NaN) still declare JSON: the server refuses other types (415)
    kw = (
        {"content": body, "headers": {**headers, "content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body, "headers": headers}
    )
    try:
        if kind == "good":
            r = await client.post(path, **kw)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            res.outcomes["good" if ok else f"failed:{r.status_code}"] += 1
            res.server_errors += r.status_code >= 500
            if not ok:
                res.unexpected.append(f"good request -> {r.status_code} {r.text[:200]}")
        elif kind in ("streamed", "cancelled"):
            n = 0
            async with client.stream("POST", path, headers=headers, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    res.server_errors += r.status_code >= 500
                    res.outcomes[f"failed:{r.status_code}"] += 1
                    res.unexpected.append(f"stream -> {r.status_code}")
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if "error" in json.loads(line[6:]):
                            res.server_errors += 1
                            res.unexpected.append(line[:200])
                        n += 1
                        if kind == "cancelled" and n >= 2:
                            break  # leave mid-stream: closing the response drops the connection
            res.outcomes[kind] += 1
        else:
            r = await client.post(path, **kw)
            res.outcomes[f"bad:{r.status_code}"] += 1
            res.server_errors += r.status_code >= 500
            if r.status_code != expect or "error" not in r.json():
                res.unexpected.append(f"bad request expected {expect}, got {r.status_code} {r.text[:200]}")
    except Exception as e:  # a transport error is a failure of the server under test
        res.outcomes["transport-error"] += 1
        res.unexpected.append(f"{kind}: {type(e).__name__}: {e}")


async def _mixed(url, good, n, concurrency, seconds, headers, seed) -> LoadResult:
    import httpx

    rng = random.Random(seed)
    bads = bad_bodies(good)
    plan = []
    for i in range(n):
        u = rng.random()
        if u < 0.35:
            plan.append(("good", good, 200))
        elif u < 0.55:
            plan.append(("streamed", good, 200))
        elif u < 0.7:
            plan.append(("cancelled", good, 200))
        else:
            body, code = bads[i % len(bads)]
            plan.append(("bad", body, code))
    res = LoadResult()
    path = url + ("/v1/chat/completions" if "messages" in good else "/v1/completions")
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()

    async def go(item):
        async with sem:
            await _one(client, path, *item, res, headers)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=seconds, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(go(p) for p in plan)), timeout=seconds)
    res.seconds = time.monotonic() - t0
    return res


def mixed_load(
    url: str,
    good: dict,
    *,
    n: int = 300,
    concurrency: int = 16,
    seconds: float = 300.0,
    headers: dict | None = None,
    seed: int = 0,
) -> LoadResult:
    """Send `n` mixed requests (35 % good, 20 % streamed, 15 % cancelled mid-stream, 30 % bad)
    with at most `concurrency` in flight, all within `seconds`. `good` is a valid request body
    whose "steering" has at least one entry."""
    check_loopback(url)
    if n > 5000 or concurrency > 256:
        raise SteerscopeError("mixed_load is bounded: at most 5000 requests and 256 in flight.")
    return asyncio.run(_mixed(url, good, n, concurrency, seconds, headers or {}, seed))
