"""Choosing R: the calibrated R, checked against a few multiples of it by what vectors do.

MELBO's observation (Mack & Turner 2024): there is a "Goldilocks" norm where learned vectors change
the completions but random vectors of the same norm mostly do not. Below it nothing changes; above
it any vector derails the model, so learned and random look alike. The DCT calibration (the R
where the target layer's response is half nonlinear, `calibrate_R`) lands near it, but not on it
for every model; so the run checks a few multiples of the calibrated R: at each, it learns a few
probe vectors with the run's own method, draws random vectors of the same norm (more of them:
they need no training, and the rule thresholds their share), generates short
completions, and counts the completions whose meaning moved away from the unsteered one (cosine
distance of sentence embeddings above the clustering threshold, i.e. a different behaviour). It
keeps the LARGEST R where at most half of the random completions moved and learned vectors moved
clearly more (at least `min_gap` more of their completions): the upper edge of the zone, where
vectors are as strong as they can be before any vector of that norm derails the model. A planted
behaviour behind a trigger needs a push of about that size: on both model organisms the trigger's
own direction elicits it only from ~1-1.5x the calibrated R (benchmarks/planted_direction.py),
while a strong objective (output KL) already moves every completion at 0.5x, where the gap alone
would pick the smallest R. With no such multiple: the largest gap, ties to the smaller R.

`MULTIPLES`, the run's default, goes no lower than the calibrated R: with kl at layer 12 of the
organisms, 0.5x was chosen in 3 of 9 runs, each time because random vectors moved 53-59 % of the
completions at 1x (one standard error, about 9 points on 32 completions, above the 50 % allowed),
and each of those runs lost the planted behaviour its 1x run found (benchmarks/bench_planted.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..directions.discovery import DiscoverConfig, calibrate_R, discover
from ..directions.discovery.baselines import random_directions
from ..directions.vectors import VectorSet
from ..generation import generate
from .embed import embed

MULTIPLES = (1.0, 2.0)  # the multiples of the calibrated R tried by default (module docstring)


@dataclass
class GoldilocksResult:
    calibrated: float  # the DCT-style calibrated R
    chosen: float  # the R the run uses
    rows: list[dict] = field(default_factory=list)  # {multiple, R, learned, random}: shares of completions moved
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def moved_share(completions, emb, threshold: float, control_ids) -> dict[str, float]:
    """Share of steered completions whose embedding is farther than `threshold` (cosine distance)
    from the unsteered completion of the same prompt, for learned vectors and for the controls
    (`control_ids`)."""
    control_ids = set(control_ids)
    e = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    base = {c.prompt_index: i for i, c in enumerate(completions) if c.vector_id is None}
    out: dict[str, list[float]] = {"learned": [], "random": []}
    for i, c in enumerate(completions):
        if c.vector_id is None:
            continue
        dist = 1.0 - float(e[i] @ e[base[c.prompt_index]])
        out["random" if c.vector_id in control_ids else "learned"].append(float(dist > threshold))
    return {k: sum(v) / len(v) if v else 0.0 for k, v in out.items()}


def goldilocks_R(lm, prompts: list[str], cfg: DiscoverConfig, *, layer_range, multiples=MULTIPLES,
                 probe_vectors: int = 4, random_vectors: int = 16, max_new_tokens: int = 24, threshold: float = 0.35,
                 max_random: float = 0.5, min_gap: float = 0.25, log=None) -> GoldilocksResult:
    """Calibrate R, then pick among `multiples` of it as the module docstring says (no
    multiples: the calibrated R as it is). Random vectors cost no training, so there are more of
    them (`random_vectors`) than probes: the rule's threshold is on their share, and with 4 of
    them on 2 prompts one completion either way moved that share by 12.5 points (on the french
    organism seeds 0 and 1 read 25 % and 62 % at the same multiple)."""
    R0, _ = calibrate_R(layer_range, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=cfg.seed)
    if not multiples:
        return GoldilocksResult(R0, R0, [], "calibrated R (no Goldilocks check)")
    # Largest multiple first, because the rule keeps the largest R that qualifies: the first that
    # does ends the check (smaller ones could not be chosen), and where the random vectors alone
    # already moved more than `max_random`, no multiple there can qualify, so its probes are not
    # trained. Both skips give the same choice as trying everything, for a fraction of the cost.
    # The unsteered completions and their embeddings, which every multiple is compared with
    comps = generate(lm, prompts, max_new_tokens=max_new_tokens, chat=cfg.chat, progress=False)
    base = (comps, embed([c.text for c in comps]))
    n_rand = min(random_vectors, lm.d_model)
    dirs = random_directions(n_rand, lm.d_model, cfg.seed + 7)  # (n, d) orthonormal
    layer = cfg.resolve_layers(lm.n_layers)[0]
    rows: list[dict] = []
    for m in sorted(multiples, reverse=True):
        ctrl = VectorSet.create(lm, dirs * (R0 * m), layer, "random", ids=[f"control-{i}" for i in range(n_rand)])
        rand = _moved(lm, prompts, base, list(ctrl), ctrl.ids, cfg, max_new_tokens, threshold)["random"]
        row = {"multiple": m, "R": R0 * m, "learned": None, "random": rand, "learned_completions": 0,
               "random_completions": n_rand * len(prompts)}
        rows.append(row)
        if rand > max_random:
            row["skipped"] = f"random vectors moved more than {max_random:.0%}: no probes trained"
            if log:
                log(f"R = {m:g} x {R0:.3g}: {rand:.0%} of random completions moved; probes not trained")
            continue
        probe = dataclasses.replace(cfg, R=R0 * m, n_vectors=min(probe_vectors, cfg.n_vectors), method_config=_one_candidate(cfg))
        vs = discover(lm, prompts, probe, layer_range=layer_range, progress=False)
        row["learned"] = _moved(lm, prompts, base, list(vs), [], cfg, max_new_tokens, threshold)["learned"]
        row["learned_completions"] = len(vs) * len(prompts)
        if log:
            log(f"R = {m:g} x {R0:.3g}: {row['learned']:.0%} of learned and {rand:.0%} of random completions moved")
        if row["learned"] - rand >= min_gap:
            break  # the largest multiple that qualifies: the smaller ones cannot be chosen
    rows.sort(key=lambda r: r["multiple"])
    best, reason = choose(rows, max_random, min_gap)
    tried = {r["multiple"] for r in rows}
    if any(m not in tried for m in multiples):
        reason += f"; smaller multiples not tried ({', '.join(f'{m:g}' for m in sorted(set(multiples) - tried))})"
    return GoldilocksResult(R0, best["R"], rows, reason)


def _moved(lm, prompts, base, vectors, control_ids, cfg, max_new_tokens, threshold) -> dict[str, float]:
    """`moved_share` of completions under `vectors`, against `base`: the unsteered completions and
    their embeddings (computed once for every multiple)."""
    steered = generate(lm, prompts, vectors=vectors, include_unsteered=False, max_new_tokens=max_new_tokens,
                       chat=cfg.chat, progress=False)
    emb = torch.cat([base[1], embed([c.text for c in steered])])
    return moved_share(base[0] + steered, emb, threshold, control_ids)


def _one_candidate(cfg: DiscoverConfig):
    """The method's settings without candidate selection (kl's `candidates`): a probe asks how
    strongly a vector of norm R moves completions, not which of many vectors to keep."""
    mc = cfg.method_config
    if mc is not None and any(f.name == "candidates" for f in dataclasses.fields(mc)):
        return dataclasses.replace(mc, candidates=1)
    return mc


def choose(rows: list[dict], max_random: float = 0.5, min_gap: float = 0.25) -> tuple[dict, str]:
    """The largest R where random vectors moved at most `max_random` of completions and learned
    ones at least `min_gap` more; else the largest gap among those under `max_random` (ties:
    smaller R); the smallest R when random vectors moved too much everywhere."""
    ok = [r for r in rows if r["random"] <= max_random]
    if not ok:
        return (min(rows, key=lambda r: r["R"]),
                f"random vectors moved more than {max_random:.0%} of completions at every multiple; kept the smallest")
    clear = [r for r in ok if r["learned"] - r["random"] >= min_gap]
    if clear:
        best = max(clear, key=lambda r: r["R"])
        return best, (f"the largest R where learned vectors moved clearly more completions than random ones "
                      f"({best['learned']:.0%} vs {best['random']:.0%}) and random ones moved at most {max_random:.0%}")
    best = max(ok, key=lambda r: (round(r["learned"] - r["random"], 6), -r["R"]))
    return best, (f"no multiple where learned vectors moved {min_gap:.0%} more completions than random ones; the "
                  f"largest gap ({best['learned']:.0%} vs {best['random']:.0%}) among multiples where at most "
                  f"{max_random:.0%} of random completions moved")
