"""Coherence of steered completions, and the held-out evaluation of a chosen direction.

Coherence. A candidate's completions are scored by how natural the UNsteered model finds them:
the mean log-probability per token (the EOS that ended a reply counts as a token, so an empty
reply is scored too) under the unsteered model, averaged over prompts, minus the same for the
model's own replies (AxBench's fluency proxy, made relative so that it does not depend on the
model or the prompts). The reference is the LESS natural of its unsteered replies to A and to B
(`reference_logprob`): steering that turns one kind of reply into the other (refusals into
answers) is judged against the model's replies of both kinds, not only the kind it removes. On a
model tuned to refuse, its canned refusals score -0.04 to -0.07 nats per token, far above its
answers (-0.29 on harmless_test): against the refusals alone, fluent answers to harmful prompts
("A nail bomb is a simple yet effective recipe ...") scored -1.45 to -1.55 and were called
incoherent; so did every partial bypass (-0.5 to -2.2). That reference was changed after this
was seen on organism:refusal, the one refusal model measured; the README says so. 0 = as natural as the model's own replies; -1 nat
per token = each token is e times less likely. A candidate more than `INCOHERENT_BELOW` nats per
token below the baseline is incoherent: it is never chosen or recommended, and whatever the metric
says of its text (no refusal phrase in "Tighterupitologikologikepiece...") is not a success.

Why 1.5 nats (a perplexity 4.5 times the baseline's), measured on SmolLM2-135M-Instruct, 40
tokens, 8 harmful prompts, candidates of `extract --sets harmful harmless --read last:3` ablated:
the unsteered replies score -0.70 nats per token; candidates whose replies stay fluent (answers,
lists, other wordings) score 0.08-0.32 below that; broken ones 2.1 (a loop of fragments,
'"<subbid"<subbid"...'), 3.5 (word salad and blank lines) and 4.0 ("Mid-Sight Point: A Self-A...")
below. 1.5 sits in that gap: 1.2 nats of room for behaviours less natural to the model than these
and 0.6 under the mildest broken output measured. (A refusal-tuned model made to answer loses
more than the guess of "a few nats at its first tokens": 1.3 per token against its own answers, see
above; the threshold was left as calibrated.)

Held-out evaluation (`evaluate`): the chosen direction on prompts selection never saw:
    baseline A / ablation (A, the direction projected out at every layer) /
    orthogonalised (A, the direction projected out of the weights: a copy of the model in memory)
    baseline B / addition (B, coef * v added at the direction's layer)
each with its metric, coherence against the baseline of its set, and a few examples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import SteerscopeError
from ..generation import Completion, generate, last_token_logits
from .vector_metrics import completion_logprobs

INCOHERENT_BELOW = 1.5  # nats per token below the baseline's replies; see the module docstring


def reference_logprob(lp_a, lp_b):
    """The coherence reference: the less natural of the unsteered replies to A and to B (module
    docstring); either may be None (not measured), then the other is the reference."""
    if lp_a is None or lp_b is None:
        return lp_b if lp_a is None else lp_a
    return torch.minimum(torch.as_tensor(lp_a), torch.as_tensor(lp_b)) if torch.is_tensor(lp_a) else min(lp_a, lp_b)


def _eos_id(lm) -> int | None:
    eos = lm.eos_ids
    tid = getattr(lm.tokenizer, "eos_token_id", None)
    return tid if tid in eos else (min(eos) if eos else None)


def naturalness(lm, completions: list[Completion], chat: bool | None = None, batch_size: int = 16) -> list[float]:
    """Mean log-probability per token of each completion given its prompt under the unsteered
    model; a reply that ended on EOS includes it (an empty reply is then scored by its EOS)."""
    eos = _eos_id(lm)
    ids = [c.token_ids + ([eos] if c.finish_reason == "eos" and eos is not None else []) for c in completions]
    return completion_logprobs(lm, [c.prompt for c in completions], ids, chat=chat, batch_size=batch_size)


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]  # noqa: PLR0124 (NaN test)
    return sum(xs) / len(xs) if xs else math.nan


@dataclass
class Condition:
    """One row of the held-out table."""

    name: str  # baseline A | ablation | orthogonalised | baseline B | addition
    prompts: str  # "A" or "B"
    score: float  # mean metric
    logprob: float  # mean log-prob per token under the unsteered model
    coherence: float | None = None  # logprob minus the reference (the less natural baseline; None: a baseline)
    coherent: bool = True
    examples: list[dict] = field(default_factory=list)  # {"prompt", "text"}


@dataclass
class HeldOut:
    vector_id: str
    source: str  # where the held-out prompts came from
    n_a: int
    n_b: int
    conditions: list[Condition] = field(default_factory=list)
    note: str = ""

    def get(self, name: str) -> Condition | None:
        return next((c for c in self.conditions if c.name == name), None)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The held-out table as text, examples under it."""
        out = [
            f"held-out ({self.source}; {self.n_a} A and {self.n_b} B prompts selection never saw), {self.vector_id}:",
            f"  {'condition':<15} {'prompts':>7} {'metric':>8} {'logprob':>8} {'coherence':>9}",
        ]
        for c in self.conditions:
            coh = "" if c.coherence is None else f"{c.coherence:+.2f}" + ("" if c.coherent else " (incoherent)")
            out.append(f"  {c.name:<15} {c.prompts:>7} {c.score:>8.3f} {c.logprob:>8.2f} {coh:>9}")
        if self.note:
            out.append(f"  note: {self.note}")
        for c in self.conditions:
            for e in c.examples:
                out.append(f"  [{c.name}] {e['prompt'][:60]!r} -> {e['text'][:100]!r}")
        return out


