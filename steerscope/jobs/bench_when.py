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
of bench's results.jsonl (one per (method, measure)); `conditional_table` prints them.

In `steerscope bench --when FOLDER --on-topic SET --off-topic SET`, this is the stage
"when:NAME" per concept (`conditional_stage`, artifact conditional/NAME.json): every vector arm of
the concept at its matched coefficient, judged by the bench's offline concept judge. The flags are
checked before the model loads (`validate_when`) and the condition against the model and the
steering layers before the first stage (`bench_condition`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .._io import write_json_atomic
from ..directions.condition import When, load_when
from ..directions.data import load_prompts
from ..directions.vectors import SteeringVector
from ..errors import SteerscopeError
from ..generation import generate
from ..interventions.conditional import Condition
from .stages import Stage

VARIANTS = ("unsteered", "ungated", "gated")


def conditional_completions(
    lm,
    vector: SteeringVector,
    coef: float,
    when: Condition,
    on_topic: Sequence[str],
    off_topic: Sequence[str],
    *,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    system: str | None = None,
) -> dict:
    """The completions behind the conditional rows: {"n_on": int, "texts": {variant: [P texts]},
    "fired": [P bools], "scores": [P gate scores]}, prompts on-topic first. Greedy decoding."""
    on, off = list(on_topic), list(off_topic)
    if not on or not off:
        raise SteerscopeError("the conditional bench row needs on-topic and off-topic prompts (both non-empty).")
    prompts = on + off
    kw = dict(coef=coef, max_new_tokens=max_new_tokens, chat=chat, system=system, progress=False)
    plain = generate(lm, prompts, vectors=[vector], include_unsteered=True, **kw)  # unsteered, then ungated
    gated = generate(lm, prompts, vectors=[vector], include_unsteered=False, when=when, **kw)
    P = len(prompts)
    by = {"unsteered": plain[:P], "ungated": plain[P:], "gated": gated}
    return {
        "n_on": len(on),
        "texts": {name: [c.text for c in by[name]] for name in VARIANTS},
        "fired": [bool(c.gate_fired) for c in gated],
        "scores": [float(c.gate_score) for c in gated],
    }


def conditional_rates(comps: dict, shows: Callable[[list[str]], list[bool]], *, concept: str = "", coef=None):
    """Rows {"concept", "method", "multiplier", "measure", "value", "n"} from
    `conditional_completions`: measures rate_on_topic, rate_off_topic, selectivity for each of
    unsteered/ungated/gated; fired_on_topic and fired_off_topic for gated."""
    n_on, P = comps["n_on"], len(comps["fired"])
    base = {"concept": concept, "multiplier": coef}
    rows = []
    for name in VARIANTS:
        hits = shows(comps["texts"][name])  # (P,) bool
        rate_on, rate_off = sum(hits[:n_on]) / n_on, sum(hits[n_on:]) / (P - n_on)
        for measure, value, n in (
            ("rate_on_topic", rate_on, n_on),
            ("rate_off_topic", rate_off, P - n_on),
            ("selectivity", rate_on - rate_off, P),
        ):
            rows.append({**base, "method": name, "measure": measure, "value": value, "n": n})
    fired = comps["fired"]
    for measure, part, n in (("fired_on_topic", fired[:n_on], n_on), ("fired_off_topic", fired[n_on:], P - n_on)):
        rows.append({**base, "method": "gated", "measure": measure, "value": sum(part) / n, "n": n})
    return rows


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
    """`conditional_rates` of `conditional_completions` (see both)."""
    comps = conditional_completions(
        lm, vector, coef, when, on_topic, off_topic, max_new_tokens=max_new_tokens, chat=chat, system=system
    )
    return conditional_rates(comps, shows, concept=concept, coef=coef)


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


# ---- the bench stage ----------------------------------------------------------------------------
NOT_VECTORS = ("prompting", "distill")  # methods without a steering vector to gate


def validate_when(cfg) -> tuple[list[str], list[str]] | None:
    """Before the model loads: the conditional stage's flags; its (on-topic, off-topic) prompts,
    or None without --when."""
    given = [
        flag
        for flag, v in (
            ("--when-layer", cfg.when_layer),
            ("--when-threshold", cfg.when_threshold),
            ("--on-topic", cfg.on_topic),
            ("--off-topic", cfg.off_topic),
        )
        if v is not None
    ]
    if cfg.when is None:
        if given:
            raise SteerscopeError(f"{', '.join(given)} only apply with --when FOLDER (a condition set); add it.")
        return None
    if cfg.on_topic is None or cfg.off_topic is None:
        raise SteerscopeError(
            "--when needs --on-topic SET and --off-topic SET (prompt sets, names or files): "
            "the prompts the gate should fire on and those it should not."
        )
    if not (Path(cfg.when) / "config.json").is_file():
        raise SteerscopeError(
            f"--when {cfg.when}: not a vector-set folder (no config.json); give a condition set made by "
            "`steerscope condition`."
        )
    if all(m in NOT_VECTORS for m in cfg.methods):
        raise SteerscopeError("--when gates steering vectors, but --methods lists none; add e.g. diffmean.")
    return tuple(_topic(getattr(cfg, k), f"--{k.replace('_', '-')}", cfg.n_topic) for k in ("on_topic", "off_topic"))


def _topic(spec: str, flag: str, n: int) -> list[str]:
    try:
        return load_prompts(spec)[:n]
    except SteerscopeError as e:
        raise SteerscopeError(f"{flag} {spec}: {e}") from None


def bench_condition(cfg, lm, layers: dict[str, int]) -> Condition:
    """After the model loads, before any stage: the condition --when asks for, read at or before
    every layer a method steers at (`layers`: method -> layer)."""
    cond = load_when(cfg.when, lm, When(cfg.when, cfg.when_layer, cfg.when_threshold))
    late = sorted((layer, m) for m, layer in layers.items() if layer < cond.layer)
    if late:
        layer, m = late[0]
        raise SteerscopeError(
            f"--when-layer: the condition layer {cond.layer} comes after layer {layer}, where {m} steers; the gate is "
            f"read on the prompt before steering, so give --when-layer {layer} or lower."
        )
    return cond


def conditional_stage(concept) -> Stage:
    def save(res: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, res)

    return Stage(
        f"when:{concept.name}",
        f"conditional/{concept.name}.json",
        lambda ctx: bench_conditional(ctx, concept),
        save,
        lambda p, ctx: json.loads(p.read_text()),
    )


def bench_conditional(ctx, concept) -> dict:
    """Every vector arm of the concept (its saved vector at its matched coefficient) through
    `conditional_rows`, judged by the bench's concept judge."""
    from safetensors.torch import load_file

    cfg, cond = ctx.cfg, ctx.condition
    res = ctx.artifacts[f"concept:{concept.name}"]
    on, off = ctx.topics
    vecs = [m for m, r in res["methods"].items() if r.get("kind") == "vector"]
    tensors = load_file(str(ctx.folder.path(f"concepts/{concept.name}.safetensors"))) if vecs else {}

    def shows(texts: list[str]) -> list[bool]:
        return ctx.judge.shows(concept.name, ctx.judge.scores(texts)[concept.name])

    out = {
        "concept": concept.name,
        "condition": {
            "folder": cfg.when,
            "layer": cond.layer,
            "threshold": float(cond.threshold),
            "above": bool(cond.above),
        },
        "on_topic": {"set": cfg.on_topic, "n": len(on)},
        "off_topic": {"set": cfg.off_topic, "n": len(off)},
        "methods": {},
    }
    for m in vecs:
        r = res["methods"][m]
        comps = conditional_completions(
            ctx.lm,
            SteeringVector(tensors[m], r["layer"], m),
            r["coef"],
            cond,
            on,
            off,
            max_new_tokens=cfg.max_new_tokens,
        )
        rows = conditional_rates(comps, shows, concept=concept.name, coef=r["coef"])
        out["methods"][m] = {
            "coef": r["coef"],
            "layer": r["layer"],
            "kl": r["kl"],
            "values": {f"{x['method']}.{x['measure']}": x["value"] for x in rows},
            **comps,
        }
    return out


def conditional_result_rows(ctx, settings: dict) -> list[dict]:
    """results.jsonl rows of the conditional stage: one per (concept, method, variant, measure);
    measures cast_rate_on_topic, cast_rate_off_topic, cast_selectivity, cast_fired_on_topic,
    cast_fired_off_topic."""
    rows = []
    for c in ctx.concepts:
        res = ctx.artifacts.get(f"when:{c.name}")
        if res is None:
            continue
        cond = res["condition"]
        n = {"on_topic": res["on_topic"]["n"], "off_topic": res["off_topic"]["n"]}
        for m, r in res["methods"].items():
            for key, value in r["values"].items():
                variant, measure = key.split(".", 1)
                split = next((k for k in n if measure.endswith(k)), "on_topic+off_topic")
                rows.append(
                    {
                        "concept": c.name,
                        "method": m,
                        "variant": variant,
                        "layer": r["layer"],
                        "coef": r["coef"],
                        "kl_p": r["kl"],
                        "multiplier": 1.0,
                        "measure": f"cast_{measure}",
                        "value": value,
                        "judge": "the gate (cosine at the condition layer)"
                        if measure.startswith("fired")
                        else ctx.judge.name,
                        "split": split,
                        "n": n[split] if split in n else n["on_topic"] + n["off_topic"],
                        "on_topic": res["on_topic"]["set"],
                        "off_topic": res["off_topic"]["set"],
                        "condition": cond["folder"],
                        "condition_layer": cond["layer"],
                        "condition_threshold": cond["threshold"],
                        "condition_above": cond["above"],
                        **settings,
                    }
                )
    return rows
