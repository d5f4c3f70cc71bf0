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
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import SteerscopeError
from ..models.activations import read_layer
from .model import SAE, SAEConfig


class ActivationBuffer:
    """Residual activations at `layer` from `texts`, served in shuffled batches.

    The buffer holds `buffer_tokens` activations; when half has been served it is refilled with
    fresh activations and reshuffled, so consecutive batches mix many documents. The first token
    of every text (BOS / attention sink, whose norm is often orders of magnitude larger) and
    tokens with norm above `max_norm_multiple` x the median are dropped.
    """

    def __init__(self, lm, texts: list[str], layer: int, *, batch_size: int = 1024, buffer_tokens: int = 32768,
                 context: int = 128, lm_batch: int = 8, drop_first: bool = True, max_norm_multiple: float | None = 10.0,
                 seed: int = 0, loop: bool = True):
        if not texts:
            raise SteerscopeError("the SAE needs text: give at least one document.")
        self.lm, self.texts, self.layer = lm, list(texts), lm.check_layer(layer)
        self.batch_size, self.buffer_tokens, self.context, self.lm_batch = batch_size, buffer_tokens, context, lm_batch
        self.drop_first, self.max_norm_multiple, self.loop = drop_first, max_norm_multiple, loop
        self.g = torch.Generator().manual_seed(seed)
        self._doc = 0
        self.tokens_seen = 0
        self.buf = torch.zeros(0, lm.d_model)

    @torch.no_grad()
    def _more(self) -> torch.Tensor:
        """Activations of the next `lm_batch` texts: (n_tokens, d) float32."""
        if self._doc >= len(self.texts):
            if not self.loop:
                return torch.zeros(0, self.lm.d_model)
            self._doc = 0
        chunk = self.texts[self._doc:self._doc + self.lm_batch]
        self._doc += len(chunk)
        enc = self.lm.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.context)
        ids, mask = enc["input_ids"].to(self.lm.device), enc["attention_mask"].to(self.lm.device).bool()
        acts = read_layer(self.lm, self.layer, ids, mask.long())  # (B, T, d)
        keep = mask.clone()
        if self.drop_first:
            first = mask.long().cumsum(-1) == 1
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

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._fill()
        served = 0
        while len(self.buf) >= self.batch_size:
            yield self.buf[:self.batch_size]
            self.buf = self.buf[self.batch_size:]
            served += self.batch_size
            if served >= self.buffer_tokens // 2:  # refill when half used
                self._fill()
                served = 0


def tensor_batches(x: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches from a fixed (N, d) tensor (synthetic data, cached activations)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[i:i + batch_size]]


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float | None = None
    warmup_steps: int = 100
    decay_frac: float = 0.2
    l1_warmup_frac: float = 0.05
    dead_after: int = 1_000_000  # tokens without firing before a latent counts as dead
    scale_input: bool = True
    seed: int = 0


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


def train_sae(batches: Iterator[torch.Tensor], cfg: SAEConfig, tcfg: TrainConfig | None = None,
              progress: bool = False) -> tuple[SAE, TrainHistory]:
    from tqdm.auto import tqdm

    t = tcfg or TrainConfig()
    sae = SAE(cfg, seed=t.seed)
    hist = TrainHistory()
    it = iter(batches)
    first = next(it).float()
    scale = math.sqrt(cfg.d_in) / float(first.norm(dim=-1).mean()) if t.scale_input else 1.0
    hist.input_scale = scale
    with torch.no_grad():
        sae.b_dec.copy_((first * scale).mean(0))
    lr = t.lr if t.lr is not None else 2e-4 / math.sqrt(cfg.n_latents / 2 ** 14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, t))
    since_fired = torch.zeros(cfg.n_latents)
    sae.train()
    bar = tqdm(range(t.steps), desc=f"sae {cfg.arch}", disable=not progress, leave=False)
    batch = first
    for step in bar:
        x = batch.float() * scale  # (B, d)
        out = sae(x)
        err = (x - out.recon).square().sum(-1)
        fvu = err.mean() / (x - x.mean(0)).square().sum(-1).mean().clamp_min(1e-12)
        if cfg.arch == "relu":
            l1_w = cfg.l1_coef * min(1.0, (step + 1) / max(1, int(t.l1_warmup_frac * t.steps)))
            # MSE in units of the (scaled) input: E||x||^2 = d_in, so divide by d_in
            loss = err.mean() / cfg.d_in + l1_w * (out.acts * sae.W_dec.norm(dim=-1)).sum(-1).mean() / math.sqrt(cfg.d_in)
        else:
            loss = fvu + cfg.aux_coef * sae.aux_loss(x, out, since_fired > t.dead_after)
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
        if step + 1 < t.steps:
            try:
                batch = next(it)
            except StopIteration:
                raise SteerscopeError(f"the activation source ran out after {step + 1} steps; give more text or fewer steps.") from None
    sae.eval()
    if cfg.arch == "batchtopk":
        sae.inference = True
    fold_input_scale(sae, scale)
    return sae, hist


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float) -> None:
    """Make an SAE trained on x * scale read and write raw x (acts unchanged)."""
    sae.W_enc.mul_(scale)
    sae.b_dec.div_(scale)
    sae.W_dec.div_(scale)


def cache_activations(buffer: ActivationBuffer, folder, shard_tokens: int = 65536) -> int:
    """Write the buffer's activations (one pass over its texts) to `folder` as safetensors shards
    `acts-00000.safetensors`, ... for repeated training runs; returns the number of tokens.
    Each shard is written to a temporary name and renamed, so a killed run leaves whole shards."""
    import os
    from pathlib import Path

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
        save_file({"acts": x.contiguous()}, str(tmp), metadata={"layer": str(buffer.layer), "model": buffer.lm.model_id})
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


def shard_batches(folder, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches from cached shards (shards in random order, rows shuffled)."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("acts-*.safetensors"))
    if not files:
        raise SteerscopeError(f"no activation shards in {folder}.")
    g = torch.Generator().manual_seed(seed)
    carry = torch.zeros(0)
    while True:
        for i in torch.randperm(len(files), generator=g).tolist():
            x = load_file(str(files[i]))["acts"]
            x = torch.cat([carry, x]) if len(carry) else x
            x = x[torch.randperm(len(x), generator=g)]
            whole = len(x) // batch_size * batch_size
            for j in range(0, whole, batch_size):
                yield x[j:j + batch_size]
            carry = x[whole:]
