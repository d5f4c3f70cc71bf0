"""`steerscope sae train | corpus | eval | features`: sparse autoencoders."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .._io import refuse_existing, write_text_atomic
from ..errors import SteerscopeError
from ._registry import command, say, with_model


def sae_train_config() -> type:
    from ..jobs.sae import SAEJobConfig

    @dataclass(frozen=True)
    class SAETrainCommand(with_model()):
        job: SAEJobConfig = field(default_factory=SAEJobConfig)
        """the training job"""
        out: str = field(default="", metadata={"required": True})
        """output SAE folder (SAELens layout)"""
        force: bool = False
        """overwrite OUT and discard any checkpoint"""

    return SAETrainCommand


@command(
    "sae train",
    "train an SAE at one layer",
    "Train a TopK, BatchTopK, ReLU or binding (--slots) SAE on residual activations streamed from the model; saved in "
    "the SAELens layout. Checkpoints go to OUT.partial; rerunning the same command resumes.",
    sae_train_config,
)
def cmd_sae_train(cfg) -> int:
    from ..jobs.sae import train_job

    refuse_existing(cfg.out, cfg.force)
    lm = cfg.model.load()
    sae, hist = train_job(lm, cfg.job, cfg.out, force=cfg.force)
    print(
        f"{sae.cfg.arch} SAE, {sae.cfg.n_latents} latents at layer {sae.cfg.layer}: L0 {hist.l0[-1]:.1f}, "
        f"FVU {hist.fvu[-1]:.3f}, dead {hist.dead_frac[-1]:.1%} after {cfg.job.train.steps} steps x "
        f"{cfg.job.batch_size} tokens; saved to {cfg.out}"
    )
    return 0


def sae_corpus_config() -> type:
    from ..sae.corpus import CorpusConfig

    @dataclass(frozen=True)
    class SAECorpusCommand(with_model()):
        corpus: CorpusConfig = field(default_factory=CorpusConfig)
        """what to sample"""
        out: str = field(default="", metadata={"required": True})
        """output .jsonl file; an existing corpus made with the same settings is continued"""
        force: bool = False
        """start the file over"""

    return SAECorpusCommand


@command(
    "sae corpus",
    "sample a JSONL text corpus from the model itself (for training SAEs offline)",
    "Sample documents from the model (chat answers to topic x task requests and continuations of prose "
    "openings) into a JSONL file; resumable.",
    sae_corpus_config,
)
def cmd_sae_corpus(cfg) -> int:
    from ..sae.corpus import sample_corpus

    lm = cfg.model.load()
    if Path(cfg.out).exists() and not cfg.force:
        say(f"{cfg.out} exists: continuing it (finished batches are kept; --force starts over)")
    n = sample_corpus(lm, cfg.out, cfg.corpus, force=cfg.force)
    print(f"{cfg.out}: {n} documents sampled from {lm.model_id}")
    return 0


def sae_eval_config() -> type:
    @dataclass(frozen=True)
    class SAEEvalCommand(with_model()):
        sae: str = field(default="", metadata={"required": True})
        """SAE folder (SAELens layout)"""
        text: str = "self:40"
        """.txt / .jsonl file, or self:N"""
        baselines: bool = False
        """also evaluate PCA / ICA / random dictionaries at the SAE's sparsity"""
        seed: int = 0
        """seed for self:N sampling and the random baseline"""
        json: str | None = None
        """also write the numbers here"""

    return SAEEvalCommand


def _load_sae(path: str, lm):
    from ..sae.formats import load_saelens

    sae = load_saelens(path)
    if sae.cfg.d_in != lm.d_model:
        raise SteerscopeError(
            f"the SAE reads {sae.cfg.d_in}-dim activations but the model's d_model is {lm.d_model}; "
            "it was trained on another model (pass that model with --model)."
        )
    lm.check_layer(sae.cfg.layer)
    return sae


