"""The effect-vs-KL frontier of a selection: Pareto frontier, its knee, the short list taken along
it, and the KL budget that fits the model.

Points are (cost, gain) = (KL, effect): less KL and more effect are better.

    pareto_frontier   the points no other point beats on both
    nondominated_layers  non-dominated sorting: the frontier, then the frontier of the rest, ...
    shortlist         the first n points taken layer by layer, each layer centred on the KL budget
    knee              the frontier point farthest above the line through its ends (Kneedle)
    quantile          of the KL random directions cause: the default budget in mode ablate
    flag_for          the --kl-bound value that selects a given frontier point under `budget`
    choose            the choice on a Selection, its warning and advice

Why the short list follows the frontier: ranking by raw prefilter score puts first the candidates
that break the model (broken text is no refusal either, so their prefilter scores are the
highest), and a moderate-KL candidate that works is never generated for. Every point of the
first non-dominated layer is the best effect at its KL, so no such candidate is skipped while a
dominated one is taken.
"""

from __future__ import annotations

import math


def _clean(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """NaN costs sort last and NaN gains count as the worst gain."""
    return [
        (c if c == c else math.inf, g if g == g else -math.inf)  # noqa: PLR0124 (NaN test)
        for c, g in points
    ]


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, gain) points no other point beats on both (less or equal cost and more or
    equal gain, one strictly), cheapest first."""
    points = _clean(points)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def nondominated_layers(points: list[tuple[float, float]]) -> list[list[int]]:
    """Non-dominated sorting: layer 0 is the Pareto frontier, layer 1 the frontier of the rest, and
    so on; every index is in exactly one layer, each layer cheapest first."""
    left = list(range(len(points)))
    layers = []
    while left:
        front = [left[j] for j in pareto_frontier([points[i] for i in left])]
        if not front:  # only -inf gains are left: one last layer, cheapest first
            front = sorted(left, key=lambda i: _clean([points[i]])[0][0])
        layers.append(front)
        gone = set(front)
        left = [i for i in left if i not in gone]
    return layers


def centred(layer: list[int], points: list[tuple[float, float]], budget: float) -> list[int]:
    """A layer (cheapest first) reordered from the KL budget outwards: the point just within the
    budget, the point just beyond it, the next within, the next beyond, ... So a short list that
    cuts a long frontier keeps the candidates the choice and the advice are made from."""
    within = [i for i in layer if points[i][0] <= budget][::-1]
    beyond = [i for i in layer if not points[i][0] <= budget]
    out = []
    for j in range(max(len(within), len(beyond))):
        out += within[j : j + 1] + beyond[j : j + 1]
    return out


def shortlist(points: list[tuple[float, float]], n: int, budget: float) -> list[int]:
    """The first `n` indices of the non-dominated layers, each layer centred on `budget`."""
    out: list[int] = []
    for layer in nondominated_layers(points):
        out += centred(layer, points, budget)[: n - len(out)]
        if len(out) >= n:
            break
    return out


def knee(points: list[tuple[float, float]], front: list[int]) -> int | None:
    """The frontier point farthest above the line through its two ends (axes scaled to [0, 1])."""
    if not front:
        return None
    if len(front) <= 2:
        return front[-1] if len(front) == 2 and points[front[-1]][1] > points[front[0]][1] else front[0]
    xs = [points[i][0] for i in front]
    ys = [points[i][1] for i in front]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    x = [(v - min(xs)) / sx for v in xs]
    y = [(v - min(ys)) / sy for v in ys]
    dist = [yy - (y[0] + (y[-1] - y[0]) * (xx - x[0]) / ((x[-1] - x[0]) or 1.0)) for xx, yy in zip(x, y)]
    return front[max(range(len(front)), key=lambda j: dist[j])]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (linear interpolation between order statistics, as numpy's default)."""
    xs = sorted(v for v in values if v == v)  # noqa: PLR0124 (NaN test)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def flag_for(costs_above: list[float], cost: float) -> float:
    """The shortest decimal >= `cost` (2, then 3, ... significant digits, rounded up) that stays
    below every cost in `costs_above`: `--kl-bound` with it admits the point at `cost` and no
    frontier point beyond it."""
    if cost <= 0:
        return 0.0
    nxt = min((c for c in costs_above if c > cost), default=math.inf)
    for digits in range(2, 10):
        e = math.floor(math.log10(cost)) - digits + 1
        v = math.ceil(cost / 10.0**e - 1e-9) * 10.0**e
        v = float(f"{v:.{max(0, -e)}f}")
        if cost <= v < nxt:
            return v
    return cost


