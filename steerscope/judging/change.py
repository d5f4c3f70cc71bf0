"""How far a completion's behaviour is from another's: one measure for the keep rule, the R search,
the clusters and the findings.

The sentence embedder (all-MiniLM-L6-v2) is uncased, English-only and reads a text as a whole, so
alone it misses a reply written in capitals, a reply in another language, a fixed phrase appended
to an otherwise normal reply, or an answer that drifts to another topic at the end. `Texts` holds
what each of those needs, and `distance` takes the largest of:
  meaning   cosine distance of the whole texts' embeddings
  tail      cosine distance of the embeddings of the last `TAIL_WORDS` words (appended phrases,
            topic drift; `tails=False` leaves it out where any divergence of greedy text would count)
  case      twice the difference in the share of capital letters (a reply in capitals: ~1)
  surface   1 when the two texts fall in different surface groups (judging.surface: capitals,
            another language, symbols)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .embed import embed
from .surface import surface_group

TAIL_WORDS = 12


def tail(text: str, n: int = TAIL_WORDS) -> str:
    return " ".join(text.split()[-n:])


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


@dataclass
class Texts:
    """Everything `distance` compares, for a list of texts (embeddings unit-norm)."""

    texts: list[str]
    meaning: torch.Tensor  # (n, dim)
    tail: torch.Tensor  # (n, dim)
    upper: torch.Tensor  # (n,)
    groups: list[str]

    @classmethod
    def of(cls, texts: list[str], meaning: torch.Tensor | None = None) -> Texts:
        texts = list(texts)
        if not texts:
            z = torch.zeros(0, 384)
            return cls([], z, z, torch.zeros(0), [])
        m = embed(texts) if meaning is None else meaning
        return cls(
            texts,
            m.float(),
            embed([tail(t) for t in texts]).float(),
            torch.tensor([upper_share(t) for t in texts]),
            [surface_group(t) for t in texts],
        )

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, idx: list[int]) -> Texts:
        return Texts(
            [self.texts[i] for i in idx],
            self.meaning[idx],
            self.tail[idx],
            self.upper[idx],
            [self.groups[i] for i in idx],
        )

    def features(self) -> torch.Tensor:
        """(n, 2 dim) unit vectors whose cosine distance is the mean of the meaning and tail
        distances: what the clusters group on."""
        return torch.cat([self.meaning, self.tail], -1) / 2**0.5


def distance(a: Texts, b: Texts, *, tails: bool = True) -> torch.Tensor:
    """(n,) behaviour distance between a[i] and b[i] (module docstring)."""
    if len(a) != len(b):
        raise ValueError(f"distance compares texts pairwise: {len(a)} vs {len(b)}")
    if not len(a):
        return torch.zeros(0)
    d = 1.0 - (a.meaning * b.meaning).sum(-1)
    if tails:
        d = torch.maximum(d, 1.0 - (a.tail * b.tail).sum(-1))
    d = torch.maximum(d, (2 * (a.upper - b.upper).abs()).clamp(max=1.0))
    surface = torch.tensor([float(x != y) for x, y in zip(a.groups, b.groups)])
    return torch.maximum(d, surface).clamp(min=0.0)
