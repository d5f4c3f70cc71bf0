"""The server's decode loop: continuous batching where every request is one batch row with its
own steering.

One worker thread owns the model. Requests wait in a queue; between decoding steps the worker
admits new ones (up to `max_batch` rows): their prompts are prefilled together (left-padded,
each row steered by its own vectors), then their KV caches are left-padded to the running
batch's length and concatenated to it, so from the next step on they decode in the same forward
pass as the rows already running (Yu et al. 2022, "Orca": iteration-level scheduling). A row
that finishes or is cancelled leaves at once: its cache row is dropped and columns that became
all padding are trimmed.

Per-row steering uses the same per-row `Add`/`Ablate` as `generation.generate` (one hook per
distinct layer and position selector, zero rows elsewhere), so K distinct vectors in a batch
cost what one does, and a request's greedy tokens equal `generate` for its prompt and vector.
Positions are exact at every step: the attention mask gives each row's absolute positions and
the prompt lengths are pinned (`steer(..., prompt_len=...)`).

Caches that cannot be padded and joined (sliding-window or recurrent layers) fall back to
batches per window: new requests wait until the running batch has finished. `use_cache=False`
recomputes every sequence at every step (a reference path; rows can always join).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SteerscopeError
from ..generation import last_position_logits, left_pad, row_generator, sample_rows
from ..interventions.ops import Ablate, Add, Intervention
from ..interventions.positions import Positions
from ..interventions.steer import steer
from ..models.compat import cache_layers, joinable, with_cache
from ..models.registry import Site
from .logits import logprobs_of, penalised


# ---- what a request asks for -----------------------------------------------------------------------
@dataclass(frozen=True)
class AddSpec:
    """coef * vector added at `layer` on `positions` (resolved from a request)."""

    vector: torch.Tensor  # (d,) float32
    layer: int
    coef: float
    positions: Positions


@dataclass(frozen=True)
class AblateSpec:
    direction: torch.Tensor  # (d,) float32, any norm (made unit by Ablate)
    positions: Positions


@dataclass(frozen=True)
class RowSteering:
    """Everything one request does to its row. `probe`: (unit vector (d,), layer) whose
    projection is reported per generated token (the playground's heat map)."""

    adds: tuple[AddSpec, ...] = ()
    ablations: tuple[AblateSpec, ...] = ()
    probe: tuple[torch.Tensor, int] | None = None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None: text held back earlier, handed out at the end (no new token)
    text: str  # new text (may be "" while a multi-byte character or a stop string is pending)
    projection: float | None
    logprob: float | None = None  # log p(token) under the steered model (after penalties, before temperature)
    top_logprobs: tuple[tuple[str, float], ...] | None = None  # the most likely (token text, log p), best first
    token_text: str | None = None  # the token decoded alone (set with logprob)


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    status: int = 500  # HTTP status of an error: 422 when the request's own steering caused it


@dataclass
class GenRequest:
    """One request. `sink(event)` is called from the worker thread for every TokenEvent and
    once with the DoneEvent; it must not block (the server hands events to its event loop)."""

    prompt_ids: list[int]
    steering: RowSteering
    max_tokens: int
    sink: Callable[[object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep decoding past EOS (fixed-length runs, as vLLM's ignore_eos)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of a generated token
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(SteerscopeError):
    pass


# ---- one row of the running batch ------------------------------------------------------------------
class _Row:
    def __init__(self, req: GenRequest, tokenizer, eos: set[int], tok_lock: threading.Lock):
        self.req, self.tok, self.eos, self.tok_lock = req, tokenizer, eos, tok_lock
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.last: int | None = None
        self.gen = row_generator(req.seed) if req.temperature > 0 else None
        self.done = False
        self._lp: tuple | None = None  # (logprob, top) of the latest token, when the request asks

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    def decode(self) -> str:
        with self.tok_lock:  # a fast tokenizer is not safe to use from two threads at once
            return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int, projection: float | None, lp: tuple | None = None) -> None:
        """Record a sampled token, hand out the new text, finish on EOS / stop / length."""
        if token in self.eos and not self.req.ignore_eos:
            return self.finish("stop")
        self.ids.append(token)
        self.last = token
        if lp is not None:  # token strings decoded here, on the engine thread, under the tokenizer lock
            with self.tok_lock:
                lp = (lp[0], tuple((self.tok.decode([i]), v) for i, v in lp[1]), self.tok.decode([token]))
        self._lp = lp
        text = self.decode()
        hits = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.req.stop) if i >= 0]
        if hits:
            self._emit(token, text[:min(hits)], projection)
            return self.finish("stop", flush=False)
        # Hold back an incomplete UTF-8 character and any tail that could start a stop string.
        safe = len(text.rstrip("\ufffd"))
        for s in self.req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        self._emit(token, text[:max(safe, len(self.sent))], projection)
        if len(self.ids) >= self.req.max_tokens:
            self.finish("length")

    def _emit(self, token: int | None, upto: str, projection: float | None) -> None:
        new = upto[len(self.sent):] if upto.startswith(self.sent) else ""
        self.sent += new
        lp = self._lp if token is not None else None
        self._send(TokenEvent(token, new, projection, *(lp or (None, None, None))))

    def _send(self, event) -> None:
        try:
            self.req.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop this row only
            self.req.cancelled.set()

    def finish(self, reason: str, error: str | None = None, flush: bool = True, status: int = 500) -> None:
        if self.done:
            return
        self.done = True
        if flush and reason in ("stop", "length"):
            # text held back (a tail that looked like the start of a stop string, or a
            # character that never completed) is handed out as a text-only event
            text = self.decode()
            if len(text) > len(self.sent) and text.startswith(self.sent):
                self._emit(None, text, None)
        self._send(DoneEvent(reason, self.prompt_len, len(self.ids), error, status))


class _Probe(Intervention):
    """Reads (never changes) the last position's projection on a per-row unit vector at one
    layer; registered before the steering, so it sees the residual stream before this layer's
    own addition."""

    def __init__(self, dirs: torch.Tensor, layer: int, out: dict):
        self.dirs, self.layer, self.out = dirs, layer, out  # dirs (B, d) unit (zero rows: no probe)

    def hook_specs(self, lm, state):
        dirs = self.dirs.to(device=lm.device, dtype=torch.float32)
        out, layer = self.out, self.layer

        def read(x: torch.Tensor) -> torch.Tensor:  # x (B, T, d)
            out[layer] = (x[:, -1].float() * dirs).sum(-1).cpu()  # (B,)
            return x

        return [(*lm.arch.resolve(Site(layer, "resid_post")), read)]


def _interventions(lm, rows: list[_Row], probes: dict) -> list:
    """Per-row interventions for a batch of rows (row i steered by request i only)."""
    B, d = len(rows), lm.d_model
    out: list = []
    for L in sorted({r.req.steering.probe[1] for r in rows if r.req.steering.probe is not None}):
        dirs = torch.zeros(B, d)
        for i, r in enumerate(rows):
            p = r.req.steering.probe
            if p is not None and p[1] == L:
                dirs[i] = p[0]
        out.append(_Probe(dirs, L, probes))
    # Ablations first, as in `generate(interventions=...)`; one per-row Ablate per (positions, slot).
    groups: dict = {}
    for i, r in enumerate(rows):
        seen: dict = {}
        for a in r.req.steering.ablations:
            slot = seen[a.positions] = seen.get(a.positions, -1) + 1
            groups.setdefault((a.positions, slot), {})[i] = a.direction
    for (pos, _), members in groups.items():
        fill = next(iter(members.values()))
        dirs = torch.stack([members.get(i, fill) for i in range(B)])
        strength = torch.tensor([1.0 if i in members else 0.0 for i in range(B)])
        out.append(Ablate(dirs, strength=strength, positions=pos))
    # One per-row Add per (layer, positions, slot): zero vectors and coefficients elsewhere.
    groups = {}
    for i, r in enumerate(rows):
        seen = {}
        for a in r.req.steering.adds:
            key = (a.layer, a.positions)
            slot = seen[key] = seen.get(key, -1) + 1
            groups.setdefault((a.layer, a.positions, slot), {})[i] = a
    for (L, pos, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        vec, coef = torch.zeros(B, d), torch.zeros(B)
        for i, a in members.items():
            vec[i], coef[i] = a.vector, a.coef
        out.append(Add(vec, layer=L, coef=coef, positions=pos))
    return out


def _lpad(t: torch.Tensor, T: int, dim: int) -> torch.Tensor:
    """Left-pad `t` with zeros along `dim` to length T."""
    n = T - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """The worker. `submit(req)` from any thread; `start()`/`stop()` around its life."""

    def __init__(self, lm, *, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256,
                 use_cache: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise SteerscopeError("max_batch and max_queue must be >= 1.")
        self.lm, self.max_batch, self.window_s, self.max_queue, self.use_cache = lm, max_batch, window_s, max_queue, use_cache
        eos = lm.model.generation_config.eos_token_id
        eos = eos if eos is not None else lm.tokenizer.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.inbox: queue.Queue[GenRequest] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache of the running rows
        self.mask: torch.Tensor | None = None  # (B, T) attention mask over the cache
        self.joinable = True  # set False on the first cache that cannot be padded and joined
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "errors": 0}
        # Held around every use of the tokenizer, here and by the server's request threads.
        self.tokenizer_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life ----------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="steerscope-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for r in self.rows:
            r.finish("cancelled")
        while not self.inbox.empty():
            self._row(self.inbox.get_nowait()).finish("cancelled")

    def submit(self, req: GenRequest) -> None:
        if self.inbox.qsize() >= self.max_queue:
            raise QueueFull(f"the server has {self.max_queue} requests waiting; retry later.")
        self.inbox.put(req)

    def _row(self, req: GenRequest) -> _Row:
        return _Row(req, self.lm.tokenizer, self.eos, self.tokenizer_lock)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def busy_rows(self) -> int:
        return len(self.rows)

    # ---- the loop ------------------------------------------------------------------------------
    def _take(self) -> list[GenRequest]:
        room = self.max_batch - len(self.rows)
        if room <= 0 or (self.rows and not self.joinable and self.use_cache):
            return []
        new: list[GenRequest] = []
        if not self.rows:  # idle: wait for a request, then a short window for others to arrive
            try:
                new.append(self.inbox.get(timeout=0.1))
            except queue.Empty:
                return []
            deadline = time.monotonic() + self.window_s
            while len(new) < room:
                left = deadline - time.monotonic()
                try:
                    new.append(self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait())
                except queue.Empty:
                    break
        while len(new) < room:
            try:
                new.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        live = []
        for r in new:
            if r.cancelled.is_set():  # the client left while waiting
                self._row(r).finish("cancelled")
            else:
                live.append(r)
        return live

    def _loop(self) -> None:
        while not self._stop.is_set():
            new = [self._row(r) for r in self._take()]
            if new:
                self._admit_isolated(new)
            if self.rows:
                try:
                    self._step()
                except Exception as e:  # one decode forward serves every running row: all fail, the server goes on
                    self._fail(self.rows, e)
                    self.rows, self.cache, self.mask = [], None, None
            new = None  # drop finished rows now, not when the next request arrives

    def _fail(self, rows: list[_Row], e: Exception) -> None:
        self.stats["errors"] += 1
        traceback.print_exc(file=sys.stderr)
        for r in rows:
            r.finish("error", f"{type(e).__name__}: {e}")

    def _admit_isolated(self, new: list[_Row]) -> None:
        """Admit new rows together; if their shared prefill fails, admit each alone, so only the
        request that caused the failure gets the error (the running rows are untouched)."""
        try:
            return self._admit(new)
        except Exception as e:
            if len(new) == 1:
                return self._fail(new, e)
        for r in new:
            if r.done:
                continue
            if r.ids:  # the failure came after its first token was handed out: it cannot be redone
                self._fail([r], RuntimeError("its batch failed after the prefill"))
                continue
            try:
                self._admit([r])
            except Exception as e:
                self._fail([r], e)

    @torch.no_grad()
    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """(B, vocab) float32 last-position logits with each row's steering; records probes."""
        probes: dict = {}
        plen = torch.tensor([r.prompt_len for r in rows])
        kw = with_cache(self.lm.model, cache) if cache is not None else {"use_cache": False}
        with steer(self.lm, *_interventions(self.lm, rows, probes), prompt_len=plen):
            logits = last_position_logits(self.lm, {"input_ids": ids, "attention_mask": mask, **kw})
        self._probes = probes
        return logits

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each live row's next token (greedy, or its own random stream) and push it."""
        logits = penalised(logits, [(r.ids, r.req.presence_penalty, r.req.frequency_penalty) for r in rows])
        # Rows are independent in the forward pass: a row whose steering overflowed fails alone.
        for i in (~torch.isfinite(logits).all(-1)).nonzero()[:, 0].tolist():
            rows[i].finish("error", "the steered forward pass gave non-finite logits: the steering is too strong "
                                    "for this model; lower `coef`.", status=422)
        tokens = logits.argmax(-1).tolist()  # greedy rows (what transformers' greedy decoding picks)
        hot = [i for i, r in enumerate(rows) if r.gen is not None and not r.done]
        if hot:
            drawn = sample_rows(logits[hot], [rows[i].gen for i in hot], [rows[i].req.temperature for i in hot],
                                [rows[i].req.top_p for i in hot]).tolist()
            for i, t in zip(hot, drawn):
                tokens[i] = t
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if r.done:
                continue
            p = r.req.steering.probe
            proj = float(self._probes[p[1]][i]) if p is not None and p[1] in self._probes else None
            r.push(int(t), proj, logprobs_of(logits[i], int(t), r.req.logprobs) if r.req.logprobs is not None else None)

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad([torch.tensor(s, dtype=torch.long) for s in seqs], self.lm.tokenizer.pad_token_id, self.lm.device)

    def _admit(self, new: list[_Row]) -> None:
        """Prefill new rows together, hand out their first token, join them to the batch."""
        from transformers import DynamicCache

        self.stats["prefills"] += 1
        ids, mask = self._padded([r.req.prompt_ids for r in new])
        cache = DynamicCache() if self.use_cache else None
        logits = self._forward(new, ids, mask, cache)
        if cache is not None and not joinable(cache):
            self.joinable = False  # e.g. sliding-window layers: batches per window from now on
        self._sample(new, logits)
        keep = [i for i, r in enumerate(new) if not r.done]
        if not keep:
            return
        if not self.use_cache:
            self.rows += [new[i] for i in keep]
            self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))
            return
        if len(keep) < len(new):
            cache.batch_select_indices(torch.tensor(keep, device=self.lm.device))
            mask = mask[keep]
        new = [new[i] for i in keep]
        if not self.rows:
            self.rows, self.cache, self.mask = new, cache, mask
        else:
            self._join(new, cache, mask)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.rows))

    def _join(self, new: list[_Row], cache, mask: torch.Tensor) -> None:
        """Left-pad the two caches (and masks) to one length and stack their rows."""
        T = max(self.mask.shape[1], mask.shape[1])
        mine, theirs = cache_layers(self.cache), cache_layers(cache)
        # Every new tensor is built before any is assigned: a failure half-way (out of memory)
        # leaves the running batch as it was, and only the joining rows fail.
        kv = [(torch.cat([_lpad(a.keys, T, 2), _lpad(b.keys, T, 2)]), torch.cat([_lpad(a.values, T, 2), _lpad(b.values, T, 2)]))
              for a, b in zip(mine, theirs)]  # keys/values (B, heads, T, head_dim)
        joined_mask = torch.cat([_lpad(self.mask, T, 1), _lpad(mask, T, 1)])
        for a, (k, v) in zip(mine, kv):
            a.keys, a.values = k, v
        self.mask = joined_mask
        self.rows = self.rows + new

    def _step(self) -> None:
        """One decoding step for every running row, then drop the rows that finished."""
        rows = self.rows
        self.stats["steps"] += 1
        if self.use_cache:
            ids = torch.tensor([[r.last] for r in rows], device=self.lm.device)
            mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(rows, ids, mask, self.cache)
            self.mask = mask
        else:
            ids, mask = self._padded([r.req.prompt_ids + r.ids for r in rows])
            logits = self._forward(rows, ids, mask, None)
        for r in rows:
            if r.req.cancelled.is_set():
                r.finish("cancelled")
        self._sample(rows, logits)
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        if self.use_cache:
            self.cache.batch_select_indices(torch.tensor(keep, device=self.lm.device))
            mask = self.mask[keep]
            first = int(mask.any(0).long().argmax())  # columns before this are padding in every row
            if first > 0:
                for l in cache_layers(self.cache):
                    l.keys, l.values = l.keys[:, :, first:], l.values[:, :, first:]
                mask = mask[:, first:]
            self.mask = mask
