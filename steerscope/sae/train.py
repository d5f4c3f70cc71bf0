"""Training SAEs: a streamed, shuffled activation buffer and the training loop.

Practice followed (see SAELens / sparsify / dictionary_learning):
- inputs scaled so E||x|| = sqrt(d_in) during training, folded into the weights afterwards
  (`fold_input_scale`), so the saved SAE reads raw activations;
- decoder rows kept unit norm: parallel gradient removed before each step, renormalised after;
- b_dec initialised to the mean of the first batch; encoder initialised as the decoder's transpose;
- Adam with lr = 2e-4 / sqrt(n_latents / 2^14) unless given, linear warm-up, linear decay over
  the final 20 %; the L1 coefficient (relu) warms up over the first 5 % of steps;
- AuxK on latents that have not fired for `dead_after` tokens (topk / batchtopk).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, config_key
from ..config import Config
from ..errors import SteerscopeError
from ..models.activations import read_layer
from ..progress import bar as progress_bar
from .model import SAE, SAEConfig


class ActivationBuffer:
    """Residual activations at `layer` from `texts`, served in shuffled batches.

    The buffer holds `buffer_tokens` activations; when half has been served it is refilled with
    fresh activations and reshuffled, so consecutive batches mix many documents. Texts longer than
    `context` tokens are read as consecutive windows of `context` tokens. The first token
    of every text (BOS / attention sink, whose norm is often orders of magnitude larger) and
    tokens with norm above `max_norm_multiple` x the median are dropped.
    """

    def __init__(
        self,
        lm,
        texts: list[str],
        layer: int,
        *,
        batch_size: int = 1024,
        buffer_tokens: int = 32768,
        context: int = 128,
        lm_batch: int = 8,
        drop_first: bool = True,
        max_norm_multiple: float | None = 10.0,
        seed: int = 0,
        loop: bool = True,
    ):
        if not texts:
            raise SteerscopeError("the SAE needs text: give at least one document.")
        self.lm, self.texts, self.layer = lm, list(texts), lm.check_layer(layer)
        self.batch_size, self.buffer_tokens, self.context, self.lm_batch = batch_size, buffer_tokens, context, lm_batch
        self.drop_first, self.max_norm_multiple, self.loop = drop_first, max_norm_multiple, loop
        self.g = torch.Generator().manual_seed(seed)
        self._doc = 0
        self.tokens_seen = 0
        self.buf = torch.zeros(0, lm.d_model)
        self._served: int | None = None  # tokens served since the last refill

    def _windows(self) -> list[list[int]]:
        """Token windows of the next texts that hold any (empty only when the texts ran out)."""
        for _ in range(len(self.texts) // max(1, self.lm_batch) + 2):
            if self._doc >= len(self.texts):
                if not self.loop:
                    return []
                self._doc = 0
            chunk = self.texts[self._doc : self._doc + self.lm_batch]
            self._doc += len(chunk)
            # Long texts are cut into windows of `context` tokens rather than truncated, so no text
            # is wasted; each window starts a fresh sequence (its first token is dropped below).
            windows = []
            for ids_ in self.lm.tokenizer(chunk, add_special_tokens=True)["input_ids"]:
                windows += [ids_[i : i + self.context] for i in range(0, len(ids_), self.context) if len(ids_) - i > 1]
            if windows:
                return windows
        raise SteerscopeError("no text is longer than one token; give real documents.")

    @torch.no_grad()
    def _more(self) -> torch.Tensor:
        """Activations of the next `lm_batch` texts: (n_tokens, d) float32."""
        windows = self._windows()
        if not windows:
            return torch.zeros(0, self.lm.d_model)
        enc = self.lm.tokenizer.pad({"input_ids": windows}, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.lm.device), enc["attention_mask"].to(self.lm.device).bool()
        acts = read_layer(self.lm, self.layer, ids, mask.long())  # (B, T, d), on the block's device
        keep = mask.clone().to(acts.device)
        if self.drop_first:
            first = keep.long().cumsum(-1) == 1
            keep &= ~first
        x = acts[keep].float().cpu()
        if self.max_norm_multiple is not None and len(x):
            n = x.norm(dim=-1)
            x = x[n <= self.max_norm_multiple * n.median()]
        self.tokens_seen += len(x)
        return x

    def _fill(self) -> None:
        while len(self.buf) < self.buffer_tokens:
            more = self._more()
            if len(more) == 0:
                break
            self.buf = torch.cat([self.buf, more])
        self.buf = self.buf[torch.randperm(len(self.buf), generator=self.g)]

    def __iter__(self) -> ActivationBuffer:
        return self

    def __next__(self) -> torch.Tensor:
        if self._served is None or self._served >= self.buffer_tokens // 2:  # first call, or half used: refill
            self._fill()
            self._served = 0
        if len(self.buf) < self.batch_size:
            raise StopIteration
        out, self.buf = self.buf[: self.batch_size], self.buf[self.batch_size :]
        self._served += self.batch_size
        return out

    def _texts_key(self) -> str:
        import hashlib

        return hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly: position in the texts, the buffer's
        contents and the shuffling generator."""
        return {
            "doc": self._doc,
            "tokens_seen": self.tokens_seen,
            "g": self.g.get_state(),
            "buf": self.buf.clone(),
            "served": -1 if self._served is None else self._served,
            "texts": self._texts_key(),
        }

    def load_state_dict(self, st: dict) -> None:
        if st["texts"] != self._texts_key():
            raise SteerscopeError(
                "the text source differs from the one the checkpoint was made with; "
                "resume with the same texts, or start over (--force)."
            )
        self._doc, self.tokens_seen, self.buf = st["doc"], st["tokens_seen"], st["buf"]
        self.g.set_state(st["g"])
        self._served = None if st["served"] < 0 else st["served"]


