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
import json
import secrets
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..errors import SteerscopeError
from .config import ServeConfig
from .engine import Engine
from .guard import Guard
from .protocol import DoneEvent, GenRequest, QueueFull, TokenEvent
from .schema import ChatBody, CompletionBody, UploadBody, parse_body
from .store import RequestError, VectorStore, parse_steering


def _when_out(gates: tuple) -> dict | list:
    """`steerscope.when` of a gated request: {"steering": [entries], "fired", "score"} for its one
    gate, a list of them (in the order of the entries) when its entries carry several."""
    return gates[0] if len(gates) == 1 else list(gates)


def _err(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        409: "conflict_error",
        413: "request_too_large",
        429: "rate_limit_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


def create_app(lm, store: VectorStore, engine: Engine, cfg: ServeConfig, api_key: str | None = None):
    """The FastAPI application around a started `engine` (the caller starts and stops it)."""
    app = FastAPI(title="steerscope", docs_url=None, redoc_url=None, openapi_url=None)
    limit = cfg.max_body_kb * 1024
    names = {lm.model_id, "steerscope", "default"}
    app.state.engine, app.state.store, app.state.lm = engine, store, lm

    # A pure ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect
    # from the handlers, so a non-streamed request kept decoding after its client left.
    app.add_middleware(Guard, api_key=api_key, max_body=limit, max_body_kb=cfg.max_body_kb, error=_err)

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

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse(
            {
                "status": "ok" if ok else "engine stopped",
                "model": lm.model_id,
                "running_rows": engine.busy_rows,
                "waiting": engine.inbox.qsize(),
            },
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": lm.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "steerscope",
                    "n_layers": lm.n_layers,
                    "d_model": lm.d_model,
                }
            ],
        }

    @app.get("/v1/vectors")
    async def list_vectors():
        return {"object": "list", "data": store.describe()}

    @app.post("/v1/vectors")
    async def upload(request: Request):
        body = parse_body(UploadBody, await body_of(request))
        name = await asyncio.to_thread(store.upload, body)
        return JSONResponse(
            {"object": "vector_set", "name": name, "data": [d for d in store.describe() if d["name"] == name]},
            status_code=201,
        )

    @app.delete("/v1/vectors/{name}")
    async def delete(name: str):
        store.remove(name)
        return {"object": "vector_set.deleted", "name": name, "deleted": True}

    def gen_request(body, prompt_ids: list[int], sink) -> GenRequest:
        """A validated body (`schema`) checked against the model and the server's limits."""
        if body.model is not None and body.model not in names:
            raise RequestError(
                f"model {body.model!r} is not served here; use {lm.model_id!r} (GET /v1/models).", 404, "model"
            )
        if body.n not in (None, 1):
            raise RequestError("only n=1 is supported; send several requests (they are batched together).", param="n")
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        mt = cfg.default_max_tokens if mt is None else mt
        if not 1 <= mt <= cfg.max_tokens_limit:
            raise RequestError(
                f"max_tokens must be an integer in 1..{cfg.max_tokens_limit} (--max-tokens-limit), got {mt!r}.",
                param="max_tokens",
            )
        context = _context_length(lm)
        if context is not None and len(prompt_ids) + mt > context:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({mt}) exceeds the model's context "
                f"of {context} tokens; shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        temperature = 0.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        # Sampling with no seed draws one (returned in the response, so the text can be reproduced).
        seed = body.seed if body.seed is not None else (secrets.randbits(31) if temperature > 0 else 0)
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise RequestError("stop must be a non-empty string or a list of at most 4.", param="stop")
        logprobs = None
        if isinstance(body, ChatBody):
            if body.top_logprobs is not None and not body.logprobs:
                raise RequestError('top_logprobs needs "logprobs": true.', param="top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        elif body.logprobs is not None:
            logprobs = body.logprobs
        chat = isinstance(body, ChatBody)  # the chat endpoint applies the template, /v1/completions does not
        steering = parse_steering(store, lm, body.steering, body.projection, cfg.max_vectors_per_request, chat)
        return GenRequest(
            prompt_ids,
            steering,
            mt,
            sink,
            temperature,
            top_p,
            seed,
            tuple(stop),
            bool(body.ignore_eos),
            body.presence_penalty or 0.0,
            body.frequency_penalty or 0.0,
            logprobs,
        )

    async def run(request: Request, chat: bool):
        body = parse_body(ChatBody if chat else CompletionBody, await body_of(request))
        prompt_ids = await asyncio.to_thread(_prompt_ids, lm, body, chat, engine.tokenizer_lock)
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most {cfg.max_prompt_tokens} "
                "(--max-prompt-tokens).",
                param="messages" if chat else "prompt",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = gen_request(body, prompt_ids, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise RequestError(str(e), 429) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": lm.model_id}
        lp = _LogprobFormat(chat) if req.logprobs is not None else None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(events, req, meta, chat, usage, lp),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, tokens, projections, token_events = [], [], [], []
        checked = time.monotonic()
        try:
            while True:
                try:
                    e = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    e = None
                if time.monotonic() - checked >= 0.25:  # also while tokens keep coming
                    checked = time.monotonic()
                    if await request.is_disconnected():  # the client left: free its row now
                        req.cancelled.set()
                        return JSONResponse({}, status_code=499)
                if isinstance(e, TokenEvent):
                    text.append(e.text)
                    if e.token_id is not None:
                        tokens.append(e.token_id)
                        projections.append(e.projection)
                        token_events.append(e)
                elif isinstance(e, DoneEvent):
                    break
        finally:
            req.cancelled.set()  # no-op when finished; stops the row when this handler is cancelled
        if e.finish_reason == "error":
            return _err(f"generation failed: {e.error}", e.status)
        extra = {
            "token_ids": tokens,
            "projections": projections if req.steering.probe is not None else None,
            "seed": req.seed,
        }
        if e.gates:
            extra["when"] = _when_out(e.gates)
        content = "".join(text)
        logprobs = lp.whole(token_events) if lp is not None else None
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": e.finish_reason,
                "logprobs": logprobs,
            }
            if chat
            else {"index": 0, "text": content, "finish_reason": e.finish_reason, "logprobs": logprobs}
        )
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": {
                "prompt_tokens": e.prompt_tokens,
                "completion_tokens": e.completion_tokens,
                "total_tokens": e.prompt_tokens + e.completion_tokens,
            },
            "steerscope": extra,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def _context_length(lm) -> int | None:
    """The model's context in tokens (None when its config names none)."""
    cfg = lm.model.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _prompt_ids(lm, body, chat: bool, tok_lock) -> list[int]:
    """Token ids exactly as `generate` encodes them (chat template with the generation prompt,
    or the raw prompt); the tokenizer is shared with the engine thread, hence the lock."""
    if chat:
        if not lm.has_chat_template:
            raise RequestError(f"{lm.model_id} has no chat template; use /v1/completions.", param="messages")
        clean = [{"role": m.role, "content": m.text()} for m in body.messages]
        with tok_lock:
            text = lm.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
            enc = lm.encode([text], formatted=True)
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(
                "prompt must be one non-empty string (send several requests for several prompts).", param="prompt"
            )
        with tok_lock:
            enc = lm.encode([prompt], chat=False)
    return enc["input_ids"][0].tolist()


