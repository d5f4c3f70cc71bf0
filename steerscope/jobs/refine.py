"""`steerscope refine`: search around good vectors ("start from the best results and optimise them").

Discovery (MELBO, DCT) finds directions that change the model a lot; a researcher who has seen a
behaviour under a few of them wants vectors that show it more often, with fewer side effects.
Refine starts from chosen vectors (a finding exported by `steerscope findings --export`, a run's
learned set, any vector folder; `--ids`, else the `--seeds` best by the fitness) and searches near
them with a text scorer as the fitness:

    fitness(v) = mean scorer(completions to the train prompts under v)
                 - kl_weight * max(0, q95 per-token KL(unsteered || steered) on neutral rollouts - kl_budget)

the second term keeping "behaviour on regular prompts the same" (KL on fixed neutral rollouts,
`judging.kl_match.Rollouts`). The budget defaults to the median KL of the folder's vectors:
discovered vectors at their R already cost more than any fixed small budget, and the point is not
to cost more. Candidates live on the sphere of radius R (the steering norm, as in MELBO), R
annealed up and down over the generations (`anneal`). The search methods (local ES, CMA-ES, CEM)
are the `REFINE_METHODS` family in `directions.refine`; they never generate, they call this
module's `Evaluator`, which does.
One population is one batched `generate` call (a vector per row). Every generation's candidates and
fitness are checkpointed; the searches are deterministic given their seed, so a killed refine
replays the saved generations and goes on.

Afterwards the best seed, the refined vector and the unsteered model are compared on held-out
prompts (the honest check: the search saw only the train prompts), the per-coordinate growth with
R is measured, and the sparsity of seeds and refined vectors in the neuron basis and, given an
SAE, in its feature basis (`directions.refine.growth`, `sparsity`).

This module holds the command's config, the evaluator (the fitness: generate, score, KL; every
generation checkpointed) and the search checkpoint's key; `jobs.refine_job` runs the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..checkpoint import Checkpoint, config_key
from ..config import Config, config_to_dict
from ..directions.refine import REFINE_METHODS, Start
from ..directions.vectors import SteeringVector
from ..generation import generate
from ..judging.kl_match import Rollouts
from ..models.loading import ModelConfig
from ..progress import say


@dataclass(frozen=True)
class RefineConfig(Config):
    """Everything `steerscope refine` does; every field is a flag of the command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model"""
    vectors: str = field(default="", metadata={"required": True})
    """vector folder to start from (e.g. from `steerscope findings --export`, or RUN/vectors/learned)"""
    ids: list[str] = field(default_factory=list)
    """start from these vectors of the folder (default: the --seeds best by fitness)"""
    seeds: int = field(default=4, metadata={"min": 1})
    """start from this many of the folder's vectors, the best by fitness (when no --ids)"""
    scorer: str | None = field(default=None, metadata={"none": "the organism's detector"})
    """text metric that is the fitness (regex:P, substring:a|b, refusal, sentiment); default for
    --model organism:NAME: the organism's own detector"""
    method: str = field(default="cma", metadata={"choices": REFINE_METHODS})
    """search method: local (around the best seed), cma or cem (in the span of the seeds)"""
    generations: int = field(default=8, metadata={"min": 1})
    """populations evaluated"""
    population: int = field(default=8, metadata={"min": 2})
    """candidates per generation (one batched generate call)"""
    sigma: float = field(default=0.3, metadata={"min": 0})
    """initial step size, as a fraction of R"""
    anneal: list[float] = field(default_factory=lambda: [1.0, 1.5, 1.0, 0.7, 1.0])
    """multiples of the seeds' R, spread over the generations (R annealed up and down)"""
    prompts: str = "neutral"
    """prompt file or builtin set the behaviour is scored on"""
    n_train: int = field(default=4, metadata={"min": 1})
    """prompts the search scores on (the first of --prompts)"""
    n_heldout: int = field(default=4, metadata={"min": 0})
    """prompts after those, for the final held-out comparison"""
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    """tokens per completion"""
    neutral: str = "neutral"
    """prompt set of the KL rollouts (taken from its end)"""
    n_neutral: int = field(default=8, metadata={"min": 1})
    """neutral prompts in the KL rollouts"""
    kl_tokens: int = field(default=16, metadata={"min": 1})
    """rollout length of the KL penalty"""
    kl_quantile: float = field(default=0.95, metadata={"min": 0, "max": 1})
    """quantile of the per-token KL that is penalised"""
    kl_budget: float | None = field(default=None, metadata={"min": 0, "none": "the median KL of the folder's vectors"})
    """KL (nats) allowed before the penalty starts (default: what the starting vectors already cost, so refined
    vectors may not change regular prompts more than discovery's vectors do)"""
    kl_weight: float = field(default=1.0, metadata={"min": 0})
    """fitness lost per nat over the budget (0: no penalty)"""
    sae: str | None = field(default=None, metadata={"none": "none"})
    """SAE folder: also measure sparsity in its feature basis"""
    judge_url: str | None = field(default=None, metadata={"none": "none"})
    """OpenAI-compatible endpoint of an LLM judge whose rating is the fitness instead of --scorer"""
    judge_model: str | None = None
    """model name sent to the judge"""
    judge_rubric: str | None = None
    """the judge's system prompt asking for a number (say what behaviour to rate; default: how far the
    response departs from a plain answer)"""
    judge_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key"""
    seed: int = 0
    """seed of the search (generation is greedy)"""

    def to_dict(self) -> dict:
        return config_to_dict(self)


@dataclass
class Eval:
    fitness: torch.Tensor  # (P,)
    score: torch.Tensor  # (P,)
    kl: torch.Tensor  # (P,)


def _log(msg: str) -> None:
    say(f"steerscope refine: {msg}")  # stderr and the job log


class Evaluator:
    """Scores populations: fitness = mean scorer on the train prompts - KL penalty. Records every
    generation (candidates, R multiple, fitness, score, KL) and checkpoints it, so that a
    deterministic search replays saved generations instead of recomputing them."""

    def __init__(
        self,
        lm,
        cfg: RefineConfig,
        scorer,
        train: list[str],
        neutral: list[str],
        layer: int,
        budget: float,
        checkpoint: Checkpoint | None = None,
    ):
        self.lm, self.cfg, self.scorer, self.train, self.layer, self.budget = lm, cfg, scorer, train, layer, budget
        self.neutral = neutral
        self.ckpt = checkpoint
        saved = checkpoint.load() if checkpoint is not None else None
        self.saved: list[dict] = saved["generations"] if saved else []
        self.history: list[dict] = []

    @cached_property
    def rollouts(self) -> Rollouts:
        return Rollouts(self.lm, self.neutral, self.cfg.kl_tokens)

    def completions(self, vectors: torch.Tensor, prompts: list[str]) -> list[list[str]]:
        """(P, len(prompts)) completion texts, one batched generate call."""
        svs = [SteeringVector(v, self.layer, f"c{i}") for i, v in enumerate(vectors)]
        comps = generate(
            self.lm,
            prompts,
            vectors=svs,
            coef=1.0,
            include_unsteered=False,
            max_new_tokens=self.cfg.max_new_tokens,
            progress=False,
        )
        n = len(prompts)
        return [[c.text for c in comps[i * n : (i + 1) * n]] for i in range(len(vectors))]

    def measure(self, vectors: torch.Tensor, prompts: list[str]) -> tuple[Eval, list[list[str]]]:
        texts = self.completions(vectors, prompts)
        flat = [t for row in texts for t in row]
        # nanmean: a judge that failed on a completion gives NaN for it, not for the whole candidate
        s = self.scorer.score_texts(flat, prompts * len(vectors)).view(len(vectors), len(prompts)).nanmean(1)  # (P,)
        kl = torch.tensor(
            [float(torch.quantile(self.rollouts.kl(v, self.layer, 1.0), self.cfg.kl_quantile)) for v in vectors]
        )  # (P,)
        return Eval(self.fitness(s, kl), s, kl), texts

    def fitness(self, score: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        return score - self.cfg.kl_weight * (kl - self.budget).clamp_min(0.0)

    def __call__(self, vectors: torch.Tensor, mult: float) -> torch.Tensor:
        """Fitness of one generation's candidates (P, d) at R multiple `mult`."""
        g = len(self.history)
        vectors = vectors.float().cpu()
        if (
            g < len(self.saved)
            and self.saved[g]["candidates"].shape == vectors.shape
            and torch.allclose(self.saved[g]["candidates"], vectors, atol=1e-5)
        ):
            rec = self.saved[g]
        else:
            self.saved = self.saved[:g]  # a different search from here on: the rest is stale
            ev, texts = self.measure(vectors, self.train)
            rec = {
                "candidates": vectors,
                "mult": mult,
                "fitness": ev.fitness,
                "score": ev.score,
                "kl": ev.kl,
                "texts": [row[0] for row in texts],
            }
            self.saved.append(rec)
            if self.ckpt is not None:
                self.ckpt.save({"generations": self.saved})
        self.history.append(rec)
        best = int(rec["fitness"].argmax())
        _log(
            f"generation {g + 1}: R x{mult:g}, best fitness {float(rec['fitness'][best]):.3f} (score "
            f"{float(rec['score'][best]):.2f}, KL {float(rec['kl'][best]):.2f}), mean {float(rec['fitness'].mean()):.3f}"
        )
        return rec["fitness"]

    def best(self) -> tuple[torch.Tensor, float, int]:
        """(vector, fitness, generation) of the best candidate seen."""
        g, i = max(
            ((g, int(r["fitness"].argmax())) for g, r in enumerate(self.history)),
            key=lambda gi: float(self.history[gi[0]]["fitness"][gi[1]]),
        )
        return self.history[g]["candidates"][i], float(self.history[g]["fitness"][i]), g

    def best_per_mult(self) -> dict[float, torch.Tensor]:
        """The best candidate at each R multiple (for the per-coordinate growth)."""
        out: dict[float, tuple[float, torch.Tensor]] = {}
        for r in self.history:
            i = int(r["fitness"].argmax())
            f = float(r["fitness"][i])
            if r["mult"] not in out or f > out[r["mult"]][0]:
                out[r["mult"]] = (f, r["candidates"][i])
        return {m: v for m, (f, v) in sorted(out.items())}


def search_key(cfg: RefineConfig, start: Start, fingerprint: str, budget: float) -> str:
    """What the search checkpoint belongs to: the model, the seeds and every search setting."""
    return config_key(
        fingerprint,
        start.ids,
        [round(float(x), 5) for x in start.vectors.flatten()[:64]],
        cfg.scorer,
        cfg.method,
        cfg.generations,
        cfg.population,
        cfg.sigma,
        cfg.anneal,
        cfg.prompts,
        cfg.n_train,
        cfg.max_new_tokens,
        cfg.neutral,
        cfg.n_neutral,
        cfg.kl_tokens,
        cfg.kl_quantile,
        budget,
        cfg.kl_weight,
        cfg.seed,
    )
