"""llama.cpp control vectors (`llama-cli --control-vector FILE`), read and written with `gguf`.

Format (what repeng writes and llama.cpp's `common_control_vector_load_one` accepts):
    general.architecture      = "controlvector"
    controlvector.model_hint  = the HF model_type (informational; llama.cpp ignores metadata)
    controlvector.layer_count = number of direction tensors in the file
    direction.<k>             1-D F32 tensor of length n_embd, for k >= 1

Layer mapping: llama.cpp adds `direction.<k>` to the output of (0-based) block k, at every
position, after the block's residual add. That is exactly steerscope's layer k (resid_post), so
steerscope layer L <-> direction.L. llama.cpp rejects direction.0 (the whole file fails to load),
so a vector at layer 0 cannot be exported. The coefficient is not stored by llama.cpp; `coef`
bakes one in (llama.cpp's `--control-vector-scaled FILE S` scales further). Values are written
as float32: llama.cpp rejects F64.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._io import refuse_existing
from ..errors import ModelMismatchError, SteerscopeError
from .vectors import VectorSet

ARCH = "controlvector"


class Exported(NamedTuple):
    path: Path
    layers: list[int]  # the direction.<k> written
    left_out: str  # what was not exported and why ("" when everything was)


def export_gguf(
    vs: VectorSet, path: str | Path, *, coef: float = 1.0, indices: Sequence[int] | None = None, overwrite: bool = False
) -> Exported:
    """Write the chosen vectors (default: all whose layer llama.cpp accepts, i.e. >= 1; vectors at
    layer 0 are left out and named in the result) as one control-vector file."""
    import gguf

    path = Path(path)
    refuse_existing(path, overwrite)
    if vs.config.site != "resid_post":
        raise SteerscopeError(
            f"llama.cpp control vectors steer block outputs (resid_post); these vectors are for {vs.config.site}."
        )
    left_out = ""
    if indices is None:
        chosen = [i for i in range(len(vs)) if vs.layers[i] >= 1]
        if len(chosen) < len(vs):
            left_out = (
                f"{len(vs) - len(chosen)} vector(s) at layer 0 ({', '.join(vs.ids[i] for i in range(len(vs)) if vs.layers[i] < 1)}): "
                "llama.cpp rejects direction.0"
            )
    else:
        chosen = [int(i) for i in indices]
    if not chosen:
        raise SteerscopeError(
            "nothing to export: llama.cpp accepts layers >= 1 only and every chosen vector is at layer 0."
        )
    layers = [vs.layers[i] for i in chosen]
    if len(set(layers)) != len(layers):
        dup = sorted({l for l in layers if layers.count(l) > 1})
        raise SteerscopeError(
            f"several vectors at layer(s) {dup}; a control-vector file holds one per layer: "
            "pick them with --index (indices=[...])."
        )
    if 0 in layers:
        raise SteerscopeError(
            "llama.cpp rejects a direction for layer 0 (direction.0 invalidates the file); "
            "drop that vector from --index (or --layers 1:N)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(f"{ARCH}.model_hint", vs.config.model_type)
        w.add_uint32(f"{ARCH}.layer_count", len(chosen))
        for i in sorted(chosen, key=lambda j: vs.layers[j]):
            w.add_tensor(f"direction.{vs.layers[i]}", (vs.vectors[i].double() * coef).numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Exported(path, sorted(layers), left_out)


def read_gguf(path: str | Path) -> tuple[str | None, dict[int, np.ndarray]]:
    """(model_hint, {layer: float32 vector}) from a control-vector file, checked like llama.cpp does."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SteerscopeError(f"{path} does not exist.")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise SteerscopeError(f"{path} is not a GGUF file ({e}).") from None
    arch = r.get_field("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise SteerscopeError(
            f"{path} is a GGUF file but not a control vector (general.architecture is {arch.contents() if arch else None!r})."
        )
    hint = r.get_field(f"{ARCH}.model_hint")
    out: dict[int, np.ndarray] = {}
    for t in r.tensors:
        if not t.name.startswith("direction."):
            continue
        k = t.name[len("direction.") :]
        if not k.isdigit() or int(k) < 1:
            raise SteerscopeError(
                f"{path}: tensor {t.name!r} has an invalid layer (llama.cpp needs direction.<k> with k >= 1)."
            )
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SteerscopeError(f"{path}: {t.name} is {t.tensor_type.name}, llama.cpp needs F32.")
        out[int(k)] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not out:
        raise SteerscopeError(f"{path} has no direction.<k> tensors.")
    if len({v.shape[0] for v in out.values()}) != 1:
        raise SteerscopeError(f"{path}: direction tensors have different lengths.")
    return (hint.contents() if hint is not None else None), out


def import_gguf(path: str | Path, lm, *, check_model: bool = True) -> VectorSet:
    """Read a control vector for the loaded model `lm` as a VectorSet (one vector per layer)."""
    hint, dirs = read_gguf(path)
    n = next(iter(dirs.values())).shape[0]
    if n != lm.d_model:
        raise ModelMismatchError(
            f"{path} has vectors of size {n} but this model's d_model is {lm.d_model}; it was made for another model."
        )
    if check_model and hint and hint != lm.model_type:
        raise ModelMismatchError(
            f"{path} was made for a {hint} model, the loaded one is {lm.model_type}; pass check_model=False to use it anyway."
        )
    layers = sorted(dirs)
    for l in layers:
        lm.check_layer(l)
    vecs = torch.from_numpy(np.stack([dirs[l] for l in layers]))
    return VectorSet.create(
        lm,
        vecs,
        layers,
        "llamacpp_import",
        ids=[f"direction.{l}" for l in layers],
        hyperparams={"source": str(path), "model_hint": hint},
    )