class _LogprobFormat:
    """OpenAI's logprobs objects from TokenEvents: chat's {"content": [{token, logprob, bytes,
    top_logprobs}]} or completions' {tokens, token_logprobs, top_logprobs, text_offset}. A token
    that is only part of a multi-byte character decodes (alone) to U+FFFD, and so do its bytes."""

    def __init__(self, chat: bool):
        self.chat, self.offset = chat, 0

    def entry(self, e: TokenEvent) -> dict:
        s = e.token_text or ""
        if self.chat:
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in e.top_logprobs or ()]
            return {"token": s, "logprob": e.logprob, "bytes": list(s.encode()), "top_logprobs": top}
        out = {
            "token": s,
            "token_logprob": e.logprob,
            "top_logprobs": dict(e.top_logprobs or ()),
            "text_offset": self.offset,
        }
        self.offset += len(s)
        return out

    def whole(self, events: list[TokenEvent]) -> dict:
        rows = [self.entry(e) for e in events]
        if self.chat:
            return {"content": rows}
        return {
            "tokens": [r["token"] for r in rows],
            "token_logprobs": [r["token_logprob"] for r in rows],
            "top_logprobs": [r["top_logprobs"] for r in rows],
            "text_offset": [r["text_offset"] for r in rows],
        }


async def _sse(events: asyncio.Queue, req: GenRequest, meta: dict, chat: bool, usage: bool, lp: _LogprobFormat | None):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. A client that leaves
    cancels the generator here, which cancels the row at the engine's next step."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        text: str | None,
        finish: str | None,
        extra: dict | None = None,
        role: bool = False,
        logprobs: dict | None = None,
    ) -> str:
        if chat:
            delta = (
                ({"role": "assistant", "content": ""} if role else {"content": text})
                if text is not None or role
                else {}
            )
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
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
                logprobs = lp.whole([e]) if lp is not None and e.token_id is not None else None
                yield chunk(
                    e.text,
                    None,
                    {"token_id": e.token_id, "projection": e.projection, "seed": req.seed},
                    logprobs=logprobs,
                )
            else:
                break
        if e.finish_reason == "error":
            kind = "server_error" if e.status >= 500 else "invalid_request_error"
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {e.error}', 'type': kind, 'code': e.status}})}\n\n"
        else:
            yield chunk(None, e.finish_reason, {"when": _when_out(e.gates)} if e.gates else None)
            if usage:
                u = {
                    "prompt_tokens": e.prompt_tokens,
                    "completion_tokens": e.completion_tokens,
                    "total_tokens": e.prompt_tokens + e.completion_tokens,
                }
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
        self.store = store or VectorStore(
            lm, check_model=not cfg.allow_other_model, max_steer_ratio=cfg.max_steer_ratio
        )
        self.engine = Engine(
            lm,
            max_batch=cfg.max_batch,
            window_s=cfg.batch_window_ms / 1000,
            max_queue=cfg.max_queue,
            use_cache=cfg.kv_cache,
        )
        self.app = create_app(lm, self.store, self.engine, cfg, api_key)
        self.uv = uvicorn.Server(
            uvicorn.Config(self.app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = None

    @property
    def port(self) -> int:
        return int(self.uv.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        import threading

        self.engine.start()
        self.thread = threading.Thread(target=self._run, name="steerscope-http", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                self.engine.stop()
                raise SteerscopeError(
                    f"the server did not start on {self.cfg.host}:{self.cfg.port} (port in use? try --port 0)."
                )
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

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
