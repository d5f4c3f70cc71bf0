"""The `steerscope bench` report: one offline HTML page, the comparison first.

Sections: the headline (methods ranked by their mean score over concepts at the matched KL);
a methods x concepts table per measure, each naming its judge; strength-vs-effect curves (concept
rate against the KL actually reached at 0.5x, 1x, 2x the matched coefficient); detection ROC
curves; A/B steerability; example completions per method at the matched KL; settings and times.
"""

from __future__ import annotations

import json
import math
from html import escape

from . import svg

COLORS = {
    "diffmean": svg.BLUE,
    "pca": svg.GREEN,
    "probe": svg.ORANGE,
    "sae": svg.PURPLE,
    "discovered": svg.RED,
    "prompting": svg.INK,
    "distill": svg.TEAL,
}
CSS = (
    """body{font:14px/1.45 system-ui,sans-serif;margin:1.2rem 2rem;color:#1d2330;max-width:1400px}
h1{font-size:1.35rem;margin:.2rem 0}h2{font-size:1.1rem;margin:1.6rem 0 .4rem;border-bottom:1px solid #ddd}
h3{font-size:.95rem;margin:.8rem 0 .3rem}.lead{font-size:15px;max-width:62rem}
table{border-collapse:collapse;font-size:13px;margin:.3rem 0 .8rem}td,th{border-bottom:1px solid #e3e6ec;padding:.2rem .5rem}
th{background:#f4f5f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:#eef5ea}.muted{color:#888}.ci{color:#777;font-size:11px;font-weight:400}.note{color:#555;font-size:12px;max-width:60rem}
.plots{display:flex;flex-wrap:wrap;gap:.8rem}figure{margin:0}figcaption{font-size:12px;color:#444;text-align:center}
.ex td{vertical-align:top;white-space:pre-wrap;max-width:30rem;font-size:12px}
details{margin:.4rem 0}.grp{border-left:1px solid #c8ccd6}"""
    + svg.CSS
)

# (key, title, how to read it, judge, higher is better)
MEASURES = [
    (
        "score",
        "Score (harmonic mean of concept, relevance, fluency)",
        "AxBench-style aggregate per completion, averaged",
        "offline",
        True,
    ),
    ("concept_rate", "Concept rate", "share of completions the embedding judge says show the concept", "offline", True),
    ("selectivity", "Selectivity", "concept change - 0.1 x mean |change| on the other concepts", "offline", True),
    ("relevance", "Instruction relevance", "cosine of the answer to the unsteered answer", "offline", True),
    (
        "fluency_logprob",
        "Fluency (log p / token)",
        "mean log-probability per token under the unsteered model",
        "log-prob",
        True,
    ),
]


def _n(x, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt) if isinstance(x, (int, float)) else escape(str(x))


def _methods(per: list[dict]) -> list[str]:
    seen: list[str] = []
    for c in per:
        for m in c["methods"]:
            if m not in seen:
                seen.append(m)
    return seen


def _val(c: dict, m: str, key: str):
    r = c["methods"].get(m) or {}
    if key.startswith("detection."):
        return (r.get("detection") or {}).get(key.split(".", 1)[1])
    if key.startswith("ab."):
        return (r.get("ab") or {}).get(key.split(".", 1)[1])
    if key in ("kl", "coef"):
        return r.get(key)
    if key.startswith("llm."):
        return ((r.get("at") or {}).get("1", {}).get("llm") or {}).get(key.split(".", 1)[1])
    return (r.get("at") or {}).get("1", {}).get(key)


