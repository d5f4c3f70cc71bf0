"""Text sources for SAE training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SteerscopeError


def load_texts(spec: str, lm=None, seed: int = 0) -> list[str]:
    """A .txt file (one document per blank-line-separated paragraph), a .jsonl file with a `text`
    field, or self:N: N completions the model samples itself from the builtin neutral prompts."""
    if spec.startswith("self:"):
        from ..directions.data import load_prompts
        from ..generation import generate

        if not spec[5:].isdigit() or int(spec[5:]) < 1:
            raise SteerscopeError(f"self:N needs a positive count, got {spec!r}.")
        n = int(spec[5:])
        prompts = (load_prompts("neutral") * (n // 40 + 1))[:n]
        return [r.prompt + " " + r.text for r in generate(lm, prompts, max_new_tokens=96, temperature=1.0, seed=seed)]
    path = Path(spec)
    if not path.is_file():
        raise SteerscopeError(f"text source {spec!r} is neither a file nor self:N.")
    try:
        if path.suffix == ".jsonl":
            texts = [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]
        else:
            texts = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    except (ValueError, KeyError, TypeError) as e:
        raise SteerscopeError(
            f"{path} is not a JSONL file with a 'text' field on every line ({type(e).__name__}: {e})."
        ) from None
    if not texts:
        raise SteerscopeError(f"{path} holds no text.")
    return texts
