"""MELBO (Mack & Turner 2024, "Mechanistically Eliciting Latent Behaviors").

Learn vectors theta with ||theta|| = R, added at source layer s at every real token, maximising

    sum_prompts ( sum_{t in target tokens} || Z_t(theta) - Z_t(0) ||_2^p )^(1/q)

with Z the residual stream at the OUTPUT of target block t. Two bugs of the reference code are
not copied: it takes the norm over the token dimension (right only for p = 2) and reads the
target from hidden_states[t], one layer early.

Speed: the layers before s run once (`LayerRange` caches h_s), the forward stops at t, and a
chunk of vectors trains as one batch (K vectors x P prompts rows). Gradients are projected on the
tangent of the sphere and theta is renormalised to R after every Adam step; with
`orthogonal=True` vector k is kept orthogonal to vectors 0..k-1 (Gram-Schmidt after each step,
and against all earlier chunks), which is the reference's sequential scheme done in one batch.
The inner loop never calls .item(). A checkpoint (the shared `checkpoint.Checkpoint`) is saved
every `checkpoint_every` steps and after each chunk; a run started again with the same config
resumes from it and gives the same vectors as an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ...checkpoint import Checkpoint
from ...config import Config
from ...errors import SteerscopeError
from ...models.layer_range import frozen_weights
from .base import DISCOVERY, Discovered, DiscoveryContext
from .baselines import _orthonormal_rows


@dataclass(frozen=True)
class MelboConfig(Config):
    """MELBO's own settings."""

    p: float = field(default=2.0, metadata={"min": 0})
    """exponent of the per-token change in the objective"""
    q: float = field(default=1.0, metadata={"min": 0})
    """the per-prompt sum is raised to 1/q"""
    steps: int = field(default=300, metadata={"min": 1})
    """most Adam steps per chunk of vectors (training stops earlier on a plateau)"""
    plateau: float = field(default=0.01, metadata={"min": 0})
    """stop a chunk when its summed objective over the last `plateau_window` steps is less than
    this fraction above the window before (0: always run every step)"""
    plateau_window: int = field(default=20, metadata={"min": 2})
    """steps per window of the plateau rule"""
    lr: float | None = field(default=None, metadata={"min": 0})
    """Adam learning rate (auto: 0.01 * R / sqrt(d_model), the reference's 1e-3 at R=4, d=2048)"""
    orthogonal: bool = True
    """keep the vectors mutually orthogonal"""
    vectors_per_batch: int | None = field(default=None, metadata={"min": 1})
    """train this many vectors at once (auto: all in one batch)"""
    checkpoint_every: int = field(default=25, metadata={"min": 1})
    """steps between checkpoints"""


