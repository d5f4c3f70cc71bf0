"""The `steerscope refine` report: one offline HTML page, the held-out result first.

Sections: the finding (held-out scorer rate and KL of the best seed, the refined vector and the
unsteered model); the search (best and mean fitness per generation, with the R multiple of each);
per-coordinate growth with R; sparsity in the neuron and SAE bases; held-out completions side by
side; the seeds; settings.
"""

from __future__ import annotations

import json
from html import escape

from . import svg
from .bench import CSS


def _headline(ev: dict, scorer: str, method: str) -> str:
    h = ev["heldout"]
    s, r, u = h["seed"], h["refined"], h["unsteered"]
    better = r["score"] > s["score"]
    verdict = (
        "the refined vector shows the behaviour more often than its seed"
        if better
        else "the refined vector does not beat its seed here"
        if r["score"] < s["score"]
        else "the refined vector scores the same as its seed here"
    )
    tr = ev["train"]
    short = scorer if len(scorer) <= 48 else scorer[:45] + "…"
    return (
        f"<p class='lead'><b>{escape(verdict.capitalize())}</b> on {len(ev['prompts'])} {escape(ev['split'])} prompts "
        f"(scorer <code title='{escape(scorer)}'>{escape(short)}</code>): <b>{r['score']:.2f}</b> refined vs {s['score']:.2f} for the best seed "
        f"<code>{escape(ev['seed_id'])}</code> and {u['score']:.2f} unsteered; p95 per-token KL on neutral rollouts "
        f"{r['kl']:.2f} vs {s['kl']:.2f} nats. Search ({escape(method)}): train fitness {tr['seed_fitness']:.3f} → "
        f"{tr['refined_fitness']:.3f}; |v| {ev['R_seed']:.3g} → {ev['R_refined']:.3g}; cosine to the seed "
        f"{ev['cosine_seed_refined']:.2f}.</p>"
    )


def _search_plot(hist: list[dict]) -> str:
    best = [(g + 1, max(r["fitness"])) for g, r in enumerate(hist)]
    mean = [(g + 1, sum(r["fitness"]) / len(r["fitness"])) for g, r in enumerate(hist)]
    so_far = [(g, max(b for _, b in best[:g])) for g in range(1, len(best) + 1)]
    mult = [(g + 1, r["mult"]) for g, r in enumerate(hist)]
    cols = {"best": svg.BLUE, "best so far": svg.GREEN, "mean": svg.LIGHT, "R multiple": svg.RED}
    key = svg.key((k, cols[k]) for k in ("best so far", "best", "mean"))
    return (
        "<div class='plots'><figure>"
        + svg.line_chart({"mean": mean, "best": best, "best so far": so_far}, "generation", "fitness", cols, w=380)
        + f"<figcaption>fitness per generation {key}</figcaption></figure><figure>"
        + svg.line_chart({"R multiple": mult}, "generation", "R / R seed", cols, w=300)
        + "<figcaption>R annealed up and down</figcaption></figure></div>"
    )


def _growth(g: dict) -> str:
    if len(g["mults"]) < 2:
        return "<p class='note'>One R multiple only: no growth to show (give --anneal several values).</p>"
    dims = g["dims"]
    cols = {f"dim {d}": svg.color(i) for i, d in enumerate(dims)}
    series = {f"dim {d}": list(zip(g["mults"], [abs(x) for x in g["per_unit_R"][str(d)]])) for d in dims}
    flat = [
        d
        for d in dims
        if max(abs(x) for x in g["per_unit_R"][str(d)]) > 0
        and min(abs(x) for x in g["per_unit_R"][str(d)]) / max(abs(x) for x in g["per_unit_R"][str(d)]) > 0.7
    ]
    key = svg.key((f"dim {d}", cols[f"dim {d}"]) for d in dims)
    cos = ", ".join(f"×{m:g}: {c:.2f}" for m, c in zip(g["mults"], g["cosine_to_refined"]))
    return (
        f"<div class='plots'><figure>{svg.line_chart(series, 'R multiple', '|v_i| / |v|', cols, w=420, h=240)}"
        "<figcaption>the refined vector's largest coordinates, in the best vector at each R</figcaption></figure></div>"
        f"{key}<p class='note'>Keep their share of the norm (within 30 %) across R: "
        f"{escape(', '.join(f'dim {d}' for d in flat)) or 'none'}. Cosine of each R's best vector to the refined one: {escape(cos)}.</p>"
    )


