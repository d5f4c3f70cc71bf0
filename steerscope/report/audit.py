"""One self-contained page for an audit (`jobs.audit`): what the fine-tune changed first, then
every method on one table, what the base does too, each method's candidates, the configuration."""

from __future__ import annotations

import json
from html import escape

from .html import CSS

LABELS = {
    "finetune": "discovery on the fine-tune",
    "weightdiff": "weight differences, steering the base",
    "actdiff": "activation differences, steering the base",
    "base": "discovery on the base (contrast)",
    "sample": "black-box sampling",
    "amplify": "amplified sampling",
}
EXTRA_CSS = """
.changed{border-left:4px solid #c0392b}.base{border-left:4px solid #999}
td.hit{background:#e8f3e8;text-align:center}td.miss{color:#aaa;text-align:center}
.ex td{font-size:12px}.small{font-size:12px;color:#555}
"""


def _one(text: str | None, n: int = 300) -> str:
    t = " ".join((text or "").split())
    return escape(t if len(t) <= n else t[:n] + "…")


def _q(q: float) -> str:
    return f"q = {q:.2g}"


def _directions(f: dict) -> str:
    ds = f.get("directions") or []
    if not ds:
        return ""
    items = []
    for d in ds[:6]:
        src = d.get("from") or {}
        where = ""
        if "matrix" in src:
            where = f", from {escape(src['matrix'])} (σ = {src['sigma']:.3g}, sign {src['sign']:+d})"
        elif "component" in src:
            where = f", the {escape(src['component'])} of fine-tune minus base residuals (sign {src['sign']:+d})"
        norm = f"{d['norm']:.3g}" if d.get("norm") is not None else "?"
        items.append(f"<li>{escape(str(d['id']))}: layer {d.get('layer')}, norm {norm}{where}</li>")
    return "<ul class=small>" + "".join(items) + "</ul>"


def _examples(f: dict) -> str:
    steered = f["method"] not in ("sample", "amplify")
    head = (
        "<tr><th class=l>prompt</th><th class=l>under the vector</th><th class=l>fine-tune's own reply</th>"
        "<th class=l>base's own reply</th></tr>"
        if steered
        else f"<tr><th class=l>prompt</th><th class=l>{'amplified' if f['method'] == 'amplify' else 'fine-tune'} sample</th>"
        "<th class=l>base sample (same prompt, draw)</th></tr>"
    )
    rows = []
    for e in f["examples"][:3]:
        cells = [e["prompt"], e["treated"]] + ([e.get("finetune"), e.get("base_reply")] if steered else [e["base"]])
        rows.append("<tr>" + "".join(f"<td class=l>{_one(c, 220)}</td>" for c in cells) + "</tr>")
    return f"<table class=ex>{head}{''.join(rows)}</table>"


def _behaviour_card(b: dict, by: dict, kind: str) -> str:
    found = []
    for x in b["found"]:
        found.append(f"<b>{escape(LABELS.get(x['method'], x['method']))}</b> #{x['rank'] + 1} ({_q(x['q'])})")
    parts = [
        f"<div class='card {kind}'><p><b>Behaviour {b['id'] + 1}</b>"
        + (f" <span class=tag>{escape(b['surface'])}</span>" if b["surface"] else "")
        + f": “{_one(b['typical'], 260)}”</p>",
        f"<p class=small>Found by: {'; '.join(found)}. Words: {escape(', '.join(b['words']))}</p>",
    ]
    for x in b["found"][:3]:  # the evidence of each method that found it
        f = by.get((x["method"], x["rank"]))
        if f:
            parts.append(
                f"<p class=small><b>{escape(x['method'])}</b>: {escape(f['reason'])}</p>{_directions(f)}{_examples(f)}"
            )
    parts.append("</div>")
    return "".join(parts)


