"""Concept sets for comparing steering methods (`steerscope bench`).

A concept is one JSONL file (`steerscope/data/concepts/NAME.jsonl`, written for steerscope; or
the user's own, same schema), one object per line:
    {"kind": "meta", "concept": NAME, "group": "topic", "description": ..., "system_prompt": ...}
    {"kind": "positive", "text": ...}        texts that show the concept (>= 48 shipped)
    {"kind": "negative", "text": ...}        texts without it (optional: the shared neutral pool
                                             `_negatives.txt` is used when a file has none)
    {"kind": "hard_negative", "text": ...}   texts sharing surface features without the concept
                                             ("cooking the books" for cooking; >= 12 shipped)
    {"kind": "instruction", "text": ...}     open instructions to steer on (>= 10 shipped)
    {"kind": "ab", "question": ..., "behaviour": ..., "other": ...}   CAA-style A/B items
Any row may carry "split": "train" | "choose" | "report"; otherwise texts are split by position
(i % 4 in {0, 1}: train, 2: choose, 3: report; AxBench-like held-out reporting) and instructions
by position too (i % 4 == 2: choose, else report). Train texts make the directions, choose texts
set the judge's threshold and pick the vector distilled, report texts and instructions give every
number in the report.

Shipped (12): sports, cooking, space, ocean (topics); joy, anger (sentiment); french (language);
formal, pirate (style); refusal; flattery, uncertainty (persona traits). A/B items: joy, refusal,
formal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import SteerscopeError
from .data import jsonl_rows

SPLITS = ("train", "choose", "report")
KINDS = ("meta", "positive", "negative", "hard_negative", "instruction", "ab")
DEFAULT_CONCEPTS = ["sports", "cooking", "joy", "french", "formal", "refusal"]


@dataclass
class ABItem:
    question: str
    behaviour: str  # the answer showing the concept
    other: str


@dataclass
class Concept:
    name: str
    group: str
    description: str
    system_prompt: str  # the prompting baseline's system prompt
    texts: dict[str, dict[str, list[str]]]  # kind (positive / negative / hard_negative) -> split -> texts
    instructions: dict[str, list[str]]  # split -> instructions
    ab: list[ABItem] = field(default_factory=list)
    source: str = ""

    def pos(self, split: str) -> list[str]:
        return self.texts["positive"][split]

    def neg(self, split: str, hard: bool = True) -> list[str]:
        """Negatives of a split; with `hard`, the hard negatives are included."""
        return self.texts["negative"][split] + (self.texts["hard_negative"][split] if hard else [])

    def counts(self) -> dict[str, int]:
        return {k: sum(len(v) for v in d.values()) for k, d in self.texts.items()} | {
            "instruction": sum(len(v) for v in self.instructions.values()),
            "ab": len(self.ab),
        }


def builtin_names() -> list[str]:
    root = resources.files("steerscope.data").joinpath("concepts")
    return sorted(p.name[:-6] for p in root.iterdir() if p.name.endswith(".jsonl"))


def _shared_negatives() -> list[str]:
    text = resources.files("steerscope.data").joinpath("concepts/_negatives.txt").read_text(encoding="utf-8")
    return [l.strip() for l in text.splitlines() if l.strip()]


def shared_instructions() -> list[str]:
    """Generic instructions (concepts/_instructions.txt) that top up a concept's report split, so a
    bench has enough report instructions per concept for its cells to separate."""
    text = resources.files("steerscope.data").joinpath("concepts/_instructions.txt").read_text(encoding="utf-8")
    return [l.strip() for l in text.splitlines() if l.strip()]


def report_instructions(c: Concept, n: int) -> list[str]:
    """The concept's own report instructions, topped up to `n` from the shared pool (never one of
    its own instructions of any split)."""
    own = c.instructions["report"]
    seen = {x for sp in c.instructions.values() for x in sp}
    return own + [x for x in shared_instructions() if x not in seen][: max(0, n - len(own))]


def _by_position(i: int, instruction: bool) -> str:
    if instruction:
        return "choose" if i % 4 == 2 else "report"
    return ("train", "train", "choose", "report")[i % 4]


def load_concept(name_or_path: str | Path) -> Concept:
    """A shipped concept by name, or a JSONL file of the schema above."""
    s = str(name_or_path)
    if s in builtin_names():
        text = resources.files("steerscope.data").joinpath(f"concepts/{s}.jsonl").read_text(encoding="utf-8")
        source = f"builtin:{s}"
    else:
        path = Path(s)
        if not path.is_file():
            raise SteerscopeError(
                f"unknown concept {s!r}: not a shipped concept ({', '.join(builtin_names())}) "
                "and not a JSONL file; see `steerscope bench --help` for the schema."
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    rows = jsonl_rows(text, source)
    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    name = meta.get("concept") or Path(s).stem
    texts = {k: {sp: [] for sp in SPLITS} for k in ("positive", "negative", "hard_negative")}
    instructions = {sp: [] for sp in SPLITS}
    ab, seen = [], {k: 0 for k in KINDS}
    for n, r in enumerate(rows, 1):
        kind = r.get("kind")
        if kind not in KINDS:
            raise SteerscopeError(f"{source}: row {n} has kind {kind!r}; use one of {', '.join(KINDS)}.")
        if kind == "meta":
            continue
        if kind == "ab":
            if not all(str(r.get(k) or "").strip() for k in ("question", "behaviour", "other")):
                raise SteerscopeError(f"{source}: A/B row {n} needs non-empty question, behaviour and other.")
            ab.append(ABItem(r["question"], r["behaviour"], r["other"]))
            continue
        t = str(r.get("text") or "").strip()
        if not t:
            raise SteerscopeError(f"{source}: row {n} ({kind}) has no text.")
        split = r.get("split") or _by_position(seen[kind], kind == "instruction")
        if split not in SPLITS:
            raise SteerscopeError(f"{source}: row {n} has split {split!r}; use train, choose or report.")
        seen[kind] += 1
        (instructions if kind == "instruction" else texts[kind])[split].append(t)
    if not any(texts["negative"].values()):
        for i, t in enumerate(_shared_negatives()):
            texts["negative"][_by_position(i, False)].append(t)
    c = Concept(
        name,
        meta.get("group", "custom"),
        meta.get("description", name),
        meta.get("system_prompt") or f"In every answer, show this: {meta.get('description', name)}.",
        texts,
        instructions,
        ab,
        source,
    )
    need = {
        "positive texts in train and report": c.pos("train") and c.pos("report"),
        "negative texts in train and report": c.neg("train") and c.neg("report"),
        "instructions in the report split": c.instructions["report"],
    }
    missing = [k for k, ok in need.items() if not ok]
    if missing:
        raise SteerscopeError(f"concept {name} ({source}) lacks {'; '.join(missing)}; add rows of those kinds.")
    return c


def load_concepts(names: list[str]) -> list[Concept]:
    """Concepts by name or path, in the order given; "all" means every shipped concept."""
    if names == ["all"]:
        names = builtin_names()
    if not names:
        raise SteerscopeError("no concepts given; name shipped ones (e.g. sports,french) or JSONL files.")
    out = [load_concept(n) for n in names]
    dup = sorted({c.name for c in out if sum(d.name == c.name for d in out) > 1})
    if dup:
        raise SteerscopeError(f"concept(s) {', '.join(dup)} given twice; each concept once.")
    return out
