"""Request bodies of `steerscope serve`, as pydantic models (FastAPI brings pydantic).

Every field a request may carry is declared here; anything else, including OpenAI fields this
server does not implement (`logit_bias`, `response_format`, `tools`, ...), is refused with a 400
that names it, never accepted and ignored. Types are strict (no "4" for 4, no NaN or infinity).
What depends on the model or the server's settings (layer ranges, token limits, vector names) is
checked afterwards, in `app.py` and `store.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .store import RequestError

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InlineVector(BaseModel):
    """A vector carried in the request itself (validated like an upload, never stored)."""

    model_config = _STRICT
    data: str
    """base64 of d_model little-endian float32 values"""
    layer: int | None = None
    """the layer it is added at (required for an addition; unused for an ablation)"""


VectorRef = str | InlineVector


class WhenItem(BaseModel):
    """A steering entry's gate (CAST): steer only if the prompt meets a stored condition set; or
    several such conditions, all of which ({"all": [...]}) or any of which ({"any": [...]}) must
    hold (CAST's "if C1 and C2" / "if C1 or C2" rules; one level, no nesting)."""

    model_config = _STRICT
    condition: str | None = None
    """the name of a stored condition set (`steerscope condition`)"""
    all: list[WhenItem] | None = None
    """conditions that must all hold (instead of `condition`)"""
    any: list[WhenItem] | None = None
    """conditions of which one must hold (instead of `condition`)"""
    layer: int | None = None
    """condition layer (default: the set's best layer)"""
    threshold: float | None = None
    """cosine threshold (default: the set's at that layer)"""
    above: bool | None = None
    """steer when the score is above the threshold (default: the set's side)"""


class SteeringItem(BaseModel):
    """One entry of `steering`: an addition ({"vector", "coef", "layer"?, "positions"?, "when"?})
    or an ablation ({"ablate", "positions"?})."""

    model_config = _STRICT
    vector: VectorRef | None = None
    coef: float = 1.0
    layer: int | None = None
    positions: str = "all"
    ablate: VectorRef | None = None
    when: WhenItem | None = None


class Projection(BaseModel):
    model_config = _STRICT
    vector: VectorRef
    layer: int | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # OpenAI allows null for the optional fields and some clients send it for unset ones.
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    ignore_eos: bool | None = None
    user: str | None = None  # OpenAI's end-user id: metadata, not used
    steering: list[SteeringItem] | None = None
    projection: VectorRef | Projection | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionBody(_Common):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class UploadBody(BaseModel):
    """POST /v1/vectors: {"name", "config": <config.json>, "safetensors": base64} or {"name", "gguf": base64}."""

    model_config = _STRICT
    name: str
    config: dict | None = None
    safetensors: str | None = None
    gguf: str | None = None
    replace: bool = False


def parse_body(model: type[BaseModel], body: dict) -> BaseModel:
    """`body` validated as `model`, or a RequestError (400) naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        # A value that fits no member of a union gets one error per member; the deepest one is
        # the member it was meant as ({"vector": {"layer": "3"}} -> `.layer`, not "a string").
        errors = e.errors(include_url=False)
        err = max(errors, key=lambda x: len([p for p in x["loc"] if not _is_tag(p)]))
        loc = _loc(err["loc"])
        kind, got = err["type"], err.get("input")
        if kind == "extra_forbidden":
            msg = f"`{loc}` is not supported by steerscope serve; remove it."
        elif kind == "missing":
            msg = f"`{loc}` is required."
        elif kind == "finite_number":
            msg = f"`{loc}` must be a finite number, got {got!r}."
        else:
            msg = f"`{loc}`: {err['msg']} (got {_short(got)})."
        raise RequestError(msg, param=loc) from None


# pydantic names a union member in an error's location by its type: these are not fields.
_TAGS = {
    "str",
    "int",
    "float",
    "bool",
    "dict[any,any]",
    "InlineVector",
    "Projection",
    "TextPart",
    "SteeringItem",
    "WhenItem",
    "StreamOptions",
    "list[str]",
    "list[TextPart]",
    "function-after",
    "constrained-float",
}


def _is_tag(p) -> bool:
    return isinstance(p, str) and (p in _TAGS or p.startswith(("list[", "function-", "constrained-")))


def _loc(parts) -> str:
    out = ""
    for p in parts:
        if _is_tag(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "body"


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
