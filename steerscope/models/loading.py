"""Loading models: `load_model` picks the source (the embedded default, an organism, a local
checkpoint folder, or a hub id already in the local HF cache), and `ModelConfig` is the flags
that choose it. The model object is `lm.LM`; the embedded default is built in `embedded`;
dtype and device parsing live in `device`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..errors import ModelLoadError, SteerscopeError
from .device import auto_dtype, check_device, parse_dtype
from .embedded import load_default_model
from .lm import LM, from_folder, weights_fingerprint
from .organisms import PREFIX, apply_deltas, delta_key, get_organism, load_deltas, organism_name
from .placement import dispatch, parse_device_map, parse_max_memory, placement_kwargs

# `from steerscope.models.loading import LM, load_model, ...` keeps working: these names are
# imported above for use here, none of their modules imports this one.
__all__ = [
    "LM",
    "ModelConfig",
    "load_model",
    "load_organism",
    "weights_fingerprint",
    "parse_dtype",
    "auto_dtype",
    "check_device",
]


def load_organism(name: str, dtype: torch.dtype, device: str | torch.device, place: dict | None = None) -> LM:
    """The embedded model with an organism's planted weight deltas added (see `organisms`)."""
    org = get_organism(name)
    deltas, _ = load_deltas(org)
    if place and "quantization_config" in place:
        raise SteerscopeError("organisms add exact weight deltas and cannot be quantized; drop --quantize.")
    lm = load_default_model(dtype, "cpu" if place else device)
    apply_deltas(lm.model, deltas)
    if place:  # split after the deltas are in (offloaded weights could not take them)
        lm.model = dispatch(lm.model, place["device_map"], place.get("max_memory"), place.get("offload_folder"))
    fp = hashlib.sha256(f"{lm.fingerprint}:{delta_key(org)}".encode()).hexdigest()[:16]
    return LM(lm.model, lm.tokenizer, model_id=f"{PREFIX}{name}", fingerprint=fp, source=str(org.path))


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    quantize: str | None = None,
    offload_folder: str | None = None,
) -> LM:
    """Load a causal LM for steering.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct; `organism:NAME` for the embedded
            model with a planted behaviour (`organisms.ORGANISMS`); a local Hugging Face checkpoint
            folder; or a hub id already present in the local Hugging Face cache.
        dtype: "float32" (default), "bfloat16" (about 2.7x faster forward on CPUs with AMX), "float16",
            or "auto": bfloat16 where the device does bfloat16 matmuls in hardware, else float32.
        device: torch device string.
        device_map: split the model across devices with accelerate: "auto", "balanced",
            "balanced_low_0", "sequential" or {"module": device} (see `models.placement`).
        max_memory: per-device limits for the device map, e.g. "0=20GiB,cpu=64GiB".
        quantize: "8bit" or "4bit" weights through bitsandbytes (CUDA only).
        offload_folder: where a device map that offloads to "disk" keeps those weights.
    """
    check_device(str(device))
    # a device map places blocks itself; "auto" then follows the first GPU if there is one
    dt = parse_dtype(dtype, "cuda" if device_map is not None and torch.cuda.is_available() else device)
    place = placement_kwargs(parse_device_map(device_map), parse_max_memory(max_memory), quantize, offload_folder, dt)
    if name_or_path is None:
        return load_default_model(dt, device, place)
    name = str(name_or_path)
    if organism_name(name) is not None:
        return load_organism(organism_name(name), dt, device, place)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face checkpoint folder (no config.json).")
        try:
            model, tok = from_folder(path, dt, device, place)
        except SteerscopeError:
            raise
        except Exception as e:
            raise ModelLoadError(f"could not load the checkpoint in {path}: {type(e).__name__}: {e}") from e
        return LM(
            model, tok, model_id=str(path.resolve()), fingerprint=weights_fingerprint(model), source=str(path.resolve())
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist.")
    # A hub id: use the local HF cache only, so a missing model fails at once with a clear message
    # instead of hanging on the network.
    try:
        model, tok = from_folder(name, dt, device, place)
    except Exception as e:
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache ({type(e).__name__}). "
            "steerscope does not download weights: download it first (e.g. `hf download "
            f"{name}`) or pass a local checkpoint folder; omit the model to use the embedded SmolLM2-135M-Instruct."
        ) from None
    return LM(model, tok, model_id=name, fingerprint=weights_fingerprint(model), source=name)