@command(
    "sae eval",
    "L0, FVU, CE recovered, KL, dead latents (+ baselines)",
    "Evaluate an SAE on text: L0, FVU, CE loss recovered, spliced KL, dead share; optionally PCA/ICA/random "
    "baselines at the same sparsity.",
    sae_eval_config,
)
def cmd_sae_eval(cfg) -> int:
    from ..sae.evaluate import baseline_dictionary, evaluate, sae_codec
    from ..sae.texts import load_texts
    from ..sae.train import ActivationBuffer

    lm = cfg.model.load()
    sae = _load_sae(cfg.sae, lm)
    texts = load_texts(cfg.text, lm, cfg.seed + 1)
    layer = sae.cfg.layer
    rows = {"sae": evaluate(lm, sae_codec(sae), texts, layer, n_latents=sae.cfg.n_latents)}
    if cfg.baselines:
        fit = next(iter(ActivationBuffer(lm, texts, layer, batch_size=4096, buffer_tokens=4096, loop=True)))
        k = max(1, round(rows["sae"].l0))
        for kind in ("pca", "ica", "random"):
            rows[f"{kind} (k={k})"] = evaluate(lm, baseline_dictionary(kind, fit, k, seed=cfg.seed), texts, layer)
    print(f"{'':>16} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'KL':>7} {'dead':>6}")
    for name, e in rows.items():
        print(f"{name:>16} {e.l0:7.1f} {e.fvu:7.3f} {e.ce_recovered:8.3f} {e.kl_spliced:7.3f} {e.dead_frac:6.1%}")
    print(f"clean CE {rows['sae'].ce_clean:.3f}, zero-ablated {rows['sae'].ce_zero:.3f}; {rows['sae'].n_tokens} tokens")
    if cfg.json:
        write_text_atomic(Path(cfg.json), json.dumps({k: v.to_dict() for k, v in rows.items()}, indent=2))
    return 0


def sae_features_config() -> type:
    @dataclass(frozen=True)
    class SAEFeaturesCommand(with_model()):
        sae: str = field(default="", metadata={"required": True})
        """SAE folder (SAELens layout)"""
        text: str = "self:40"
        """.txt / .jsonl file, or self:N"""
        features: list[int] | None = field(default=None, metadata={"none": "auto"})
        """feature indices, e.g. 3,17,40:48 (auto: the 24 most frequently firing)"""
        n_top: int = field(default=8, metadata={"min": 1})
        """contexts shown per feature"""
        window: int = field(default=8, metadata={"min": 0})
        """tokens of context on each side"""
        seed: int = 0
        """seed for self:N sampling"""
        out: str = field(default="", metadata={"required": True})
        """output .html file"""
        force: bool = False
        """overwrite --out"""

    return SAEFeaturesCommand


@command(
    "sae features",
    "HTML page of each feature's top-activating contexts",
    "Write an HTML page with the top-activating contexts of chosen features (default: the most frequently firing) "
    "and the feature-density histogram.",
    sae_features_config,
)
def cmd_sae_features(cfg) -> int:
    from ..sae.features import render_features_page, top_contexts
    from ..sae.texts import load_texts

    out = Path(cfg.out)
    refuse_existing(out, cfg.force)
    lm = cfg.model.load()
    sae = _load_sae(cfg.sae, lm)
    feats = cfg.features
    if feats and any(not 0 <= f < sae.cfg.n_latents for f in feats):
        raise SteerscopeError(f"--features must be in 0..{sae.cfg.n_latents - 1}.")
    ctx, freq = top_contexts(lm, sae, load_texts(cfg.text, lm, cfg.seed), feats, n_top=cfg.n_top, window=cfg.window)
    html = render_features_page(
        ctx, freq, f"SAE features — {sae.cfg.arch}, {sae.cfg.n_latents} latents, layer {sae.cfg.layer}"
    )
    write_text_atomic(out, html)
    print(f"wrote {out}: {len(ctx)} features")
    return 0
