"""Choosing a candidate direction by its measured effect (Arditi et al. 2024, sec. 3.2 / app. C).

For every candidate (one per layer and read position) with A = prompts with the behaviour and
B = prompts without:
    induce     metric on B prompts with coef * v added at the candidate's layer (all positions)
    bypass     metric on A prompts with v's direction ablated at every layer
    kl_add     KL(base || steered) at the last position of neutral prompts, v added (mode add)
    kl_ablate  the same with v ablated (mode ablate)
    effect     induce - metric(B) (mode add), or metric(A) - bypass (mode ablate)
    coherence  mean log-prob per token of its completions (mode ablate: on A, ablated; mode add:
               on B, added) under the unsteered model, minus that of the less natural of the
               model's own replies to A and to B (judging.heldout: below -1.5 nats the candidate
               is incoherent)
Candidates in the last `1 - max_layer_frac` of the layers, whose addition does not move B towards
the behaviour, or that are incoherent are dropped: the metric of broken text (no refusal phrase
in word salad) is not counted as success. Among the rest, the effect-vs-KL Pareto frontier (no
other candidate has more effect for less KL) is where the choice is made, explicitly:
    choose="budget"  the most effective candidate whose KL is within the KL budget
    choose="knee"    the frontier point farthest from the line through its ends (Kneedle)
    choose=ID        that candidate (it is generated for and shown, whatever its filters say)
The KL budget: `kl_bound` when given, else one that fits the model (`kl_budget`): mode ablate,
the `kl_quantile` (0.9) of the KL that ablating `kl_random` random directions causes; mode add,
the KL of the frontier's knee. The fixed 0.1 of Arditi et al. was set on 7B+ chat models; on
SmolLM2-135M ablating a random direction costs 0.02-0.66 nats (90th percentile 0.3) and
nearly every useful candidate costs more than 0.1. The 90th percentile admits a candidate that
costs no more than most directions that carry nothing in particular; the mean would let one
outlier decide. In mode add KL on neutral prompts is partly the effect itself (adding a
sentiment direction should change neutral replies), and random vectors of the candidates' norms
cost 3-10 times less than those that work, so no random control bounds it: the knee does.
A one-line warning says when the winner barely beats the baseline, names the best coherent
frontier candidate that does better and the flag that selects it (`--kl-bound X` or `--choose ID`).

With held-out prompts (`test_prompts`, or `test_fraction` of A and B), the chosen direction is
evaluated on them (judging.heldout): baseline / ablation / orthogonalised (mode ablate) on A,
baseline / addition on B, each with coherence and examples.

Speed and memory at scale: every score at the last position is reduced inside the batch loop
(memory stays flat in the number of candidates). Completions are generated only for a short list:
every candidate is first scored by a logit prefilter (for `refusal`, the log-odds of refusal-start
tokens at the last position, as in Arditi et al.; a logit metric is its own prefilter), and the
`shortlist` candidates taken along the (KL, prefilter effect) frontier (judging.frontier: the
non-dominated layers in turn, each from the KL budget outwards) are generated for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from .._io import write_json_atomic
from ..config import Config, config_to_dict
from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..generation import generate, last_token_logits
from ..progress import bar
from .frontier import choose, knee, pareto_frontier, quantile, shortlist
from .heldout import INCOHERENT_BELOW, HeldOut, evaluate, naturalness, reference_logprob, split
from .metrics import Metric, kl_divergence, parse_metric

__all__ = ["SelectConfig", "Selection", "CandidateScore", "select", "pareto_frontier", "knee", "mean_projection"]

# Tokens a refusal starts with (SmolLM2 and Llama-style chat models), for the logit prefilter.
REFUSAL_START = "I,Sorry,As,Unfortunately,Apologies"
RULES = ("budget", "knee")


@dataclass(frozen=True)
class SelectConfig(Config):
    """How candidates are scored and chosen."""

    mode: Literal["add", "ablate"] = "add"
    """add: effect of adding on B prompts; ablate: effect of ablating on A prompts (Arditi)"""
    coef: float = 1.0
    """coefficient of the added vector"""
    kl_bound: float | None = field(default=None, metadata={"min": 0, "none": "auto"})
    """KL budget (nats, last position of neutral prompts) for --choose budget; auto: one that fits the
    model (mode ablate: the --kl-quantile of the KL of ablating random directions; mode add: the KL
    of the frontier's knee)"""
    kl_quantile: float = field(default=0.9, metadata={"min": 0, "max": 1})
    """which quantile of the random directions' KL is the auto budget (mode ablate)"""
    kl_random: int = field(default=16, metadata={"min": 1})
    """random directions ablated for the auto budget (mode ablate)"""
    choose: str = "budget"
    """budget: most effect within the KL budget; knee: the knee of the frontier; or a candidate id"""
    max_layer_frac: float = field(default=0.8, metadata={"min": 0, "max": 1})
    """drop candidates in layers at or beyond this fraction of the depth"""
    prefilter: str | None = field(default="auto", metadata={"none": "off"})
    """logit metric that ranks every candidate before a text metric generates (auto: refusal-start
    log-odds for `refusal`, none for others); off: generate for every candidate"""
    shortlist: int = field(default=8, metadata={"min": 1})
    """candidates generated for, taken along the (KL, prefilter effect) frontier"""
    incoherent_below: float | None = field(default=INCOHERENT_BELOW, metadata={"min": 0, "none": "off", "before": None})
    """a candidate whose completions' log-prob per token under the unsteered model is more than this
    many nats below the model's own replies (the less natural of those to A and to B) is incoherent, never chosen or recommended; off: no
    check (a logit metric then generates nothing)"""
    warn_ratio: float = field(default=0.25, metadata={"min": 0, "max": 1})
    """warn when the winner's effect is below this share of the A-B baseline gap"""
    max_new_tokens: int = field(default=40, metadata={"min": 1})
    """tokens generated per completion"""
    test_fraction: float = field(default=0.0, metadata={"min": 0, "max": 0.9})
    """hold out this share of A and B (a seeded draw) and evaluate the chosen direction on it"""
    orthogonalize: bool = True
    """the held-out evaluation in mode ablate also scores the direction orthogonalised into the
    weights (a copy of the model in memory for a moment)"""
    examples: int = field(default=3, metadata={"min": 0})
    """held-out examples shown per condition"""
    chat: bool | None = None
    """apply the chat template (unset: when the model has one)"""
    batch_size: int = field(default=32, metadata={"min": 1})
    """rows per forward pass"""


@dataclass
class CandidateScore:
    id: str
    layer: int
    induce: float | None
    bypass: float | None
    kl_add: float | None  # measured in mode add only
    kl_ablate: float | None  # measured in mode ablate only
    kept: bool
    reason: str = ""
    prefilter: float | None = None  # the prefilter's effect (text metrics)
    effect: float | None = None  # on the metric (None when not short-listed)
    frontier: bool = False
    logprob: float | None = None  # mean log-prob per token of its completions, unsteered model
    coherence: float | None = None  # logprob minus the reference replies' (None: not generated for)
    coherent: bool | None = None


@dataclass
class Selection:
    metric: str
    config: SelectConfig
    baseline_a: float
    baseline_b: float
    candidates: list[CandidateScore] = field(default_factory=list)
    best: int | None = None
    prefilter: str | None = None
    warning: str = ""
    kl_budget: float | None = None  # the budget used (None: none could be set)
    kl_rule: str = ""  # which rule set it
    random_kl: list[float] = field(default_factory=list)  # KL of the random directions (auto, mode ablate)
    baseline_logprob: float | None = None
    advice: str = ""  # the flag that selects the recommended candidate
    heldout: HeldOut | None = None

    @property
    def best_candidate(self) -> CandidateScore | None:
        return None if self.best is None else self.candidates[self.best]

    @property
    def kl_key(self) -> str:
        return "kl_add" if self.config.mode == "add" else "kl_ablate"

    def budget_line(self) -> str:
        return "KL budget: none" if self.kl_budget is None else f"KL budget {self.kl_budget:.3g} ({self.kl_rule})"

    def table(self) -> str:
        gen = any(c.coherence is not None for c in self.candidates)
        head = ["id", "layer", "induce", "bypass", "kl_add", "kl_ablate", "effect"]
        head += (
            (["prefilter"] if self.prefilter else []) + (["coherence"] if gen else []) + ["frontier", "kept", "note"]
        )
        fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
        rows = []
        for i, c in enumerate(self.candidates):
            r = [c.id, c.layer, c.induce, c.bypass, c.kl_add, c.kl_ablate, c.effect]
            r += ([c.prefilter] if self.prefilter else []) + ([c.coherence] if gen else [])
            r += ["F" if c.frontier else "", "*" if i == self.best else ("yes" if c.kept else "no"), c.reason]
            rows.append([fmt(x) for x in r])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
        c = self.config
        top = (
            f"metric {self.metric}: baseline on A {self.baseline_a:.4f}, on B {self.baseline_b:.4f}; mode={c.mode}, "
            f"coef={c.coef:g}, choose={c.choose}; {self.budget_line()}"
            + (f"; prefilter {self.prefilter}, {c.shortlist} generated" if self.prefilter else "")
        )
        out = [top, line(head)] + [line(r) for r in rows]
        if gen:
            out.append(
                "coherence: log-prob per token of the candidate's completions under the unsteered model minus the "
                f"less natural of its unsteered replies to A and to B ({self.baseline_logprob:.2f}); below -{c.incoherent_below:g} a candidate is "
                "incoherent: excluded from the choice and the advice, its metric on broken text is no success."
            )
        best = self.best_candidate
        out.append(
            f"selected: {best.id} (layer {best.layer}, effect {_f(best.effect)}, {self.kl_key} "
            f"{getattr(best, self.kl_key):.4f}{'' if best.coherence is None else f', coherence {best.coherence:+.2f}'})"
            if best
            else "selected: none (no candidate passed the filters within the budget; see the notes)"
        )
        if self.heldout is not None:
            out += self.heldout.lines()
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "config": config_to_dict(self.config),
            "baseline_a": self.baseline_a,
            "baseline_b": self.baseline_b,
            "best": self.best,
            "prefilter": self.prefilter,
            "warning": self.warning,
            "advice": self.advice,
            "kl_budget": self.kl_budget,
            "kl_rule": self.kl_rule,
            "random_kl": self.random_kl,
            "baseline_logprob": self.baseline_logprob,
            "candidates": [asdict(c) for c in self.candidates],
            "heldout": None if self.heldout is None else self.heldout.to_dict(),
        }

    def save(self, path) -> None:
        write_json_atomic(path, self.to_dict())


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _logit_scores(
    lm, metric: Metric, prompts: list[str], vs: VectorSet | None, mode: str, cfg: SelectConfig, desc: str
) -> torch.Tensor:
    """(K,) mean logit metric over prompts per candidate (or (1,) unsteered when vs is None)."""
    n = (len(vs) if vs is not None else 1) * len(prompts)
    with bar(n, desc, "row") as rows:
        s = last_token_logits(
            lm,
            prompts,
            vectors=vs,
            coef=cfg.coef,
            mode=mode,
            chat=cfg.chat,
            batch_size=cfg.batch_size,
            include_unsteered=vs is None,
            reduce=lambda lg, _: metric.score_logits(lg),
            progress=rows,
        )
    return s.mean(1)


