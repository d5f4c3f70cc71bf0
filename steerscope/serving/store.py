"""Named vectors the server steers with, and the parsing of a request's steering.

Vector sets are loaded at start (`--vectors DIR|FILE.gguf`) or uploaded (`POST /v1/vectors`);
both go through `VectorSet.load` / `import_gguf`, which check the shape, finite values and the
model fingerprint, and read safetensors/GGUF only (nothing is ever unpickled).

A request names vectors as `SET` (a set of one vector, or a llama.cpp control vector: all its
layers at once, as llama.cpp applies it) or `SET/ID` / `SET/INDEX` (one vector of a set).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..directions.condition import When, check_encoding, is_condition_set, when_condition
from ..directions.vectors import CONFIG_FILE, TENSORS_FILE, SteeringVector, VectorSet
from ..errors import SteerscopeError
from ..interventions.conditional import Condition
from ..interventions.positions import ALL, Positions
from .protocol import AblateSpec, AddSpec, Gated, RowSteering

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RequestError(SteerscopeError):
    """A client error: `status` is the HTTP status, `param` the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _Entry:
    vs: VectorSet
    source: str  # where it came from: a path or "upload"
    control: bool  # a llama.cpp control vector: the bare name means every layer


class VectorStore:
    """Thread-safe name -> VectorSet map for one loaded model."""

    def __init__(self, lm, *, check_model: bool = True, max_sets: int = 256, max_steer_ratio: float = 100.0):
        from ..models.activations import residual_norms

        self.lm, self.check_model, self.max_sets, self.max_steer_ratio = lm, check_model, max_sets, max_steer_ratio
        self._sets: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        # (n_layers,) the model's typical residual norm per layer: a vector (times its coefficient)
        # far above it overflows the forward pass or only writes noise; such input is refused.
        self.resid_norms = residual_norms(lm)

    def check_size(self, norm: float, layer: int, param: str, what: str) -> None:
        """Refuse a steering vector whose norm (times its coefficient) is not finite or over
        `max_steer_ratio` x the model's residual norm at its layer."""
        limit = self.max_steer_ratio * float(self.resid_norms[layer])
        if not math.isfinite(norm) or norm > limit:
            raise RequestError(
                f"`{param}`: {what} = {norm:.3g}, over {self.max_steer_ratio:g} x the model's residual "
                f"norm at layer {layer} ({float(self.resid_norms[layer]):.3g}); lower it "
                "(the server's limit: --max-steer-ratio).",
                param=param,
            )

    def vectors(self, ref: Any, param: str, need_layer: bool = True) -> list[SteeringVector]:
        """The vectors a request names: a stored name (`resolve`) or an inline vector."""
        if isinstance(ref, str):
            return self.resolve(ref, param)
        return [self.inline(ref, param, need_layer)]

    def inline(self, iv, param: str, need_layer: bool) -> SteeringVector:
        """A vector carried in a request ({"data": base64 float32, "layer"}), checked like an
        upload (shape, finite values, size against the model) and never stored."""
        import numpy as np

        raw = _b64(iv.data, f"{param}.data")
        d = self.lm.d_model
        if len(raw) != 4 * d:
            raise RequestError(
                f"`{param}.data` holds {len(raw)} bytes; this model needs {d} float32 values "
                f"({4 * d} bytes, little-endian).",
                param=f"{param}.data",
            )
        v = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(v).all()):
            raise RequestError(f"`{param}.data` has NaN or infinite values.", param=f"{param}.data")
        layer = iv.layer
        if layer is None and need_layer:
            raise RequestError(f"`{param}.layer` is required for an inline vector.", param=f"{param}.layer")
        if layer is not None and not 0 <= layer < self.lm.n_layers:
            raise RequestError(
                f"`{param}.layer` must be an integer in 0..{self.lm.n_layers - 1}, got {layer!r}.",
                param=f"{param}.layer",
            )
        if layer is not None:
            self.check_size(float(v.double().norm()), layer, f"{param}.data", "the inline vector's norm")
        return SteeringVector(v, 0 if layer is None else layer, "inline")

    # ---- adding ----------------------------------------------------------------------------------
    def add(self, name: str, vs: VectorSet, replace: bool = False) -> str:
        """Add an in-memory VectorSet (checked against the model like a loaded one)."""
        if not NAME.match(name):
            raise SteerscopeError(f"vector set name {name!r}: use 1-64 letters, digits, '_', '-' or '.'.")
        vs.check(self.lm, check_model=self.check_model)
        return self._put(name, _Entry(vs, "memory", vs.config.method == "llamacpp_import"), replace)

    def load_path(self, path: str | Path, name: str | None = None, replace: bool = False) -> str:
        """Add a vector-set folder or a GGUF control vector from disk; returns its name."""
        from ..directions.llamacpp import import_gguf

        p = Path(path)
        name = name or (p.stem if p.suffix == ".gguf" else p.name)
        if p.suffix == ".gguf":
            vs, control = import_gguf(p, self.lm, check_model=self.check_model), True
        elif p.is_dir():
            vs, control = VectorSet.load(p, self.lm, check_model=self.check_model), False
        else:
            raise SteerscopeError(f"{p} is neither a vector-set folder nor a .gguf control vector.")
        return self._put(name, _Entry(vs, str(p), control), replace)

    def upload(self, body) -> str:
        """Add an uploaded set (a validated `schema.UploadBody`): {"name", "config": {...config.json...},
        "safetensors": base64} or {"name", "gguf": base64}; "replace": true overwrites a set of the same name."""
        name = body.name
        if not NAME.match(name):
            raise RequestError(
                "`name` must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit.", param="name"
            )
        replace = body.replace
        if name in self._sets and not replace:
            raise RequestError(
                f'a vector set named {name!r} exists; DELETE it first or send "replace": true.', 409, "name"
            )
        with tempfile.TemporaryDirectory(prefix="steerscope-upload-") as tmp:
            if body.gguf is not None:
                f = Path(tmp) / f"{name}.gguf"
                f.write_bytes(_b64(body.gguf, "gguf"))
                try:
                    return self.load_path(f, name, replace)
                except RequestError:
                    raise
                except SteerscopeError as e:
                    raise RequestError(
                        f"the uploaded control vector was rejected: {_hide(e, tmp)}", param="gguf"
                    ) from None
            if body.safetensors is None or body.config is None:
                raise RequestError(
                    'send {"name", "config": <config.json object>, "safetensors": <base64>} '
                    'or {"name", "gguf": <base64>}.'
                )
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / CONFIG_FILE).write_text(json.dumps(body.config))
            (folder / TENSORS_FILE).write_bytes(_b64(body.safetensors, "safetensors"))
            try:
                vs = VectorSet.load(folder, self.lm, check_model=self.check_model)
            except SteerscopeError as e:
                raise RequestError(
                    f"the uploaded vector set was rejected: {_hide(e, tmp)}", param="safetensors"
                ) from None
            return self._put(name, _Entry(vs, "upload", False), replace)

    def _put(self, name: str, entry: _Entry, replace: bool) -> str:
        for sv in entry.vs:  # a stored vector must be usable at coef 1 (and its norm listable)
            self.check_size(float(sv.vector.double().norm()), sv.layer, "vectors", f"the norm of vector {sv.id!r}")
        with self._lock:
            if name in self._sets and not replace:
                raise RequestError(
                    f'a vector set named {name!r} exists; DELETE it first or send "replace": true.', 409, "name"
                )
            if name not in self._sets and len(self._sets) >= self.max_sets:
                raise RequestError(f"the server holds {self.max_sets} vector sets already; DELETE one first.", 409)
            self._sets[name] = entry
        return name

    def remove(self, name: str) -> None:
        with self._lock:
            if self._sets.pop(name, None) is None:
                raise RequestError(f"no vector set named {name!r}; GET /v1/vectors lists them.", 404, "name")

    # ---- reading ---------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._sets.items())
        return [
            {
                "name": n,
                "object": "vector_set",
                "method": e.vs.config.method,
                "source": e.source,
                "control_vector": e.control,
                "vectors": [
                    {"id": i, "layer": l, "norm": nm, "ref": f"{n}/{i}"}
                    for i, l, nm in zip(e.vs.ids, e.vs.layers, e.vs.config.norms)
                ],
            }
            for n, e in items
        ]

    def condition_set(self, name: str, param: str) -> VectorSet:
        """The stored condition set `name` (a `when`'s condition), or a 400 naming `param`."""
        with self._lock:
            e = self._sets.get(name)
            names = sorted(n for n, x in self._sets.items() if is_condition_set(x.vs))
        if e is None:
            raise RequestError(
                f"unknown condition set {name!r} in `{param}`; stored condition sets: "
                f"{', '.join(names[:10]) or 'none'} (GET /v1/vectors).",
                param=param,
            )
        if not is_condition_set(e.vs):
            raise RequestError(
                f"`{param}`: {name!r} is not a condition set (method {e.vs.config.method!r}); "
                "make one with `steerscope condition`.",
                param=param,
            )
        return e.vs

    def resolve(self, ref: Any, param: str) -> list[SteeringVector]:
        """The vectors a reference names (see the module docstring)."""
        if not isinstance(ref, str) or not ref:
            raise RequestError(f'`{param}` must be a vector name such as "SET" or "SET/ID".', param=param)
        name, _, which = ref.partition("/")
        with self._lock:
            e = self._sets.get(name)
            names = sorted(self._sets)  # read under the lock: an upload may change the dict meanwhile
        if e is None:
            known = ", ".join(names[:10]) or "none loaded"
            raise RequestError(
                f"unknown vector {ref!r} in `{param}`; known sets: {known} (GET /v1/vectors).", param=param
            )
        vs = e.vs
        if which:
            key: int | str = int(which) if which.lstrip("-").isdigit() and which not in vs.ids else which
            try:
                return [vs[key]]
            except SteerscopeError as err:
                raise RequestError(f"`{param}`: {err}", param=param) from None
        if len(vs) == 1 or e.control:
            return list(vs)
        raise RequestError(
            f'`{param}`: set {name!r} has {len(vs)} vectors; name one as "{name}/ID" '
            f"(ids: {', '.join(vs.ids[:8])}{' ...' if len(vs) > 8 else ''}).",
            param=param,
        )


