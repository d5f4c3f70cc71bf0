"""`steerscope serve`: the OpenAI-compatible steering server (see `serving.app`)."""

import time

from ..errors import SteerscopeError
from ._registry import command, say


def serve_config() -> type:
    from ..serving.config import ServeConfig

    return ServeConfig


@command(
    "serve",
    "an OpenAI-compatible API with a steering vector per request, and a playground",
    "Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions, "
    "streaming or not) where each request carries its own steering, batched as rows; "
    "/v1/vectors lists, uploads and removes vectors; / is a playground page.",
    serve_config,
)
def cmd_serve(cfg) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SteerscopeError("serving needs FastAPI and uvicorn: pip install 'steerscope[serve]'.") from None
    from ..serving.app import Server
    from ..serving.store import VectorStore

    key = cfg.check()  # before loading anything
    lm = cfg.model.load()
    store = VectorStore(lm, check_model=not cfg.allow_other_model, max_steer_ratio=cfg.max_steer_ratio)
    for path in cfg.vectors:
        name = store.load_path(path)
        say(f"loaded vectors {name!r} from {path}")
    server = Server(lm, cfg, store, key).start()
    say(f"steerscope serving {lm.model_id} at {server.url}/v1 (playground: {server.url}/ ; Ctrl-C stops)")
    try:
        while server.thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
