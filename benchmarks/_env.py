"""What a benchmark result records about where it was measured: the CPU (or GPU) and the versions."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").open() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def versions(*extra: str) -> str:
    """torch and transformers, plus the `extra` packages named (e.g. "sklearn")."""
    import importlib

    import transformers

    out = f"torch {torch.__version__}, transformers {transformers.__version__}"
    for name in extra:
        out += f", {name} {importlib.import_module(name).__version__}"
    return out
