"""The page of a selection: the effect-vs-KL plot (every candidate, the Pareto frontier, the KL budget
and the rule that set it, incoherent candidates, the choice), the frontier table, and the held-out
evaluation of the chosen direction with examples, as one self-contained HTML page (inline SVG,
nothing fetched)."""

from __future__ import annotations

import math
from html import escape

from . import svg


def _num(x, fmt: str = ".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _plot(sel) -> str:
    key = sel.kl_key
    cands = [c for c in sel.candidates if c.effect is not None]
    if not cands:
        return "<p>No candidate has a measured effect (all were filtered before scoring).</p>"
    W, H, pad = 760, 460, 56

    def kl(c):  # log scale: a zero KL sits at 1e-6
        return max(getattr(c, key), 1e-6)

    budget = None if sel.kl_budget is None else max(sel.kl_budget, 1e-6)
    lo, hi = min(map(kl, cands)), max(map(kl, cands))
    if budget is not None:
        lo, hi = min(lo, budget), max(hi, budget)
    hi = hi if hi > lo else lo * 10  # one KL: a decade to its right
    ys = [c.effect for c in cands] + [0.0]
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    ch = svg.Chart(W, H, svg.log(lo, hi, pad, W - pad), svg.linear(y0, y1, H - pad, pad))
    best = sel.best_candidate
    ch.axes(svg.GREY).hline(0, svg.RULE, "3,3")
    ch.xlabel(f"{key} (nats, log scale)", 13, below=14).ylabel(f"effect on {sel.metric}", 13, x=16)
    x0, x1 = math.log10(lo), math.log10(hi)
    ch.xticks(
        [10.0**e for e in range(math.floor(x0), math.ceil(x1) + 1) if x0 <= e <= x1],
        lambda d: f"1e{round(math.log10(d))}",
        16,
        size=11,
    )
    ch.yticks((y0, (y0 + y1) / 2, y1), lambda v: f"{v:.2f}", x=pad - 6, size=11)
    if budget is not None:
        rule = "auto" if sel.kl_rule.startswith("auto") else "--kl-bound"
        ch.vline(budget, svg.RED, "5,4").text(
            ch.x(budget) + 4, pad + 12, f"KL budget {sel.kl_budget:.3g} ({rule})", 12, fill=svg.RED
        )
    front = sorted([c for c in cands if c.frontier], key=kl)
    if len(front) > 1:
        ch.line([(kl(c), c.effect) for c in front], svg.BLUE)
    for c in cands:
        chosen = best is not None and c.id == best.id
        col = (
            svg.BLUE
            if c.frontier
            else (svg.ORANGE if c.coherent is False else (svg.LIGHT if not c.kept else "#99aabb"))
        )
        tip = (
            f"{c.id} layer {c.layer}: effect {c.effect:.3f}, {key} {getattr(c, key):.3f}"
            + ("" if c.coherence is None else f", coherence {c.coherence:+.2f}")
            + (f" ({c.reason})" if c.reason else "")
        )
        if c.coherent is False:  # incoherent: a hollow orange ring
            ch.dot(kl(c), c.effect, None, 6, tip, svg.ORANGE, 2)
        else:
            ch.dot(kl(c), c.effect, col, 7 if chosen else 4, tip, svg.RED if chosen else None, 3 if chosen else None)
        if c.frontier or chosen:
            ch.text(ch.x(kl(c)) + 8, ch.y(c.effect) - 6, c.id + ("  (chosen)" if chosen else ""), 11)
    key_html = svg.key(
        [
            ("Pareto frontier (coherent, kept)", svg.BLUE),
            ("kept, off the frontier", "#99aabb"),
            ("incoherent: excluded", svg.ORANGE),
            ("filtered out", svg.LIGHT),
            ("chosen (red ring)", svg.RED),
        ]
    )
    return ch.svg() + key_html


def _heldout(sel) -> str:
    ho = sel.heldout
    if ho is None:
        return (
            "<h2>Held-out evaluation</h2><p>None: give <code>--test A_TEST B_TEST</code> or "
            "<code>--test-fraction 0.25</code> to see the chosen direction on prompts selection never saw.</p>"
        )
    rows = "".join(
        f"<tr><td>{escape(c.name)}</td><td>{c.prompts}</td><td>{_num(c.score)}</td><td>{_num(c.logprob, '.2f')}</td>"
        f"<td>{'' if c.coherence is None else f'{c.coherence:+.2f}'}"
        f"{'' if c.coherent else ' <b style=color:#b00>incoherent</b>'}</td></tr>"
        for c in ho.conditions
    )
    ex = "".join(
        f"<tr><td>{escape(c.name)}</td><td>{escape(e['prompt'])}</td><td><pre>{escape(e['text'])}</pre></td></tr>"
        for c in ho.conditions
        for e in c.examples
    )
    note = f"<p>{escape(ho.note)}</p>" if ho.note else ""
    return f"""<h2>Held-out evaluation of {escape(ho.vector_id)}</h2>
<p>{ho.n_a} A and {ho.n_b} B prompts selection never saw ({escape(ho.source)}). Ablation: the direction projected
out at every layer, on A; orthogonalised: projected out of the weights instead (should match ablation); addition:
coef × vector at its layer, on B. Coherence: log-prob per token under the unsteered model minus the less natural
of the two baselines (the model's own replies to A and to B); incoherent rows' metric is no success.</p>{note}
<table><tr><th>condition</th><th>prompts</th><th>{escape(sel.metric)}</th><th>log-prob</th><th>coherence</th></tr>{rows}</table>
<h3>Examples</h3><table class="ex"><tr><th>condition</th><th>prompt</th><th>completion</th></tr>{ex}</table>"""


def render_selection(sel) -> str:
    key = sel.kl_key
    best = sel.best_candidate
    chosen = (
        f"chosen: <b>{escape(best.id)}</b> (layer {best.layer}, effect {_num(best.effect)}, {key} "
        f"{getattr(best, key):.3f}{'' if best.coherence is None else f', coherence {best.coherence:+.2f}'})"
        if best
        else "chosen: none"
    )
    rows = "".join(
        f"<tr><td>{escape(c.id)}</td><td>{c.layer}</td><td>{_num(c.effect)}</td>"
        f"<td>{getattr(c, key):.3f}</td><td>{'' if c.coherence is None else f'{c.coherence:+.2f}'}</td>"
        f"<td>{'chosen' if best is not None and c.id == best.id else ''}</td><td>{escape(c.reason)}</td></tr>"
        for c in sorted(sel.candidates, key=lambda c: getattr(c, key))
        if c.frontier or c.coherent is False or (best is not None and c.id == best.id)
    )
    warn = f'<p style="color:#b00">warning: {escape(sel.warning)}</p>' if sel.warning else ""
    coh = (
        ""
        if sel.baseline_logprob is None
        else f" Coherence: the candidate's completions' log-prob per token under the unsteered model minus the "
        f"less natural of its unsteered replies to A and to B ({sel.baseline_logprob:.2f}); below -{sel.config.incoherent_below:g} a candidate is "
        "<b>incoherent</b> (orange ring): never chosen or recommended, and its metric on broken text does not count "
        "as success."
    )
    budget = "none" if sel.kl_budget is None else f"{sel.kl_budget:.3g}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerscope select: {escape(sel.metric)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ddd;padding:3px 8px;vertical-align:top}}
pre{{margin:0;white-space:pre-wrap;font-size:12px}}{svg.CSS}</style></head><body>
<h1>Effect vs side effect: {escape(sel.metric)}, mode {sel.config.mode}</h1>
<p>baseline on A {sel.baseline_a:.3f}, on B {sel.baseline_b:.3f}; choice: {escape(sel.config.choose)}; {chosen}.</p>
<p>KL budget <b>{budget}</b>: {escape(sel.kl_rule)}.
Blue: the Pareto frontier of the kept candidates (no kept candidate has more effect for less KL).{coh}</p>{warn}
{_plot(sel)}
<h2>Frontier, chosen and incoherent candidates</h2>
<table><tr><th>id</th><th>layer</th><th>effect</th><th>{key}</th><th>coherence</th><th></th><th>note</th></tr>{rows}</table>
{_heldout(sel)}
</body></html>"""
