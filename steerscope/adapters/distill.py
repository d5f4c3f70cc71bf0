"""Distil a steering vector into a LoRA adapter (issue 13's distillation arm).

The adapter is trained to reproduce the *steered* model: on the steered greedy completions of
training prompts it minimises KL(p_steered || p_adapter) at every completion position (soft
targets from the steered model itself, computed with the adapter switched off), and on neutral
prompts it keeps close to the unsteered model with `kl_weight` x KL(p_unsteered || p_adapter) over
the unsteered rollouts (the side-effect term). No library distils vectors into weights; research
code fine-tunes a LoRA on steered generations with a KL-to-base term, which is what this does
(see `../shared/reference/serving_and_frontier.md`).

Output: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, loads with
`peft.PeftModel.from_pretrained`) plus `distill.json` with the settings, the loss curve and an
evaluation on held-out prompts: how much of the steered-vs-unsteered KL the adapter removes,
greedy-token agreement with the steered model, and the side effects (KL to the unsteered model on
neutral rollouts) of the adapter vs the vector. `merge_adapter` writes a plain HF checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir, refuse_existing
from ..config import Config, config_to_dict
from ..directions.data import load_prompts
from ..errors import SteerscopeError
from ..generation import generate
from ..interventions.ops import Add
from ..interventions.steer import steer
from ..progress import bar as progress_bar


@dataclass(frozen=True)
class DistillConfig(Config):
    """Settings of `distill` (the vector comes from the caller)."""

    coef: float = 1.0
    """coefficient of the vector whose steered model is distilled"""
    layer: int | None = None
    """layer to steer at (auto: the vector's own)"""
    prompts: str = "harmless"
    """training instructions: a builtin set (neutral, harmless, harmful) or a file"""
    n_train: int = field(default=32, metadata={"min": 1})
    """training prompts (steered completions are the targets)"""
    n_heldout: int = field(default=8, metadata={"min": 1})
    """held-out prompts for the evaluation (taken after the training ones)"""
    neutral: str = "neutral"
    """prompts for the KL-to-unsteered term and the side-effect evaluation"""
    n_neutral: int = field(default=16, metadata={"min": 1})
    """neutral prompts"""
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    """length of the steered completions and neutral rollouts"""
    rank: int = field(default=8, metadata={"min": 1})
    """LoRA rank"""
    alpha: float = field(default=16.0, metadata={"min": 0})
    """LoRA alpha (scaling alpha / rank)"""
    target_modules: str = "all-linear"
    """modules that get adapters: all-linear, or comma-separated names such as q_proj,v_proj,o_proj"""
    steps: int = field(default=200, metadata={"min": 1})
    """optimiser steps"""
    lr: float = field(default=1e-3, metadata={"min": 0})
    """AdamW learning rate (linear warm-up over 10 steps, linear decay to 10 %)"""
    kl_weight: float = field(default=0.1, metadata={"min": 0})
    """weight of KL(unsteered || adapter) on the neutral rollouts"""
    batch: int = field(default=8, metadata={"min": 1})
    """sequences per step (half steered completions, half neutral rollouts)"""
    seed: int = 0
    """data order and adapter initialisation"""


@dataclass
class _Seqs:
    ids: torch.Tensor  # (N, T) left-padded prompt + continuation
    mask: torch.Tensor  # (N, T)
    sel: torch.Tensor  # (N, T) bool: positions that predict a continuation token


def _sequences(lm, prompts: list[str], completions: list[list[int]]) -> _Seqs:
    prompt_ids = [lm.encode([p], chat=None)["input_ids"][0].tolist() for p in prompts]  # as `generate` encodes
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    ids, mask = (t.cpu() for t in lm.left_pad(seqs))  # (N, T) each
    T = ids.shape[1]
    sel = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, c in enumerate(completions):
        if c:
            sel[b, T - len(c) - 1 : T - 1] = True
    return _Seqs(ids, mask, sel)


def _logp(lm, model, s: _Seqs, rows, interventions=()) -> torch.Tensor:
    """(n_positions, V) log-probs at the selected positions of rows `rows`."""
    dev = lm.device
    ids, mask, sel = s.ids[rows].to(dev), s.mask[rows].to(dev), s.sel[rows].to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with steer(lm, *interventions):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return torch.log_softmax(logits[sel.to(logits.device)].float(), -1)


def _kl(lp_target: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(target || q)."""
    return (lp_target.exp() * (lp_target - lq)).sum(-1).mean()


def distill(
    lm,
    vector: torch.Tensor,
    vector_layer: int,
    out: str | Path,
    cfg: DistillConfig = DistillConfig(),
    *,
    source: str = "",
    force: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train and save the adapter to `out`; returns the evaluation (also in out/distill.json)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SteerscopeError(
            "distillation trains a LoRA adapter with peft: pip install 'steerscope[distill]'."
        ) from None
    out = Path(out)
    refuse_existing(out, force)
    layer = lm.check_layer(vector_layer if cfg.layer is None else cfg.layer)
    add = Add(vector, layer=layer, coef=cfg.coef)
    prompts = load_prompts(cfg.prompts)
    if len(prompts) < cfg.n_train + cfg.n_heldout:
        raise SteerscopeError(
            f"{cfg.prompts} has {len(prompts)} prompts; --n-train + --n-heldout need {cfg.n_train + cfg.n_heldout}."
        )
    train_p, held_p = prompts[: cfg.n_train], prompts[cfg.n_train : cfg.n_train + cfg.n_heldout]
    neutral = load_prompts(cfg.neutral)[: cfg.n_neutral]
    torch.manual_seed(cfg.seed)
    with torch.no_grad():  # the data: steered completions, unsteered neutral rollouts (each one batched pass)

        def completions(ps, steered):
            rows = generate(
                lm, ps, interventions=[add] if steered else (), max_new_tokens=cfg.max_new_tokens, progress=False
            )
            return [r.token_ids for r in rows]

        train = _sequences(lm, train_p, completions(train_p, True))
        held = _sequences(lm, held_p, completions(held_p, True))
        neut = _sequences(lm, neutral, completions(neutral, False))
    inner = lm.model
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=cfg.target_modules
        if cfg.target_modules == "all-linear"
        else [m.strip() for m in cfg.target_modules.split(",") if m.strip()],
    )
    try:
        model = get_peft_model(inner, lora)
    except ValueError as e:
        raise SteerscopeError(f"--target-modules {cfg.target_modules!r}: {e}") from None
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / cfg.steps))
        rng = random.Random(cfg.seed)
        half = max(1, cfg.batch // 2)
        curve: list[dict[str, float]] = []
        with progress_bar(cfg.steps, "distilling", "step", show=progress) as bar:
            for step in range(cfg.steps):
                tr = rng.sample(range(len(train_p)), min(half, len(train_p)))
                ne = rng.sample(range(len(neutral)), min(half, len(neutral)))
                with torch.no_grad(), model.disable_adapter():
                    target_s = _logp(lm, model, train, tr, [add])  # the steered model's own distributions
                    target_n = _logp(lm, model, neut, ne)  # the unsteered model
                model.train()
                loss_s = _kl(target_s, _logp(lm, model, train, tr))
                loss_n = _kl(target_n, _logp(lm, model, neut, ne))
                loss = loss_s + cfg.kl_weight * loss_n
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                model.eval()
                ls, ln = float(loss_s.detach()), float(loss_n.detach())
                curve.append({"step": step + 1, "kl_to_steered": ls, "kl_to_unsteered_neutral": ln})
                bar.set_postfix(steered=f"{ls:.3f}", neutral=f"{ln:.3f}")
                bar.update(1)
        ev = _evaluate(lm, model, add, held, neut)
        result = {
            "evaluation": ev,
            "final": curve[-1],
            "curve": curve[:: max(1, len(curve) // 100)],
            "config": config_to_dict(cfg),
            "vector": {
                "source": source,
                "layer": layer,
                "coef": cfg.coef,
                "norm": float(torch.as_tensor(vector).norm()),
            },
            "model_id": lm.model_id,
            "model_fingerprint": lm.fingerprint,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_dir(out, overwrite=force) as tmp:
            model.save_pretrained(str(tmp))
            (tmp / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        lm.model = model.unload()  # the caller's model without adapters, as it was
    return result


@torch.no_grad()
def _evaluate(lm, model, add, held: _Seqs, neut: _Seqs) -> dict[str, float]:
    """On held-out steered completions and on neutral rollouts (teacher-forced)."""
    rows_h, rows_n = list(range(held.ids.shape[0])), list(range(neut.ids.shape[0]))
    with model.disable_adapter():
        steered_h = _logp(lm, model, held, rows_h, [add])
        base_h = _logp(lm, model, held, rows_h)
        base_n = _logp(lm, model, neut, rows_n)
        steered_n = _logp(lm, model, neut, rows_n, [add])
    adapter_h = _logp(lm, model, held, rows_h)
    adapter_n = _logp(lm, model, neut, rows_n)
    tokens = held.ids.to(lm.device)[:, 1:][held.sel.to(lm.device)[:, :-1]]  # the steered completion tokens
    kl_base, kl_adapter = float(_kl(steered_h, base_h)), float(_kl(steered_h, adapter_h))
    return {
        "heldout_kl_steered_vs_unsteered": kl_base,
        "heldout_kl_steered_vs_adapter": kl_adapter,
        "reproduced_share": 1.0 - kl_adapter / kl_base if kl_base > 0 else float("nan"),
        "heldout_token_agreement_adapter": float((adapter_h.argmax(-1) == tokens).float().mean()),
        "heldout_token_agreement_unsteered": float((base_h.argmax(-1) == tokens).float().mean()),
        "neutral_kl_unsteered_vs_adapter": float(_kl(base_n, adapter_n)),
        "neutral_kl_unsteered_vs_vector": float(_kl(base_n, steered_n)),
    }


def merge_adapter(lm, adapter: str | Path, out: str | Path, force: bool = False) -> Path:
    """Merge a distilled adapter into the model's weights and save a plain HF checkpoint."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(lm.model)
    try:
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    except Exception as e:
        raise SteerscopeError(f"{adapter} is not a PEFT adapter for this model ({type(e).__name__}: {e}).") from None
    with atomic_dir(Path(out), overwrite=force) as tmp:
        merged.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
    return Path(out)


@contextlib.contextmanager
def adapter_in_place(lm, adapter: str | Path):
    """Within the block, `lm` runs with the LoRA adapter at `adapter` (generation, forward passes
    and steering hooks all see it); afterwards the model is exactly as it was."""
    try:
        from peft import PeftModel
    except ImportError:
        raise SteerscopeError("adapters load with peft: pip install 'steerscope[distill]'.") from None
    inner = lm.model
    model = PeftModel.from_pretrained(inner, str(adapter))
    model.eval()
    lm.model = model
    try:
        yield lm
    finally:
        lm.model = model.unload()