def _hide(e: Exception, tmp: str) -> str:
    """The error's message with the server's temporary folder left out (clients see it)."""
    return str(e).replace(tmp + "/", "").replace(tmp, "upload")


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"`{field}` must be a base64 string.", param=field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"`{field}` is not valid base64.", param=field) from None


def parse_steering(store: VectorStore, lm, steering, projection, max_vectors: int, chat: bool = False) -> RowSteering:
    """A request's validated `steering` items and `projection` (`schema.SteeringItem`,
    `schema.Projection`, a name or an inline vector) -> RowSteering, checked against the model.

    steering: [{"vector": REF, "coef": x, "layer"?: L, "positions"?: P, "when"?: W}, {"ablate": REF, "positions"?: P}]
    W: {"condition": NAME, "layer"?: L, "threshold"?: t, "above"?: bool}, a stored condition set
    (the defaults are the set's): that entry's steering applies only if the prompt meets it (CAST);
    entries whose W resolve to the same condition share one gate (`_gates`).
    REF: a stored vector's name, or {"data": base64 float32, "layer": L} (never stored).
    positions: all | prompt | generated | A:B | last:K (as `steerscope generate --positions`).
    """
    adds, ablations, gated_adds = [], [], {}  # gated_adds: entry index -> its AddSpecs
    for k, item in enumerate(steering or []):
        where = f"steering[{k}]"
        positions = _positions(item.positions, where)
        if item.ablate is not None:
            if item.vector is not None or item.layer is not None or "coef" in item.model_fields_set:
                raise RequestError(f'`{where}`: an ablation takes only "ablate" (and "positions").', param=where)
            if item.when is not None:
                raise RequestError(
                    f"`{where}.when`: a gate applies to additions only (an ablation acts from the first layer, "
                    "before any condition layer); remove it.",
                    param=f"{where}.when",
                )
            for sv in store.vectors(item.ablate, f"{where}.ablate", need_layer=False):
                if float(sv.vector.norm()) == 0.0:
                    raise RequestError(f"`{where}.ablate`: vector {sv.id!r} is zero and has no direction.", param=where)
                ablations.append(AblateSpec(sv.vector, positions))
            continue
        if item.vector is None:
            raise RequestError(f'`{where}` needs "vector" (or "ablate").', param=where)
        layer = item.layer
        if layer is not None and not 0 <= layer < lm.n_layers:
            raise RequestError(
                f"`{where}.layer` must be an integer in 0..{lm.n_layers - 1}, got {layer!r}.", param=f"{where}.layer"
            )
        for sv in store.vectors(item.vector, f"{where}.vector", need_layer=layer is None):
            L = sv.layer if layer is None else layer
            store.check_size(
                float(sv.vector.double().norm()) * abs(item.coef), L, f"{where}.coef", f"coef x |vector {sv.id!r}|"
            )
            spec = AddSpec(sv.vector, L, float(item.coef), positions)
            (adds if item.when is None else gated_adds.setdefault(k, [])).append(spec)
    n = len(adds) + len(ablations) + sum(map(len, gated_adds.values()))
    if n > max_vectors:
        raise RequestError(
            f"the request uses {n} vectors; this server allows {max_vectors} per request (--max-vectors-per-request).",
            param="steering",
        )
    gated = _gates(store, lm, steering or [], gated_adds, chat)
    probe = None
    if projection is not None:
        ref, layer = (projection.vector, projection.layer) if hasattr(projection, "vector") else (projection, None)
        sv = store.vectors(ref, "projection", need_layer=layer is None)[0]
        n = float(sv.vector.norm())
        if n == 0.0:
            raise RequestError("`projection`: that vector is zero.", param="projection")
        L = sv.layer if layer is None else layer
        if not 0 <= L < lm.n_layers:
            raise RequestError(f"`projection.layer` must be an integer in 0..{lm.n_layers - 1}.", param="projection")
        probe = (sv.vector.float() / n, L)
    return RowSteering(tuple(adds), tuple(ablations), probe, gated=gated)


