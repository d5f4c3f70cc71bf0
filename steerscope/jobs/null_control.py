"""The opt-in control of `steerscope run --null-model shuffle|reinit`: the same discovery on a copy
of the model with destroyed block weights (`models.null`), and a comparison of how natural and
coherent the completions elicited in the real model and in the copy are.

Measured per set of steered completions (each model's own learned vectors, the run's prompts):
    logprob_real   mean log p per token under the unsteered *real* model: natural language scores high
    distinct2      share of distinct token bigrams: repetition loops score low
    changed        share of completions that differ from that model's own unsteered completion
The copy's discovery calibrates its own R (its nonlinearity differs), with the run's method and
settings otherwise.
"""

from __future__ import annotations

import dataclasses

from ..directions.discovery import discover
from ..generation import generate
from ..judging.vector_metrics import completion_logprobs, distinct_n, nanmean


def _summary(lm, steered: list, unsteered: list, chat) -> dict:
    base = {c.prompt_index: c.text for c in unsteered}
    lp = completion_logprobs(lm, [c.prompt for c in steered], [c.token_ids for c in steered], chat=chat)
    lp0 = completion_logprobs(lm, [c.prompt for c in unsteered], [c.token_ids for c in unsteered], chat=chat)
    return {
        "completions": len(steered),
        "logprob_real": nanmean(lp),
        "logprob_real_unsteered": nanmean(lp0),
        "distinct2": nanmean([distinct_n(c.token_ids) for c in steered]),
        "changed": nanmean([float(c.text != base[c.prompt_index]) for c in steered]),
    }


def null_control(lm, cfg, train: list[str], prompts: list[str], real_completions: list, log) -> dict:
    """Discover on a null copy of `lm` and compare with the real model's learned completions
    (`real_completions`: the run's Completion rows, learned and unsteered only)."""
    from ..models.null import null_copy

    chat = cfg.discover.chat
    null = null_copy(lm, cfg.null_model, seed=cfg.discover.seed)
    d = dataclasses.replace(cfg.discover, R=None)  # the copy's own calibrated R
    log(f"null-model control: {d.method} on a copy with {cfg.null_model}d block weights")
    rank = None
    if cfg.keep_by == "completions":  # the same rule as the real run, judged by the copy itself
        from ..judging.keep import completion_ranker

        rank = completion_ranker(
            null, train, d.resolve_layers(null.n_layers)[0], chat=chat, max_new_tokens=cfg.max_new_tokens
        )
    vs = discover(null, train, d, rank=rank)
    comps = generate(null, prompts, vectors=vs, include_unsteered=True, max_new_tokens=cfg.max_new_tokens, chat=chat)
    del null
    real = _summary(
        lm,
        [c for c in real_completions if c.vector_id is not None],
        [c for c in real_completions if c.vector_id is None],
        chat,
    )
    ctrl = _summary(lm, [c for c in comps if c.vector_id is not None], [c for c in comps if c.vector_id is None], chat)
    ex = [{"vector": c.vector_id, "prompt": c.prompt, "text": c.text} for c in comps if c.vector_id is not None][:6]
    return {
        "kind": cfg.null_model,
        "R": vs.config.hyperparams.get("R"),
        "vectors": len(vs),
        "real": real,
        "null": ctrl,
        "examples": ex,
    }
