"""What a request to the engine is and what it hands back: the server's protocol types.

`RowSteering` (with `AddSpec` and `AblateSpec`) is defined once in `interventions.rows`, where
`generation` uses it too; it is re-exported here with the request and event types."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SteerscopeError
from ..interventions.rows import AblateSpec, AddSpec, Gated, RowSteering

__all__ = ["AblateSpec", "AddSpec", "Gated", "RowSteering", "GenRequest", "TokenEvent", "DoneEvent", "QueueFull"]


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None: text held back earlier, handed out at the end (no new token)
    text: str  # new text (may be "" while a multi-byte character or a stop string is pending)
    projection: float | None
    logprob: float | None = None  # log p(token) under the steered model (after penalties, before temperature)
    top_logprobs: tuple[tuple[str, float], ...] | None = None  # the most likely (token text, log p), best first
    token_text: str | None = None  # the token decoded alone (set with logprob)


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    status: int = 500  # HTTP status of an error: 422 when the request's own steering caused it
    gates: tuple = ()  # with `when` gates: ({"steering": [entry indices], "fired": bool, "score": float}, ...), decided on the prompt


@dataclass
class GenRequest:
    """One request. `sink(event)` is called from the worker thread for every TokenEvent and
    once with the DoneEvent; it must not block (the server hands events to its event loop)."""

    prompt_ids: list[int]
    steering: RowSteering
    max_tokens: int
    sink: Callable[[object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep decoding past EOS (fixed-length runs, as vLLM's ignore_eos)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of a generated token
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(SteerscopeError):
    pass
