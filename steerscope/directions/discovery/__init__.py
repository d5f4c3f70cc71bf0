"""Unsupervised discovery: directions found without naming a behaviour in advance.

`discover(lm, prompts, DiscoverConfig(...))` returns a VectorSet of vectors of norm R at the
source layer. Methods live in the `DISCOVERY` family, one file each: a frozen config dataclass and
a function `fn(ctx: DiscoveryContext, cfg) -> Discovered`, registered with
`@DISCOVERY.register(name, Config)`. Adding a method is that file plus its import line below; the
CLI flags, config files, tests and `run` pick it up from the family.

R is calibrated from the model when not given (`calibrate_R`). `random_control(lm, vs)` gives
orthogonalised random vectors of the same norms: the control every learned set should be
compared with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import Checkpoint, config_key, key_settings
from ...config import Config, config_to_dict, parse_last
from ...errors import SteerscopeError
from ...models.layer_range import LayerRange
from ..vectors import VectorSet
from .base import DISCOVERY, Discovered, DiscoveryContext
from .baselines import random_directions

# Registry lines: importing a method's module registers it.
from . import actdiff, baselines, dct, jacobian, kl, melbo, weightdiff  # noqa: E402,F401  isort: skip
from .jacobian import calibrate_R, jacobian_singular_vectors  # noqa: E402
from .melbo import MelboConfig, train_melbo  # noqa: E402


@dataclass(frozen=True)
class DiscoverConfig(Config):
    """Settings every discovery method shares, plus the chosen method's own config."""

    method: str = field(default="kl", metadata={"choices": DISCOVERY})
    """discovery method (kl, output KL, is the default of `discover` and `run` alike)"""
    source: int | None = field(default=None, metadata={"min": 0})
    """layer the vectors are added at (auto: the method's own: kl round(0.4 x n_layers), where its pools
    held the planted behaviours more often, KLConfig.source_fraction; the others round(n_layers / 4))"""
    target: int | None = field(default=None, metadata={"min": 1})
    """layer whose change is measured (auto: n_layers - 8, at least source + 1)"""
    n_vectors: int = field(default=16, metadata={"min": 1})
    """number of vectors K"""
    R: float | None = field(default=None, metadata={"min": 0, "none": "calibrate"})
    """norm of every vector; calibrate: from the model's own nonlinearity (see --calibrate-ratio)"""
    calibrate_ratio: float = field(default=0.5, metadata={"min": 0})
    """nonlinearity ratio that defines the calibrated R (DCT-style)"""
    target_tokens: str = "last:3"
    """which target-layer tokens the objective reads: last:K or all. With all, p=2 lets the first
    token's huge attention-sink activation dominate (on SmolLM2 the learned vectors then changed
    completions no more than random ones)"""
    seed: int = 0
    """random seed (initial vectors, probes)"""
    chat: bool | None = None
    """apply the chat template to the prompts (unset: when the model has one)"""
    method_config: Any = field(default=None, metadata={"family": DISCOVERY, "by": "method"})
    """the method's own settings (None: its defaults)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        m = DISCOVERY.get(self.method)
        if self.method_config is None and m.config is not None:
            object.__setattr__(self, "method_config", m.config())
        elif m.config is not None and not isinstance(self.method_config, m.config):
            raise SteerscopeError(
                f"method {self.method!r} takes a {m.config.__name__}, got {type(self.method_config).__name__}."
            )
        if self.R is not None and self.R <= 0:
            raise SteerscopeError(f"R must be positive, got {self.R}; omit it (or --R calibrate) to calibrate.")
        parse_last(self.target_tokens, allow_all=True, what="target tokens (--target-tokens):")

    @classmethod
    def of(cls, method: str = "kl", **settings) -> DiscoverConfig:
        """`DiscoverConfig.of("melbo", n_vectors=8, R=4.0, steps=60)`: shared and method settings
        in one call, each routed to its config."""
        m = DISCOVERY.get(method)
        own = {f.name for f in dataclasses.fields(m.config)} if m.config else set()
        shared = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - own - shared)
        if unknown:
            raise SteerscopeError(f"{method} has no setting(s) {', '.join(unknown)}.")
        mc = m.config(**{k: v for k, v in settings.items() if k in own}) if m.config else None
        return cls(
            method=method, method_config=mc, **{k: v for k, v in settings.items() if k in shared and k not in own}
        )

    def resolve_layers(self, n_layers: int) -> tuple[int, int]:
        # A method may place its vectors elsewhere by default (a class attribute of its config, not a
        # flag); capped so that a later target layer exists.
        auto = min(round(n_layers * getattr(self.method_config, "source_fraction", 0.25)), max(0, n_layers - 2))
        s = self.source if self.source is not None else auto
        t = self.target if self.target is not None else max(s + 1, n_layers - 8)
        return s, t


def discover(
    lm,
    prompts: list[str],
    config: DiscoverConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool | None = None,
    layer_range: LayerRange | None = None,
    force: bool = False,
    rank=None,
    base=None,
) -> VectorSet:
    """Run a discovery method; the result records R, layers, the config and method diagnostics
    (MELBO training curves, Jacobian singular values) in its hyper-parameters and extras.

    `layer_range`: reuse one built on the same prompts and layers (a run builds it once).
    `progress`: bars for the calibration and the training (None: a tqdm bar on a terminal, plain
    lines with an ETA elsewhere, `steerscope.progress`; False: none).
    `rank`: scores (n, d) candidate vectors, higher kept, for a method that trains more than it
    keeps (kl); e.g. `judging.keep.completion_ranker`. None: the method's own rule.
    `base`: the model `lm` was fine-tuned from, for weightdiff/actdiff (None: the one their config names)."""
    cfg = config or DiscoverConfig()
    method = DISCOVERY.get(cfg.method)
    if not prompts:
        raise SteerscopeError("discovery needs at least one prompt.")
    s, t = cfg.resolve_layers(lm.n_layers)
    lr_ = layer_range if layer_range is not None else LayerRange(lm, list(prompts), s, t, chat=cfg.chat)
    if (lr_.source, lr_.target) != (lm.check_layer(s), lm.check_layer(t)):
        raise SteerscopeError(f"the given layer range is {lr_.source}->{lr_.target}, the config asks for {s}->{t}.")
    calibration = None
    R = cfg.R
    if R is None:
        R, trace = calibrate_R(
            lr_, target_ratio=cfg.calibrate_ratio, target_tokens=cfg.target_tokens, seed=cfg.seed, progress=progress
        )
        calibration = {"ratio": cfg.calibrate_ratio, "R": R, "trace": trace[-5:]}
    key_cfg = {**config_to_dict(cfg), "R": R, "source": s, "target": t}
    key = config_key(lm.fingerprint, list(prompts), {**key_settings(cfg), "R": R, "source": s, "target": t})
    ckpt = Checkpoint(checkpoint_dir, key, "discovery run", force=force) if checkpoint_dir else None
    ctx = DiscoveryContext(lm, lr_, cfg, R, ckpt, progress, rank, base)
    res: Discovered = method.fn(ctx, cfg.method_config)
    hyper = {
        **key_cfg,
        "n_prompts": len(prompts),
        "prompts": list(prompts)[:50],
        "calibration": calibration,
        **res.info,
    }
    return VectorSet.create(
        lm,
        res.vectors,
        s if res.layers is None else res.layers,
        cfg.method,
        ids=[f"{cfg.method}-{i}" for i in range(len(res.vectors))],
        hyperparams=hyper,
        extras=res.extras,
    )


def random_control(lm, vs: VectorSet, seed: int = 12345, n: int | None = None) -> VectorSet:
    """Orthogonalised random vectors with the same norms and layers as `vs` (the MELBO control);
    `n` of them (default: one per vector of `vs`), the norms and layers cycled."""
    n = len(vs) if n is None else n
    idx = [i % len(vs) for i in range(n)]
    norms = vs.vectors.norm(dim=-1, keepdim=True)[idx]  # (n, 1)
    dirs = random_directions(n, lm.d_model, seed)
    return VectorSet.create(
        lm,
        dirs * norms,
        [vs.layers[i] for i in idx],
        "random",
        ids=[f"control-{i}" for i in range(n)],
        hyperparams={"control_for": vs.config.method, "seed": seed, "R": vs.config.hyperparams.get("R")},
    )


__all__ = [
    "DiscoverConfig",
    "DISCOVERY",
    "Discovered",
    "DiscoveryContext",
    "discover",
    "random_control",
    "calibrate_R",
    "jacobian_singular_vectors",
    "train_melbo",
    "MelboConfig",
]