def _generated(
    lm, metric: Metric | None, prompts: list[str], vs: VectorSet | None, mode: str, cfg: SelectConfig, logprob: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Greedy completions of V variants (the unsteered model when vs is None: V = 1) on `prompts`:
    ((V,) mean metric, or None without a metric; (V,) mean log-prob per token under the unsteered
    model, when `logprob`)."""
    res = generate(
        lm,
        prompts,
        vectors=vs,
        coef=cfg.coef,
        mode=mode,
        include_unsteered=vs is None,
        chat=cfg.chat,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    V, P = (len(vs) if vs is not None else 1), len(prompts)
    s = None
    if metric is not None:
        s = metric.score_texts([r.text for r in res], [r.prompt for r in res]).reshape(V, P).mean(1)
    lp = torch.tensor(naturalness(lm, res, cfg.chat, cfg.batch_size)).reshape(V, P).nanmean(1) if logprob else None
    return s, lp


def _kl(lm, neutral: list[str], vs: VectorSet, mode: str, cfg: SelectConfig) -> torch.Tensor:
    base = torch.log_softmax(
        last_token_logits(lm, neutral, chat=cfg.chat, include_unsteered=True, batch_size=cfg.batch_size)[0].double(), -1
    )  # (P, V)

    def kl(logits: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        return kl_divergence(base.to(logits.device)[pi], logits)

    with bar(len(vs) * len(neutral), f"KL ({mode})", "row") as rows:
        return last_token_logits(
            lm,
            neutral,
            vectors=vs,
            coef=cfg.coef,
            mode=mode,
            chat=cfg.chat,
            batch_size=cfg.batch_size,
            reduce=kl,
            progress=rows,
        ).mean(1)  # (K,)


def _random_kl(lm, neutral: list[str], cfg: SelectConfig) -> list[float]:
    """KL of ablating `cfg.kl_random` random unit directions (seed 0; ablation ignores the norm)."""
    from ..directions.discovery.baselines import random_directions

    n = min(cfg.kl_random, lm.d_model)
    rv = VectorSet.create(lm, random_directions(n, lm.d_model, 0), 0, "random", ids=[f"random-{i}" for i in range(n)])
    return [float(x) for x in _kl(lm, neutral, rv, "ablate", cfg)]


def _subset(vs: VectorSet, idx: list[int]) -> VectorSet:
    return VectorSet(
        vs.vectors[idx],
        type(vs.config)(
            **{
                **vs.config.__dict__,
                "ids": [vs.ids[i] for i in idx],
                "layers": [vs.layers[i] for i in idx],
                "norms": [],
            }
        ),
    )


def select(
    lm,
    vs: VectorSet,
    metric: str | Metric,
    a_prompts: Sequence[str],
    b_prompts: Sequence[str],
    neutral_prompts: Sequence[str],
    config: SelectConfig | None = None,
    test_prompts: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Selection:
    """Score the candidates of `vs`, choose one, and (with `test_prompts` = (A, B) held out, or
    `config.test_fraction`) evaluate it on prompts selection never saw. See the module docstring."""
    cfg = config or SelectConfig()
    for name, p in (("A", a_prompts), ("B", b_prompts), ("neutral", neutral_prompts)):
        if not p:
            raise SteerscopeError(f"selection needs {name} prompts; the list is empty.")
    if cfg.choose not in RULES and cfg.choose not in vs.ids:
        raise SteerscopeError(
            f"--choose {cfg.choose!r} is neither budget, knee nor a candidate id of this set "
            f"(ids: {', '.join(vs.ids[:4])}{' ...' if len(vs) > 4 else ''})."
        )
    vs.check(lm, check_model=False)
    m = parse_metric(metric, lm)
    pre = m if m.kind == "logits" else None
    if m.kind == "text":
        spec = cfg.prefilter
        if spec == "auto":
            spec = f"logodds:{REFUSAL_START}" if m.name == "refusal" else None
        pre = parse_metric(spec, lm) if spec else None
        if pre is not None and pre.kind != "logits":
            raise SteerscopeError(f"--prefilter must be a logit metric such as logodds:TOKENS, got {spec!r}.")
    a, b, neutral = list(a_prompts), list(b_prompts), list(neutral_prompts)
    test, source = None, ""
    if test_prompts is not None:
        test, source = (list(test_prompts[0]), list(test_prompts[1])), "--test sets"
        if not test[0] or not test[1]:
            raise SteerscopeError("held-out evaluation needs A and B test prompts; a list is empty.")
    elif cfg.test_fraction > 0:
        (a, ta), (b, tb) = split(a, cfg.test_fraction, 0), split(b, cfg.test_fraction, 1)
        test, source = (ta, tb), f"{100 * cfg.test_fraction:g} % of A and B held out, seeded"
    K, ablate, coh = len(vs), cfg.mode == "ablate", cfg.incoherent_below is not None
    # Only the chosen mode's KL decides anything, so only it is measured.
    kl = _kl(lm, neutral, vs, cfg.mode, cfg)  # (K,)
    sel = Selection(m.name, cfg, 0.0, 0.0, prefilter=pre.name if pre is not None and pre is not m else None)
    if cfg.kl_bound is not None:
        sel.kl_budget, sel.kl_rule = cfg.kl_bound, "--kl-bound"
    elif ablate:
        sel.random_kl = _random_kl(lm, neutral, cfg)
        sel.kl_budget = quantile(sel.random_kl, cfg.kl_quantile)
        sel.kl_rule = (
            f"auto: {100 * cfg.kl_quantile:g}th percentile of the KL of {len(sel.random_kl)} random directions "
            "ablated; --kl-bound X overrides"
        )
    else:
        sel.kl_rule = "auto: the KL of the frontier's knee (mode add); --kl-bound X overrides"
    max_layer = cfg.max_layer_frac * lm.n_layers
    eligible = [i for i in range(K) if vs.layers[i] < max_layer]

    def effects(ind, byp, base_a, base_b) -> list[float]:
        return [float(ind[j] - base_b) if not ablate else float(base_a - byp[j]) for j in range(len(ind))]

    forced = [vs.ids.index(cfg.choose)] if cfg.choose not in RULES else []
    # Late layers are never chosen: they are not scored (only their KL is shown).
    scored = sorted(set(eligible + forced))
    pre_scores = None  # (induce (S,), bypass (S,) | None, base A, base B) of the prefilter, S = scored
    if pre is not None and scored:
        pvs = vs if len(scored) == K else _subset(vs, scored)
        pa = float(_logit_scores(lm, pre, a, None, "add", cfg, "baseline A")[0])
        pb = float(_logit_scores(lm, pre, b, None, "add", cfg, "baseline B")[0])
        ind_p = _logit_scores(lm, pre, b, pvs, "add", cfg, "induce")
        byp_p = _logit_scores(lm, pre, a, pvs, "ablate", cfg, "bypass") if ablate else None
        pre_scores = (ind_p, byp_p, pa, pb)
        pre_eff = dict(zip(scored, effects(ind_p, byp_p, pa, pb)))
        induces = {i: float(ind_p[j]) > pb for j, i in enumerate(scored)}
    n_gen = cfg.shortlist if m.kind == "text" or coh else K
    if pre is None or not scored:
        short = list(scored)
    else:
        pool = [i for i in eligible if induces[i]] or eligible  # those whose addition induces
        pts = [(float(kl[i]), pre_eff[i]) for i in pool]
        centre = sel.kl_budget
        if centre is None:  # mode add, auto: the knee of the prefilter's frontier
            k = knee(pts, pareto_frontier(pts))
            centre = math.inf if k is None else pts[k][0]
        short = [pool[j] for j in shortlist(pts, n_gen, centre)]
    short += [i for i in forced if i not in short]
    short = sorted(short)
    sub = _subset(vs, short) if short else None
    eff_prompts, eff_mode = (a, "ablate") if ablate else (b, "add")
    lp = base_lp = None
    if m.kind == "text":
        base_a, lpa = _generated(lm, m, a, None, "add", cfg, coh)
        base_b, lpb = _generated(lm, m, b, None, "add", cfg, coh)
        base_a, base_b = float(base_a[0]), float(base_b[0])
        base_lp = reference_logprob(lpa, lpb)
        ind = byp = None
        if sub is not None:
            ind, lp_add = _generated(lm, m, b, sub, "add", cfg, coh and not ablate)
            byp, lp_abl = _generated(lm, m, a, sub, "ablate", cfg, coh) if ablate else (None, None)
            lp = lp_abl if ablate else lp_add
        measured = short
    else:
        ind, byp, base_a, base_b = pre_scores if pre_scores is not None else (None, None, math.nan, math.nan)
        measured = scored
        if coh and sub is not None:
            base_lp = reference_logprob(*(_generated(lm, None, p, None, "add", cfg, True)[1] for p in (a, b)))
            lp = _generated(lm, None, eff_prompts, sub, eff_mode, cfg, True)[1]
    sel.baseline_a, sel.baseline_b = base_a, base_b
    sel.baseline_logprob = None if base_lp is None else float(base_lp[0])
    pos = {i: j for j, i in enumerate(measured)}
    eff = dict(zip(measured, effects(ind, byp, base_a, base_b))) if ind is not None else {}
    lp_of = {} if lp is None else {i: float(lp[j]) for j, i in enumerate(short)}
    for i, sv in enumerate(vs):
        reasons = []
        j = pos.get(i)
        induce = None if j is None else float(ind[j])
        logprob = lp_of.get(i)
        coherence = None if logprob is None else logprob - sel.baseline_logprob
        coherent = None if coherence is None else bool(coherence >= -cfg.incoherent_below)
        if sv.layer >= max_layer:
            pass  # the layer's reason below says it all
        elif j is None:
            reasons.append("not short-listed by the prefilter")
        elif induce <= base_b:
            reasons.append("adding does not induce")
        elif coh and coherence is None:
            reasons.append("coherence not checked (not short-listed)")
        if coherent is False:
            reasons.append(f"incoherent: {coherence:+.2f} nats/token vs the model's own replies")
        if sv.layer >= max_layer:
            reasons.append(f"layer in last {100 * (1 - cfg.max_layer_frac):.0f} %")
        sel.candidates.append(
            CandidateScore(
                sv.id,
                sv.layer,
                induce,
                None if j is None or byp is None else float(byp[j]),
                float(kl[i]) if not ablate else None,
                float(kl[i]) if ablate else None,
                not reasons,
                "; ".join(reasons),
                None if pre_scores is None or pre is m else pre_eff.get(i),
                eff.get(i),
                logprob=logprob,
                coherence=coherence,
                coherent=coherent,
            )
        )
    choose(sel)
    if test is not None and sel.best_candidate is not None:
        sel.heldout = evaluate(lm, vs[sel.best_candidate.id], m, test[0], test[1], cfg, source)
    elif test is not None:
        sel.heldout = HeldOut("none", source, len(test[0]), len(test[1]), note="not evaluated: no candidate was chosen")
    return sel


def mean_projection(lm, prompts: Sequence[str], direction: torch.Tensor, layer: int, chat: bool | None = None) -> float:
    """Mean projection of the last-token activation at `layer` on the unit `direction` over
    `prompts`: the value for "clamp to what set A shows" (`Clamp(direction, value, layer)`)."""
    from ..models.activations import collect_activations

    acts = collect_activations(lm, list(prompts), [layer], read="last", chat=chat)[:, 0, 0]  # (N, d) float64
    u = direction.double().cpu() / direction.double().norm()
    return float((acts @ u).mean())