def _sparsity(sp: dict) -> str:
    has_sae = any("sae_k90" in r for r in sp.values())
    head = (
        "<tr><th>vector</th><th>neuron k90</th>"
        + ("<th>SAE k90</th><th>top SAE features (cosine)</th>" if has_sae else "")
        + "</tr>"
    )
    rows = []
    for name, r in sp.items():
        cells = f"<td>{escape(name)}</td><td class='num'>{r['neuron_k90']} / {r['d_model']}</td>"
        if has_sae:
            top = ", ".join(f"{i} ({c:+.2f})" for i, c in r.get("sae_top", []))
            cells += f"<td class='num'>{r.get('sae_k90', '–')} / {r.get('n_latents', '–')}</td><td>{escape(top)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    ref = sp.get("refined", {})
    seeds = [r for n, r in sp.items() if n != "refined"]
    notes = []
    for key, basis in (("neuron_k90", "neuron"), ("sae_k90", "SAE feature")):
        if key in ref and seeds:
            lo = min(r[key] for r in seeds)
            notes.append(
                f"{basis} basis: the refined vector is {'sparser than' if ref[key] < lo else 'not sparser than'} "
                f"every seed ({ref[key]} vs {lo} or more coordinates for 90 % of the squared mass)"
            )
    return (
        f"<table>{head}{''.join(rows)}</table><p class='note'>k90: how many coordinates (SAE: unit decoder rows) hold "
        f"90 % of the vector's squared mass; fewer = sparser. {escape('; '.join(notes))}.</p>"
    )


def _examples(ev: dict) -> str:
    h = ev["heldout"]
    rows = "".join(
        f"<tr><td>{escape(p)}</td><td>{escape(h['unsteered']['texts'][i])}</td><td>{escape(h['seed']['texts'][i])}</td>"
        f"<td>{escape(h['refined']['texts'][i])}</td></tr>"
        for i, p in enumerate(ev["prompts"])
    )
    return (
        f"<table class='ex'><tr><th>prompt</th><th>unsteered</th><th>seed {escape(ev['seed_id'])}</th><th>refined</th></tr>"
        f"{rows}</table>"
    )


def render_refine(config: dict, scorer: str, ev: dict, seeds: dict, model_id: str, out: str) -> str:
    method = config["method"]
    seed_rows = "".join(
        f"<tr><td>{escape(r['id'])}{' ✓' if r['id'] in seeds['ids'] else ''}</td><td class='num'>{r['fitness']:.3f}</td>"
        f"<td class='num'>{r['score']:.2f}</td><td class='num'>{r['kl']:.2f}</td></tr>"
        for r in seeds["all"]
    )
    return "".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>steerscope refine</title><style>{CSS}</style></head><body>",
            f"<h1>steerscope refine: {escape(method)} around {len(seeds['ids'])} seed{'s' if len(seeds['ids']) != 1 else ''} "
            f"on {escape(model_id)}, layer {seeds['layer']}</h1>",
            _headline(ev, scorer, method),
            f"<p class='note'>Use it: <code>steerscope generate --vector {escape(out)}/vectors --index refined</code>. "
            f"Fitness = mean <code>{escape(scorer)}</code> on the train prompts − {config['kl_weight']:g} × max(0, p{round(config['kl_quantile'] * 100)} KL − "
            f"{ev['kl_budget']:.3g}"
            + (" (the median KL of the input vectors)" if config["kl_budget"] is None else "")
            + ").</p>",
            "<p class='note'>The search maximises what the scorer measures: read the completions below before trusting a "
            "higher score (a regex can be satisfied by text that does not show the behaviour).</p>",
            "<h2>Held-out completions</h2>",
            _examples(ev),
            "<h2>Search</h2>",
            _search_plot(ev["train"]["history"]),
            "<h2>Which dimensions keep their magnitude as R varies</h2>",
            _growth(ev["growth"]),
            "<h2>Sparsity</h2>",
            _sparsity(ev["sparsity"]),
            "<h2>Seeds</h2><p class='note'>Every vector of the input folder scored on the train prompts; ✓ = a seed.</p>"
            f"<table><tr><th>vector</th><th>fitness</th><th>score</th><th>KL p95</th></tr>{seed_rows}</table>",
            f"<h2>Settings</h2><details><summary>config</summary><pre>{escape(json.dumps(config, indent=1))}</pre></details>",
            "</body></html>",
        ]
    )
