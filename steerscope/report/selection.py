"""The effect-vs-KL plot of a selection: every candidate, the Pareto frontier, the KL budget and the
choice, as one self-contained HTML page (inline SVG, nothing fetched)."""

from __future__ import annotations

import math
from html import escape

from . import svg


def render_selection(sel) -> str:
    key = sel.kl_key
    cands = [c for c in sel.candidates if c.effect is not None]
    W, H, pad = 760, 460, 56
    if not cands:
        body = "<p>No candidate has a measured effect (all were filtered before scoring).</p>"
    else:

        def kl(c):  # log scale: a zero KL sits at 1e-6
            return max(getattr(c, key), 1e-6)

        lo, hi = min(map(kl, cands)), max(map(kl, cands))
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
        if sel.config.choose == "budget" and max(sel.config.kl_bound, 1e-6) <= hi:
            bound = max(sel.config.kl_bound, 1e-6)
            ch.vline(bound, svg.RED, "5,4").text(
                ch.x(bound) + 4, pad + 12, f"KL budget {sel.config.kl_bound:g}", 12, fill=svg.RED
            )
        front = sorted([c for c in cands if c.frontier], key=kl)
        if len(front) > 1:
            ch.line([(kl(c), c.effect) for c in front], svg.BLUE)
        for c in cands:
            col = (
                svg.BLUE if c.frontier else (svg.LIGHT if not c.kept else "#99aabb")
            )  # kept, off the frontier: pale blue
            chosen = best is not None and c.id == best.id
            tip = f"{c.id} layer {c.layer}: effect {c.effect:.3f}, {key} {getattr(c, key):.3f}" + (
                f" ({c.reason})" if c.reason else ""
            )
            ch.dot(kl(c), c.effect, col, 7 if chosen else 4, tip, svg.RED if chosen else None, 3 if chosen else None)
            if c.frontier:
                ch.text(ch.x(kl(c)) + 8, ch.y(c.effect) - 6, c.id, 11)
        body = ch.svg()
    best = sel.best_candidate
    chosen = (
        f"chosen: <b>{escape(best.id)}</b> (layer {best.layer}, effect {best.effect:.3f}, {key} {getattr(best, key):.3f})"
        if best
        else "chosen: none"
    )
    rows = "".join(
        f"<tr><td>{escape(c.id)}</td><td>{c.layer}</td><td>{'' if c.effect is None else f'{c.effect:.3f}'}</td>"
        f"<td>{getattr(c, key):.3f}</td><td>{'yes' if c.frontier else ''}</td><td>{escape(c.reason)}</td></tr>"
        for c in sorted(sel.candidates, key=lambda c: getattr(c, key))
        if c.frontier
    )
    warn = f'<p style="color:#b00">warning: {escape(sel.warning)}</p>' if sel.warning else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerscope select: {escape(sel.metric)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 8px}}{svg.CSS}</style></head><body>
<h1>Effect vs side effect: {escape(sel.metric)}, mode {sel.config.mode}</h1>
<p>baseline on A {sel.baseline_a:.3f}, on B {sel.baseline_b:.3f}; choice: {sel.config.choose}. {chosen}.
Blue: the Pareto frontier (no candidate has more effect for less KL); grey: filtered out.</p>{warn}
{body}
<h2>Frontier</h2><table><tr><th>id</th><th>layer</th><th>effect</th><th>{key}</th><th>frontier</th><th>note</th></tr>{rows}</table>
</body></html>"""
