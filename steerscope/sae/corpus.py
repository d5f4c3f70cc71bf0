"""A text corpus the model samples itself, for SAE training where no corpus can be downloaded.

`sample_corpus` writes JSONL rows `{"text": ...}` batch by batch (each batch appended whole and
fsynced), so a killed run keeps every finished batch and a rerun continues after the last one.
Prompts mix chat requests (topic x task templates, answered through the chat template) with raw
openings continued as plain text, so the activations cover both the chat format and prose.

Sampling uses its own decode loop rather than `generate`: transformers draws each token with
`torch.multinomial`, which fills one exponential random number per vocabulary entry per row
(about a quarter of decode time for a 49k vocabulary on CPU); inverse-CDF sampling (one uniform
per row + `searchsorted` on the cumulative probabilities) draws from the same distribution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import write_text_atomic
from ..checkpoint import Checkpoint, config_key, key_settings
from ..config import Config
from ..errors import SteerscopeError
from ..models.compat import with_cache
from ..progress import bar as progress_bar

TOPICS = (
    "volcanoes",
    "bread baking",
    "the Roman empire",
    "honeybees",
    "chess openings",
    "black holes",
    "tax forms",
    "a rainy harbour town",
    "jazz",
    "photosynthesis",
    "medieval castles",
    "electric cars",
    "friendship",
    "the water cycle",
    "a lost dog",
    "space travel",
    "gardening in winter",
    "the stock market",
    "dinosaurs",
    "a job interview",
    "coral reefs",
    "learning to swim",
    "the printing press",
    "coffee",
    "mountain climbing",
    "a birthday party",
    "vaccines",
    "the French revolution",
    "origami",
    "a haunted library",
    "machine learning",
    "recycling",
    "a train journey",
    "ancient Egypt",
    "penguins",
    "public speaking",
    "the moon landing",
    "a village market",
    "sleep",
    "earthquakes",
    "poetry",
    "a family dinner",
    "solar panels",
    "the ocean floor",
    "a detective",
    "football",
    "spices",
    "the immune system",
    "a thunderstorm",
    "libraries",
    "bicycles",
    "the Silk Road",
    "a robot",
    "cheese",
    "climate",
    "the human heart",
    "a first day at school",
    "glaciers",
    "painting",
    "a small bakery",
    "prime numbers",
    "owls",
    "the internet",
    "a desert",
    "kindness",
    "tea",
)
TASKS = (
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three facts about {}.",
    "Write a poem about {}.",
    "What are the pros and cons of {}?",
    "Describe {} in detail.",
    "Write a diary entry about {}.",
    "What should a beginner know about {}?",
)
OPENINGS = (
    "The history of {} begins",
    "Chapter one. It was",
    "Most people do not realise that {}",
    "Dear friend, I am writing to tell you about {}",
    "In the morning, the",
    "A guide to {}:",
    "Once upon a time, near",
    "Scientists studying {} have found",
)


def corpus_prompts(n: int, seed: int = 0) -> list[tuple[str, bool]]:
    """n (prompt, chat) pairs: half chat requests, half raw openings, shuffled with `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        topic = TOPICS[int(torch.randint(len(TOPICS), (1,), generator=g))]
        if i % 2 == 0:
            out.append((TASKS[int(torch.randint(len(TASKS), (1,), generator=g))].format(topic), True))
        else:
            out.append((OPENINGS[int(torch.randint(len(OPENINGS), (1,), generator=g))].format(topic), False))
    return out


@torch.no_grad()
def sample_batch(lm, texts: list[str], max_new_tokens: int, temperature: float, g: torch.Generator) -> list[str]:
    """Sample a continuation of each (already formatted) text; stops a row at EOS."""
    from transformers import DynamicCache

    tok = lm.tokenizer
    # Left padding: every row's last column is its own last token, so `logits[:, -1]` is each
    # row's next-token distribution (with right padding short rows were sampled at a pad).
    enc = lm.encode(texts, formatted=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos_ids = lm.eos_ids
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)  # empty: rows end at max_new_tokens
    cache = DynamicCache()
    out = lm.forward(ids, mask, **with_cache(lm.model, cache))
    done = torch.zeros(len(texts), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1).cpu()  # (B, V)
        u = torch.rand(len(texts), 1, generator=g)
        nxt = (
            torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True))
            .squeeze(-1)
            .clamp(max=probs.shape[-1] - 1)
        )
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, (~done).long().unsqueeze(-1).to(mask.device)], dim=-1)
        out = lm.forward(nxt.unsqueeze(-1).to(lm.device), mask, **with_cache(lm.model, cache))
    gen = torch.stack(new, dim=1)  # (B, new)
    res = []
    for row in gen.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        res.append(tok.decode(row[:cut], skip_special_tokens=True))
    return res


@dataclass(frozen=True)
class CorpusConfig(Config):
    """What to sample."""

    docs: int = field(default=640, metadata={"min": 1})
    """number of documents (a rerun with more continues the file)"""
    batch_size: int = field(default=64, metadata={"min": 1})
    """documents sampled together (batch b uses seed + b, so it is part of what a resume must match)"""
    max_new_tokens: int = field(default=192, metadata={"min": 1})
    """tokens sampled per document"""
    temperature: float = field(default=0.9, metadata={"min": 1e-6})
    """sampling temperature (> 0)"""
    seed: int = 0
    """random seed"""


def sample_corpus(
    lm, path, cfg: CorpusConfig | None = None, *, progress: bool | None = None, force: bool = False
) -> int:
    """Append sampled documents to the JSONL file `path` until it holds `cfg.docs`; returns the count.

    Resumable: finished batches already in the file are kept and skipped (batch b is sampled with
    seed + b, so a resumed corpus equals an uninterrupted one). A torn last line is dropped. The
    settings are kept with the shared checkpoint helper next to the file: continuing it with other
    settings (or another model) is refused unless `force`, which starts the file over.
    """
    cfg = cfg or CorpusConfig()
    n_docs, batch_size, max_new_tokens, temperature, seed = (
        cfg.docs,
        cfg.batch_size,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.seed,
    )
    path = Path(path)
    state = Checkpoint(
        path.with_name(f".{path.name}.state"),
        config_key(lm.fingerprint, {**key_settings(cfg), "docs": None}),
        "corpus",
        force=force,
    )
    if force:
        path.unlink(missing_ok=True)
    if path.exists() and state.load() is None and path.stat().st_size:
        raise SteerscopeError(
            f"{path} exists and was not made by `steerscope sae corpus`; choose another --out or pass --force."
        )
    state.save({"docs": n_docs})
    raw = path.read_text() if path.exists() else ""
    lines = raw.splitlines()
    texts = []
    for line in lines:
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn write at the end
    done_batches = len(texts) // batch_size
    keep = texts[: done_batches * batch_size]
    if len(keep) != len(lines) or (raw and not raw.endswith("\n")):
        write_text_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in keep))
    prompts = corpus_prompts(max(n_docs, len(keep)), seed)
    n_batches = -(-n_docs // batch_size)
    with (
        progress_bar(n_batches, "sampling corpus", "batch", show=progress, initial=min(done_batches, n_batches)) as bar,
        path.open("a") as f,
    ):
        for b in range(done_batches, n_batches):
            chunk = prompts[b * batch_size : (b + 1) * batch_size]
            # chat requests go through the chat template when the model has one, else stay plain text
            formatted = [lm.format_prompt(p, chat=True) if c and lm.has_chat_template else p for p, c in chunk]
            conts = sample_batch(lm, formatted, max_new_tokens, temperature, torch.Generator().manual_seed(seed + b))
            docs = [(p + "\n" + t if c else p + t) for (p, c), t in zip(chunk, conts)]
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    return n_batches * batch_size
