"""Which precision and device a model is loaded in: dtype names, the "auto" dtype, and device
checks that fail with one line naming the fix."""

from __future__ import annotations

import torch

from ..errors import SteerscopeError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from its name; "auto" is `auto_dtype(device)`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in _DTYPES:
        raise SteerscopeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where `device` multiplies bfloat16 matrices in hardware (CUDA GPUs that support it;
    CPUs with AVX512-BF16 or AMX), else float32. Emulated bfloat16 is slower than float32 on a CPU,
    so the choice is by instruction set, not by whether torch accepts the dtype."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        caps = getattr(torch.cpu, "get_capabilities", lambda: {})()  # torch >= 2.6: the CPU's instruction sets
        return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else torch.float32
    return torch.float32


def check_device(device: str) -> torch.device:
    """The torch device named `device`, or one line saying why it cannot be used."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SteerscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SteerscopeError(f"device {device!r} was asked for but this torch has no CUDA device; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SteerscopeError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SteerscopeError("device 'mps' is not available here; use --device cpu.")
    return dev
