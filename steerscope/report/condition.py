"""The `steerscope condition` report: one offline HTML page (inline SVG, nothing fetched) for a
condition set, rendered from the set's own hyperparams so it can be redrawn from the folder.

Sections: the chosen layer and how to use it; validation AUC and balanced accuracy per layer; ROC
curves of the best layer and a few others; the best layer's validation scores against its threshold;
the per-layer table (best layer marked); settings.
"""

from __future__ import annotations

import json
from html import escape

from ..directions.condition import layer_id
from ..directions.condition_fit import NARROW
from . import svg

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:21px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 9px;text-align:right}
th{background:#f4f4f4}tr.best td{background:#eef4fb;font-weight:600}.plots{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:420px}.note{font-size:13px;color:#555}
code{background:#f4f4f4;padding:0 3px}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
"""


def _others(layers: list[int], best: int, k: int = 3) -> list[int]:
    """Up to `k` layers besides the best, spread evenly over the range (first, middle, last ...)."""
    rest = [l for l in layers if l != best]
    if len(rest) <= k:
        return rest
    return sorted({rest[round(i * (len(rest) - 1) / (k - 1))] for i in range(k)})


def _scores_strip(d: dict, w: int = 420, h: int = 150) -> str:
    """The best layer's validation scores, ON above OFF, with the threshold."""
    on, off, t = d["scores_on"], d["scores_off"], d["threshold"]
    vals = on + off + [t]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 0.01
    c = svg.Chart(w, h, svg.linear(lo - pad, hi + pad, 50, w - 12), svg.linear(0, 3, h - 30, 8), class_="strip")
    c.axes(left=False).xlabel("cosine score", below=4)
    c.text(50, h - 16, f"{lo - pad:.3g}").text(w - 12, h - 16, f"{hi + pad:.3g}", anchor="end")
    c.vline(t, svg.RED, "4 3").text(
        c.x(t) + 3, 18, f"threshold {t:+.4f} ({'>' if d['above'] else '<'})", 10, fill=svg.RED
    )
    c.text(46, c.y(2) + 4, "ON", 11, "end", svg.BLUE).text(46, c.y(1) + 4, "OFF", 11, "end", svg.GREY)
    for y, pts, col in ((2, on, svg.BLUE), (1, off, svg.GREY)):
        for s in pts:
            c.dot(s, y, col, 4, f"{s:+.4f}", opacity=0.7)
    return c.svg()


def render_condition(vs, out: str = "DIR") -> str:
    """The page for a condition set `vs` (a `VectorSet` made by `find_condition`)."""
    hp = vs.config.hyperparams
    per = {int(k): v for k, v in hp["condition"].items()}
    best = int(hp["best_layer"])
    layers = sorted(per)
    b = per[best]
    n = hp.get("n", {})
    fit = hp.get("fit", {})
    when = {"condition": out, "layer": best, "threshold": b["threshold"], "above": b["above"]}
    lead = (
        f"<p><b>Best layer {best}</b>: validation AUC {b['auc']:.3f}, balanced accuracy {b['val_acc']:.3f} "
        f"(TPR {b['tpr']:.2f}, FPR {b['fpr']:.2f}) with the gate <code>cos(mean prompt state, c) "
        f"{'&gt;' if b['above'] else '&lt;'} {b['threshold']:+.4f}</code>, on {n.get('on_val', '?')} ON and "
        f"{n.get('off_val', '?')} OFF held-out prompts (fitted on {n.get('on_train', '?')} and {n.get('off_train', '?')}).</p>"
        f"<p class='note'>Use it: <code>steerscope generate ... --when {escape(out)}</code>, or in a steering entry "
        f'<code>"when": {escape(json.dumps(when))}</code>. Chat template: '
        f"{escape({None: 'when the model has one', True: 'on', False: 'off'}[fit.get('chat')])}; generate with the same "
        "setting, the gate reads the prompt as the model sees it.</p>"
    )
    span = max(b["scores_on"] + b["scores_off"]) - min(b["scores_on"] + b["scores_off"])
    if span < NARROW:
        lead += (
            f"<p class='note' style='color:#b00'>The validation scores at layer {best} span only {span:.4f} in cosine: "
            "the mean prompt state is dominated by a component every prompt shares (e.g. the first token's massive "
            "activation), so the threshold is fragile to prompt length and system prompt.</p>"
        )
    if b.get("train_auc", 0) - b["auc"] > 0.15:
        lead += (
            f"<p class='note' style='color:#b00'>Train AUC {b['train_auc']:.3f} is far above validation "
            f"{b['auc']:.3f}: the vector overfits; give more prompts.</p>"
        )
    lo = min([0.5] + [per[l][f] for l in layers for f in ("auc", "val_acc", "train_auc") if f in per[l]])
    cols = {"val AUC": svg.BLUE, "val balanced acc": svg.GREEN, "train AUC": svg.LIGHT}
    per_layer = svg.line_chart(
        {k: [(l, per[l][f]) for l in layers] for k, f in (("train AUC", "train_auc"), ("val AUC", "auc"),
                                                          ("val balanced acc", "val_acc"))},
        "layer", "validation", cols, w=460, h=240, vline=best, ylim=(lo, 1.0),
    )  # fmt: skip
    shown = _others(layers, best) + [best]  # the best drawn last, on top
    others = [c for c in svg.PALETTE if c != svg.RED]
    roc_cols = {f"L{l}": (svg.RED if l == best else others[i % len(others)]) for i, l in enumerate(shown)}
    roc = svg.line_chart(
        {f"L{l}": [tuple(p) for p in per[l]["roc"]] for l in shown},
        "false positive rate (OFF fired)",
        "true positive rate (ON fired)",
        roc_cols,
        w=340,
        h=320,
        diag=True,
        ylim=(0.0, 1.0),
    )
    roc_key = svg.key(
        (f"layer {l}" + (" (best)" if l == best else "") + f", AUC {per[l]['auc']:.3f}", roc_cols[f"L{l}"])
        for l in sorted(shown)
    )
    rows = "".join(
        f"<tr{' class=best' if l == best else ''}><td>{l}{' ★' if l == best else ''}</td><td>{escape(layer_id(l))}</td>"
        f"<td>{d['auc']:.3f}</td><td>{d['val_acc']:.3f}</td><td>{d['tpr']:.2f}</td><td>{d['fpr']:.2f}</td>"
        f"<td>{d['threshold']:+.4f}</td><td>{'&gt;' if d['above'] else '&lt;'}</td><td>{d.get('train_auc', float('nan')):.3f}</td></tr>"
        for l in layers
        for d in (per[l],)
    )
    return "".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'><title>steerscope condition</title>",
            f"<style>{CSS}{svg.CSS}</style></head><body>",
            f"<h1>steerscope condition: {escape(str(hp.get('data') or 'ON vs OFF'))} on {escape(vs.config.model_id)}</h1>",
            lead,
            "<h2>Per layer</h2><div class='plots'><figure>",
            per_layer,
            f"<figcaption>validation AUC and balanced accuracy per layer (dashed: the best layer); "
            f"{svg.key((k, c) for k, c in cols.items())}</figcaption></figure><figure>",
            roc,
            f"<figcaption>validation ROC curves (dotted: chance) {roc_key}</figcaption></figure></div>",
            f"<h2>Layer {best}: validation scores</h2><figure>",
            _scores_strip(b),
            "<figcaption>each held-out prompt's cosine with the condition vector; the gate fires on the "
            f"{'right' if b['above'] else 'left'} of the threshold</figcaption></figure>",
            "<h2>Table</h2><p class='note'>Balanced accuracy = (TPR + 1 − FPR) / 2 at the threshold that maximises "
            "it on the validation split; AUC on the chosen side. ★ = the chosen layer (best balanced accuracy, "
            "then AUC, then the earlier layer).</p>",
            "<table><tr><th>layer</th><th>id</th><th>val AUC</th><th>val bal. acc</th><th>TPR</th><th>FPR</th>"
            f"<th>threshold</th><th>side</th><th>train AUC</th></tr>{rows}</table>",
            f"<h2>Settings</h2><pre>{escape(json.dumps({'fit': fit, 'n': n, 'method': vs.config.method}, indent=1))}</pre>",
            "</body></html>",
        ]
    )