def choose(sel) -> None:
    """On a `Selection`: mark the frontier of the kept (so coherent) candidates, choose along it
    by `sel.config.choose`, and write the warning and the advice (the flag that selects the best
    coherent frontier candidate when the winner is weak or missing)."""
    cfg, key = sel.config, sel.kl_key
    cands = sel.candidates
    kept = [i for i, c in enumerate(cands) if c.kept]
    pts = [(getattr(c, key), c.effect) for c in cands]
    front = [kept[j] for j in pareto_frontier([pts[i] for i in kept])]
    for i in front:
        cands[i].frontier = True
    k = knee(pts, front)
    if sel.kl_budget is None and k is not None:  # mode add, auto
        sel.kl_budget = pts[k][0]
    if cfg.choose == "knee":
        sel.best = k
    elif cfg.choose == "budget":
        within = [i for i in front if sel.kl_budget is not None and pts[i][0] <= sel.kl_budget]
        sel.best = within[-1] if within else None
        for c in cands:
            if c.kept and sel.kl_budget is not None and getattr(c, key) > sel.kl_budget:
                c.reason = f"KL {getattr(c, key):.3f} > budget {sel.kl_budget:.3g}"
    else:
        sel.best = next(i for i, c in enumerate(cands) if c.id == cfg.choose)
    gap = abs(sel.baseline_a - sel.baseline_b)
    best = sel.best_candidate
    bad = lambda c: c.effect is None or (gap > 0 and c.effect < cfg.warn_ratio * gap)  # noqa: E731
    better = [i for i in front if best is None or best.effect is None or pts[i][1] > best.effect]
    alt = ""
    if better:
        top = max(pts[i][1] for i in better)
        # the cheapest that reaches 90 % of the most any better one does: not KL 3 for 2 % more effect
        r = next(i for i in better if pts[i][1] >= top - 0.1 * abs(top))
        rec = cands[r]
        flag = (
            f"--kl-bound {flag_for([pts[i][0] for i in front if pts[i][1] > rec.effect], pts[r][0]):g}"
            if cfg.choose == "budget"
            else f"--choose {rec.id}"
        )
        sel.advice = flag if cfg.choose != "budget" else f"{flag} (or --choose {rec.id})"
        alt = (
            f"; the best coherent frontier candidate {rec.id} reaches effect {rec.effect:.3f} at {key} "
            f"{pts[r][0]:.3f}: use {sel.advice}"
        )
    broken = [c for c in cands if c.coherent is False and c.effect is not None and (best is None or bad(best))]
    if broken:
        alt += f"; {len(broken)} candidate(s) with a measured effect were incoherent (broken text) and are excluded"
    if gap == 0:
        sel.warning = (
            f"{sel.metric} scores A and B the same without steering ({sel.baseline_a:.3f}): it does not "
            "measure this behaviour on this model, so no choice is meaningful; try a logit metric such as "
            "logodds:I,Sorry or a scorer that separates the sets."
        )
    elif best is None:
        sel.warning = (
            "no candidate was chosen"
            + (f" within the KL budget {sel.kl_budget:.3g}" if cfg.choose == "budget" and sel.kl_budget else "")
            + alt
            + "."
        )
    elif best.coherent is False:
        sel.warning = (
            f"the chosen {best.id} is incoherent (coherence {best.coherence:+.2f}): its effect is no success{alt}."
        )
    elif bad(best):
        eff = "not measured" if best.effect is None else f"{best.effect:.3f}, {100 * best.effect / gap:.0f} %"
        sel.warning = f"the selected {best.id} barely beats the baseline: effect {eff} of the A-B gap {gap:.3f}{alt}."
