"""Which discovered candidates to keep: those that change what the model says, in a way natural to it.

Output-KL discovery (directions.discovery.kl) trains 3 candidates per vector kept, because which
local maximum a start lands in is luck: on the model organisms a few starts land in the planted
mode, many in degenerate ones ("a Shelf of the Shelf", " I I I I"), many in mild rewordings of the
unsteered reply. This ranks candidates by the completions they produce on the training prompts:

    score = change - NATURALNESS_WEIGHT * surprise

    change    mean behaviour distance between the steered and the unsteered completion, per prompt
              (judging.change: meaning, the last words, case, surface group): how far the vector
              moves what is said
    surprise  minus the mean log-probability per token of the steered completion under the
              unsteered model: how unnatural the model finds it

A planted behaviour is one the model was trained to produce, so it is *natural* to the model (low
surprise: 0.7-2.3 nats per token on the organisms, against a median near 1.5 for all candidates)
yet far from its default reply; degenerate loops and word salad are far but unnatural, rewordings
natural but near. The same two numbers make a finding's "how far from unsteered" and
"naturalness" in the report (judging.findings), so what the run keeps is what its report ranks.

Measured offline on 11 draws of 24 kl candidates (3 organisms, seeds 0-2, bfloat16, 1 x the
calibrated R): of the 21 candidates that showed the planted behaviour on at least 2 of 4 prompts,
the 8 kept per draw by this score held 18 (weights 0.1-0.3 held 17-18; change alone 14; the
8 with the most steered entropy, the previous rule, 8). It costs one batched greedy generation of
every candidate on the training prompts (8.4 s for 24 candidates and 2 prompts, bfloat16, 2 CPU cores).
"""

from __future__ import annotations

import math

import torch

from ..generation import generate
from .change import Texts, distance
from .vector_metrics import completion_logprobs

NATURALNESS_WEIGHT = 0.2  # per nat of surprise; 0.1-0.3 kept the same planted candidates (above)


class CompletionRanker:
    """Callable (n, d) vectors -> (n,) scores, higher kept; `last` holds the per-candidate
    change, surprise and completions of the latest call, to inspect why a candidate was kept."""

    def __init__(
        self,
        lm,
        prompts: list[str],
        layer: int,
        *,
        chat: bool | None = None,
        max_new_tokens: int = 32,
        naturalness_weight: float = NATURALNESS_WEIGHT,
    ):
        self.lm, self.prompts, self.layer, self.chat = lm, list(prompts), layer, chat
        self.max_new_tokens, self.weight = max_new_tokens, naturalness_weight
        self.last: dict = {}

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        P = len(self.prompts)
        rows = generate(
            self.lm,
            self.prompts,
            vectors=vectors,
            layer=self.layer,
            include_unsteered=True,
            max_new_tokens=self.max_new_tokens,
            chat=self.chat,
        )  # shown: tens of seconds for kl's 24
        steered = rows[P:]  # the P unsteered rows come first, then vector by vector, prompt by prompt
        rep = Texts.of([r.text for r in rows])  # P unsteered, then n * P steered
        n = len(vectors)
        change = distance(rep.select(list(range(P, len(rows)))), rep.select([i % P for i in range(n * P)])).view(n, P)
        lp = completion_logprobs(self.lm, [r.prompt for r in steered], [r.token_ids for r in steered], chat=self.chat)
        # An empty completion (EOS at once) has no log-probability; it is ranked as unnatural.
        surprise = torch.tensor([-x if math.isfinite(x) else 10.0 for x in lp]).view(n, P)  # (n, P) nats
        score = change.mean(-1) - self.weight * surprise.mean(-1)  # (n,)
        self.last = {
            "change": change.mean(-1).tolist(),
            "surprise": surprise.mean(-1).tolist(),
            "texts": [[r.text for r in steered[i * P : (i + 1) * P]] for i in range(n)],
        }
        return score


def completion_ranker(lm, prompts: list[str], layer: int, **kw) -> CompletionRanker:
    """The ranker `discover(..., rank=...)` takes: candidates scored by their completions on `prompts`."""
    return CompletionRanker(lm, prompts, layer, **kw)
