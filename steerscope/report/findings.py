"""The report's first screen: the behaviours found, and how R was chosen."""

from __future__ import annotations

import math
from html import escape

CSS = """
.finding{border:2px solid #1f5fa8;border-radius:8px;margin:8px 0;padding:6px 12px;background:#f5f9ff}
.finding h3{margin:2px 0 4px;font-size:15px}.finding .typical{background:#fff;border-left:4px solid #1f5fa8;padding:4px 10px;margin:4px 0;font-size:14px}
.finding .facts{font-size:13px;color:#444}.nofinding{border:2px solid #bbb;border-radius:8px;padding:8px 14px;background:#fafafa}
.lead{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
"""


def _f(x, fmt=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def surface_tag(f: dict) -> str:
    """'<b>in French</b> · ' for a surface-group finding or cluster (judging.surface), else ''."""
    return f'<b class="surface">{escape(f["surface"])}</b> · ' if f.get("surface") else ""


def _one_line(text: str, n: int = 240) -> str:
    """A completion on one line: runs of whitespace (newlines included) shown as one space or ⏎."""
    import re

    t = re.sub(r"\s*\n\s*", " ⏎ ", text.strip())
    t = re.sub(r"(?: ⏎ [*\-•]?)+(?= ⏎|$)", " ⏎", t)  # blank or bullet-only lines
    return t if len(t) <= n else t[:n].rstrip() + "…"


def findings_section(findings: list[dict], run_dir_hint: str = "RUN") -> str:
    if not findings:
        return ('<div class="nofinding" id="no-findings"><b>No behaviour appeared only under learned vectors.</b> Every '
                'cluster of learned-vector completions also holds random-vector or unsteered completions. Try more '
                'vectors, other layers, or an explicit --R; the vector table below still ranks what each vector did.</div>')
    out = []
    for f in findings:
        links = " ".join(f'<a class="tag" href="#card-{escape(v)}">{escape(v)}</a>' for v in f["vectors"])
        n_prompts = len(f["prompts"])
        nat = (f'log p per token {_f(f.get("logprob"))} (unsteered completions: {_f(f.get("logprob_unsteered"))})')
        out.append(
            f'<div class="finding" id="finding-{f["rank"]}" data-rank="{f["rank"]}">'
            f'<h3>#{f["rank"] + 1} · {surface_tag(f)}{escape(", ".join(f["words"]) or "(no distinctive words)")}</h3>'
            f'<div class="typical">{escape(_one_line(f["typical"]))}</div>'
            f'<div class="facts">elicited by <b>{f["n_vectors"]}</b> learned vector{"s" if f["n_vectors"] != 1 else ""} '
            f'({f["completions"]} completion{"s" if f["completions"] != 1 else ""}, {n_prompts} prompt{"s" if n_prompts != 1 else ""}, '
            f'{f["heldout"]} held-out) and by no random vector and not unsteered · distance from unsteered '
            f'{_f(f["distance"])} · {nat}<br>vectors: {links}<br>'
            f'export: <code>steerscope findings --run {escape(run_dir_hint)} --export {f["rank"]} --out finding-{f["rank"]}</code>'
            f'</div></div>')
    more = (f'<details id="more-findings"><summary>{len(out) - 5} more findings</summary>{"".join(out[5:])}</details>'
            if len(out) > 5 else "")
    return "".join(out[:5]) + more


def _counts(rows: list[dict]) -> str:
    """How many completions each share came from, and which multiples had no probes trained."""
    if "random_completions" not in rows[0]:
        return ""  # a run from before the counts were recorded
    n_l = max(r["learned_completions"] for r in rows)
    skipped = [r["multiple"] for r in rows if r.get("learned") is None]
    return (f' ({n_l} learned and {rows[0]["random_completions"]} random completions at each multiple'
            + (f'; no probes trained at {", ".join(f"{m:g}×" for m in skipped)}, where random vectors alone moved '
               f'too many' if skipped else '') + ')')


def goldilocks_plot(g: dict | None) -> str:
    """Shares of completions moved by learned and random probe vectors at each multiple of the
    calibrated R, with the chosen R marked."""
    if not g:
        return ""
    if g.get("given"):
        return f'<p id="goldilocks">R = {_f(g["chosen"], ".3g")}, given explicitly.</p>'
    rows = g.get("rows") or []
    if not rows:
        return f'<p id="goldilocks">R = {_f(g["chosen"], ".3g")}: the calibrated R ({escape(g.get("reason", ""))}).</p>'
    W, H, pad = 320, 190, 32
    ms = [r["multiple"] for r in rows]
    lx0, lx1 = math.log(min(ms)), math.log(max(ms))
    sx = lambda m: pad + (math.log(m) - lx0) / ((lx1 - lx0) or 1) * (W - 2 * pad)  # noqa: E731
    sy = lambda v: H - pad - v * (H - 2 * pad)  # noqa: E731
    parts = [f'<line x1="{pad}" y1="{sy(0)}" x2="{W - pad}" y2="{sy(0)}" stroke="#ccc"/>',
             f'<line x1="{pad}" y1="{sy(1)}" x2="{W - pad}" y2="{sy(1)}" stroke="#eee"/>',
             f'<text x="4" y="{sy(1) + 4}" font-size="10">100%</text><text x="10" y="{sy(0) + 4}" font-size="10">0%</text>']
    chosen = next((r for r in rows if abs(r["R"] - g["chosen"]) < 1e-9 * max(1.0, g["chosen"])), None)
    if chosen:
        parts.append(f'<line x1="{sx(chosen["multiple"]):.1f}" y1="{pad - 8}" x2="{sx(chosen["multiple"]):.1f}" '
                     f'y2="{H - pad}" stroke="#59a14f" stroke-dasharray="4 3"/>')
    for key, col in (("learned", "#1f5fa8"), ("random", "#8a8a8a")):
        have = [r for r in rows if r.get(key) is not None]  # no learned share where no probes were trained
        pts = " ".join(f"{sx(r['multiple']):.1f},{sy(r[key]):.1f}" for r in have)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(r["multiple"]):.1f}" cy="{sy(r[key]):.1f}" r="3" fill="{col}"/>' for r in have]
    parts += [f'<text x="{sx(m):.1f}" y="{H - 12}" font-size="10" text-anchor="middle">{m:g}×</text>' for m in ms]
    return (f'<figure id="goldilocks"><svg class="plot" width="{W}" height="{H}">{"".join(parts)}</svg>'
            f'<figcaption style="font-size:12px;max-width:{W}px">Choosing R: share of completions whose meaning moved '
            f'under <span style="color:#1f5fa8">learned</span> and <span style="color:#8a8a8a">random</span> probe vectors '
            f'at multiples of the calibrated R = {_f(g["calibrated"], ".3g")}'
            + _counts(rows) + '. '
            f'<span style="color:#59a14f">Chosen: R = {_f(g["chosen"], ".3g")}</span> ({escape(g.get("reason", ""))}).'
            f'</figcaption></figure>')