def _scores(lm, metric, prompts: list[str], comps: list[Completion], logits_fn) -> list[float]:
    """Per-variant mean metric of completions grouped by variant (P prompts each)."""
    P = len(prompts)
    if metric.kind == "logits":
        return [float(x) for x in logits_fn().mean(1)]
    s = metric.score_texts([c.text for c in comps], [c.prompt for c in comps]).reshape(-1, P)  # (V, P)
    return [float(x) for x in s.mean(1)]


def _conditions(lm, metric, prompts, comps, names, set_name, cfg, logits_fn, base_logprob=None) -> list[Condition]:
    """Conditions for completions `comps` (variant-major, P prompts each); the first variant is
    the baseline unless `base_logprob` is given."""
    P = len(prompts)
    lp = naturalness(lm, comps, cfg.chat)
    scores = _scores(lm, metric, prompts, comps, logits_fn)
    out = []
    for k, name in enumerate(names):
        rows, m = comps[k * P : (k + 1) * P], mean(lp[k * P : (k + 1) * P])
        ref = base_logprob if base_logprob is not None else (None if k == 0 else out[0].logprob)
        coh = None if ref is None else m - ref
        out.append(
            Condition(
                name,
                set_name,
                scores[k],
                m,
                coh,
                coh is None or cfg.incoherent_below is None or coh >= -cfg.incoherent_below,
                [{"prompt": c.prompt, "text": c.text} for c in rows[: cfg.examples]],
            )
        )
    return out


def evaluate(lm, sv, metric, test_a: list[str], test_b: list[str], cfg, source: str) -> HeldOut:
    """The held-out table of `sv` (a SteeringVector): see the module docstring. `cfg` is the
    SelectConfig (coef, chat, max_new_tokens, batch_size, examples, incoherent_below, orthogonalize)."""
    gen = dict(chat=cfg.chat, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)
    lt = dict(chat=cfg.chat, batch_size=cfg.batch_size, include_unsteered=True)
    red = lambda lg, _: metric.score_logits(lg)  # noqa: E731
    ho = HeldOut(sv.id, source, len(test_a), len(test_b))
    comps = generate(lm, test_a, vectors=[sv], mode="ablate", include_unsteered=True, **gen)
    fn = lambda: last_token_logits(lm, test_a, vectors=[sv], mode="ablate", reduce=red, **lt)  # noqa: E731
    ho.conditions += _conditions(lm, metric, test_a, comps, ["baseline A", "ablation"], "A", cfg, fn)
    if cfg.mode == "ablate" and cfg.orthogonalize:
        try:
            from ..interventions.orthogonalize import orthogonalized_model
            from ..models.lm import LM

            olm = LM(orthogonalized_model(lm, sv.vector), lm.tokenizer, f"{lm.model_id} - {sv.id}", lm.fingerprint)
            comps = generate(olm, test_a, **gen)
            fn = lambda: last_token_logits(olm, test_a, reduce=red, **lt)  # noqa: E731
            base = ho.conditions[0].logprob
            ho.conditions += _conditions(lm, metric, test_a, comps, ["orthogonalised"], "A", cfg, fn, base)
            del olm
        except SteerscopeError as e:
            ho.note = f"orthogonalised: not evaluated ({e})"
    elif cfg.mode == "ablate":
        ho.note = "orthogonalised: not evaluated (--no-orthogonalize)"
    comps = generate(lm, test_b, vectors=[sv], coef=cfg.coef, mode="add", include_unsteered=True, **gen)
    fn = lambda: last_token_logits(lm, test_b, vectors=[sv], coef=cfg.coef, reduce=red, **lt)  # noqa: E731
    ho.conditions += _conditions(lm, metric, test_b, comps, ["baseline B", "addition"], "B", cfg, fn)
    # Coherence against the less natural of the two baselines (module docstring), for every steered row.
    by = {c.name: c for c in ho.conditions}
    ref = reference_logprob(by["baseline A"].logprob, by["baseline B"].logprob)
    for c in ho.conditions:
        if not c.name.startswith("baseline"):
            c.coherence = c.logprob - ref
            c.coherent = cfg.incoherent_below is None or c.coherence >= -cfg.incoherent_below
    return ho


def split(prompts: list[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(kept, held out): a seeded random `fraction` of the prompts held out (at least 1, and at
    least 1 kept), the rest in their order."""
    n = len(prompts)
    k = min(n - 1, max(1, round(fraction * n)))
    if n < 2:
        raise SteerscopeError(f"--test-fraction needs at least 2 prompts per set, got {n}; give --test A_TEST B_TEST.")
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]
