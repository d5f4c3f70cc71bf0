"""The merged report of a grid sweep: progress, one table row per point (swept values, status,
headline metrics, links to the point's own report and log), and plots of each headline metric
against each swept field (one line per combination of the other fields). One offline HTML file."""

from __future__ import annotations

from html import escape
from typing import Any

from . import svg

CSS = (
    """body{font:14px/1.45 system-ui,sans-serif;margin:1.2rem 2rem;color:#1d2330}
h1{font-size:1.35rem;margin:.2rem 0}h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #e3e6ec;padding:.25rem .55rem;text-align:left}
th{background:#f4f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.status-done{color:#2d7a32}.status-failed{color:#b3261e;font-weight:600}.status-running{color:#1f5fa8}.status-pending{color:#888}
.progress{display:flex;gap:1.2rem;align-items:center;margin:.4rem 0 1rem}.bar{width:280px;height:12px;background:#eee;border-radius:6px;overflow:hidden;display:flex}
.bar span{display:block;height:100%}.plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figcaption{font-size:12px;color:#555}
.err{color:#b3261e;font-size:12px;max-width:40rem}"""
    + svg.CSS
)


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return escape(str(x))


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _plot(metric: str, field: str, points: dict, fields: list[str]) -> str:
    """metric vs field; one polyline per combination of the other swept fields."""
    rows = [p for p in points.values() if p["status"] == "done" and metric in (p.get("headline") or {})]
    xs = sorted(
        {p["values"][field] for p in rows},
        key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)),
    )
    if len(xs) < 2:
        return ""
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    W, H, pad = 340, 210, 40
    if numeric and min(xs) > 0 and max(xs) / min(xs) > 20:  # log scale for R-like sweeps
        x = svg.log(min(xs), max(xs), pad, W - pad)
    elif numeric:
        x = svg.linear(min(xs), max(xs), pad, W - pad)
    else:
        x = svg.categories(xs, pad, W - pad)
    ys = [p["headline"][metric] for p in rows]
    y0, y1 = min(ys), max(ys)
    if y0 == y1:  # a metric the sweep did not move: the table says it
        return ""
    c = svg.Chart(W, H, x, svg.linear(y0, y1, H - pad, pad)).axes(svg.LIGHT, left=False)
    c.yticks([y1, y0], lambda v: f"{v:.3g}", x=4, anchor=None).xticks(xs)
    others = [f for f in fields if f != field]
    groups: dict[tuple, list] = {}
    for p in rows:
        groups.setdefault(tuple(p["values"][f] for f in others), []).append(p)
    legend = []
    for i, (combo, ps) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        col = svg.color(i)
        ps = sorted(ps, key=lambda p: xs.index(p["values"][field]))
        pts = [(p["values"][field], p["headline"][metric]) for p in ps]
        c.line(pts, col).dots(pts, col, titles=[f"{p['values']}: {p['headline'][metric]:.4g}" for p in ps])
        if others:
            legend.append(svg.coloured("■ " + ", ".join(f"{f}={v}" for f, v in zip(others, combo)), col))
    return (
        f'<figure class="sweep-plot" data-metric="{escape(metric)}" data-field="{escape(field)}">'
        f"{c.svg()}<figcaption><b>{escape(metric)}</b> vs <b>{escape(field)}</b><br>{' '.join(legend)}</figcaption></figure>"
    )


def render_sweep(grid: dict, points: dict[str, dict], counts: dict[str, int], eta: float | None, elapsed: float) -> str:
    fields = list(grid["grid"])
    total = max(1, sum(counts.values()))
    segs = "".join(
        f'<span style="width:{100 * counts[k] / total:.1f}%;background:{c}"></span>'
        for k, c in (("done", "#59a14f"), ("failed", "#e15759"), ("running", "#1f5fa8"))
    )
    metrics = sorted({m for p in points.values() for m in (p.get("headline") or {})})
    head = (
        "".join(f"<th>{escape(f)}</th>" for f in fields)
        + "<th>status</th><th>attempts</th><th>time</th>"
        + "".join(f"<th>{escape(m)}</th>" for m in metrics)
        + "<th>links</th>"
    )
    body = []
    for key, p in points.items():
        st = p["status"]
        cells = "".join(f"<td>{_num(p['values'][f])}</td>" for f in fields)
        cells += f'<td class="status-{st}">{st}</td><td class="num">{p.get("attempts", "")}</td><td class="num">{_duration(p.get("seconds"))}</td>'
        cells += "".join(f'<td class="num">{_num((p.get("headline") or {}).get(m, ""))}</td>' for m in metrics)
        link = f"points/{escape(key)}"
        report = f'<a href="{link}/out/report.html">report</a> · ' if p.get("has_report") else ""
        cells += f'<td>{report}<a href="{link}/sweep_log.txt">log</a></td>'
        body.append(f'<tr data-key="{escape(key)}" data-status="{st}">{cells}</tr>')
        if p.get("error"):
            body.append(
                f'<tr><td colspan="{len(fields) + len(metrics) + 4}" class="err">{escape(p["error"])}</td></tr>'
            )
    plots = [_plot(m, f, points, fields) for m in metrics for f in fields]
    plots = [p for p in plots if p][:12]
    eta_txt = "finished" if eta == 0 else f"ETA {_duration(eta)}" if eta is not None else "ETA after the first point"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>steerscope sweep: {escape(grid["command"])}</title>'
        f"<style>{CSS}</style></head><body><h1>Sweep: <code>steerscope {escape(grid['command'])}</code> over "
        f"{escape(', '.join(fields))}</h1>"
        f'<div class="progress" id="progress"><div class="bar">{segs}</div><span>{counts["done"]} done · '
        f"{counts['running']} running · {counts['failed']} failed · {counts['pending']} pending of {total} · "
        f"{_duration(elapsed)} elapsed in this session · {eta_txt}</span></div>"
        + f'<h2>Points</h2><table id="points"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        + (f'<h2>Headline metrics vs swept fields</h2><div class="plots">{"".join(plots)}</div>' if plots else "")
        + f"<h2>Grid</h2><pre>{escape(_json(grid))}</pre></body></html>"
    )


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2)