class TensorBatches:
    """Endless shuffled batches from a fixed (N, d) tensor (synthetic data, cached activations);
    resumable through `state_dict` / `load_state_dict`."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int = 0):
        if len(x) < batch_size:
            raise SteerscopeError(f"{len(x)} rows cannot fill a batch of {batch_size}.")
        self.x, self.batch_size = x, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.i = torch.randperm(len(x), generator=self.g), 0

    def __iter__(self) -> TensorBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.i + self.batch_size > len(self.x):  # next epoch
            self.perm, self.i = torch.randperm(len(self.x), generator=self.g), 0
        out = self.x[self.perm[self.i : self.i + self.batch_size]]
        self.i += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"g": self.g.get_state(), "perm": self.perm.clone(), "i": self.i, "n": len(self.x)}

    def load_state_dict(self, st: dict) -> None:
        if st["n"] != len(self.x):
            raise SteerscopeError(f"the checkpoint was made on {st['n']} rows, this source has {len(self.x)}.")
        self.g.set_state(st["g"])
        self.perm, self.i = st["perm"], st["i"]


tensor_batches = TensorBatches


@dataclass(frozen=True)
class TrainConfig(Config):
    """How an SAE is trained."""

    steps: int = field(default=2000, metadata={"min": 1})
    """optimiser steps"""
    lr: float | None = field(default=None, metadata={"min": 0})
    """Adam learning rate (auto: 2e-4 / sqrt(n_latents / 2^14))"""
    warmup_steps: int = field(default=100, metadata={"min": 0})
    """linear learning-rate warm-up"""
    decay_frac: float = field(default=0.2, metadata={"min": 0, "max": 1})
    """share of the steps at the end over which the learning rate decays to 0"""
    l1_warmup_frac: float = field(default=0.05, metadata={"min": 0, "max": 1})
    """share of the steps over which the L1 coefficient warms up (relu)"""
    dead_after: int = field(default=1_000_000, metadata={"min": 1})
    """tokens without firing before a latent counts as dead (AuxK)"""
    scale_input: bool = True
    """scale inputs to E||x|| = sqrt(d_in) while training (folded into the weights after)"""
    binding_init: str = field(default="random", metadata={"choices": ("random", "icp", "match")})
    """binding: how D and M start. random: random orthogonal M. Both others first train a plain TopK SAE of
    the same size (--binding-warm-steps) and take D and M_1 from its atoms. icp: registers the atoms onto
    themselves (ICP + orthogonal Procrustes from --binding-restarts random rotations); finds M on 1 of 6
    seeds of the synthetic check at d = 16. match (slots 2): sharpens the atoms (MOD), splits them into
    slots by co-firing, pairs them by their inner products; finds M on 6 of 6 seeds there
    (sae/binding.py). Both assume an orthogonal M"""
    binding_warm_steps: int = field(default=2400, metadata={"min": 1})
    """binding, --binding-init icp / match: steps of the plain TopK SAE trained first (on top of --steps)"""
    binding_restarts: int = field(default=24000, metadata={"min": 1})
    """binding, --binding-init icp: random starts of the ICP search for M"""
    binding_match_rows: int = field(default=8192, metadata={"min": 1})
    """binding, --binding-init match: activations the atoms are sharpened and split into slots on"""
    seed: int = 0
    """random seed (initial weights)"""
    device: str | None = field(default=None, metadata={"cli": "--sae-device"})
    """device the SAE trains on (auto: where the batches are)"""


@dataclass
class TrainHistory:
    l0: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    dead_frac: list[float] = field(default_factory=list)
    input_scale: float = 1.0


def _lr_factor(step: int, t: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    decay_start = int(t.steps * (1 - t.decay_frac))
    decay = 1.0 if step < decay_start else max(0.0, (t.steps - step) / max(1, t.steps - decay_start))
    return warm * decay


def load_checkpoint(folder, cfg: SAEConfig, tcfg: TrainConfig) -> dict | None:
    """The training state saved in `folder` for these settings, or None when there is none."""
    return _checkpoint(folder, cfg, tcfg).load()


def _checkpoint(folder, cfg: SAEConfig, tcfg: TrainConfig) -> Checkpoint:
    return Checkpoint(folder, config_key(cfg, tcfg), "SAE training run")


def train_sae(
    batches: Iterator[torch.Tensor],
    cfg: SAEConfig,
    tcfg: TrainConfig | None = None,
    progress: bool | None = False,
    checkpoint_dir=None,
    checkpoint_every: int = 250,
) -> tuple[SAE, TrainHistory]:
    """Train an SAE on `batches` of (B, d_in) activations.

    With `checkpoint_dir`, the full training state (weights, optimiser, schedule, dead-latent
    counters, history and the batch source's position) is written there every `checkpoint_every`
    steps, and a call that finds a checkpoint continues from it: the result equals an
    uninterrupted run. The batch source must then have `state_dict` / `load_state_dict`
    (`ActivationBuffer`, `TensorBatches`, `ShardBatches` do).
    """
    t = tcfg or TrainConfig()
    sae = SAE(cfg, seed=t.seed)
    hist = TrainHistory()
    it = iter(batches)
    lr = t.lr if t.lr is not None else 2e-4 / math.sqrt(cfg.n_latents / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, t))
    ckpt = _checkpoint(checkpoint_dir, cfg, t)
    if checkpoint_dir is not None and not hasattr(it, "state_dict"):
        raise SteerscopeError(
            "checkpointing needs a resumable batch source (ActivationBuffer, TensorBatches, ShardBatches)."
        )
    state = ckpt.load()
    start, first = 0, None
    if state is None:
        cfg.rule.warm_start(sae, it, t)  # binding --binding-init icp: D, M from a plain SAE's atoms
        first = next(it).float()
    dev = torch.device(t.device) if t.device else (first.device if first is not None else torch.device("cpu"))
    sae.to(dev)
    since_fired = torch.zeros(cfg.n_latents, device=dev)
    if state is not None:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        since_fired = state["since_fired"].to(dev)
        hist = TrainHistory(**state["hist"])
        it.load_state_dict(state["batches"])
        start, scale = state["step"], hist.input_scale
    else:
        first = first.to(dev)
        scale = math.sqrt(cfg.d_in) / float(first.norm(dim=-1).mean()) if t.scale_input else 1.0
        hist.input_scale = scale
        with torch.no_grad():
            sae.b_dec.copy_((first * scale).mean(0))
    sae.train()
    with progress_bar(t.steps, f"sae {cfg.arch}", "step", show=progress, initial=start) as bar:
        for step in range(start, t.steps):
            if step == 0:
                batch = first
            else:
                try:
                    batch = next(it)
                except StopIteration:
                    raise SteerscopeError(
                        f"the activation source ran out after {step} steps; give more text or fewer steps."
                    ) from None
            x = batch.to(dev).float() * scale  # (B, d)
            out = sae(x)
            err = (x - out.recon).square().sum(-1)
            fvu = err.mean() / (x - x.mean(0)).square().sum(-1).mean().clamp_min(1e-12)
            loss = cfg.rule.loss(sae, x, out, err, fvu, step, t, since_fired > t.dead_after)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.project_decoder_grad()
            opt.step()
            sched.step()
            sae.normalize_decoder()
            with torch.no_grad():
                fired = (out.acts > 0).any(0)
                since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + x.shape[0])
                l0 = float((out.acts > 0).sum(-1).float().mean())
            hist.l0.append(l0)
            hist.fvu.append(float(fvu.detach()))
            hist.dead_frac.append(float((since_fired > t.dead_after).float().mean()))
            if step % 20 == 0:
                bar.set_postfix(L0=f"{l0:.1f}", FVU=f"{hist.fvu[-1]:.3f}")
            if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0 and step + 1 < t.steps:
                ckpt.save(
                    {
                        "step": step + 1,
                        "sae": sae.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "since_fired": since_fired,
                        "hist": asdict(hist),
                        "batches": it.state_dict(),
                    }
                )
            bar.update(1)
    sae.eval()
    cfg.rule.finish(sae)
    fold_input_scale(sae, scale)
    return sae, hist


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float) -> None:
    """Make an SAE trained on x * scale read and write raw x (acts unchanged)."""
    sae.W_enc.mul_(scale)
    sae.b_dec.div_(scale)
    sae.divide_decoder_(scale)


def cache_activations(buffer: ActivationBuffer, folder, shard_tokens: int = 65536) -> int:
    """Write the buffer's activations (one pass over its texts) to `folder` as safetensors shards
    `acts-00000.safetensors`, ... for repeated training runs; returns the number of tokens.
    Each shard is written to a temporary name and renamed, so a killed run leaves whole shards."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.glob("acts-*.safetensors")):
        raise SteerscopeError(f"{folder} already holds activation shards; use another folder or delete them.")
    buffer.loop = False
    pending, n, shard = [], 0, 0

    def flush(x):
        nonlocal shard
        tmp = folder / f".acts-{shard:05d}.tmp"
        save_file(
            {"acts": x.contiguous()}, str(tmp), metadata={"layer": str(buffer.layer), "model": buffer.lm.model_id}
        )
        os.replace(tmp, folder / f"acts-{shard:05d}.safetensors")
        shard += 1

    while True:
        more = buffer._more()
        if len(more) == 0:
            break
        pending.append(more)
        n += len(more)
        while sum(len(p) for p in pending) >= shard_tokens:
            x = torch.cat(pending)
            flush(x[:shard_tokens])
            pending = [x[shard_tokens:]]
    if pending and sum(len(p) for p in pending):
        flush(torch.cat(pending))
    return n


class ShardBatches:
    """Endless shuffled batches from cached shards: shards in a random order per epoch, rows
    shuffled within each shard, leftovers carried into the next. Resumable like `TensorBatches`."""

    def __init__(self, folder, batch_size: int, seed: int = 0):
        self.files = sorted(Path(folder).glob("acts-*.safetensors"))
        if not self.files:
            raise SteerscopeError(f"no activation shards in {folder}.")
        self.batch_size = batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.j = 0  # next shard in `order`
        self.x = torch.zeros(0)  # the current shuffled shard (+ carry)
        self.i = 0  # rows of `x` served
        self._resume: dict | None = None  # state at the start of the current shard

    def __iter__(self) -> ShardBatches:
        return self

    def _load_next(self, carry: torch.Tensor) -> None:
        from safetensors.torch import load_file

        if self.j >= len(self.order):
            self.order, self.j = torch.randperm(len(self.files), generator=self.g).tolist(), 0
        # state before loading: enough to rebuild x exactly on resume
        self._resume = {"g": self.g.get_state(), "order": list(self.order), "j": self.j, "carry": carry.clone()}
        x = load_file(str(self.files[self.order[self.j]]))["acts"]
        self.j += 1
        x = torch.cat([carry, x]) if len(carry) else x
        self.x, self.i = x[torch.randperm(len(x), generator=self.g)], 0

    def __next__(self) -> torch.Tensor:
        while self.i + self.batch_size > len(self.x):
            self._load_next(self.x[self.i :])
        out = self.x[self.i : self.i + self.batch_size]
        self.i += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"n_files": len(self.files), "i": self.i, "shard": self._resume}

    def load_state_dict(self, st: dict) -> None:
        if st["n_files"] != len(self.files):
            raise SteerscopeError(
                f"the checkpoint was made on {st['n_files']} shards, the folder holds {len(self.files)}."
            )
        if st["shard"] is None:
            return
        r = st["shard"]
        self.g.set_state(r["g"])
        self.order, self.j = list(r["order"]), r["j"]
        self._load_next(r["carry"])
        self.i = st["i"]


shard_batches = ShardBatches
