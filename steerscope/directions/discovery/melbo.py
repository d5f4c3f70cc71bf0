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
The inner loop never calls .item(). A checkpoint (safetensors + json, written atomically) is
saved every `checkpoint_every` steps and after each chunk; a run started again with the same
config resumes from it and gives the same vectors as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..._io import write_json_atomic
from ...errors import SteerscopeError
from ...models.layer_range import frozen_weights
from .baselines import _orthonormal_rows


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


class _Checkpoint:
    """state.safetensors + state.json in a folder; both replaced atomically."""

    def __init__(self, folder: Path | None, key: str):
        self.folder, self.key = folder, key

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if self.folder is None or not (self.folder / "state.json").is_file():
            return None
        from safetensors.torch import load_file

        meta = json.loads((self.folder / "state.json").read_text())
        if meta.get("key") != self.key:
            raise SteerscopeError(
                f"{self.folder} holds a checkpoint of a different MELBO run (other model, prompts or settings); "
                "delete it or pass --force to start over."
            )
        return meta, load_file(str(self.folder / "state.safetensors"))

    def save(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".state.safetensors.{os.getpid()}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / "state.safetensors")
        write_json_atomic(self.folder / "state.json", {**meta, "key": self.key})


def run_key(lm, prompts: list[str], cfg_dict: dict) -> str:
    blob = json.dumps({"model": lm.fingerprint, "prompts": prompts, "cfg": cfg_dict}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_melbo(layer_range, *, n_vectors: int, R: float, p: float = 2.0, q: float = 1.0, target_tokens: str = "all",
                steps: int = 300, lr: float | None = None, orthogonal: bool = True, chunk: int | None = None,
                seed: int = 0, checkpoint: _Checkpoint | None = None, checkpoint_every: int = 25,
                progress=None, callback: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (vectors (K, d), curves (K, steps) of each vector's objective)."""
    with frozen_weights(layer_range.lm):
        return _train(layer_range, n_vectors, R, p, q, target_tokens, steps, lr, orthogonal, chunk, seed, checkpoint,
                      checkpoint_every, progress, callback)


def _train(layer_range, n_vectors, R, p, q, target_tokens, steps, lr, orthogonal, chunk, seed, checkpoint,
           checkpoint_every, progress, callback):
    lr_ = lr if lr is not None else 0.01 * R / math.sqrt(layer_range.lm.d_model)
    d = layer_range.lm.d_model
    chunk = chunk or n_vectors
    if orthogonal and n_vectors > d:
        raise SteerscopeError(f"{n_vectors} orthogonal vectors do not fit in d_model={d}.")
    mask = layer_range.target_mask(target_tokens).float()  # (P, T)
    ckpt = checkpoint or _Checkpoint(None, "")
    done = torch.zeros(0, d)
    curves = torch.zeros(0, steps)
    start_chunk, start_step, state = 0, 0, None
    loaded = ckpt.load()
    if loaded is not None:
        meta, t = loaded
        done, curves = t["done"], t["curves"]
        start_chunk, start_step = meta["chunk"], meta["step"]
        state = t if "theta" in t else None
    n_chunks = math.ceil(n_vectors / chunk)
    for c in range(start_chunk, n_chunks):
        K = min(chunk, n_vectors - c * chunk)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        theta = torch.nn.Parameter(_project(torch.randn(K, d, generator=g), done, orthogonal, R))
        # AdamW(wd=0, betas=(.9,.98), amsgrad) as in the reference code.
        opt = torch.optim.Adam([theta], lr=lr_, betas=(0.9, 0.98), amsgrad=True)
        curve = torch.zeros(K, steps)
        step0 = 0
        if state is not None and c == start_chunk:
            with torch.no_grad():
                theta.copy_(state["theta"])
            opt.state[theta] = {"step": state["adam_step"].clone(), "exp_avg": state["exp_avg"].clone(),
                                "exp_avg_sq": state["exp_avg_sq"].clone(), "max_exp_avg_sq": state["max_exp_avg_sq"].clone()}
            curve = state["curve"].clone()
            step0 = start_step
        for step in range(step0, steps):
            opt.zero_grad(set_to_none=True)
            obj = melbo_objective(layer_range.delta(theta), mask, K, p, q)  # (K,)
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
                st = opt.state[theta]
                ckpt.save({"chunk": c, "step": step + 1}, {"done": done, "curves": curves, "theta": theta.detach(),
                                                          "adam_step": st["step"], "exp_avg": st["exp_avg"],
                                                          "exp_avg_sq": st["exp_avg_sq"], "max_exp_avg_sq": st["max_exp_avg_sq"],
                                                          "curve": curve})
            if callback is not None:
                callback(c, step)
        done = torch.cat([done, theta.detach().clone()])
        curves = torch.cat([curves, curve])
        ckpt.save({"chunk": c + 1, "step": 0}, {"done": done, "curves": curves})  # this chunk's vectors are safe
        state = None
    return done, curves
