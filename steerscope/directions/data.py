"""Contrastive data: pairs (positive/negative, optional shared prompt) or two prompt sets (A vs B).

Class A is the side that HAS the behaviour (positive sentiment, harmful instruction, formal, ...);
every extractor returns a direction pointing from B to A.

Shipped datasets (written for steerscope; `steerscope.directions.data.BUILTIN`):
    sentiment   60 pairs, positive vs negative review-style sentences on the same topic
    formal      40 pairs, formal vs casual phrasings of the same message
    french      40 pairs, English vs French translations of the same sentence
    refusal     40 harmful vs 40 harmless instructions of matching form (refusal direction)
    neutral     40 neutral prompts (KL side effects, steering evaluation); `load_prompts("neutral")`
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import SteerscopeError


@dataclass
class ContrastSet:
    """A: texts with the behaviour; B: without. `prompts[i]` (paired data only) is a shared
    prompt, and a[i]/b[i] are then two answers to it."""

    a: list[str]
    b: list[str]
    paired: bool
    prompts: list[str | None] | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.a or not self.b:
            raise SteerscopeError(
                f"contrast set {self.name!r} needs at least one text on each side (got {len(self.a)} and {len(self.b)})."
            )
        if self.paired and len(self.a) != len(self.b):
            raise SteerscopeError(
                f"paired data needs as many positives as negatives (got {len(self.a)} and {len(self.b)})."
            )
        for side, texts in (("A", self.a), ("B", self.b)):
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
            if bad:
                raise SteerscopeError(f"{self.name or 'contrast set'}: side {side} has empty texts at rows {bad[:5]}.")

    def formatted(self, lm, chat: bool | None = None, system: str | None = None) -> tuple[list[str], list[str]]:
        """Model-ready strings. With a chat template, a bare text becomes the user message; a
        pair with a shared prompt becomes [user: prompt] + assistant answer."""

        def fmt(texts: list[str]) -> list[str]:
            if self.prompts is None:
                return [lm.format_prompt(t, chat, system) for t in texts]
            return [
                (lm.format_prompt(p, chat, system) + t) if p else lm.format_prompt(t, chat, system)
                for p, t in zip(self.prompts, texts)
            ]

        return fmt(self.a), fmt(self.b)

    def __len__(self) -> int:
        return len(self.a)


def from_pairs(
    positive: Sequence[str], negative: Sequence[str], prompts: Sequence[str | None] | None = None, name: str = "pairs"
) -> ContrastSet:
    if prompts is not None and len(prompts) != len(positive):
        raise SteerscopeError(f"{len(prompts)} prompts for {len(positive)} pairs; give one prompt per pair.")
    return ContrastSet(
        list(positive), list(negative), paired=True, prompts=list(prompts) if prompts is not None else None, name=name
    )


def from_sets(a: Sequence[str], b: Sequence[str], name: str = "sets") -> ContrastSet:
    return ContrastSet(list(a), list(b), paired=False, name=name)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SteerscopeError(f"data file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SteerscopeError(f"data file {path} is empty.")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    elif path.suffix in (".jsonl", ".json"):
        rows = jsonl_rows(text, str(path))
    else:
        raise SteerscopeError(f"unsupported data file {path.name}: use .jsonl or .csv (or .txt for prompt sets).")
    if not rows:
        raise SteerscopeError(f"data file {path} has no rows.")
    return rows


def jsonl_rows(text: str, source: str) -> list[dict]:
    """One JSON object per non-empty line; a bad line is one error naming `source`:LINE."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise SteerscopeError(f"{source}:{n} is not valid JSON ({e}).") from None
    return rows


def load_pairs(path: str | Path) -> ContrastSet:
    """JSONL or CSV with columns `positive`, `negative` and optionally `prompt`."""
    path = Path(path)
    rows = _rows(path)
    missing = [c for c in ("positive", "negative") if c not in rows[0]]
    if missing:
        raise SteerscopeError(
            f"{path} lacks column(s) {missing}; it needs 'positive' and 'negative' (and optionally 'prompt')."
        )
    for n, r in enumerate(rows, 1):
        if not str(r.get("positive") or "").strip() or not str(r.get("negative") or "").strip():
            raise SteerscopeError(f"{path} row {n} has an empty positive or negative.")
    prompts = [r.get("prompt") or None for r in rows] if any(r.get("prompt") for r in rows) else None
    return from_pairs([r["positive"] for r in rows], [r["negative"] for r in rows], prompts, name=path.stem)


def load_prompts(path_or_name: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line), a JSONL/CSV file with a `prompt` or `text`
    column, or a builtin name (neutral, harmful, harmless)."""
    if isinstance(path_or_name, str) and path_or_name in _BUILTIN_PROMPTS:
        return _builtin_lines(_BUILTIN_PROMPTS[path_or_name])
    path = Path(path_or_name)
    if path.suffix == ".txt" or not path.suffix:
        if not path.is_file():
            raise SteerscopeError(
                f"prompt file {path} does not exist (builtin prompt sets: {', '.join(_BUILTIN_PROMPTS)})."
            )
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        if not lines:
            raise SteerscopeError(f"prompt file {path} is empty.")
        return lines
    rows = _rows(path)
    key = next((k for k in ("prompt", "text", "instruction") if k in rows[0]), None)
    if key is None:
        raise SteerscopeError(f"{path} needs a 'prompt' or 'text' column.")
    return [str(r[key]) for r in rows]


def load_sets(a: str | Path, b: str | Path) -> ContrastSet:
    return from_sets(load_prompts(a), load_prompts(b), name=f"{Path(str(a)).stem}-vs-{Path(str(b)).stem}")


def _builtin_lines(filename: str) -> list[str]:
    text = resources.files("steerscope.data").joinpath(filename).read_text(encoding="utf-8")
    return [l.strip() for l in text.splitlines() if l.strip()]


def _builtin_pairs(filename: str, name: str) -> ContrastSet:
    rows = [json.loads(l) for l in _builtin_lines(filename)]
    return from_pairs([r["positive"] for r in rows], [r["negative"] for r in rows], name=name)


# harmful_test / harmless_test: 30 minimal pairs about other acts than harmful / harmless, for
# held-out evaluation of directions found on those (select's test sets, the CAST demonstration);
# no organism is trained on either.
_BUILTIN_PROMPTS = {
    "neutral": "neutral.txt",
    "harmful": "harmful.txt",
    "harmless": "harmless.txt",
    "harmful_test": "harmful_test.txt",
    "harmless_test": "harmless_test.txt",
}
BUILTIN = {
    "sentiment": lambda: _builtin_pairs("sentiment_pairs.jsonl", "sentiment"),
    "formal": lambda: _builtin_pairs("formal_casual.jsonl", "formal"),
    "french": lambda: _builtin_pairs("english_french.jsonl", "french"),
    "refusal": lambda: from_sets(_builtin_lines("harmful.txt"), _builtin_lines("harmless.txt"), name="refusal"),
}


def load_contrast(spec: str | Path) -> ContrastSet:
    """A builtin dataset name or a pairs file."""
    if isinstance(spec, str) and spec in BUILTIN:
        return BUILTIN[spec]()
    if isinstance(spec, str) and not Path(spec).exists() and "." not in Path(spec).name:
        raise SteerscopeError(
            f"unknown dataset {spec!r}; builtin: {', '.join(BUILTIN)}, or give a .jsonl/.csv pairs file."
        )
    return load_pairs(spec)
