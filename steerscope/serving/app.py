"""`steerscope serve`: an OpenAI-compatible HTTP API whose requests carry their own steering.

    POST /v1/chat/completions, /v1/completions   (stream or not; steering in the body)
    GET  /v1/models
    GET/POST /v1/vectors, DELETE /v1/vectors/{name}
    GET  /                                        the playground (one offline page)

Steering rides in the request body, so the `openai` client sends it through `extra_body`::

    client.chat.completions.create(model="steerscope", messages=[...], temperature=0,
        extra_body={"steering": [{"vector": "happy", "coef": 6}, {"ablate": "refusal"}],
                    "projection": "happy"})

Unlike OpenAI, decoding is greedy unless `temperature` is given (a request then equals
`steerscope generate` with the same vector, coefficient and prompt). With `projection`, every
token comes with the projection of the residual stream on that unit vector at its layer, taken
at the position that produced the token before that layer's steering (`steerscope.projection`).

Every request is one row of the engine's running batch (`engine.py`); all checks happen before a
request reaches it, and the engine's hooks live only inside one forward pass.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..errors import SteerscopeError
from .config import ServeConfig
from .engine import DoneEvent, Engine, GenRequest, QueueFull, TokenEvent
from .store import RequestError, VectorStore, parse_steering

def _err(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def create_app(lm, store: VectorStore, engine: Engine, cfg: ServeConfig, api_key: str | None = None):
    """The FastAPI application around a started `engine` (the caller starts and stops it)."""
    app = FastAPI(title="steerscope", docs_url=None, redoc_url=None, openapi_url=None)
    limit = cfg.max_body_kb * 1024
    names = {lm.model_id, "steerscope", "default"}
    app.state.engine, app.state.store, app.state.lm = engine, store, lm

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            ok = hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())  # constant time
            if not ok:
                return _err("missing or wrong API key: send `Authorization: Bearer KEY`.", 401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            return _err(f"the request body is larger than {cfg.max_body_kb} KiB (--max-body-kb).", 413)
        return await call_next(request)

    async def body_of(request: Request) -> dict[str, Any]:
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > limit:
                raise RequestError(f"the request body is larger than {cfg.max_body_kb} KiB (--max-body-kb).", 413)
            chunks.append(c)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object.")
        return body

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return _err(str(e), e.status, e.param)

    @app.exception_handler(SteerscopeError)
    async def steerscope_error(request: Request, e: SteerscopeError):
        return _err(str(e), 400)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": lm.model_id, "object": "model", "created": 0, "owned_by": "steerscope",
                                            "n_layers": lm.n_layers, "d_model": lm.d_model}]}

    @app.get("/v1/vectors")
    async def list_vectors():
        return {"object": "list", "data": store.describe()}

    @app.post("/v1/vectors")
    async def upload(request: Request):
        body = await body_of(request)
        name = await asyncio.to_thread(store.upload, body)
        return JSONResponse({"object": "vector_set", "name": name,
                             "data": [d for d in store.describe() if d["name"] == name]}, status_code=201)

    @app.delete("/v1/vectors/{name}")
    async def delete(name: str):
        store.remove(name)
        return {"object": "vector_set.deleted", "name": name, "deleted": True}

    def gen_request(body: dict, prompt_ids: list[int], sink) -> GenRequest:
        """Every sampling field checked; steering resolved against the store."""
        if body.get("model") is not None and body["model"] not in names:
            raise RequestError(f"model {body['model']!r} is not served here; use {lm.model_id!r} (GET /v1/models).", 404, "model")
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported; send several requests (they are batched together).", param="n")
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        mt = cfg.default_max_tokens if mt is None else mt
        if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= cfg.max_tokens_limit:
            raise RequestError(f"max_tokens must be an integer in 1..{cfg.max_tokens_limit} (--max-tokens-limit), got {mt!r}.",
                               param="max_tokens")
        temperature = _number(body, "temperature", 0.0, 0.0, 100.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        seed = body.get("seed", 0)
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(f"seed must be an integer, got {seed!r}.", param="seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a non-empty string or a list of at most 4.", param="stop")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError("ignore_eos must be true or false.", param="ignore_eos")
        steering = parse_steering(store, lm, body.get("steering"), body.get("projection"), cfg.max_vectors_per_request)
        return GenRequest(prompt_ids, steering, mt, sink, temperature, top_p, seed, tuple(stop), ignore_eos)

    async def run(request: Request, chat: bool):
        body = await body_of(request)
        prompt_ids = await asyncio.to_thread(_prompt_ids, lm, body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = gen_request(body, prompt_ids, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise RequestError(str(e), 429) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": lm.model_id}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(events, req, meta, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, tokens, projections = [], [], []
        try:
            while True:
                e = await events.get()
                if isinstance(e, TokenEvent):
                    text.append(e.text)
                    if e.token_id is not None:
                        tokens.append(e.token_id)
                        projections.append(e.projection)
                elif isinstance(e, DoneEvent):
                    break
        finally:
            req.cancelled.set()  # no-op when finished; stops the row when this handler is cancelled
        if e.finish_reason == "error":
            return _err(f"generation failed: {e.error}", 500)
        extra = {"token_ids": tokens, "projections": projections if req.steering.probe is not None else None}
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": e.finish_reason}
                  if chat else {"index": 0, "text": content, "finish_reason": e.finish_reason, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
                          "total_tokens": e.prompt_tokens + e.completion_tokens}, "steerscope": extra}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def _number(body: dict, key: str, default: float, lo: float, hi: float, low_open: bool = False) -> float:
    import math

    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi or (low_open and v <= lo):
        raise RequestError(f"{key} must be a number in {'(' if low_open else '['}{lo:g}, {hi:g}], got {v!r}.", param=key)
    return float(v)


def _prompt_ids(lm, body: dict, chat: bool) -> list[int]:
    """Token ids exactly as `generate` encodes them (chat template with the generation prompt,
    or the raw prompt)."""
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("messages must be a non-empty list of {\"role\", \"content\"}.", param="messages")
        clean = []
        for k, m in enumerate(msgs):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text") or None
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
                raise RequestError(f"messages[{k}] must be {{\"role\": system|user|assistant, \"content\": text}}.", param="messages")
            clean.append({"role": m["role"], "content": content})
        if not lm.has_chat_template:
            raise RequestError(f"{lm.model_id} has no chat template; use /v1/completions.", param="messages")
        text = lm.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        enc = lm.encode([text], formatted=True)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be one non-empty string (send several requests for several prompts).", param="prompt")
        enc = lm.encode([prompt], chat=False)
    return enc["input_ids"][0].tolist()


async def _sse(events: asyncio.Queue, req: GenRequest, meta: dict, chat: bool, usage: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. A client that leaves
    cancels the generator here, which cancels the row at the engine's next step."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, extra: dict | None = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {"content": text}) if text is not None or role else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        out = {**meta, "object": obj, "choices": [choice]}
        if extra is not None:
            out["steerscope"] = extra
        return f"data: {json.dumps(out)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            e = await events.get()
            if isinstance(e, TokenEvent):
                yield chunk(e.text, None, {"token_id": e.token_id, "projection": e.projection})
            else:
                break
        if e.finish_reason == "error":
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {e.error}', 'type': 'server_error', 'code': 500}})}\n\n"
        else:
            yield chunk(None, e.finish_reason)
            if usage:
                u = {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
                     "total_tokens": e.prompt_tokens + e.completion_tokens}
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': u})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled.set()


class Server:
    """A running server on a background thread (tests, benchmarks, notebooks)::

        with Server(lm, ServeConfig(port=0), store) as s:
            openai.OpenAI(base_url=s.url + "/v1", api_key="-")...
    """

    def __init__(self, lm, cfg: ServeConfig, store: VectorStore | None = None, api_key: str | None = None):
        import uvicorn

        self.lm, self.cfg = lm, cfg
        self.store = store or VectorStore(lm, check_model=not cfg.allow_other_model)
        self.engine = Engine(lm, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000, max_queue=cfg.max_queue,
                             use_cache=cfg.kv_cache)
        self.app = create_app(lm, self.store, self.engine, cfg, api_key)
        self.uv = uvicorn.Server(uvicorn.Config(self.app, host=cfg.host, port=cfg.port, log_level="warning",
                                                timeout_graceful_shutdown=2))
        self.thread = None

    @property
    def port(self) -> int:
        return int(self.uv.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        import threading

        self.engine.start()
        self.thread = threading.Thread(target=self._run, name="steerscope-http", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                self.engine.stop()
                raise SteerscopeError(f"the server did not start on {self.cfg.host}:{self.cfg.port} (port in use? try --port 0).")
            time.sleep(0.02)
        return self

    def _run(self) -> None:
        try:
            self.uv.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it in one line
            pass

    def stop(self) -> None:
        self.uv.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.engine.stop()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
