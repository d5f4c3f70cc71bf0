"""One self-contained HTML page for a run: inline CSS, JS and SVG, nothing fetched at view time.

Sections, the finding first: behaviours found (clusters only learned vectors produce, ranked,
each linking to the cards of its vectors); learned vs random, next to how R was chosen; a 2-D map of
the behaviour clusters; norm-sweep plots; one card per vector with unsteered vs steered completions
side by side for every prompt; the per-vector table, collapsed, sortable by any column (click a
header; `#sort=COLUMN:asc|desc` in the URL opens and sorts it on load); the configuration.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from html import escape

from . import svg
from .findings import CSS as FINDINGS_CSS
from .findings import findings_section, goldilocks_plot, surface_tag

COLUMNS = [
    ("target_change", "target Δ"),
    ("kl_neutral", "KL neutral"),
    ("logprob", "log p"),
    ("distinct2", "distinct-2"),
    ("embed_distance", "embed dist"),
    ("changed", "changed"),
]

CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4;cursor:pointer;user-select:none}th.sorted-asc:after{content:" ▲"}th.sorted-desc:after{content:" ▼"}
td.l,th.l{text-align:left}.learned{color:#1f5fa8}.random{color:#8a8a8a}
.card{border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px 12px}
.card table{width:100%;table-layout:fixed}.card td{text-align:left;vertical-align:top;white-space:pre-wrap}
.tag{display:inline-block;padding:0 6px;border-radius:8px;background:#eee;margin-right:4px;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""

JS = """
function sortTable(key, dir){
  const t=document.getElementById('summary'), body=t.tBodies[0];
  const rows=[...body.rows], ths=[...t.tHead.rows[0].cells];
  const th=ths.find(h=>h.dataset.key===key); if(!th) return;
  const idx=ths.indexOf(th), num=th.dataset.type==='num';
  rows.sort((a,b)=>{let x=a.cells[idx].dataset.v, y=b.cells[idx].dataset.v;
    if(num){x=parseFloat(x);y=parseFloat(y);if(isNaN(x))x=-Infinity;if(isNaN(y))y=-Infinity;return dir==='asc'?x-y:y-x;}
    return dir==='asc'?x.localeCompare(y):y.localeCompare(x);});
  rows.forEach(r=>body.appendChild(r));
  ths.forEach(h=>h.classList.remove('sorted-asc','sorted-desc')); th.classList.add('sorted-'+dir);
  document.body.dataset.sortedBy=key+':'+dir;
}
document.querySelectorAll('#summary th').forEach(th=>th.addEventListener('click',()=>{
  sortTable(th.dataset.key, th.classList.contains('sorted-desc')?'asc':'desc');}));
