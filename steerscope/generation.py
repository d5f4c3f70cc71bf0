"""Batched steered generation: P prompts x K vectors in as few `generate` calls as possible.

Every (vector, prompt) pair is one batch row; row i is steered by its own vector through a
per-row `Add` (one hook per distinct layer, zero rows for vectors at other layers and for the
unsteered baseline), so K vectors cost one batched pass instead of K. Prompts are left-padded,
the KV cache is used, and greedy decoding is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._tensors import as_rows
from .directions.vectors import SteeringVector, VectorSet
from .errors import SteerscopeError
from .interventions.conditional import Condition
from .interventions.positions import ALL, Positions
from .interventions.rows import AblateSpec, AddSpec, RowSteering, per_row
from .interventions.steer import steer
from .models.compat import with_cache
from .models.prefix import PrefixSplit, guarded, verified
from .progress import bar


@dataclass
class Completion:
    """One generated completion. `vector_id` is None for the unsteered baseline."""

    prompt_index: int
    prompt: str
    vector_id: str | None
    layer: int | None
    coef: float | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    gate_fired: bool | None = None  # with `when`: whether the gate let this row's steering apply
    gate_score: float | None = None  # with `when`: cos(mean prompt hidden state, condition vector)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Variant:
    id: str | None
    vector: torch.Tensor | None  # (d,)
    layer: int | None
    coef: float | None


def _variants(lm, vectors, layer, coef, include_unsteered) -> list[_Variant]:
    if vectors is None:
        if layer is not None:
            raise SteerscopeError("a layer was given without vectors; pass vectors=... or drop layer.")
        return [_Variant(None, None, None, None)]
    if isinstance(vectors, VectorSet):
        vectors.check(lm, check_model=False)
        svs = list(vectors)
    elif isinstance(vectors, SteeringVector):
        svs = [vectors]
    elif isinstance(vectors, (list, tuple)) and vectors and all(isinstance(v, SteeringVector) for v in vectors):
        svs = list(vectors)
    else:
        rows = as_rows(vectors, lm.d_model, "steering vector")
        if layer is None:
            raise SteerscopeError("raw vector tensors need layer=...; a VectorSet carries its own layers.")
        svs = [SteeringVector(r, layer, f"v{i}") for i, r in enumerate(rows)]
    coefs = list(coef) if isinstance(coef, (list, tuple)) else [coef] * len(svs)
    if len(coefs) != len(svs):
        raise SteerscopeError(
            f"{len(coefs)} coefficients for {len(svs)} vectors; give one per vector or a single number."
        )
    out = [_Variant(None, None, None, None)] if include_unsteered else []
    for sv, c in zip(svs, coefs):
        L = lm.check_layer(layer if layer is not None else sv.layer)
        out.append(_Variant(sv.id, as_rows(sv.vector, lm.d_model, f"vector {sv.id}")[0], L, float(c)))
    return out


def _per_row(lm, variants: list[_Variant], positions: Positions, mode: str = "add", when: Condition | None = None):
    """Interventions steering row i by variant i (`interventions.rows.per_row`).

    add: coef * vector at the variant's layer. ablate: its direction projected out at every
    layer. Unsteered variants get rows that are exactly untouched. `when`: every steered row is
    gated on its own prompt (CAST)."""
    if mode not in ("add", "ablate"):
        raise SteerscopeError(f"mode must be 'add' or 'ablate', got {mode!r}.")
    rows = [
        RowSteering()
        if v.vector is None
        else RowSteering(adds=(AddSpec(v.vector, v.layer, v.coef, positions),), when=when)
        if mode == "add"
        else RowSteering(ablations=(AblateSpec(v.vector, positions),), when=when)
        for v in variants
    ]
    return per_row(rows, lm.d_model)


def _check_when(lm, when: Condition, variants: list[_Variant], mode: str) -> None:
    """The gate is decided in the steering pass itself, so it must be read no later than the
    first layer a vector is added at."""
    lm.check_layer(when.layer)
    if mode != "add":
        raise SteerscopeError(
            "`when` gates additions only: an ablation acts from the first layer on, before any condition layer."
        )
    late = sorted({v.layer for v in variants if v.layer is not None and v.layer < when.layer})
    if late:
        raise SteerscopeError(
            f"the condition is read at layer {when.layer}, after the steering layer(s) {late}; "
            f"use a condition layer <= {late[0]} (--when-layer) or steer at a later layer."
        )


@torch.no_grad()
def last_token_logits(
    lm,
    prompts: Sequence[str],
    *,
    vectors=None,
    layer: int | None = None,
    coef=1.0,
    mode: str = "add",
    include_unsteered: bool = False,
    chat: bool | None = None,
    system: str | None = None,
    batch_size: int = 32,
    reduce=None,
    progress=None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """(n_variants, n_prompts, vocab) float32 next-token logits at the last prompt position, with
    every (vector, prompt) pair as one batch row (same variants and order as `generate`).

    `reduce(logits (B, vocab), prompt_index (B,)) -> (B,)` turns each batch's logits into one
    number per row at once, and the result is (n_variants, n_prompts): memory then stays flat in
    the number of vectors (K x P x vocab floats are never held; 90 candidates x 35 prompts x
    SmolLM2's 49k vocabulary would be 620 MB per call). `progress`: a bar (`progress.bar`) updated per row.

    `share_prefix`: prompts that start alike (a chat template and system prompt: about half of
    SmolLM2's tokens here) run that prefix once per vector and batch, and the prompt suffixes
    attend to its cached keys/values (`_SharedPrefix`; checked against the plain forward on the
    first batch, plain rows on any mismatch)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SteerscopeError("the prompt list is empty; give at least one prompt.")
    variants = _variants(lm, vectors, layer, coef, include_unsteered)
    rows = [(vi, pi) for vi in range(len(variants)) for pi in range(len(prompts))]
    shared = _SharedPrefix(lm, prompts, chat, system) if share_prefix and len(prompts) > 1 else None
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ivs = lambda rs: _per_row(lm, [variants[vi] for vi, _ in rs], ALL, mode)  # noqa: E731
        if shared is not None and shared.ok:
            logits = shared.logits(chunk, ivs)
        else:
            enc = lm.encode([prompts[pi] for _, pi in chunk], chat=chat, system=system)
            with steer(lm, *ivs(chunk)):
                logits = last_position_logits(lm, enc)  # (B, vocab)
        if reduce is not None:
            logits = reduce(logits, torch.tensor([pi for _, pi in chunk], device=logits.device)).float().cpu()
        out.append(logits)
        if progress is not None:
            progress.update(len(chunk))
    if reduce is not None:
        return torch.cat(out).reshape(len(variants), len(prompts))
    return torch.cat(out).reshape(len(variants), len(prompts), -1)


def last_position_logits(lm, enc) -> torch.Tensor:
    """(B, vocab) float32 logits at the last position only (`LM.last_logits`: the unembedding
    is not run at the other positions where the model allows it)."""
    return lm.last_logits(**enc, k=1)[:, -1].float()


def generate(
    lm,
    prompts: Sequence[str],
    *,
    vectors=None,
    layer: int | None = None,
    coef: float | Sequence[float] = 1.0,
    positions: Positions = ALL,
    mode: str = "add",
    interventions: Sequence = (),
    include_unsteered: bool | None = None,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    system: str | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    use_cache: bool = True,
    when: Condition | None = None,
    amplify=None,
) -> list[Completion]:
    """Generate a completion for every (vector, prompt) pair.

    Args:
        vectors: None (unsteered), a VectorSet, a SteeringVector or list of them, or a (K, d)
            tensor (then `layer` is required). `layer` overrides the vectors' own layers.
        coef: one coefficient, or one per vector.
        positions: which tokens the vectors are added at (see `Positions`).
        mode: "add" (coef * vector at its layer) or "ablate" (project each vector's direction out
            at every layer, Arditi et al. 2024; `layer` and `coef` are then unused).
        interventions: extra interventions applied to every row (e.g. an `Ablate`), before the vectors.
        include_unsteered: add an unsteered row per prompt (default: True when vectors are given).
        min_new_tokens: suppress EOS until this many tokens (e.g. for timing).
        temperature: 0 = greedy (deterministic); otherwise sampling with `top_p`. Each prompt has its
            own random stream derived from (`seed`, prompt index): the result does not depend on
            `batch_size` or on which rows share a batch, and the steered and unsteered rows of a
            prompt draw the same random numbers (so their differences come from the steering).
        chat: apply the chat template (default: when the tokenizer has one).
        progress: a bar over the rows (None: `steerscope.progress.bar`'s default; False: none).
        use_cache: decode with the KV cache (default); False recomputes every sequence at every
            step (slow; the same tokens, a check that steering does not depend on the cache).
        when: gate every steered row on its own prompt (CAST; `directions.condition.when_condition`
            makes one from a condition set): its vector applies only if the prompt's mean hidden
            state at `when.layer` meets the condition, decided on the prompt pass and held while
            generating. Each steered completion reports `gate_fired` and `gate_score`.
        amplify: an `amplify.Amplify` (its base model and alpha): sample the model with its
            difference from the base amplified (needs temperature > 0, no vectors or interventions).
    Returns completions ordered by variant (unsteered first), then prompt.
    """
    from transformers import GenerationConfig

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SteerscopeError("the prompt list is empty; give at least one prompt.")
    if max_new_tokens < 1:
        raise SteerscopeError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SteerscopeError("temperature must be >= 0 and top_p in (0, 1].")
    variants = _variants(
        lm, vectors, layer, coef, vectors is not None if include_unsteered is None else include_unsteered
    )
    rows = [(vi, pi) for vi in range(len(variants)) for pi in range(len(prompts))]
    if when is not None:
        _check_when(lm, when, variants, mode)
    if amplify is not None and (temperature == 0 or vectors is not None or interventions):
        raise SteerscopeError("amplify samples the unsteered model: give a temperature > 0 and no vectors.")

    tok = lm.tokenizer
    eos_set = lm.eos_ids
    eos = sorted(eos_set) or None  # None: no EOS, every row runs to max_new_tokens
    # Sampling happens in `_RowSampler` (a logits processor that leaves one token possible per
    # row), so transformers always decodes greedily here.
    gc = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=False,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
        use_cache=use_cache,
    )
    results: list[Completion] = []
    with bar(len(rows), "generating", "row", show=progress) as rows_done:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            enc = lm.encode([prompts[pi] for _, pi in chunk], chat=chat, system=system)
            adds = _per_row(lm, [variants[vi] for vi, _ in chunk], positions, mode, when)
            procs = (
                [_RowSampler([_row_seed(seed, pi) for _, pi in chunk], temperature, top_p)] if temperature > 0 else []
            )
            if amplify is not None:
                amplify.prompt_mask = enc["attention_mask"]
                procs.insert(0, amplify)
            # Prompt lengths are pinned: without a cache every step is a fresh full pass.
            with torch.no_grad(), steer(lm, *interventions, *adds, prompt_len=enc["attention_mask"].sum(-1)):
                out = lm.model.generate(**enc, generation_config=gc, logits_processor=procs)
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            gates = [g[0] if g else None for g in adds.gates(len(chunk))]  # `when`: one gate per steered row
            for (vi, pi), ids, gate in zip(chunk, new, gates):
                cut = next((j for j, t in enumerate(ids) if t in eos_set), None)
                ids = ids if cut is None else ids[:cut]
                v = variants[vi]
                results.append(
                    Completion(
                        pi,
                        prompts[pi],
                        v.id,
                        v.layer,
                        v.coef,
                        tok.decode(ids, skip_special_tokens=True),
                        ids,
                        "length" if cut is None else "eos",
                        None if gate is None else gate.fired,
                        None if gate is None else gate.score,
                    )
                )
            rows_done.update(len(chunk))
    return results


def _row_seed(seed: int, prompt_index: int) -> int:
    import hashlib

    return int(hashlib.sha256(f"steerscope:{seed}:{prompt_index}".encode()).hexdigest()[:15], 16)


class _RowSampler:
    """Temperature + nucleus sampling with one generator per batch row (inverse-CDF: one uniform
    per row and step). Returns scores that are -inf except at the drawn token, so the greedy
    decoder outside picks it. transformers' own sampler draws all rows from one global stream,
    which made sampled text depend on the batch size."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]  # see row_generator
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores (B, V)
        token = sample_rows(scores, self.gens, self.temperature, self.top_p)[:, None]  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)


def row_generator(seed: int, prompt_index: int = 0) -> torch.Generator:
    """The random stream of prompt `prompt_index` under `seed` (what `generate` samples with)."""
    return torch.Generator().manual_seed(_row_seed(seed, prompt_index))


def sample_rows(scores: torch.Tensor, gens: Sequence[torch.Generator], temperature, top_p) -> torch.Tensor:
    """(B,) tokens drawn from (B, V) scores with one generator per row (inverse CDF, one uniform
    per row). `temperature`/`top_p`: numbers or (B,) tensors. Shared by `generate` and the server
    so a sampled request gives the same text in both."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=scores.device).reshape(-1, 1)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=scores.device).reshape(-1, 1)
    probs = torch.softmax(scores.float() / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if bool((p < 1).any()):
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
        sorted_p = sorted_p.masked_fill(before >= p, 0.0)  # the top token always stays
    cdf = sorted_p.cumsum(-1)  # (B, V)
    u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(scores.device)[:, None]  # (B, 1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return order.gather(-1, pick)[:, 0]


class _SharedPrefix:
    """Last-token logits with the prompts' common prefix computed once per variant in a batch
    (`models.prefix`: the split, the self-check and the fallback are shared with `LayerRange`).

    Per batch: the prefix for each distinct variant (U rows, C tokens) fills a KV cache, whose
    rows are then repeated for the batch's (variant, prompt) rows, and the left-padded suffixes
    run against it. The first batch is also run plainly and compared (`prefix.verified`); on a
    mismatch or an error sharing is switched off for the call and `reason` says why."""

    def __init__(self, lm, prompts: list[str], chat, system, min_prefix: int = 4):
        self.lm, self.checked, self.reason = lm, False, None
        enc = lm.encode(prompts, chat=chat, system=system)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        self.split = PrefixSplit.find(ids, mask, min_prefix)
        n = mask.sum(-1)
        self.full = [ids[i, ids.shape[1] - int(n[i]) :] for i in range(len(prompts))]  # each prompt's tokens

    @property
    def ok(self) -> bool:
        return self.split is not None and self.reason is None

    def _plain(self, chunk, ivs) -> torch.Tensor:
        ids, mask = self.lm.left_pad([self.full[pi] for _, pi in chunk])
        with steer(self.lm, *ivs(chunk)):
            return last_position_logits(self.lm, {"input_ids": ids, "attention_mask": mask})

    def logits(self, chunk, ivs) -> torch.Tensor:
        if not self.checked:
            self.checked = True
            out, self.reason = verified(
                lambda: self._shared(chunk, ivs), lambda: self._plain(chunk, ivs), self.lm.dtype
            )
            return out
        out, self.reason = guarded(self._shared, chunk, ivs)
        return out if self.reason is None else self._plain(chunk, ivs)

    def _shared(self, chunk, ivs) -> torch.Tensor:
        from transformers import DynamicCache

        lm, C = self.lm, self.split.C
        firsts: dict[int, int] = {}
        for j, (vi, _) in enumerate(chunk):
            firsts.setdefault(vi, j)
        heads = [chunk[j] for j in firsts.values()]  # one row per distinct variant
        cache = DynamicCache()
        pre = self.split.prefix.to(lm.device)[None].expand(len(heads), C)  # (U, C)
        with steer(lm, *ivs(heads)):
            last_position_logits(
                lm, {"input_ids": pre, "attention_mask": torch.ones_like(pre), **with_cache(lm.model, cache)}
            )
        order = list(firsts)
        cache.batch_select_indices(torch.tensor([order.index(vi) for vi, _ in chunk], device=lm.device))
        suf, full_mask = self.split.suffixes([pi for _, pi in chunk])  # (B, S), (B, C + S)
        with steer(lm, *ivs(chunk)):
            return last_position_logits(
                lm,
                {
                    "input_ids": suf.to(lm.device),
                    "attention_mask": full_mask.to(lm.device),
                    **with_cache(lm.model, cache),
                },
            )
