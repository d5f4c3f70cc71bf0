"""The conditional row of a bench: how selective is a gated (CAST) steering vector?

CAST's claim (Lee et al. 2025) is selectivity: the behaviour shows on prompts about the condition
and not on the others. Given a behaviour vector, a condition (`directions.condition.when_condition`
on a condition set) and two prompt sets, on-topic and off-topic, this generates unsteered,
ungated-steered and gated-steered completions to both sets (two batched `generate` calls) and
reports the share of completions that show the behaviour, per set, plus

    selectivity = rate(on-topic) - rate(off-topic)

for each variant, and for the gated one how often the gate fired per set. An ideal gate keeps
the ungated on-topic rate and the unsteered off-topic rate.

`shows(texts) -> list[bool]` is the judge (in `steerscope bench`, the offline concept judge:
`EmbeddingJudge.shows(concept, EmbeddingJudge.scores(texts)[concept])`). The rows have the shape
of bench's results.jsonl (one per (method, measure)); `conditional_table` prints them. This is a
standalone function, not yet a stage of `steerscope bench`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..directions.vectors import SteeringVector
from ..errors import SteerscopeError
from ..generation import generate
from ..interventions.conditional import Condition

VARIANTS = ("unsteered", "ungated", "gated")


def conditional_rows(
    lm,
    vector: SteeringVector,
    coef: float,
    when: Condition,
    on_topic: Sequence[str],
    off_topic: Sequence[str],
    shows: Callable[[list[str]], list[bool]],
    *,
    concept: str = "",
    max_new_tokens: int = 32,
    chat: bool | None = None,
    system: str | None = None,
) -> list[dict]:
    """Rows {"concept", "method", "multiplier", "measure", "value", "n"}: measures rate_on_topic,
    rate_off_topic, selectivity for each of unsteered/ungated/gated; fired_on_topic and
    fired_off_topic for gated. Greedy decoding."""
    on, off = list(on_topic), list(off_topic)
    if not on or not off:
        raise SteerscopeError("the conditional bench row needs on-topic and off-topic prompts (both non-empty).")
    prompts, n_on = on + off, len(on)
    kw = dict(coef=coef, max_new_tokens=max_new_tokens, chat=chat, system=system, progress=False)
    plain = generate(lm, prompts, vectors=[vector], include_unsteered=True, **kw)  # unsteered, then ungated
    gated = generate(lm, prompts, vectors=[vector], include_unsteered=False, when=when, **kw)
    P = len(prompts)
    by = {"unsteered": plain[:P], "ungated": plain[P:], "gated": gated}
    base = {"concept": concept, "multiplier": coef}
    rows = []
    for name in VARIANTS:
        hits = shows([c.text for c in by[name]])  # (P,) bool
        rate_on, rate_off = sum(hits[:n_on]) / n_on, sum(hits[n_on:]) / (P - n_on)
        for measure, value, n in (
            ("rate_on_topic", rate_on, n_on),
            ("rate_off_topic", rate_off, P - n_on),
            ("selectivity", rate_on - rate_off, P),
        ):
            rows.append({**base, "method": name, "measure": measure, "value": value, "n": n})
    fired = [bool(c.gate_fired) for c in gated]
    rows.append({**base, "method": "gated", "measure": "fired_on_topic", "value": sum(fired[:n_on]) / n_on, "n": n_on})
    rows.append(
        {
            **base,
            "method": "gated",
            "measure": "fired_off_topic",
            "value": sum(fired[n_on:]) / (P - n_on),
            "n": P - n_on,
        }
    )
    return rows


def conditional_table(rows: list[dict]) -> str:
    """A plain-text table: one line per variant, columns on-topic rate, off-topic rate,
    selectivity, and the gate's firing rates."""
    val = {(r["method"], r["measure"]): r["value"] for r in rows}
    out = [f"{'':10} {'on-topic':>9} {'off-topic':>9} {'select.':>8} {'fired on':>9} {'fired off':>9}"]
    for name in VARIANTS:
        cells = [val.get((name, m)) for m in ("rate_on_topic", "rate_off_topic", "selectivity")]
        cells += [val.get((name, m)) for m in ("fired_on_topic", "fired_off_topic")]
        out.append(f"{name:10} " + " ".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in cells))
    return "\n".join(out)