const m=location.hash.match(/sort=([^:&]+):?(asc|desc)?/);
if(m){document.getElementById('vector-table').open=true; sortTable(decodeURIComponent(m[1]), m[2]||'desc');}
"""


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.3g}"
    return escape(str(x))


def _scatter(points, labels, sets, clusters) -> str:
    """Completions on the first two principal components: shape = set, colour = behaviour cluster."""
    W, H, pad = 520, 380, 24
    if not points:
        return "<p>no completions</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    c = svg.Chart(
        W,
        H,
        svg.linear(min(xs), max(xs), pad, W - pad),
        svg.linear(min(ys), max(ys), H - pad, pad),
        id="cluster-map",
        class_="plot",
    )
    for (x, y), label, s in zip(points, labels, sets):
        col = svg.color(label)
        if s == "random":
            c.square(x, y, col, opacity=0.6)
        elif s == "sample":
            c.dot(x, y, None, stroke=col)
        elif s == "unsteered":
            c.triangle(x, y)
        else:
            c.dot(x, y, col, r=5, opacity=0.8)
    legend = "".join(
        f'<li><span class="tag" style="background:{svg.color(k["id"])};color:#fff">{k["id"]}</span>'
        f"{k['size']} completions — {surface_tag(k)}<i>{escape(', '.join(k['words']))}</i>: “{escape(k['typical'][:120])}”</li>"
        for k in clusters
    )
    return (
        c.svg()
        + "<p>● learned ■ random △ unsteered ○ unsteered sample; colour = behaviour cluster (first two principal "
        f'components of the completion embeddings)</p><ol start="0" style="font-size:13px">{legend}</ol>'
    )


def _sweep_plot(vid: str, rows: list[dict]) -> str:
    """The norm sweep of one vector: share of completions changed and target-layer change against
    the multiple of R (log scale), on one y scale from 0 to the larger of 1 and the largest change."""
    W, H, pad = 300, 200, 30
    ms = [r["multiple"] for r in rows]
    ymax = max([r["target_change"] for r in rows] + [1.0])
    hi = max(ms) if len(ms) > 1 else min(ms) * math.e  # one multiple: a unit of log scale, the point at the left
    c = svg.Chart(W, H, svg.log(min(ms), hi, pad, W - pad), svg.linear(0, ymax, H - pad, pad), class_="plot sweep-plot")
    for key, col in (("changed", svg.RED), ("target_change", svg.BLUE)):
        pts = [(r["multiple"], r[key]) for r in rows]
        c.line(pts, col).dots(pts, col)
    c.xticks(ms, lambda m: f"{m:g}×", dy=H - 8 - (H - pad)).yticks([0, ymax], lambda v: f"{v:.2g}", x=pad - 3)
    c.text(pad, 14, vid, 11)
    return (
        f'<figure>{c.svg()}<figcaption style="font-size:12px">{svg.coloured("share of completions changed", svg.RED)}, '
        f"{svg.coloured('target-layer change', svg.BLUE)} vs multiple of R</figcaption></figure>"
    )


def null_section(null: dict | None) -> str:
    """Real model vs the null-model control (`jobs.null_control`)."""
    if not null:
        return ""
    r, n = null["real"], null["null"]
    rows = [
        ("steered completions", "completions", "{:.0f}"),
        ("changed vs its own unsteered", "changed", "{:.2f}"),
        ("log p / token under the real model (steered)", "logprob_real", "{:.2f}"),
        ("log p / token under the real model (its unsteered)", "logprob_real_unsteered", "{:.2f}"),
        ("distinct bigrams (1 = no repetition)", "distinct2", "{:.2f}"),
    ]
    body = "".join(
        f"<tr><td class='l'>{escape(t)}</td><td>{f.format(r[k])}</td><td>{f.format(n[k])}</td></tr>" for t, k, f in rows
    )
    ex = "".join(
        f"<tr><td class='l'>{escape(e['vector'])}</td><td class='l'>{escape(e['text'])}</td></tr>"
        for e in null["examples"]
    )
    natural = r["logprob_real"] - n["logprob_real"]
    return (
        f"<h2 id='null-control'>Natural behaviours or artefacts? Control on a {escape(null['kind'])}d copy</h2>"
        f"<p class='lead'>The same discovery on a copy of the model whose block weights were {escape(null['kind'])}d "
        f"({null['vectors']} vectors, its own calibrated R = {_fmt(null['R'])}). What the real model's vectors elicit is "
        f"{natural:.2f} nats/token {'more' if natural >= 0 else 'less'} natural (log p under the unsteered real model) "
        f"than what the copy's vectors elicit.</p><table><tr><th class='l'></th><th>real model</th><th>null copy</th></tr>{body}</table>"
        f"<details><summary>completions elicited in the null copy</summary><table>{ex}</table></details>"
    )


def _model_dtype(metrics: dict) -> str:
    m = metrics.get("model")
    return f" ({escape(m['dtype'])} on {escape(m['device'])})" if m else ""


def _gate_tag(r: dict) -> str:
    return ' <span class="tag">gate did not fire: unsteered</span>' if r.get("gate_fired") is False else ""


def _gate_line(gate: dict | None) -> str:
    """--when's gate: its rule, and which prompts it let the vectors steer."""
    if not gate:
        return ""
    rule = f"cos {'&gt;' if gate['above'] else '&lt;'} {gate['threshold']:.3f} at layer {gate['layer']}"
    items = "".join(
        f"<li>{'fired' if p['fired'] else 'did not fire'} ({p['score']:.3f}): {escape(p['prompt'])}</li>"
        for p in gate["prompts"]
    )
    return (
        f'<p id="gate"><b>Gated (CAST):</b> every vector, learned and random, steered only the prompts that meet '
        f"the condition {escape(str(gate['condition']))} ({rule}): {gate['fired']} of {len(gate['prompts'])} prompts. "
        f"The others' steered completions are the unsteered ones.</p><details><summary>the gate per prompt</summary>"
        f"<ul>{items}</ul></details>"
    )


