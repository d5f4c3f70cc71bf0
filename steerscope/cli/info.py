"""`steerscope info`: a model's layers, d_model, architecture, fingerprint and cache location."""

from dataclasses import dataclass

from ._registry import command, with_model


def info_config() -> type:
    @dataclass(frozen=True)
    class InfoCommand(with_model()):
        """`steerscope info`: the model flags only."""

    return InfoCommand


@command(
    "info",
    "show a model's layers, d_model, architecture and cache location",
    "Show a model's layers, d_model, architecture, fingerprint and cache location.",
    info_config,
)
def cmd_info(cfg) -> int:
    from .._io import cache_root
    from ..models.embedded import default_cache_dir

    lm = cfg.model.load()
    n_params = sum(p.numel() for p in lm.model.parameters())
    rows = [
        ("model", lm.model_id),
        ("architecture", f"{type(lm.model).__name__} (model_type={lm.model_type})"),
        ("layers", f"{lm.n_layers} (valid layer indices 0..{lm.n_layers - 1}; layer L = output of block L)"),
        ("d_model", str(lm.d_model)),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("vocab", str(len(lm.tokenizer))),
        ("dtype / device", f"{str(lm.dtype).replace('torch.', '')} / {lm.device}"),
        ("chat template", "yes" if lm.has_chat_template else "no"),
        ("fingerprint", lm.fingerprint),
        ("loaded from", lm.source),
        ("cache", str(default_cache_dir() if cfg.model.model is None else cache_root())),
    ]
    for k, v in rows:
        print(f"{k:>15}  {v}")
    return 0