def _gates(store: VectorStore, lm, steering, gated_adds: dict[int, list[AddSpec]], chat: bool) -> tuple[Gated, ...]:
    """The request's gates: entries whose `when` resolves to the same condition (set, layer,
    threshold, side) share one gate and one decision; each other `when` is a gate of its own
    (CAST's "French when about France, a refusal when harmful" in one request). The request's
    ablations are never gated (they act from the first layer, before any condition layer)."""
    groups: dict[tuple, tuple[tuple[Condition, ...], str, list[int], list[AddSpec]]] = {}
    for k, specs in gated_adds.items():
        w, where = steering[k].when, f"steering[{k}].when"
        leaves, combine = _leaves(w, where)
        conds = tuple(_condition(store, lm, leaf, at, chat) for leaf, at in leaves)
        for c, (_, at) in zip(conds, leaves):
            late = sorted({a.layer for a in specs if a.layer < c.layer})
            if late:
                raise RequestError(
                    f"`{at}.layer`: the condition is read at layer {c.layer}, after the steering layer(s) {late}; "
                    f"the gate is decided before steering, so use a condition layer <= {late[0]}.",
                    param=f"{at}.layer",
                )
        # The resolved conditions, not the entry as written: {"condition": "c"} and the same set's
        # defaults written out are one gate.
        key = (combine,) + tuple(
            (leaf.condition, c.layer, float(c.threshold), bool(c.above)) for (leaf, _), c in zip(leaves, conds)
        )
        _, _, entries, members = groups.setdefault(key, (conds, combine, [], []))
        entries.append(k)
        members.extend(specs)
    return tuple(Gated(tuple(m), c, combine, tag=tuple(e)) for c, combine, e, m in groups.values())


