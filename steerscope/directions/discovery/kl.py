"""Output-KL discovery: vectors that most change what the model would say next.

MELBO's objective (melbo.py) rewards any large change of the residual stream at a target layer.
On our model organisms (steerscope.models.organisms) the planted behaviour's own direction scores
only 1.2-1.3x a random direction of the same norm under it, while the DCT factors score ~3x
(benchmarks/planted_direction.py), so more steps of that objective do not find the behaviour. The
same direction changes the next-token *distribution* 2.7-3.6x more than the median random
direction (the "output_kl" rows of that benchmark): a planted behaviour is a switch of output
mode, which the logits show more than the residual norm does. (DCT's factors score higher still
on this objective; it does not make the planted direction the maximum, but ascent on it reached
the planted mode from half of its starts on the french organism, benchmarks/bench_planted.py.)

So this method maximises, for each vector theta (||theta|| = R, added at every token of the source
layer),

    mean over prompts p and reply positions j of  KL( P_theta(. | x_p, y_<j) || P_0(. | x_p, y_<j) )

where y is the *unsteered* model's own greedy reply (`reply_tokens` tokens) and P the model's
next-token distribution after the final layer. Reading the KL along the reply rather than only at
the end of the prompt rewards vectors that keep changing the reply (a language or style switch)
over vectors that only swap its first word. In one ad hoc comparison (32 vectors, bfloat16, the
calibrated R, 4 other prompts) 4 of 32 vectors replied in French with it against 2 of 32 with the
KL at the prompt's last 3 tokens only; on the caps organism 2 of 32 either way, and no random vector
in any. The reply's first token (predicted at the prompt's last position) still gets half of each
prompt's weight (`first_share`): that is where the kind of reply is decided, and a refusal changes
little after it. In paired draws of 24 candidates (seeds 0 and 2 on refuse, 0 on caps and french)
the candidates showing the planted behaviour on 2 of 4 prompts went 1 -> 2, 1 -> 1, 2 -> 3 and
4 -> 4 against the plain mean. Training is MELBO's: projected Adam on the sphere,
vectors kept orthogonal, the plateau rule, checkpoints (`train_melbo` with this objective).

Which local maximum a start lands in is luck: on the organisms 0-17 % of starts land in the planted
mode (benchmarks/kl_candidates.py counts them per draw), the rest in other high-KL modes, many of
them degenerate (a loop of one word, "a Shelf of the Shelf"), many mild rewordings of the
unsteered reply. So the method trains `candidates` x K vectors
and keeps K. Which K is the caller's ranking when it gives one: `steerscope run` ranks candidates
by their completions (judging/keep.py: far from the unsteered reply yet natural to the model),
which kept 18 of the 21 planted candidates in 11 draws. Without one, the K whose steered
next-token distributions keep the most entropy (degenerate loops collapse it); that kept 8 of the
same 21, because a refusal or a capitals reply is as confident as a loop.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...config import Config
from ...models.layer_range import LayerRange
from .base import DISCOVERY, Discovered, DiscoveryContext
from .melbo import final_values, train_melbo


@dataclass(frozen=True)
class KLConfig(Config):
    """Output-KL discovery's own settings."""

    # Where `--source auto` puts kl's vectors: round(0.4 x n_layers), layer 12 of SmolLM2's 30,
    # later than the other methods' n_layers / 4. Not a flag (`--source N` overrides it). Measured
    # on the three model organisms, seeds 0-2 (benchmarks/kl_candidates.py --source L): of the 8
    # candidates the run keeps, those showing the planted behaviour numbered 2 or more in 8 of 9
    # draws at layer 12, 6 of 9 at layer 8, fewer at 10 and 16; refusal, planted least additively,
    # gained most (2 / 2 / 2 against 2 / 0 / 1). End to end (bench_planted.py, with the R check at
    # 1 and 2x) the runs met the 15 % share in 8 of 9, and 5 of 6 at seeds 3-4 chosen afterwards
    # (layer 8: 6 of 9, 3 of 6). The objective runs from the source to the output, so a later
    # source also trains faster (42-57 s for 24 candidates against 56-68 s).
    source_fraction: ClassVar[float] = 0.4

    reply_tokens: int = field(default=8, metadata={"min": 0})
    """read the KL along this many tokens of the unsteered greedy reply, plus the prompt's last
    token (0: the prompt's target tokens only, --target-tokens)"""
    first_share: float | None = field(default=0.5, metadata={"min": 0, "max": 1, "none": "mean"})
    """weight of the reply's first token (read at the prompt's last position) in each prompt's KL,
    the rest spread over the reply tokens; mean: every position the same. The first token decides
    what kind of reply follows (an answer or a refusal, which language); the plain mean over 9
    positions let vectors that only change that decision score low"""
    steps: int = field(default=30, metadata={"min": 1})
    """most Adam steps (training stops earlier on a plateau)"""
    plateau: float = field(default=0.01, metadata={"min": 0})
    """stop when the summed objective over the last `plateau_window` steps is less than this
    fraction above the window before (0: always run every step)"""
    plateau_window: int = field(default=10, metadata={"min": 2})
    """steps per window of the plateau rule"""
    lr: float | None = field(default=None, metadata={"min": 0})
    """Adam learning rate (auto: c * R / sqrt(d_model), c = 0.15 for kl, whose saturating KL
    plateaus in ~30 steps at that size, and 0.01 for melbo)"""
    orthogonal: bool = True
    """keep the vectors mutually orthogonal"""
    candidates: int = field(default=3, metadata={"min": 1})
    """train this many candidates per vector asked for and keep the best (1: keep every vector
    trained): by the caller's ranking when it gives one (`steerscope run` and `discover`: the
    candidates whose completions move furthest from the unsteered ones while staying natural to
    the model, judging.keep), else those whose steered next-token distributions along the reply
    keep the most entropy"""
    vectors_per_batch: int | None = field(default=None, metadata={"min": 1})
    """train this many vectors at once (auto: all in one batch)"""
    checkpoint_every: int = field(default=10, metadata={"min": 1})
    """steps between checkpoints"""


