"""The report's first screen: the behaviours found, and how R was chosen."""

from __future__ import annotations

import math
from html import escape

from . import svg

CSS = """
.finding{border:2px solid #1f5fa8;border-radius:8px;margin:8px 0;padding:6px 12px;background:#f5f9ff}
.finding h3{margin:2px 0 4px;font-size:15px}.finding .typical{background:#fff;border-left:4px solid #1f5fa8;padding:4px 10px;margin:4px 0;font-size:14px}
.finding .facts{font-size:13px;color:#444}.nofinding{border:2px solid #bbb;border-radius:8px;padding:8px 14px;background:#fafafa}
.lead{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.finding.weak{border-color:#bbb;background:#fafafa}.finding .flag{color:#b15928}.power{font-size:13px;color:#444;max-width:900px}
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


def _card(f: dict, run_dir_hint: str) -> str:
    links = " ".join(f'<a class="tag" href="#card-{escape(v)}">{escape(v)}</a>' for v in f["vectors"])
    cls = "finding" if f.get("significant") else "finding weak"
    flag = f' · <b class="flag">{escape(f["single"])}</b>' if f.get("single") else ""
    return (
        f'<div class="{cls}" id="finding-{f["rank"]}" data-rank="{f["rank"]}" data-significant="{int(bool(f.get("significant")))}">'
        f"<h3>#{f['rank'] + 1} · {surface_tag(f)}{escape(', '.join(f['words']) or '(no distinctive words)')}{flag}</h3>"
        f'<div class="typical">{escape(_one_line(f["typical"]))}</div>'
        f'<div class="facts"><b>Why here:</b> {escape(f.get("reason", ""))}<br>vectors: {links}<br>'
        f"export: <code>steerscope findings --run {escape(run_dir_hint)} --export {f['rank']} --out finding-{f['rank']}</code>"
        f"</div></div>"
    )


def findings_section(findings: list[dict], run_dir_hint: str = "RUN", null_model: dict | None = None) -> str:
    """The significant findings (up to 5 shown, the rest folded), then the candidates that did not
    beat chance, folded and marked, then what the test can detect at the run's counts."""
    if findings and "significant" not in findings[0]:  # a run measured before the null model
        findings = [{**f, "significant": True, "reason": "", "single": ""} for f in findings]
    sig = [f for f in findings if f["significant"]]
    weak = [f for f in findings if not f["significant"]]
    power = f'<p class="power" id="power">{escape(null_model["power"])}</p>' if null_model else ""
    if not sig:
        out = [
            '<div class="nofinding" id="no-findings"><b>No behaviour beat chance.</b> No cluster of learned-vector '
            "completions appeared under significantly more learned vectors than random vectors of the same norms and "
            "unsteered samples. Try more vectors (--n-vectors), other layers, or an explicit --R; the vector table "
            "below still ranks what each vector did.</div>"
        ]
    else:
        cards = [_card(f, run_dir_hint) for f in sig]
        out = cards[:5] + (
            [
                f'<details id="more-findings"><summary>{len(cards) - 5} more significant findings</summary>'
                f"{''.join(cards[5:])}</details>"
            ]
            if len(cards) > 5
            else []
        )
    if weak:
        out.append(
            f'<details id="not-significant"><summary>{len(weak)} cluster{"s" if len(weak) != 1 else ""} under learned '
            f"vectors that did not beat chance (not significant)</summary>{''.join(_card(f, run_dir_hint) for f in weak)}"
            "</details>"
        )
    return "".join(out) + power


def goldilocks_plot(g: dict | None, moved: dict | None = None) -> str:
    """The R search: the share of completions random vectors moved at each R tried, the threshold,
    the chosen R, and the learned and random vectors' shares at that R in the run itself."""
    if not g:
        return ""
    if g.get("given"):
        return f'<p id="goldilocks">R = {_f(g["chosen"], ".3g")}, given explicitly.</p>'
    rows = [r for r in g.get("rows") or [] if r.get("random") is not None]
    if not rows:
        return f'<p id="goldilocks">R = {_f(g["chosen"], ".3g")}: the calibrated R ({escape(g.get("reason", ""))}).</p>'
    W, H, pad = 340, 200, 34
    cm = g["chosen"] / g["calibrated"]  # the chosen R as a multiple of the calibrated one
    ms = [r["multiple"] for r in rows] + [cm]
    lo, hi = min(ms), max(ms)
    if math.log(hi) - math.log(lo) < 1e-9:  # one multiple: half a unit of log scale either side
        lo, hi = lo / math.exp(0.7), hi * math.exp(0.7)
    c = svg.Chart(W, H, svg.log(lo, hi, pad, W - pad), svg.linear(0, 1, H - pad, pad), class_="plot")
    thr = g.get("max_random", 0.5)
    c.hline(0, svg.RULE).hline(1, svg.FAINT).hline(thr, svg.RED, "3 3")
    c.text(4, c.y(1) + 4, "100%").text(10, c.y(0) + 4, "0%")
    c.vline(cm, svg.GREEN, "4 3", top=pad - 8)
    pts = [(r["multiple"], r["random"]) for r in rows]
    c.line(pts, svg.GREY).dots(pts, svg.GREY)
    if moved and moved.get("learned") is not None:
        c.square(cm, moved["learned"], svg.BLUE)
    c.xticks(sorted({round(r["multiple"], 3) for r in rows}), lambda m: f"{m:.2g}×", dy=pad - 12)
    run_note = ""
    if moved and moved.get("learned") is not None:
        learned = svg.coloured(f"learned vectors moved {moved['learned']:.0%}", svg.BLUE)
        run_note = f" In the run at that R, {learned} of their completions and random ones {moved['random']:.0%}."
    chosen = svg.coloured(f"Chosen: R = {_f(g['chosen'], '.3g')}", svg.GREEN)
    return (
        f'<figure id="goldilocks">{c.svg()}'
        f'<figcaption style="font-size:12px;max-width:{W}px">Choosing R: share of completions whose behaviour moved '
        f"under {svg.coloured('random', svg.GREY)} vectors at each R the search tried (multiples of the "
        f"calibrated R = {_f(g['calibrated'], '.3g')}, {escape(str(rows[0].get('random_completions', '?')))} completions each; "
        f"{svg.coloured(f'threshold {thr:.0%}', svg.RED)}). {chosen} ({escape(g.get('reason', ''))})."
        + run_note
        + "</figcaption></figure>"
    )