def _table(per: list[dict], methods: list[str], key: str, higher: bool | None = True, fmt: str = ".2f") -> str:
    """Methods x concepts; the best cell per concept in bold when it is unique (`higher` None:
    no best, e.g. matched coefficients)."""
    head = "<tr><th>method</th>" + "".join(f"<th>{escape(c['concept'])}</th>" for c in per) + "<th>mean</th></tr>"
    best = {}
    for c in per:
        vals = sorted(
            (v if higher else -v, m)
            for m in methods
            if isinstance(v := _val(c, m, key), (int, float)) and not math.isnan(v)
        )
        if higher is not None and len(vals) > 1 and format(vals[-1][0], fmt) != format(vals[-2][0], fmt):
            best[c["concept"]] = vals[-1][1]
    body = []
    for m in methods:
        vals = [_val(c, m, key) for c in per]
        nums = [v for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]
        if not nums and all((c["methods"].get(m) or {}).get("kind") != "skip" for c in per):
            continue
        cells = []
        for c, v in zip(per, vals):
            r = c["methods"].get(m) or {}
            if r.get("kind") == "skip":
                cells.append(f'<td class="muted" title="{escape(r["info"]["skipped"])}">skipped</td>')
            else:
                cls = "num best" if best.get(c["concept"]) == m else "num"
                ci = (((r.get("at") or {}).get("1") or {}).get("ci") or {}).get(key)
                band = f' <span class="ci">[{_n(ci[0], fmt)}, {_n(ci[1], fmt)}]</span>' if ci else ""
                cells.append(f'<td class="{cls}">{_n(v, fmt)}{band}</td>')
        mean = sum(nums) / len(nums) if nums else None
        body.append(f'<tr><td>{escape(m)}</td>{"".join(cells)}<td class="num">{_n(mean, fmt)}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>" if body else '<p class="muted">no numbers</p>'


def _key(methods: list[str]) -> str:
    return svg.key((m, COLORS.get(m, svg.INK)) for m in methods)


def _headline(per: list[dict], methods: list[str], meta: dict) -> str:
    kl = meta["config"]["kl"]
    means = []
    for m in methods:
        v = [x for c in per if isinstance(x := _val(c, m, "score"), (int, float)) and not math.isnan(x)]
        r = [x for c in per if isinstance(x := _val(c, m, "concept_rate"), (int, float)) and not math.isnan(x)]
        if v:
            means.append((sum(v) / len(v), sum(r) / len(r) if r else float("nan"), m, len(v)))
    means.sort(reverse=True)
    if not means:
        return '<p class="lead">No method produced a judged completion.</p>'
    best = means[0]
    wins: dict[str, list[str]] = {}
    for c in per:
        vals = sorted(
            (x, m) for m in methods if isinstance(x := _val(c, m, "score"), (int, float)) and not math.isnan(x)
        )
        if len(vals) > 1 and vals[-1][0] > vals[-2][0] + 1e-9:
            wins.setdefault(vals[-1][1], []).append(c["concept"])
    gap = _paired_gaps(per, best[2], [m for _, _, m, _ in means])
    rank = "".join(
        f"<tr><td>{i + 1}</td><td>{escape(m)}</td><td class='num'>{s:.3f}</td><td class='num'>{r:.2f}</td>"
        f"<td class='num'>{_gap_cell(gap.get(m)) if m != best[2] else '–'}</td>"
        f"<td>{escape(', '.join(wins.get(m, [])) or '–')}</td></tr>"
        for i, (s, r, m, _) in enumerate(means)
    )
    tied = [m for m, g in gap.items() if m != best[2] and g[2] > 0 and g[0] < 2 * g[1]]
    noise = (
        f" <b>{escape(', '.join(tied))}</b> {'is' if len(tied) == 1 else 'are'} within two standard errors of it "
        f"(paired over the same instructions): at this sample size {'it is' if len(tied) == 1 else 'they are'} "
        "not distinguishable from the best."
        if tied
        else ""
    )
    base = [c["unsteered"]["concept_rate"] for c in per]
    return (
        f'<p class="lead">At matched side effects (per-token KL to the unsteered model = {kl["target"]:g} nats at the '
        f"{100 * kl['quantile']:g}th percentile over {kl['tokens']}-token neutral rollouts), <b>{escape(best[2])}</b> "
        f"has the highest mean score over {best[3]} concept{'s' if best[3] != 1 else ''} ({best[0]:.3f}; concept rate {best[1]:.2f}, unsteered "
        f"{sum(base) / len(base):.2f}). Scores and rates are the offline judge's ({escape(meta['judges']['offline'])}); "
        f"prompting is not matched, its own KL is in the KL table.{noise}</p>"
        f"<table><tr><th>#</th><th>method</th><th>mean score</th><th>mean concept rate</th><th>score below the best (± SE)</th>"
        f"<th>best on</th></tr>{rank}</table>"
    )


def _paired_gaps(per: list[dict], best: str, methods: list[str]) -> dict[str, tuple[float, float, int]]:
    """Per method: mean and standard error of (best's score - its score) over the same report
    instructions of every concept (per-completion harmonic-mean scores), and the pair count."""
    out = {}
    for m in methods:
        d = []
        for c in per:
            a, b = (c["methods"].get(best) or {}).get("at"), (c["methods"].get(m) or {}).get("at")
            if not a or not b:
                continue
            nc = c["n_instructions"]["choose"]
            d += [x["hm"] - y["hm"] for x, y in zip(a["1"]["rows"][nc:], b["1"]["rows"][nc:])]
        if len(d) > 1:
            mu = sum(d) / len(d)
            sd = math.sqrt(sum((x - mu) ** 2 for x in d) / (len(d) - 1))
            out[m] = (mu, sd / math.sqrt(len(d)), len(d))
    return out


VARIANTS = ("unsteered", "ungated", "gated")


def _conditional(cond: list[dict], cfg: dict) -> str:
    """The CAST section: per concept, per method, the concept rate on on-topic and off-topic
    prompts unsteered / ungated / gated, each variant's selectivity, and how often the gate fired."""
    c0 = cond[0]
    k = c0["condition"]
    out = [
        "<h2>Conditional steering (CAST)</h2>",
        f"<p class='note'>Each vector at its matched coefficient, gated on the condition set "
        f"<code>{escape(str(k['folder']))}</code>: it steers a prompt only when the cosine between the prompt's mean "
        f"hidden state at layer {k['layer']} and the condition vector is {'above' if k['above'] else 'below'} "
        f"{k['threshold']:.3f}. Rates: share of completions the offline judge says show the concept, over "
        f"{c0['on_topic']['n']} on-topic ({escape(str(c0['on_topic']['set']))}) and {c0['off_topic']['n']} off-topic "
        f"({escape(str(c0['off_topic']['set']))}) prompts, greedy, {cfg['max_new_tokens']} tokens. Selectivity = "
        "on-topic rate − off-topic rate. An ideal gate keeps the ungated on-topic rate and the unsteered off-topic "
        "rate; fired: share of prompts whose gate fired.</p>",
    ]
    head = (
        "<tr><th rowspan=2>method</th><th rowspan=2>coef</th>"
        + "".join(f"<th colspan=3 class='grp'>{v}</th>" for v in VARIANTS)
        + "<th colspan=2 class='grp'>gate fired</th></tr><tr>"
        + "<th class='grp'>on-topic</th><th>off-topic</th><th>selectivity</th>" * len(VARIANTS)
        + "<th class='grp'>on-topic</th><th>off-topic</th></tr>"
    )
    for c in cond:
        body = []
        for m, r in c["methods"].items():
            v = r["values"]
            cells = [
                v.get(f"{x}.{meas}") for x in VARIANTS for meas in ("rate_on_topic", "rate_off_topic", "selectivity")
            ]
            cells += [v.get(f"gated.{meas}") for meas in ("fired_on_topic", "fired_off_topic")]
            body.append(
                f"<tr><td>{escape(m)}</td><td class='num'>{_n(r['coef'], '.3g')}</td>"
                + "".join(f"<td class='num{' grp' if i % 3 == 0 else ''}'>{_n(x)}</td>" for i, x in enumerate(cells))
                + "</tr>"
            )
        out.append(f"<h3>{escape(c['concept'])}</h3>")
        out.append(f"<table>{head}{''.join(body)}</table>" if body else "<p class='muted'>no vector method</p>")
    return "".join(out)


def _gap_cell(g) -> str:
    return "–" if g is None else f"{g[0]:.3f} ± {g[1]:.3f}"


def render_bench(meta: dict, per: list[dict], cond: list[dict] | None = None) -> str:
    methods = _methods(per)
    cfg = meta["config"]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>steerscope bench</title><style>{CSS}</style></head><body>",
        f"<h1>steerscope bench: {len(methods)} method{'s' if len(methods) != 1 else ''} × {len(per)} concept{'s' if len(per) != 1 else ''} on {escape(meta['model_id'])} ({escape(cfg['model']['dtype'])}), layer {meta['layer']}</h1>",
        _headline(per, methods, meta),
    ]
    out.append("<h2>Methods × concepts at the matched KL</h2>")
    out.append(
        f'<p class="note">Report split: {per[0]["n_instructions"]["report"]} instructions per concept, greedy, '
        f"{cfg['max_new_tokens']} tokens. Brackets: 95 % bootstrap interval over the instructions (score and concept rate). "
        f"Bold: best per concept. Offline judge: {escape(meta['judges']['offline'])}"
        + (f"; LLM judge: {escape(meta['judges']['llm'])}" if meta["judges"]["llm"] else "; no LLM judge given")
        + ".</p>"
    )
    for key, title, how, judge, higher in MEASURES:
        jname = meta["judges"]["offline"] if judge == "offline" else "the unsteered model's log-probabilities"
        out.append(f"<h3>{escape(title)}</h3><p class='note'>{escape(how)}; judge: {escape(jname)}.</p>")
        out.append(_table(per, methods, key, higher))
    if meta["judges"]["llm"]:
        out.append(
            f"<h3>LLM judge: completions with all three ratings</h3><p class='note'>judge: "
            f"{escape(meta['judges']['llm'])}. A rating is missing when the reply held no number or the request "
            "failed; the tables below average the ratings that came back, so a cell over few completions is "
            "weak evidence.</p>"
        )
        out.append(_table(per, methods, "llm.rated", higher=None, fmt=".0%"))
        for k in ("score", "concept", "instruction", "fluency"):
            out.append(f"<h3>LLM judge: {k} (0-2)</h3><p class='note'>judge: {escape(meta['judges']['llm'])}.</p>")
            out.append(_table(per, methods, f"llm.{k}"))
    out.append(
        "<h3>Side effects reached (per-token KL quantile, nats)</h3><p class='note'>vectors: the matched value "
        "(target ± 10 %); prompting and distill: measured on the same rollouts, not matched.</p>"
    )
    out.append(_table(per, methods, "kl", higher=None, fmt=".3f"))
    out.append("<h3>Matched coefficient</h3>" + _table(per, methods, "coef", higher=None, fmt=".3g"))
    out.append(
        "<h2>Detection</h2><p class='note'>AUROC of the max-over-tokens projection (SAE: the feature's activation) "
        "on held-out texts (choose + report splits): positives vs negatives and hard negatives; then vs hard negatives only.</p>"
    )
    out.append("<h3>AUROC (all negatives)</h3>" + _table(per, methods, "detection.auroc"))
    out.append("<h3>AUROC (hard negatives)</h3>" + _table(per, methods, "detection.auroc_hard"))
    if cond:
        out.append(_conditional(cond, cfg))
    if any(c.get("ab") for c in per):
        abc = [c for c in per if c.get("ab")]
        out.append(
            "<h2>A/B steerability (CAA)</h2><p class='note'>Slope of P(behaviour answer) per unit multiplier of "
            f"the matched coefficient (multipliers {escape(str(cfg['ab_multipliers']))}), and the share of items whose "
            "own slope is negative (anti-steerable).</p>"
        )
        out.append("<h3>slope</h3>" + _table(abc, methods, "ab.slope", fmt=".3f"))
        out.append("<h3>anti-steerable share</h3>" + _table(abc, methods, "ab.anti_steerable", higher=False))
        plots = []
        for c in abc:
            series = {
                m: list(zip(r["ab"]["multipliers"], r["ab"]["p_behaviour"]))
                for m, r in c["methods"].items()
                if "slope" in (r.get("ab") or {})
            }
            plots.append(
                f"<figure>{svg.line_chart(series, 'multiplier of the matched coef', 'P(behaviour)', COLORS, ylim=(0, 1))}"
                f"<figcaption>{escape(c['concept'])} (unsteered {c['ab']['unsteered']:.2f})</figcaption></figure>"
            )
        out.append(_key(methods) + f"<div class='plots'>{''.join(plots)}</div>")
    out.append(
        "<h2>Strength vs effect</h2><p class='note'>Concept rate against the KL reached at "
        f"{escape(', '.join(f'{m:g}' for m in cfg['curve']))} × the matched coefficient (dashed: the budget). "
        "Prompting and distill are single points.</p>" + _key(methods)
    )
    plots = []
    for c in per:
        series = {}
        for m, r in c["methods"].items():
            if r.get("kind") == "vector":
                series[m] = sorted((r["kl_at"][k], r["at"][f"{float(k):g}"]["concept_rate"]) for k in r["kl_at"])
            elif "at" in r:
                series[m] = [(r["kl"], r["at"]["1"]["concept_rate"])]
        plots.append(
            f"<figure>{svg.line_chart(series, 'per-token KL (quantile)', 'concept rate', COLORS, vline=cfg['kl']['target'], ylim=(0, 1))}"
            f"<figcaption>{escape(c['concept'])} (unsteered {c['unsteered']['concept_rate']:.2f})</figcaption></figure>"
        )
    out.append(f"<div class='plots'>{''.join(plots)}</div>")
    out.append("<h2>Detection ROC curves</h2>" + _key(methods))
    plots = []
    for c in per:
        series = {m: [tuple(p) for p in r["detection"]["roc"]] for m, r in c["methods"].items() if "detection" in r}
        plots.append(
            f"<figure>{svg.line_chart(series, 'false-positive rate', 'true-positive rate', COLORS, w=220, h=200, diag=True, ylim=(0, 1))}"
            f"<figcaption>{escape(c['concept'])}</figcaption></figure>"
        )
    out.append(f"<div class='plots'>{''.join(plots)}</div>")
    out.append("<h2>Examples at the matched KL</h2>")
    for c in per:
        nc = c["n_instructions"]["choose"]
        base = c["unsteered"]["rows"]
        rows = []
        for i in range(nc, min(nc + 2, len(base))):
            cells = [
                f"<td><i>{escape(c['instructions'][i])}</i></td><td><b>unsteered</b><br>{escape(base[i]['text'])}</td>"
            ]
            for m, r in c["methods"].items():
                if "at" in r:
                    x = r["at"]["1"]["rows"][i]
                    cells.append(
                        f"<td><b>{escape(m)}</b> {'✓' if x['shows'][c['concept']] else '·'}<br>{escape(x['text'])}</td>"
                    )
            rows.append(f"<tr>{''.join(cells)}</tr>")
        out.append(
            f"<details {'open' if c is per[0] else ''}><summary>{escape(c['concept'])}: {escape(c['description'])}</summary>"
            f"<table class='ex'>{''.join(rows)}</table></details>"
        )
    out.append(
        "<h2>Notes and settings</h2><p class='note'>Offline judge held-out balanced accuracy on report-split texts: "
        + escape(", ".join(f"{k} {v:.2f}" for k, v in meta["judge_accuracy"].items()))
        + ".</p>"
    )
    for c in per:
        info = {m: r.get("info") for m, r in c["methods"].items() if r.get("info")}
        if info:
            out.append(f"<p class='note'><b>{escape(c['concept'])}</b>: {escape(json.dumps(info))}</p>")
    if meta.get("seconds"):
        out.append("<p class='note'>stage times in the last call (s): " + escape(json.dumps(meta["seconds"])) + "</p>")
    out.append(f"<details><summary>configuration</summary><pre>{escape(json.dumps(cfg, indent=1))}</pre></details>")
    out.append(f"<p class='note'>every number: {escape(meta['out'])}/results.jsonl</p></body></html>")
    return "".join(out)