@torch.no_grad()
def greedy_replies(
    lm, prompts: list[str], n: int, *, chat: bool | None = None, formatted: bool = False
) -> tuple[list[str], list[str]]:
    """(prompt texts, prompt texts followed by the model's own greedy reply of up to `n` tokens),
    both as text that `lm.encode(..., formatted=True)` reads back: the prompt is encoded exactly
    as a run encodes it (chat template or BOS included), then decoded with its special tokens.
    One prompt at a time: no padding, and a few short prompts cost well under a second."""
    eos = lm.eos_ids
    heads, full = [], []
    for p in prompts:
        ids = lm.encode([p], chat=chat, formatted=formatted)["input_ids"]  # (1, T)
        T = ids.shape[1]
        for _ in range(n):
            nxt = int(lm.forward(ids).logits[0, -1].argmax())
            if nxt in eos:
                break
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
        heads.append(lm.tokenizer.decode(ids[0, :T]))
        full.append(lm.tokenizer.decode(ids[0]))
    return heads, full


def reply_mask(lr: LayerRange, n_prompt: list[int]) -> torch.Tensor:
    """(P, T) bool: each row's last prompt token and every token after it (the positions whose
    next-token distributions predict the reply). `n_prompt`: the prompt's own token count per row."""
    n = lr.valid.sum(-1, keepdim=True)  # (P, 1) real tokens: prompt + reply
    pos = lr.valid.long().cumsum(-1)  # 1-based position among real tokens
    start = torch.tensor(n_prompt, device=n.device)[:, None]  # (P, 1)
    return lr.valid & (pos >= start.clamp(max=n))


def position_weights(mask: torch.Tensor, first_share: float | None) -> torch.Tensor:
    """(M,) float32 weights of the M read positions of `mask` (P, T), in its row-major order,
    summing to 1. None: every position the same (the plain mean). Else every row weighs the
    same; within a row its first read position gets `first_share` of the row and the others
    share the rest (a row of one position gets all of it)."""
    m = mask.bool()
    if first_share is None:
        return torch.full((int(m.sum()),), 1.0 / max(1, int(m.sum())), device=m.device)
    per_row = m.sum(-1, keepdim=True).float()  # (P, 1)
    first = m & (m.long().cumsum(-1) == 1)  # (P, T) each row's first read position
    rest = (1.0 - first_share) / (per_row - 1).clamp_min(1)
    w = torch.where(first, torch.where(per_row > 1, first_share, 1.0), rest.expand_as(m).float())
    w = w[m]
    return w / w.sum().clamp_min(1e-12)


class OutputKL:
    """theta (K, d) -> (K,) mean KL(steered || unsteered) of the next-token distributions at
    `mask`, through the blocks after the source, the final norm and the unembedding."""

    def __init__(self, lm, lr: LayerRange, mask: torch.Tensor, first_share: float | None = None):
        self.lm, self.lr, self.mask = lm, lr, mask  # mask (P, T)
        self.head = lm.model.get_output_embeddings()
        # Gemma-2 style models cap their logits in the head's caller; do the same.
        self.cap = getattr(
            getattr(lm.model.config, "get_text_config", lambda: lm.model.config)(), "final_logit_softcapping", None
        )
        self.n = mask.sum().clamp_min(1)
        self.weights = position_weights(mask, first_share)  # (M,), sums to 1
        with torch.no_grad():
            self.base = self._logp(lr.z_target, 1)  # (M, vocab), M = masked positions

    def _logp(self, z: torch.Tensor, K: int) -> torch.Tensor:
        z = z[self.mask.repeat(K, 1)]  # (K*M, d): only the positions read, before the vocab-wide head
        logits = self.head(self.lm.arch.final_norm(z)).float()
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return torch.log_softmax(logits, dim=-1)

    def _steered(self, theta: torch.Tensor) -> torch.Tensor:
        """(K, M, vocab) steered log-probs at the positions read."""
        K = theta.shape[0]
        return self._logp(self.lr.run(theta), K).view(K, *self.base.shape)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        lp = self._steered(theta)  # (K, M, vocab)
        kl = (lp.exp() * (lp - self.base)).sum(-1)  # (K, M); the base broadcasts, never copied K times
        return kl.float() @ self.weights  # (K,)

    @torch.no_grad()
    def entropy(self, theta: torch.Tensor) -> torch.Tensor:
        """(K,) mean entropy (nats) of the steered next-token distributions at the positions read."""
        lp = self._steered(theta)  # (K, M, vocab)
        return -(lp.exp() * lp).sum(-1).sum(-1) / self.n


