"""Choosing R: a search for the largest norm at which random vectors mostly do not change the reply.

MELBO's observation (Mack & Turner 2024): there is a "Goldilocks" norm where learned vectors change
the completions but random vectors of the same norm mostly do not. Below it nothing changes; above
it any vector derails the model, so learned and random look alike and a learned-vs-random
comparison says little. The DCT calibration (the R where the target layer's response is half
nonlinear, `calibrate_R`) lands near it, but on some models random vectors already move most
replies there (56-66 % on two fine-tunes), so a fixed set of multiples that cannot go below it
leaves the run where chance is strongest.

The search needs no training: at each R it draws `random_vectors` orthogonal random vectors of
that norm, generates short greedy completions on the training prompts and counts the share whose
behaviour moved away from the unsteered completion (judging.change, meaning/case/surface, tails
left out: any divergence of greedy text changes the tail). The share rises with R, so it brackets
the largest R where at most `max_random` moved by doubling or halving from the calibrated R, then
bisects (in log R) until its `steps` are spent. The upper edge is kept because a behaviour
planted behind a trigger needs a push of about that size (benchmarks/planted_direction.py). The
learned vectors' own share at the chosen R comes from the run's completions, and the report plots
both.

It lives in jobs/, not judging/ or directions/discovery/: it generates (generation) and reads
the change with judging.change, so only a layer above both may hold it (tests/test_architecture.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..directions.discovery import DiscoverConfig, calibrate_R
from ..directions.discovery.baselines import random_directions
from ..directions.vectors import VectorSet
from ..generation import generate
from ..judging.change import Texts, distance
from ..progress import bar

MAX_RANDOM = 0.5  # "random vectors mostly do not change the reply"
LOG2_RANGE = (-4.0, 3.0)  # multiples of the calibrated R searched: 1/16 .. 8


@dataclass
class GoldilocksResult:
    calibrated: float  # the DCT-style calibrated R
    chosen: float  # the R the run uses
    rows: list[dict] = field(default_factory=list)  # {multiple, R, random, random_completions}, by multiple
    reason: str = ""
    max_random: float = MAX_RANDOM

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def moved_share(base: Texts, steered: Texts, base_index: list[int], threshold: float) -> float:
    """Share of `steered` completions whose behaviour is farther than `threshold` from the
    unsteered completion of the same prompt (`base_index[i]`: its row in `base`)."""
    if not len(steered):
        return 0.0
    d = distance(steered, base.select(base_index), tails=False)
    return float((d > threshold).float().mean())


def search(
    share_at, steps: int, max_random: float, lo: float = LOG2_RANGE[0], hi: float = LOG2_RANGE[1]
) -> tuple[float, str]:
    """The largest log2-multiple x in [lo, hi] with share_at(x) <= max_random, found by bracketing
    from 0 with steps of 1 and then bisecting; `share_at` is called at most `steps` times."""
    good, bad, calls = None, None, 0
    seen: dict[float, float] = {}

    def probe(x: float) -> None:
        nonlocal good, bad, calls
        calls += 1
        seen[x] = s = share_at(x)
        if s <= max_random:
            good = x if good is None else max(good, x)
        else:
            bad = x if bad is None else min(bad, x)

    probe(0.0)
    while calls < steps and (good is None or bad is None):
        x = good + 1 if bad is None else bad - 1
        if not lo <= x <= hi:
            break
        probe(x)
    while calls < steps and good is not None and bad is not None and bad - good > 0.2:
        probe((good + bad) / 2)
    if good is None:
        return min(seen), (
            f"random vectors moved more than {max_random:.0%} of completions even at "
            f"{2 ** min(seen):.3g}x the calibrated R; kept the smallest tried"
        )
    edge = "" if bad is not None else f" (the search's upper end, {2**hi:g}x)" if good >= hi else " (steps spent)"
    return good, (
        f"the largest R found where random vectors moved at most {max_random:.0%} of completions "
        f"({seen[good]:.0%})" + edge
    )


def goldilocks_R(
    lm,
    prompts: list[str],
    cfg: DiscoverConfig,
    *,
    layer_range,
    steps: int = 5,
    random_vectors: int = 16,
    max_new_tokens: int = 24,
    threshold: float = 0.35,
    max_random: float = MAX_RANDOM,
    log=None,
    progress: bool | None = None,
) -> GoldilocksResult:
    """Calibrate R, then search for the largest R where random vectors mostly do not change the
    reply (module docstring). `steps=0`: the calibrated R as it is. `progress`: show bars (None:
    `progress.bar`'s default), one for the calibration, one over the R values tried."""
    R0, _ = calibrate_R(
        layer_range, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=cfg.seed, progress=progress
    )
    if steps <= 0:
        return GoldilocksResult(R0, R0, [], "calibrated R (no R search)", max_random)
    n_rand = min(random_vectors, lm.d_model)
    dirs = random_directions(n_rand, lm.d_model, cfg.seed + 7)  # (n, d) orthonormal
    layer = cfg.resolve_layers(lm.n_layers)[0]
    rows: list[dict] = []
    # One unit for the unsteered completions, one per R tried (`n_rand x len(prompts)` completions).
    with bar(1 + steps, "R search", "R value", show=progress) as tried:
        comps = generate(lm, prompts, max_new_tokens=max_new_tokens, chat=cfg.chat, progress=False)
        base = Texts.of([c.text for c in comps])
        tried.update(1)

        def share_at(x: float) -> float:
            m = 2.0**x
            ctrl = VectorSet.create(lm, dirs * (R0 * m), layer, "random", ids=[f"control-{i}" for i in range(n_rand)])
            steered = generate(
                lm,
                prompts,
                vectors=list(ctrl),
                include_unsteered=False,
                max_new_tokens=max_new_tokens,
                chat=cfg.chat,
                progress=False,
            )
            share = moved_share(base, Texts.of([c.text for c in steered]), [c.prompt_index for c in steered], threshold)
            rows.append({"multiple": m, "R": R0 * m, "random": share, "random_completions": len(steered)})
            if log:
                log(f"R = {m:.3g} x {R0:.3g}: {share:.0%} of random completions moved")
            tried.set_postfix(R=f"{R0 * m:.3g}", moved=f"{share:.0%}")
            tried.update(1)
            return share

        x, reason = search(share_at, steps, max_random)
    rows.sort(key=lambda r: r["multiple"])
    return GoldilocksResult(R0, R0 * 2.0**x, rows, reason, max_random)