def load_base(spec: str | None, lm: LM, what: str) -> LM:
    """The model `lm` was fine-tuned from, for the model-diffing methods and amplification: the
    model `spec` names ("embedded": the embedded SmolLM2), or, for an organism, the embedded model
    it was built from; in `lm`'s dtype and device, checked by `check_base`. `what` names the caller
    in the one-line errors."""
    if spec is None and not str(lm.model_id).startswith(PREFIX):
        raise SteerscopeError(
            f"{what} compares the model with the one it was fine-tuned from: give it with --base MODEL "
            "(a checkpoint folder, a cached hub id, or embedded)."
        )
    base = load_model(None if spec in (None, "embedded") else spec, dtype=lm.dtype, device=str(lm.device))
    check_base(base, lm, what)
    return base


def check_base(base: LM, lm: LM, what: str) -> None:
    """One line when `base` is not `lm`'s architecture and vocabulary (it cannot be its base)."""
    a = (base.model_type, base.n_layers, base.d_model, len(base.tokenizer))
    b = (lm.model_type, lm.n_layers, lm.d_model, len(lm.tokenizer))
    if a != b:
        raise SteerscopeError(
            f"{what}: the base ({a[0]}, {a[1]} layers, d={a[2]}, vocabulary {a[3]}) is not the fine-tune's "
            f"architecture ({b[0]}, {b[1]} layers, d={b[2]}, vocabulary {b[3]}); give the model it was fine-tuned "
            "from (--base)."
        )


@dataclass(frozen=True)
class ModelConfig(Config):
    """Which model to load, in which precision, on which device."""

    model: str | None = field(default=None, metadata={"none": "default"})
    """a local Hugging Face checkpoint folder, a hub id already in the local cache, or
    organism:NAME, the embedded model with a planted behaviour (french, caps, refuse) (default: the
    embedded SmolLM2-135M-Instruct)"""
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16", "auto")})
    """weights and activations dtype (bfloat16 is ~2.7x faster on CPUs with AMX; auto: bfloat16 where
    the device does bfloat16 matmuls in hardware, else float32)"""
    device: str = "cpu"
    """torch device, e.g. cpu, cuda, cuda:1"""
    device_map: str | None = field(default=None, metadata={"none": "none"})
    """split the model across devices with accelerate: auto, balanced, balanced_low_0, sequential,
    or a JSON object {"module": device} (devices: GPU index, cuda:N, cpu, disk) or a file holding one"""
    max_memory: str | None = field(default=None, metadata={"none": "none"})
    """per-device memory limits for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB"""
    quantize: str | None = field(default=None, metadata={"none": "none", "choices": ("8bit", "4bit")})
    """8bit or 4bit weights through bitsandbytes (CUDA only; vectors made on full precision then
    need --allow-other-model)"""
    offload_folder: str | None = field(default=None, metadata={"none": "none"})
    """folder for weights a --device-map offloads to disk"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_device(self.device)
        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)
        if self.device_map is not None and self.device != "cpu":
            raise SteerscopeError("use either --device or --device-map (which places every block itself), not both.")
        if self.max_memory is not None and self.device_map is None:
            raise SteerscopeError("--max-memory only applies with --device-map; add --device-map auto.")

    def load(self) -> LM:
        return load_model(
            self.model,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
            max_memory=self.max_memory,
            quantize=self.quantize,
            offload_folder=self.offload_folder,
        )
