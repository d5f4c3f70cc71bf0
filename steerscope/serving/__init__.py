"""Serving steered models: an OpenAI-compatible server (`steerscope serve`) whose requests carry
their own steering, decoded as rows of one continuously batched loop.

`ServeConfig` and the engine import without FastAPI; `Server` (and `create_app`) need the
`serve` extra (FastAPI + uvicorn) and are imported on first use.
"""

from .config import ServeConfig
from .engine import Engine
from .protocol import GenRequest, RowSteering

__all__ = ["Engine", "GenRequest", "RowSteering", "ServeConfig", "Server", "VectorStore", "create_app"]


def __getattr__(name: str):
    if name in ("Server", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "VectorStore":
        from .store import VectorStore

        return VectorStore
    raise AttributeError(name)
