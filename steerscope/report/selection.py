"""The effect-vs-KL plot of a selection: every candidate, the Pareto frontier, the KL budget and the
choice, as one self-contained HTML page (inline SVG, nothing fetched)."""

from __future__ import annotations

import math
from html import escape


def render_selection(sel) -> str:
    key = sel.kl_key
    cands = [c for c in sel.candidates if c.effect is not None]
    W, H, pad = 760, 460, 56
    if not cands:
        body = "<p>No candidate has a measured effect (all were filtered before scoring).</p>"
    else:
        kls = [max(getattr(c, key), 1e-6) for c in cands]
        lx = [math.log10(k) for k in kls]
        x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
        ys = [c.effect for c in cands] + [0.0]
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        X = lambda v: pad + (math.log10(max(v, 1e-6)) - x0) / (x1 - x0) * (W - 2 * pad)  # noqa: E731
        Y = lambda v: H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad)  # noqa: E731
        best = sel.best_candidate
        parts = [f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="#888"/>',
                 f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="#888"/>',
                 f'<line x1="{pad}" y1="{Y(0):.1f}" x2="{W - pad}" y2="{Y(0):.1f}" stroke="#ccc" stroke-dasharray="3,3"/>',
                 f'<text x="{W / 2}" y="{H - 14}" text-anchor="middle" font-size="13">{key} (nats, log scale)</text>',
                 f'<text x="16" y="{H / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 16 {H / 2})">'
                 f'effect on {escape(sel.metric)}</text>']
        for e in range(math.floor(x0), math.ceil(x1) + 1):
            if x0 <= e <= x1:
                px = pad + (e - x0) / (x1 - x0) * (W - 2 * pad)
                parts.append(f'<text x="{px:.1f}" y="{H - pad + 16}" text-anchor="middle" font-size="11">1e{e}</text>')
        for v in (y0, (y0 + y1) / 2, y1):
            parts.append(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.2f}</text>')
        if sel.config.choose == "budget" and math.log10(max(sel.config.kl_bound, 1e-6)) <= x1:
            bx = X(sel.config.kl_bound)
            parts.append(f'<line x1="{bx:.1f}" y1="{pad}" x2="{bx:.1f}" y2="{H - pad}" stroke="#e15759" stroke-dasharray="5,4"/>'
                         f'<text x="{bx + 4:.1f}" y="{pad + 12}" font-size="12" fill="#e15759">KL budget {sel.config.kl_bound:g}</text>')
        front = sorted([c for c in cands if c.frontier], key=lambda c: getattr(c, key))
        if len(front) > 1:
            pts = " ".join(f"{X(getattr(c, key)):.1f},{Y(c.effect):.1f}" for c in front)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="#4e79a7" stroke-width="2"/>')
        for c in cands:
            color = "#4e79a7" if c.frontier else ("#bbb" if not c.kept else "#9ab")
            r = 7 if best is not None and c.id == best.id else 4
            stroke = ' stroke="#e15759" stroke-width="3"' if r == 7 else ""
            parts.append(f'<circle cx="{X(getattr(c, key)):.1f}" cy="{Y(c.effect):.1f}" r="{r}" fill="{color}"{stroke}>'
                         f'<title>{escape(c.id)} layer {c.layer}: effect {c.effect:.3f}, {key} {getattr(c, key):.3f}'
                         f'{" (" + escape(c.reason) + ")" if c.reason else ""}</title></circle>')
            if c.frontier:
                parts.append(f'<text x="{X(getattr(c, key)) + 8:.1f}" y="{Y(c.effect) - 6:.1f}" font-size="11">{escape(c.id)}</text>')
        body = f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}">{"".join(parts)}</svg>'
    best = sel.best_candidate
    chosen = (f"chosen: <b>{escape(best.id)}</b> (layer {best.layer}, effect {best.effect:.3f}, {key} {getattr(best, key):.3f})"
              if best else "chosen: none")
    rows = "".join(f"<tr><td>{escape(c.id)}</td><td>{c.layer}</td><td>{'' if c.effect is None else f'{c.effect:.3f}'}</td>"
                   f"<td>{getattr(c, key):.3f}</td><td>{'yes' if c.frontier else ''}</td><td>{escape(c.reason)}</td></tr>"
                   for c in sorted(sel.candidates, key=lambda c: getattr(c, key)) if c.frontier)
    warn = f'<p style="color:#b00">warning: {escape(sel.warning)}</p>' if sel.warning else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerscope select: {escape(sel.metric)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 8px}}</style></head><body>
<h1>Effect vs side effect: {escape(sel.metric)}, mode {sel.config.mode}</h1>
<p>baseline on A {sel.baseline_a:.3f}, on B {sel.baseline_b:.3f}; choice: {sel.config.choose}. {chosen}.
Blue: the Pareto frontier (no candidate has more effect for less KL); grey: filtered out.</p>{warn}
{body}
<h2>Frontier</h2><table><tr><th>id</th><th>layer</th><th>effect</th><th>{key}</th><th>frontier</th><th>note</th></tr>{rows}</table>
</body></html>"""