@DISCOVERY.register("melbo", MelboConfig)
def melbo(ctx: DiscoveryContext, cfg: MelboConfig) -> Discovered:
    """MELBO (Mack & Turner 2024): vectors that maximise the change at the target layer."""
    s = ctx.settings
    chunks = -(-s.n_vectors // (cfg.vectors_per_batch or s.n_vectors))
    with ctx.bar(cfg.steps * chunks, "melbo") as bar:
        res = train_melbo(
            ctx.layer_range,
            n_vectors=s.n_vectors,
            R=ctx.R,
            p=cfg.p,
            q=cfg.q,
            target_tokens=s.target_tokens,
            steps=cfg.steps,
            lr=cfg.lr,
            orthogonal=cfg.orthogonal,
            chunk=cfg.vectors_per_batch,
            seed=s.seed,
            checkpoint=ctx.checkpoint,
            checkpoint_every=cfg.checkpoint_every,
            progress=bar,
            plateau=cfg.plateau,
            window=cfg.plateau_window,
        )
    return Discovered(
        res.vectors,
        {"curves": res.curves},
        {"final_objective": final_values(res.curves).tolist(), "steps_run": res.steps_run},
    )


class MelboResult(NamedTuple):
    vectors: torch.Tensor  # (K, d)
    curves: torch.Tensor  # (K, steps): each vector's objective per step; NaN after an early stop
    steps_run: list[int]  # steps each chunk ran


def final_values(curves: torch.Tensor) -> torch.Tensor:
    """(K,) each curve's last value that was run (curves are NaN after an early stop)."""
    ran = (~curves.isnan()).sum(-1).clamp_min(1) - 1  # (K,) index of the last step run
    return curves.gather(1, ran[:, None])[:, 0]


def plateaued(curve: torch.Tensor, step: int, window: int, tol: float) -> bool:
    """True when the chunk's summed objective over steps (step-window, step] rose less than `tol`
    (relative) over the window before it. `curve` (K, steps) holds steps 0..step."""
    if tol <= 0 or step + 1 < 2 * window or (step + 1) % window:
        return False
    total = curve[:, : step + 1].sum(0)  # (steps so far,)
    last, before = total[-window:].mean(), total[-2 * window : -window].mean()
    return bool(last - before < tol * before.abs().clamp_min(1e-12))


def melbo_objective(delta: torch.Tensor, mask: torch.Tensor, K: int, p: float, q: float) -> torch.Tensor:
    """(K,) objective. delta (K*P, T, d); mask (P, T) target tokens."""
    P = mask.shape[0]
    norms = delta.norm(dim=-1)  # (K*P, T): the norm over d_model, per token
    per_prompt = (norms.pow(p) * mask.repeat(K, 1)).sum(-1).pow(1.0 / q)  # (K*P,)
    return per_prompt.view(K, P).sum(-1)


def _project(theta: torch.Tensor, earlier: torch.Tensor | None, orthogonal: bool, R: float) -> torch.Tensor:
    """Back onto the constraint set: orthogonal to earlier chunks, Gram-Schmidt within the
    chunk, norm R."""
    if earlier is not None and orthogonal and earlier.shape[0]:
        u = earlier / earlier.norm(dim=-1, keepdim=True)
        theta = theta - (theta @ u.T) @ u
    if orthogonal:
        theta = _orthonormal_rows(theta)
    return R * theta / theta.norm(dim=-1, keepdim=True)


def train_melbo(
    layer_range,
    *,
    n_vectors: int,
    R: float,
    p: float = 2.0,
    q: float = 1.0,
    target_tokens: str = "all",
    steps: int = 300,
    lr: float | None = None,
    orthogonal: bool = True,
    chunk: int | None = None,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 25,
    progress=None,
    callback: Callable[[int, int], None] | None = None,
    plateau: float = 0.0,
    window: int = 20,
    objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MelboResult:
    """Train K vectors; `callback(chunk, step)` runs after every step (tests use it to kill a run).
    `plateau` > 0 stops a chunk early when its objective flattens (see `plateaued`).
    `objective(theta (K, d)) -> (K,)` replaces MELBO's (p, q, target_tokens unused then): the same
    projected ascent, orthogonality, plateau rule and checkpoints for another objective (kl.py)."""
    with frozen_weights(layer_range.lm):
        return _train(
            layer_range,
            n_vectors,
            R,
            p,
            q,
            target_tokens,
            steps,
            lr,
            orthogonal,
            chunk,
            seed,
            checkpoint,
            checkpoint_every,
            progress,
            callback,
            plateau,
            window,
            objective,
        )


def _train(
    layer_range,
    n_vectors,
    R,
    p,
    q,
    target_tokens,
    steps,
    lr,
    orthogonal,
    chunk,
    seed,
    checkpoint,
    checkpoint_every,
    progress,
    callback,
    plateau,
    window,
    objective,
):
    lr_ = lr if lr is not None else 0.01 * R / math.sqrt(layer_range.lm.d_model)
    d = layer_range.lm.d_model
    chunk = chunk or n_vectors
    if orthogonal and n_vectors > d:
        raise SteerscopeError(f"{n_vectors} orthogonal vectors do not fit in d_model={d}.")
    mask = layer_range.target_mask(target_tokens).float()  # (P, T)
    ckpt = checkpoint or Checkpoint(None, "")
    dev = layer_range.lm.device
    done = torch.zeros(0, d, device=dev)
    curves = torch.zeros(0, steps, device=dev)
    start_chunk, start_step, state, steps_run = 0, 0, None, []
    loaded = ckpt.load()
    if loaded is not None:
        done, curves = loaded["done"].to(dev), loaded["curves"].to(dev)
        start_chunk, start_step = loaded["chunk"], loaded["step"]
        steps_run = list(loaded.get("steps_run", []))
        state = loaded if "theta" in loaded else None
        if progress is not None and hasattr(progress, "start_at"):  # the resumed steps are done, not fast
            progress.start_at(start_chunk * steps + start_step)
    n_chunks = math.ceil(n_vectors / chunk)
    for c in range(start_chunk, n_chunks):
        K = min(chunk, n_vectors - c * chunk)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        theta = torch.nn.Parameter(_project(torch.randn(K, d, generator=g).to(dev), done, orthogonal, R))
        # AdamW(wd=0, betas=(.9,.98), amsgrad) as in the reference code.
        opt = torch.optim.Adam([theta], lr=lr_, betas=(0.9, 0.98), amsgrad=True)
        curve = torch.full((K, steps), float("nan"), device=dev)
        step0, ran = 0, steps
        if state is not None and c == start_chunk:
            with torch.no_grad():
                theta.copy_(state["theta"])
            opt.load_state_dict(state["opt"])
            curve = state["curve"].to(dev)
            step0 = start_step
        for step in range(step0, steps):
            opt.zero_grad(set_to_none=True)
            obj = objective(theta) if objective else melbo_objective(layer_range.delta(theta), mask, K, p, q)  # (K,)
            (-obj.sum()).backward()
            with torch.no_grad():
                gr = theta.grad
                unit = theta / theta.norm(dim=-1, keepdim=True)
                theta.grad = gr - (gr * unit).sum(-1, keepdim=True) * unit  # tangent of the sphere
            opt.step()
            with torch.no_grad():
                theta.copy_(_project(theta, done, orthogonal, R))
                curve[:, step] = obj.detach()
            if progress is not None:
                progress.update(1)
                if step % 10 == 0 or step == steps - 1:
                    progress.set_postfix(chunk=f"{c + 1}/{n_chunks}", objective=f"{float(obj.detach().mean()):.4g}")
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                ckpt.save(
                    {
                        "chunk": c,
                        "step": step + 1,
                        "done": done,
                        "curves": curves,
                        "theta": theta.detach(),
                        "opt": opt.state_dict(),
                        "curve": curve,
                        "steps_run": steps_run,
                    }
                )
            if callback is not None:
                callback(c, step)
            if plateaued(curve, step, window, plateau):
                ran = step + 1
                if progress is not None:
                    progress.update(steps - ran)  # the bar counts the steps the plateau saved
                break
        done = torch.cat([done, theta.detach().clone()])
        curves = torch.cat([curves, curve])
        steps_run.append(ran)
        ckpt.save({"chunk": c + 1, "step": 0, "done": done, "curves": curves, "steps_run": steps_run})  # chunk safe
        state = None
    return MelboResult(done.cpu(), curves.cpu(), steps_run)
