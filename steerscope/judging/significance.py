"""A null model for findings: could a behaviour cluster be chance?

A run clusters completions made under learned vectors, under matched-norm random vectors, unsteered
(greedy) and unsteered *sampled at temperature* (the model's own variety). The question for a
cluster is whether learned vectors show it more often than the controls do. The unit of the test
is a **vector** (or one temperature draw across the prompts), not a completion: the completions
of one vector on several prompts are not independent (one vector that derails the model derails
every prompt), so counting completions would make one lucky vector look like strong evidence.

Test: a unit *shows* the cluster when at least one of its completions is in it. With k of n
learned units and j of m control units (random vectors and sample draws) showing it, the one-sided
p-value is Fisher's exact test on that 2x2 table, P(X >= k) for X hypergeometric (n + m units,
k + j showing, n drawn): the chance that the learned vectors would hold at least k of the showing
units if learned and control units were exchangeable. Over all clusters the p-values are corrected
for false discoveries (Benjamini & Hochberg 1995), counting only clusters that could reach the
threshold at all (Tarone 1990: a cluster shown by one unit has p >= n / (n + m) and can never be
significant, so it does not dilute the others).

What the test cannot do is fixed by the counts, and `power` says it in words for the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb


def fisher_greater(k: int, n: int, j: int, m: int) -> float:
    """P(X >= k), X ~ Hypergeometric(N = n + m units, K = k + j showing, n drawn): the one-sided
    Fisher exact p-value that learned units (k of n) show a cluster more often than controls (j of m)."""
    N, K = n + m, k + j
    if K == 0:
        return 1.0
    total = comb(N, n)
    return sum(comb(K, x) * comb(N - K, n - x) for x in range(k, min(K, n) + 1)) / total


def min_p(K: int, n: int, m: int) -> float:
    """The smallest p-value a cluster shown by K units can reach (all of them learned)."""
    return fisher_greater(min(K, n), n, K - min(K, n), m)


def benjamini_hochberg(pvals: list[float]) -> list[float]:
    """q-values (BH step-up adjusted p-values), in the input order."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    q = [1.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, pvals[i] * m / rank)
        q[i] = min(1.0, running)
    return q


@dataclass
class ClusterTest:
    cluster: int
    learned: int  # learned vectors showing the cluster
    random: int  # random vectors showing it
    samples: int  # unsteered temperature draws showing it
    greedy: bool  # the greedy unsteered completion of some prompt is in it
    p: float
    q: float  # BH-adjusted over the testable clusters (1.0 when not testable)
    testable: bool  # could reach the threshold with these unit counts (Tarone)
    significant: bool

    def to_dict(self) -> dict:
        return asdict(self)


def unit_of(row: dict) -> tuple[str, str] | None:
    """(set, unit id) of a completion row: a learned or random vector, or a sample draw; None for
    the greedy unsteered rows (one per prompt, not a unit of the test)."""
    if row["set"] in ("learned", "random", "sample"):
        return row["set"], row["vector_id"]
    return None


def test_clusters(rows: list[dict], labels: list[int], *, alpha: float = 0.05) -> dict[int, ClusterTest]:
    """A `ClusterTest` for every cluster holding a learned completion. `rows` carry "set"
    (learned, random, sample, unsteered) and "vector_id" (the sample draw's id for samples)."""
    units: dict[str, set[str]] = {"learned": set(), "random": set(), "sample": set()}
    showing: dict[int, dict[str, set[str]]] = {}
    greedy: set[int] = set()
    for r, c in zip(rows, labels):
        u = unit_of(r)
        if u is None:
            greedy.add(c)
            continue
        units[u[0]].add(u[1])
        showing.setdefault(c, {"learned": set(), "random": set(), "sample": set()})[u[0]].add(u[1])
    n, m = len(units["learned"]), len(units["random"]) + len(units["sample"])
    found = {c: s for c, s in showing.items() if s["learned"]}
    stats = {}
    for c, s in found.items():
        k, j = len(s["learned"]), len(s["random"]) + len(s["sample"])
        stats[c] = (k, j, fisher_greater(k, n, j, m), min_p(k + j, n, m) <= alpha)
    testable = [c for c in stats if stats[c][3]]
    qs = dict(zip(testable, benjamini_hochberg([stats[c][2] for c in testable])))
    return {
        c: ClusterTest(
            c,
            stats[c][0],
            len(s["random"]),
            len(s["sample"]),
            c in greedy,
            stats[c][2],
            qs.get(c, 1.0),
            c in qs,
            qs.get(c, 1.0) <= alpha,
        )
        for c, s in found.items()
    }


def min_learned_for(alpha: float, n: int, m: int, tests: int = 1) -> int | None:
    """The fewest learned vectors (of n, with no control showing it) that make a cluster
    significant when `tests` clusters are tested at once (the worst case of BH: rank `tests`
    needs p <= alpha, rank 1 needs p <= alpha / tests); None if not even all n do."""
    for k in range(1, n + 1):
        if fisher_greater(k, n, 0, m) <= alpha / max(1, tests):
            return k
    return None


