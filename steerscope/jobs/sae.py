"""SAE training as a job: stages "source" (activations, optionally cached on disk) -> "train"
(checkpointed with the shared helper, resumable) -> "save" (SAELens folder + training.json), run
by `run_stages` in a JobFolder (OUT.partial)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import refuse_existing, write_json_atomic
from .._version import __version__
from ..checkpoint import JobFolder
from ..config import Config, config_to_dict
from ..errors import SteerscopeError
from ..sae.model import SAEConfig
from ..sae.train import TrainConfig


@dataclass(frozen=True)
class SAEJobConfig(Config):
    """What `steerscope sae train` does."""

    layer: int = field(default=0, metadata={"required": True})
    """the layer whose residual stream (resid_post) the SAE reads"""
    text: str = "self:200"
    """.txt / .jsonl file, or self:N (text the model samples itself)"""
    sae: SAEConfig = field(default_factory=lambda: SAEConfig(d_in=1))
    """the SAE (d_in is the model's d_model)"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """training settings"""
    batch_size: int = field(default=1024, metadata={"min": 1})
    """activations per step"""
    buffer: int = field(default=32768, metadata={"min": 1})
    """shuffled activation buffer size in tokens"""
    cache: str | None = None
    """activation cache folder: filled from --text on first use, then trained from (safetensors
    shards), so repeated runs skip the model"""
    checkpoint_every: int = field(default=250, metadata={"min": 1})
    """steps between checkpoints (in OUT.partial/); a rerun with the same settings resumes"""


class _Ctx:
    def __init__(self):
        self.artifacts: dict = {}


def train_job(lm, cfg: SAEJobConfig, out: str | Path, *, force: bool = False, progress: bool | None = None):
    """Train and save; returns (sae, history). The stages run in `OUT.partial/` (a JobFolder:
    the same settings resume from the last checkpoint, others are refused without `force`):

        source   the activation batches: streamed from the model, or from the --cache folder
                 (filled on first use)
        train    the SAE, checkpointed every `checkpoint_every` steps with the shared helper
        save     the SAELens folder OUT and OUT/training.json; OUT.partial is then removed
    """
    from ..sae import ActivationBuffer, cache_activations, shard_batches, train_sae
    from ..sae.formats import save_saelens
    from ..sae.texts import load_texts
    from ..sae.train import load_checkpoint
    from .stages import Stage, run_stages

    out = Path(out)
    refuse_existing(out, force)  # a finished SAE is never replaced without --force
    partial = out.with_name(out.name + ".partial")
    layer = lm.check_layer(cfg.layer)
    scfg = cfg.sae.replace(d_in=lm.d_model, model_id=lm.model_id, model_type=lm.model_type, layer=layer)
    if scfg.rule.uses_k and scfg.k > scfg.n_latents:
        raise SteerscopeError(f"--k {scfg.k} exceeds --n-latents {scfg.n_latents}.")
    if cfg.cache is None or not any(Path(cfg.cache).glob("acts-*.safetensors")):
        texts = load_texts(cfg.text, lm, cfg.train.seed)  # checked (and sampled) before any training
    folder = JobFolder(
        partial, "SAE training", {"model": lm.fingerprint, **config_to_dict(cfg)}, force=force, version=__version__
    )
    state = load_checkpoint(partial, scfg, cfg.train)
    if state is not None:
        print(
            f"resuming from the checkpoint at step {state['step']} in {partial} (pass --force to start over)",
            file=sys.stderr,
        )
    seed = cfg.train.seed

    def source(ctx):
        cache = Path(cfg.cache) if cfg.cache else None
        if cache is None:
            return ActivationBuffer(lm, texts, layer, batch_size=cfg.batch_size, buffer_tokens=cfg.buffer, seed=seed)
        if any(cache.glob("acts-*.safetensors")):
            print(f"training on the activations cached in {cache} (the --text source is not read)", file=sys.stderr)
        else:
            n = cache_activations(ActivationBuffer(lm, texts, layer, seed=seed), cache)
            print(f"cached {n} activations at layer {layer} in {cache}", file=sys.stderr)
        return shard_batches(cache, cfg.batch_size, seed=seed)

    def train(ctx):
        return train_sae(
            ctx.artifacts["source"],
            scfg,
            cfg.train,
            progress=progress,
            checkpoint_dir=partial,
            checkpoint_every=cfg.checkpoint_every,
        )

    def save(ctx):
        sae, hist = ctx.artifacts["train"]
        save_saelens(sae, out, overwrite=force)
        write_json_atomic(
            out / "training.json",
            {"steps": cfg.train.steps, "batch_size": cfg.batch_size, **asdict(hist), "config": config_to_dict(cfg)},
        )
        return out

    ctx = _Ctx()
    run_stages(
        folder,
        [Stage("source", None, source), Stage("train", None, train), Stage("save", None, save)],
        ctx,
        log=lambda m: None,
    )
    shutil.rmtree(partial, ignore_errors=True)
    return ctx.artifacts["train"]
