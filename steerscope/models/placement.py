"""Where a model's weights live: one device, or split across devices (and CPU/disk offload) by
Hugging Face accelerate's device maps, optionally 8/4-bit through bitsandbytes.

steerscope does not place blocks itself: `--device-map auto|balanced|balanced_low_0|sequential|JSON`
and `--max-memory` go to `from_pretrained(device_map=...)` (or `accelerate.dispatch_model` for a
model built in memory, e.g. an organism after its deltas are added). Interventions then run on
whatever device each block's activations are on (`Intervention.hook_specs` keeps a copy of its
vectors per device), so hooks, per-row vectors, discovery and SAE steering work when consecutive
blocks sit on different devices.

What is exact: a split in fp32/bf16/fp16 computes the same operations as the unsplit model on
the same device type (tested: identical logits on CPU with half the blocks offloaded to disk).
What is not: 8/4-bit weights change the model (vectors made on the full-precision model load with
`--allow-other-model`, and their effect should be re-measured); splitting across different device
types (GPU + CPU) gives numerically different, not identical, results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import SteerscopeError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """`auto` / `balanced` / `balanced_low_0` / `sequential`, a JSON object {"module": device}, or
    a path to a JSON file holding one. Devices: an int (GPU index), "cuda:N", "cpu", "mps", "disk"."""
    if spec is None or isinstance(spec, dict):
        return spec
    s = spec.strip()
    if s in STRATEGIES:
        return s
    text = Path(s).read_text() if not s.startswith("{") and Path(s).is_file() else s
    try:
        dm = json.loads(text)
    except ValueError:
        raise SteerscopeError(
            f"--device-map {spec!r}: use {', '.join(STRATEGIES)}, a JSON object "
            '{"module": device} or a file holding one.'
        ) from None
    if not isinstance(dm, dict) or not dm:
        raise SteerscopeError(f'--device-map {spec!r}: the JSON must be a non-empty object {{"module": device}}.')
    for k, v in dm.items():
        ok = isinstance(v, int) or (isinstance(v, str) and (v in ("cpu", "disk", "mps") or v.startswith("cuda:")))
        if not ok:
            raise SteerscopeError(
                f"--device-map: module {k!r} is mapped to {v!r}; use a GPU index, cuda:N, cpu, mps or disk."
            )
    return dm


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """`0=20GiB,1=20GiB,cpu=64GiB` (or the same as JSON) -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}."""
    if spec is None or isinstance(spec, dict):
        return spec
    s = spec.strip()
    try:
        raw = json.loads(s) if s.startswith("{") else dict(p.split("=", 1) for p in s.split(",") if p.strip())
    except ValueError:
        raise SteerscopeError(f"--max-memory {spec!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB.") from None
    out: dict = {}
    for k, v in raw.items():
        k = k.strip()
        out[int(k) if k.isdigit() else k] = v.strip() if isinstance(v, str) else v
    return out


def placement_kwargs(device_map, max_memory, quantize: str | None, offload_folder: str | None, dtype) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for a device map and/or bitsandbytes quantization."""
    kw: dict[str, Any] = {}
    if quantize is not None:
        if not torch.cuda.is_available():
            raise SteerscopeError(
                f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); use --dtype bfloat16 on this machine."
            )
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise SteerscopeError("--quantize needs bitsandbytes: pip install bitsandbytes.") from None
        kw["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantize == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        )
        device_map = device_map or "auto"
    if device_map is not None:
        kw["device_map"] = device_map
        if max_memory is not None:
            kw["max_memory"] = max_memory
        if offload_folder is not None:
            kw["offload_folder"] = offload_folder
    return kw


def dispatch(model: torch.nn.Module, device_map, max_memory=None, offload_folder: str | None = None) -> torch.nn.Module:
    """Split a model that is already in memory (on CPU) with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map in ("balanced", "balanced_low_0", "auto"):
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise SteerscopeError("the device map offloads to disk: pass --offload-folder DIR.")
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the input embeddings' device (their execution device when offloaded)."""
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    if dev.type == "meta":
        hook = getattr(emb, "_hf_hook", None)
        dev = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return dev


def devices(model: torch.nn.Module) -> list[str]:
    """The devices a model's blocks sit on (`hf_device_map` values when split)."""
    dm = getattr(model, "hf_device_map", None)
    if dm:
        return sorted({str(v) for v in dm.values()})
    return [str(input_device(model))]


def resident_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict()` with offloaded (meta) tensors replaced by their stored values."""
    state = dict(model.state_dict())
    for mod_name, mod in model.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook]) if hook is not None else []
        for h in hooks:
            wm = getattr(h, "weights_map", None)
            if wm is None:
                continue
            for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if p.device.type == "meta" and full in state:
                    try:
                        state[full] = wm[pname]
                    except KeyError:
                        pass
    return state