def _leaves(w, where: str) -> tuple[list[tuple[Any, str]], str]:
    """A `when` -> ([(condition entry, its field path)], "and" | "or"); one 400 naming the field
    when it is not exactly one of condition / all / any, or nests combinations."""
    given = [f for f in ("condition", "all", "any") if getattr(w, f) is not None]
    if len(given) != 1:
        raise RequestError(
            f'`{where}` needs exactly one of "condition", "all" or "any"; got {", ".join(given) or "none"}.',
            param=where,
        )
    if given[0] == "condition":
        return [(w, where)], "and"
    extra = [f for f in ("layer", "threshold", "above") if getattr(w, f) is not None]
    if extra:
        raise RequestError(
            f"`{where}.{extra[0]}`: give it inside each condition of `{where}.{given[0]}`, not beside it.",
            param=f"{where}.{extra[0]}",
        )
    items = getattr(w, given[0])
    if not items:
        raise RequestError(f"`{where}.{given[0]}` needs at least one condition.", param=f"{where}.{given[0]}")
    for i, leaf in enumerate(items):
        at = f"{where}.{given[0]}[{i}]"
        if leaf.condition is None or leaf.all is not None or leaf.any is not None:
            raise RequestError(f'`{at}` must be one condition ({{"condition": NAME, ...}}); no nesting.', param=at)
    return [(leaf, f"{where}.{given[0]}[{i}]") for i, leaf in enumerate(items)], "and" if given[0] == "all" else "or"


def _condition(store: VectorStore, lm, w, where: str, chat: bool) -> Condition:
    """A `when` entry -> its Condition (the stored set's defaults filled in), or a 400 naming the
    field; `chat`: whether the request's prompt was encoded with the chat template (the chat
    endpoint) or not (/v1/completions), which must match how the set was fitted."""
    vs = store.condition_set(w.condition, f"{where}.condition")
    try:
        check_encoding(vs, lm, chat, f"`{where}.condition`")
    except SteerscopeError as e:
        endpoint = "/v1/chat/completions" if not chat else "/v1/completions"
        raise RequestError(f"{e} (here: send it to {endpoint})", param=f"{where}.condition") from None
    try:
        return when_condition(vs, When(w.condition, w.layer, w.threshold, w.above))
    except SteerscopeError as e:
        field, _, rest = str(e).partition(":")  # when_condition names its field first ("when.layer: ...")
        param = f"{where}.{field.removeprefix('when.')}" if field.startswith("when.") else where
        raise RequestError(
            f"`{param}`:{rest}" if field.startswith("when.") else f"`{where}`: {e}", param=param
        ) from None


def _positions(spec: Any, where: str) -> Positions:
    if spec is None or spec == "all":
        return ALL
    if not isinstance(spec, str):
        raise RequestError(
            f"`{where}.positions` must be a string: all, prompt, generated, A:B or last:K.", param=f"{where}.positions"
        )
    try:
        return Positions.parse(spec)
    except SteerscopeError as e:
        raise RequestError(f"`{where}.positions`: {e}", param=f"{where}.positions") from None