def power(alpha: float, n: int, n_random: int, n_samples: int, tests: int) -> str:
    """What the test can and cannot detect at these counts, in one paragraph for the report."""
    m = n_random + n_samples
    alone = min_learned_for(alpha, n, m, 1)
    worst = min_learned_for(alpha, n, m, max(1, tests))
    one = fisher_greater(1, n, 0, m)
    parts = [
        f"Each behaviour is tested on {n} learned vectors against {n_random} random vectors of the same norms "
        f"and {n_samples} unsteered draws at temperature (Fisher's exact test per vector, false discoveries "
        f"controlled at {alpha:g} over {tests} testable cluster{'s' if tests != 1 else ''})."
    ]
    if alone is None:
        parts.append("At these counts no behaviour can be significant: give more vectors (--n-vectors) or controls.")
    else:
        parts.append(
            f"A behaviour that no control shows needs at least {alone} of the {n} learned vectors to be "
            f"significant on its own"
            + (f", and {worst} if it is the weakest of {tests} tested" if worst and worst != alone else "")
            + f". One vector alone can never be (p = {one:.2f} at best): a behaviour seen under a single "
            f"vector may be real, but these counts cannot tell it from chance."
        )
    parts.append(
        "The test compares how often vectors show a behaviour, not how strongly; a behaviour the controls "
        "show now and then needs correspondingly more learned vectors."
    )
    return " ".join(parts)


def _hypergeom_pmf(K: int, a: int, N: int) -> list[float]:
    """P(X = x) for x = 0..min(K, a), X ~ Hypergeometric(N units, K showing, a drawn)."""
    total = comb(N, a)
    return [comb(K, x) * comb(N - K, a - x) / total for x in range(min(K, a) + 1)]


def stratified_greater(strata: list[tuple[int, int, int, int]]) -> float:
    """One-sided exact p-value that a treated model shows a behaviour more often than a control
    model, stratified by prompt: each stratum is (k, a, j, b), k of a treated completions and j of b
    control completions of one prompt showing it. Under the null the two models' completions of a
    prompt are exchangeable, so the treated count of stratum p is Hypergeometric(a + b, k + j, a);
    the p-value is P(sum of them >= sum k), their convolution (the conditional exact test that
    Fisher's is for one stratum; a prompt both models answer alike carries no evidence)."""
    dist = [1.0]
    observed = 0
    for k, a, j, b in strata:
        observed += k
        pmf = _hypergeom_pmf(k + j, a, a + b)
        new = [0.0] * (len(dist) + len(pmf) - 1)
        for x, px in enumerate(dist):
            if px:
                for y, py in enumerate(pmf):
                    new[x + y] += px * py
        dist = new
    return min(1.0, sum(dist[observed:]))


@dataclass
class SampleTest:
    cluster: int
    treated: int  # treated completions in the cluster
    control: int  # control completions in it
    prompts: int  # prompts whose treated completions show it
    p: float
    q: float
    testable: bool
    significant: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compare_samples(
    models: list[str], prompts: list[int], labels: list[int], *, treated: str, control: str, alpha: float = 0.05
) -> dict[int, SampleTest]:
    """A `SampleTest` for every cluster holding a `treated` completion: does the treated model (a
    fine-tune, sampled) show it more often than the control model (its base, sampled on the same
    prompts as often)? `models[i]`, `prompts[i]`, `labels[i]` describe completion i; rows of other
    models are ignored. Exact stratified test per cluster (`stratified_greater`), BH over the
    clusters that could reach `alpha` at all (Tarone: those whose every completion could be treated)."""
    per: dict[int, list[int]] = {}  # prompt -> [treated, control] completions
    showing: dict[int, dict[int, list[int]]] = {}  # cluster -> prompt -> [treated, control] in it
    for m, p, c in zip(models, prompts, labels):
        if m not in (treated, control):
            continue
        side = 0 if m == treated else 1
        per.setdefault(p, [0, 0])[side] += 1
        showing.setdefault(c, {}).setdefault(p, [0, 0])[side] += 1
    stats = {}
    for c, by in showing.items():
        k = sum(v[0] for v in by.values())
        if not k:
            continue
        strata = [(v[0], per[p][0], v[1], per[p][1]) for p, v in by.items()]
        best = [
            (min(v[0] + v[1], per[p][0]), per[p][0], v[0] + v[1] - min(v[0] + v[1], per[p][0]), per[p][1])
            for p, v in by.items()
        ]  # every showing completion treated, as far as the prompt allows
        stats[c] = (
            k,
            sum(v[1] for v in by.values()),
            sum(v[0] > 0 for v in by.values()),
            stratified_greater(strata),
            stratified_greater(best) <= alpha,
        )
    testable = [c for c in stats if stats[c][4]]
    qs = dict(zip(testable, benjamini_hochberg([stats[c][3] for c in testable])))
    return {
        c: SampleTest(c, s[0], s[1], s[2], s[3], qs.get(c, 1.0), c in qs, qs.get(c, 1.0) <= alpha)
        for c, s in stats.items()
    }
