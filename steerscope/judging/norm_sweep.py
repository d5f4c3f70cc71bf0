"""Norm sweep: how the target layer and the completions change as R is scaled ("Goldilocks" R).

For each multiple m of the vectors' norms: the mean per-token change at the target layer,
relative to the mean norm of the unsteered target activations, the share of greedy completions
that differ from the unsteered ones, and the number of distinct completions. Too small an R
changes nothing; too large turns text to gibberish; the useful range is in between.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..generation import generate
from ..models.layer_range import LayerRange


@dataclass
class SweepRow:
    multiple: float
    mean_norm: float
    target_change: float  # mean ||Z_t(v) - Z_t(0)|| / mean ||Z_t(0)|| over the method's target tokens
    changed: float  # share of (vector, prompt) completions that differ from the unsteered one
    distinct: int  # distinct completions among all steered rows
    example: str


def norm_sweep(
    lm,
    prompts: list[str],
    vs: VectorSet,
    multiples=(0.25, 0.5, 1.0, 2.0, 4.0),
    *,
    target: int | None = None,
    max_new_tokens: int = 24,
    chat: bool | None = None,
    layer_range: LayerRange | None = None,
    unsteered: list | None = None,
    each: bool = False,
) -> list[SweepRow] | dict[str, list[SweepRow]]:
    """One row per multiple, over all vectors of `vs` (or, with `each`, one list per vector id).
    `layer_range` (same prompts, the vectors' layer -> target) and `unsteered` completions are
    reused when given (a run has both already). Every (multiple, vector, prompt) completion comes
    from one batched generation: a call per multiple cost a second of fixed overhead each."""
    source = vs.layers[0]
    if any(l != source for l in vs.layers):
        raise SteerscopeError("norm_sweep needs vectors at one source layer; pick them with --index.")
    t = target if target is not None else vs.config.hyperparams.get("target", min(lm.n_layers - 1, source + 1))
    if target is None and t <= source:  # a vector placed after the set's target layer (weightdiff --at block)
        t = source + 1
    if t >= lm.n_layers:
        raise SteerscopeError(f"norm_sweep measures the change at a later layer; layer {source} is the model's last.")
    lr = (
        layer_range
        if layer_range is not None and (layer_range.source, layer_range.target) == (source, t)
        else LayerRange(lm, prompts, source, t, chat=chat)
    )
    tmask = lr.target_mask(vs.config.hyperparams.get("target_tokens", "all"))  # (P, T)
    base_norm = lr.z_target.float().norm(dim=-1)[tmask].mean()
    base = (
        unsteered
        if unsteered is not None
        else generate(lm, prompts, max_new_tokens=max_new_tokens, chat=chat, progress=False)
    )
    multiples = [float(m) for m in multiples]
    res = generate(
        lm,
        prompts,
        vectors=[sv for _ in multiples for sv in vs],
        coef=[m for m in multiples for _ in vs],
        max_new_tokens=max_new_tokens,
        chat=chat,
        include_unsteered=False,
        progress=False,
    )
    P, K = len(prompts), len(vs)
    groups = {vid: [[vid] for _ in multiples] for vid in vs.ids} if each else {"": [list(vs.ids) for _ in multiples]}
    out: dict[str, list[SweepRow]] = {}
    for key, per_m in groups.items():
        out[key] = []
        for j, (m, ids) in enumerate(zip(multiples, per_m)):
            keep = [k for k, vid in enumerate(vs.ids) if vid in ids]
            sub = [res[(j * K + k) * P + p] for k in keep for p in range(P)]  # rows: multiple, vector, prompt
            with torch.no_grad():
                delta = lr.delta(vs.vectors[keep].to(lm.device) * m).norm(dim=-1)  # (k*P, T)
            change = float(delta[tmask.repeat(len(keep), 1)].mean() / base_norm)
            changed = sum(r.token_ids != base[r.prompt_index].token_ids for r in sub) / len(sub)
            out[key].append(
                SweepRow(
                    m,
                    float(vs.vectors[keep].norm(dim=-1).mean()) * m,
                    change,
                    changed,
                    len({tuple(r.token_ids) for r in sub}),
                    sub[0].text[:80],
                )
            )
    return out if each else out[""]


def format_sweep(rows: list[SweepRow]) -> str:
    head = f"{'x R':>6} {'|v|':>8} {'target change':>14} {'changed':>8} {'distinct':>9}  example (vector 0, prompt 0)"
    lines = [head] + [
        f"{r.multiple:>6g} {r.mean_norm:>8.3g} {r.target_change:>14.3f} {r.changed:>8.0%} {r.distinct:>9}  {r.example!r}"
        for r in rows
    ]
    return "\n".join(lines)


def sweep_to_dicts(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