# A run builds the objective once per Goldilocks multiple and once more for the vectors, on the same
# LayerRange; the greedy replies and the range to the output (~4 s on SmolLM2) do not depend on R.
_BUILT: weakref.WeakKeyDictionary[LayerRange, dict] = weakref.WeakKeyDictionary()


def output_kl_objective(
    lm, layer_range: LayerRange, reply_tokens: int, target_tokens: str, first_share: float | None = None
) -> OutputKL:
    """The objective on `layer_range`'s prompts, from its source layer to the model's output
    (built once per range and settings). `first_share`: the weight of the reply's first token
    (read at the prompt's last position) in each prompt's KL; None or reply_tokens = 0: every
    read position the same."""
    first_share = first_share if reply_tokens > 0 else None
    key = (reply_tokens, target_tokens if reply_tokens <= 0 else None, first_share)
    built = _BUILT.setdefault(layer_range, {})
    if key in built:
        return built[key]
    obj = _build(lm, layer_range, reply_tokens, target_tokens, first_share)
    if obj.lr is not layer_range:  # a value holding its own weak key would keep it alive forever
        built[key] = obj
    return obj


def _build(lm, lr0: LayerRange, reply_tokens: int, target_tokens: str, first_share: float | None) -> OutputKL:
    last = lm.n_layers - 1
    if reply_tokens > 0:
        heads, texts = greedy_replies(lm, lr0.prompts, reply_tokens, chat=lr0.chat, formatted=lr0.formatted)
        n_prompt = [int(lm.encode([h], formatted=True)["attention_mask"].sum()) for h in heads]
        lr = LayerRange(lm, texts, lr0.source, last, formatted=True)
        mask = reply_mask(lr, n_prompt)
    else:
        lr = (
            lr0
            if lr0.target == last
            else LayerRange(lm, lr0.prompts, lr0.source, last, chat=lr0.chat, formatted=lr0.formatted)
        )
        mask = lr.target_mask(target_tokens)
    return OutputKL(lm, lr, mask, first_share)


@DISCOVERY.register("kl", KLConfig)
def kl(ctx: DiscoveryContext, cfg: KLConfig) -> Discovered:
    """Output-KL discovery: vectors that most change the next-token distribution along the reply."""
    s, lm = ctx.settings, ctx.lm
    objective = output_kl_objective(lm, ctx.layer_range, cfg.reply_tokens, s.target_tokens, cfg.first_share)
    n = s.n_vectors * cfg.candidates
    chunks = -(-n // (cfg.vectors_per_batch or n))
    lr = cfg.lr if cfg.lr is not None else 0.15 * ctx.R / math.sqrt(lm.d_model)
    with ctx.bar(cfg.steps * chunks, "kl") as bar:
        res = train_melbo(
            objective.lr,
            n_vectors=n,
            R=ctx.R,
            steps=cfg.steps,
            lr=lr,
            orthogonal=cfg.orthogonal,
            chunk=cfg.vectors_per_batch,
            seed=s.seed,
            checkpoint=ctx.checkpoint,
            checkpoint_every=cfg.checkpoint_every,
            progress=bar,
            plateau=cfg.plateau,
            window=cfg.plateau_window,
            objective=objective,
        )
    # train_melbo returns vectors and curves on the CPU; the scores come back there too.
    info: dict = {}
    if n > s.n_vectors and ctx.rank is not None:
        score, by = ctx.rank(res.vectors).float().cpu(), "completions"  # (n,)
    else:
        score = torch.cat([objective.entropy(c) for c in res.vectors.split(cfg.vectors_per_batch or n)]).float().cpu()
        by = "entropy"
    keep = score.argsort(descending=True, stable=True)[: s.n_vectors].sort().values  # in training order
    if n > s.n_vectors:
        info = {
            "candidates": n,
            "kept": keep.tolist(),
            "kept_by": by,
            "candidate_score": [round(float(e), 4) for e in score],
        }
    return Discovered(
        res.vectors[keep],
        {"curves": res.curves[keep]},
        {
            "final_objective": final_values(res.curves)[keep].tolist(),
            "steps_run": res.steps_run,
            "objective": "KL(steered || unsteered) along the reply, nats",
            "reads": "output",  # target: R only
            **info,
        },
    )