def render_report(config: dict, metrics: dict, rows: list[dict], run_dir: str = "RUN", null: dict | None = None) -> str:
    sets, vecs = metrics["sets"], metrics["vectors"]
    score_cols = sorted({k for m in vecs.values() for k in m if k.startswith("score:")})
    cols = COLUMNS + [(k, k[6:]) for k in score_cols]
    head = (
        '<tr><th class="l" data-key="id" data-type="str">vector</th><th class="l" data-key="set" data-type="str">set</th>'
        + "".join(f'<th data-key="{escape(k)}" data-type="num">{escape(n)}</th>' for k, n in cols)
        + '<th class="l" data-key="clusters" data-type="str">clusters</th></tr>'
    )
    body = []
    for vid, m in vecs.items():
        cells = "".join(f'<td data-v="{m.get(k, float("nan"))}">{_fmt(m.get(k, float("nan")))}</td>' for k, _ in cols)
        cl = ",".join(map(str, m.get("clusters", [])))
        body.append(
            f'<tr class="{sets[vid]}"><td class="l" data-v="{escape(vid)}"><a href="#card-{escape(vid)}">{escape(vid)}</a></td>'
            f'<td class="l" data-v="{sets[vid]}">{sets[vid]}</td>{cells}<td class="l" data-v="{cl}">{cl}</td></tr>'
        )
    summary = metrics["summary"]
    keys = ["vectors", "completions", "distinct_completions", "clusters"] + [
        k for k in summary.get("learned", {}) if k.startswith("mean_")
    ]
    compare = (
        "<table id='learned-vs-random'><tr><th class='l'></th>"
        + "".join(f"<th>{s}</th>" for s in summary)
        + "</tr>"
        + "".join(
            f"<tr><td class='l'>{k.replace('_', ' ')}</td>"
            + "".join(f"<td>{_fmt(summary[s][k])}</td>" for s in summary)
            + "</tr>"
            for k in keys
        )
        + "</table>"
    )
    by_vec = defaultdict(list)
    for r in rows:
        by_vec[r["vector_id"]].append(r)
    base = {r["prompt_index"]: r for r in by_vec[None]}
    cards = []
    for vid in vecs:
        m = vecs[vid]
        tags = "".join(f'<span class="tag">{escape(n)} {_fmt(m.get(k, float("nan")))}</span>' for k, n in cols)
        trs = "".join(
            f"<tr><td>{escape(r['split'])}: {escape(r['prompt'])}{_gate_tag(r)}</td><td>{escape(base[r['prompt_index']]['text'])}</td>"
            f"<td>{escape(r['text'])}</td></tr>"
            for r in sorted(by_vec[vid], key=lambda r: r["prompt_index"])
        )
        cards.append(
            f'<div class="card vector-card {sets[vid]}" id="card-{escape(vid)}" data-vector="{escape(vid)}">'
            f'<b class="{sets[vid]}">{escape(vid)}</b> ({sets[vid]}) {tags}'
            f'<table><tr><th class="l" style="width:22%">prompt</th><th class="l">unsteered</th><th class="l">steered</th></tr>'
            f"{trs}</table></div>"
        )
    d = metrics.get("discovery", {})
    sweeps = "".join(_sweep_plot(v, r) for v, r in metrics.get("sweep", {}).items()) or "<p>no sweep</p>"
    n_learned = sum(v == "learned" for v in sets.values())
    by = "for changed, natural completions" if d.get("kept_by") == "completions" else "by entropy"  # kl's two rules
    kept = f" (kept from {d['candidates']} candidates {by})" if (d.get("candidates") or 0) > n_learned else ""
    title = (
        f"{escape(str(d.get('method')))}: {n_learned} vectors{kept}, layer "
        f"{d.get('source')} → {escape(str(d.get('reads') or d.get('target')))}, R = {_fmt(d.get('R'))}"
    )
    found = metrics.get("findings")
    n_found = sum(bool(f.get("significant", True)) for f in found or [])
    nm = metrics.get("null_model")
    lead = (
        f"{n_found} behaviour{'s' if n_found != 1 else ''} found that beat chance"
        + (
            f" (false-discovery rate {nm['alpha']:g}, against {nm['random']} random vectors and {nm['samples']} unsteered "
            f"samples per prompt)"
            if nm
            else ""
        )
        if found is not None
        else "measured before findings existed"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>steerscope run — {title}</title>
<style>{CSS}{FINDINGS_CSS}{svg.CSS}</style></head><body>
<h1>steerscope run — {title}</h1>
<p>model {escape(str(((config["config"].get("model") or {}).get("model")) or "SmolLM2-135M-Instruct (embedded)"))}{_model_dtype(metrics)}, steerscope {escape(config.get("steerscope_version", ""))},
{len(rows)} completions, {_fmt(metrics.get("seconds", float("nan")))} s. <b>{lead}.</b></p>
{_gate_line(metrics.get("gate"))}
<h2 id="behaviours-found">Behaviours found</h2>{findings_section(found or [], run_dir, metrics.get("null_model"))}
<h2>Learned vs random (same norms)</h2><div class="lead">{compare}{goldilocks_plot(metrics.get("goldilocks"), metrics.get("moved"))}</div>
{null_section(null)}
<h2>Behaviour clusters</h2>{_scatter(metrics.get("map", []), metrics.get("labels", []), [r["set"] for r in rows], metrics.get("clusters", []))}
<h2>Norm sweep</h2><div class="plots">{sweeps}</div>
<h2>Completions</h2>{"".join(cards)}
<h2>Vectors</h2><details id="vector-table"><summary>all {len(vecs)} vectors: metrics table (click to open; click a column to sort)</summary>
<table id="summary"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></details>
<h2>Run configuration</h2><pre>{escape(json.dumps(config, indent=2))}</pre>
<script>{JS}</script></body></html>"""