def _table(t: dict) -> str:
    methods = [m for m in LABELS if m in t["methods"]]
    head = "<tr><th class=l>behaviour</th>" + "".join(f"<th>{escape(m)}</th>" for m in methods) + "</tr>"
    rows = []
    for b in t["behaviours"]:
        hit = {x["method"]: x for x in b["found"]}
        cells = "".join(
            f"<td class=hit>#{hit[m]['rank'] + 1}<br><span class=small>{_q(hit[m]['q'])}</span></td>"
            if m in hit
            else "<td class=miss>—</td>"
            for m in methods
        )
        tag = " (base too)" if b["in_base"] else ""
        rows.append(f"<tr><td class=l>{b['id'] + 1}. {_one(b['typical'], 90)}{tag}</td>{cells}</tr>")
    if not rows:
        rows.append(f"<tr><td class=l colspan={len(methods) + 1}>no significant finding by any method</td></tr>")
    status = []
    for label, key in (("significant findings", None), ("wall time", "seconds"), ("forward tokens", "forward_tokens")):
        cells = []
        for m in methods:
            info = t["methods"][m]
            if key is None:
                cells.append(f"<td>{info['significant']}</td>" if info["status"] == "ran" else "<td>skipped</td>")
            else:
                c = t["compute"].get(m, {})
                if c.get("reused_from"):
                    cells.append(f"<td title='{escape(c['reused_from'])}'>reused</td>")
                    continue
                v = c.get(key)
                cells.append(f"<td>{'' if v is None else (f'{v:.0f} s' if key == 'seconds' else f'{v:,}')}</td>")
        status.append(f"<tr><td class=l><i>{label}</i></td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}{''.join(status)}</table>"


def _method_section(m: str, info: dict) -> str:
    if info["status"] != "ran":
        return f"<details><summary>{escape(LABELS[m])}: skipped ({escape(info['why'])})</summary></details>"
    link = f" (<a href='{escape(info['run'])}/report.html'>its run report</a>)" if info.get("run") else ""
    items = []
    for f in info["findings"][:10]:
        mark = "" if f["significant"] else " <span class=tag>not significant</span>"
        items.append(f"<li>#{f['rank'] + 1}{mark} “{_one(f['typical'], 160)}” — {escape(f['reason'])}</li>")
    body = "<ol>" + "".join(items) + "</ol>" if items else "<p>no candidate</p>"
    return (
        f"<details><summary>{escape(LABELS[m])}: {info['significant']} significant of {len(info['findings'])} "
        f"candidates</summary>{link}{body}</details>"
    )


def render_audit(t: dict, audit_dir: str = "AUDIT") -> str:
    by = {(f["method"], f["rank"]): f for m in t["methods"].values() for f in m["findings"]}
    changed = [b for b in t["behaviours"] if b["id"] in t["changed"]]
    also = [b for b in t["behaviours"] if b["id"] not in t["changed"]]
    ran = [m for m in LABELS if t["methods"].get(m, {}).get("status") == "ran"]
    lead = (
        f"<p><b>{len(changed)} behaviour{'s' if len(changed) != 1 else ''}</b> the fine-tune shows and its base does "
        f"not, significant under at least one method's null model (false-discovery rate "
        f"{t['config']['alpha']:g} per method).</p>"
        if changed
        else "<p><b>No method found a significant change.</b> That is not proof there is none: each method sees "
        "only the prompts and vectors it was given (the table below says what each tried).</p>"
    )
    same = (
        "<p class=small>The fine-tune's weights equal the base's: every finding here would be a false positive.</p>"
        if t["same_weights"]
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>steerscope audit</title>"
        f"<style>{CSS}{EXTRA_CSS}</style></head><body>"
        f"<h1>Audit: {escape(t['model'])} against its base {escape(t['base'])}</h1>"
        f"<p class=small>{t['dtype']}; methods: {', '.join(escape(LABELS[m]) for m in ran)}. Folder: "
        f"{escape(audit_dir)}</p>{same}"
        f"<h2>What the fine-tune changed</h2>{lead}"
        + "".join(_behaviour_card(b, by, "changed") for b in changed)
        + "<h2>Every method on one table</h2><p class=small>A cell is the behaviour's rank among that method's "
        "findings and its q-value; — : that method did not find it significantly. Steered methods: learned vs "
        "matched-norm random vectors vs unsteered samples (`steerscope run`). Sampling methods: the fine-tune "
        "(or amplified) vs the base on the same prompts, exact test stratified by prompt.</p>"
        + _table(t)
        + (
            "<h2>Also in the base</h2><p class=small>Found on the fine-tune, but discovery on the base finds it too: "
            "not what the fine-tune changed.</p>" + "".join(_behaviour_card(b, by, "base") for b in also)
            if also
            else ""
        )
        + "<h2>Each method's candidates</h2>"
        + "".join(_method_section(m, t["methods"][m]) for m in LABELS if m in t["methods"])
        + f"<h2>Configuration</h2><pre>{escape(json.dumps(t['config'], indent=1))}</pre></body></html>"
    )
