"""The server's decode loop: continuous batching where every request is one batch row with its
own steering.

One worker thread owns the model. Requests wait in a queue; between decoding steps the worker
admits new ones (up to `max_batch` rows): their prompts are prefilled together (left-padded,
each row steered by its own vectors), then their KV caches are left-padded to the running
batch's length and concatenated to it, so from the next step on they decode in the same forward
pass as the rows already running (Yu et al. 2022, "Orca": iteration-level scheduling). A row
that finishes or is cancelled leaves at once: its cache row is dropped and columns that became
all padding are trimmed.

Per-row steering is `interventions.rows.per_row`, as in `generation.generate` (one hook per
distinct layer and position selector, zero rows elsewhere), so K distinct vectors in a batch
cost what one does, and a request's greedy tokens equal `generate` for its prompt and vector.
The request and event types are in `protocol`; a row's text output (detokenising, stop
strings) in `detok`; this module is the scheduler and the KV-cache surgery.
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

import torch

from ..errors import SteerscopeError
from ..generation import last_position_logits, sample_rows
from ..interventions.ops import Intervention
from ..interventions.rows import RowInterventions, per_row
from ..interventions.steer import steer
from ..models.compat import cache_layers, joinable, with_cache
from ..models.registry import Site
from .detok import Row
from .logits import logprobs_of, penalised
from .protocol import GenRequest, QueueFull


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


def _interventions(lm, rows: list[Row], probes: dict, prefill: bool) -> tuple[list, RowInterventions]:
    """Per-row interventions for a batch of rows (row i steered by request i only): the probes,
    read before any steering, then `interventions.rows.per_row`. A gated row (`when`) is decided
    on its prefill; every later step reuses that decision (`latched`), so a row's gate does not
    depend on when it joined or on what else is running."""
    B, d = len(rows), lm.d_model
    out: list = []
    for L in sorted({r.req.steering.probe[1] for r in rows if r.req.steering.probe is not None}):
        dirs = torch.zeros(B, d)  # (B, d): zero rows have no probe
        for i, r in enumerate(rows):
            p = r.req.steering.probe
            if p is not None and p[1] == L:
                dirs[i] = p[0]
        out.append(_Probe(dirs, L, probes))
    latched = None if prefill else [tuple(g.fired for g in r.gates) for r in rows]
    steering = per_row([r.req.steering for r in rows], d, latched)
    return out + steering, steering


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

    def __init__(
        self, lm, *, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256, use_cache: bool = True
    ):
        if max_batch < 1 or max_queue < 1:
            raise SteerscopeError("max_batch and max_queue must be >= 1.")
        self.lm, self.max_batch, self.window_s, self.max_queue, self.use_cache = (
            lm,
            max_batch,
            window_s,
            max_queue,
            use_cache,
        )
        self.eos = lm.eos_ids  # empty: rows end at a stop string or max_tokens
        self.inbox: queue.Queue[GenRequest] = queue.Queue()
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache of the running rows
        self.mask: torch.Tensor | None = None  # (B, T) attention mask over the cache
        self.joinable = True  # set False on the first cache that cannot be padded and joined
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "errors": 0}
        # Held around every use of the tokenizer, here and by the server's request threads.
        self.tokenizer_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life ----------------------------------------------------------------------------------
    def start(self) -> Engine:
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

    def _row(self, req: GenRequest) -> Row:
        return Row(req, self.lm.tokenizer, self.eos, self.tokenizer_lock)

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

    def _fail(self, rows: list[Row], e: Exception) -> None:
        self.stats["errors"] += 1
        traceback.print_exc(file=sys.stderr)
        for r in rows:
            r.finish("error", f"{type(e).__name__}: {e}")

    def _admit_isolated(self, new: list[Row]) -> None:
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
    def _forward(
        self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, cache, prefill: bool = False
    ) -> torch.Tensor:
        """(B, vocab) float32 last-position logits with each row's steering; records probes, and
        on a prefill each gated row's decisions (`Row.gates`)."""
        probes: dict = {}
        plen = torch.tensor([r.prompt_len for r in rows])
        kw = with_cache(self.lm.model, cache) if cache is not None else {"use_cache": False}
        ivs, steering = _interventions(self.lm, rows, probes, prefill)
        with steer(self.lm, *ivs, prompt_len=plen):
            logits = last_position_logits(self.lm, {"input_ids": ids, "attention_mask": mask, **kw})
        if prefill:
            for r, g in zip(rows, steering.gates(len(rows))):
                r.gates = g
        self._probes = probes
        return logits

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each live row's next token (greedy, or its own random stream) and push it."""
        logits = penalised(logits, [(r.ids, r.req.presence_penalty, r.req.frequency_penalty) for r in rows])
        # Rows are independent in the forward pass: a row whose steering overflowed fails alone.
        for i in (~torch.isfinite(logits).all(-1)).nonzero()[:, 0].tolist():
            rows[i].finish(
                "error",
                "the steered forward pass gave non-finite logits: the steering is too strong "
                "for this model; lower `coef`.",
                status=422,
            )
        tokens = logits.argmax(-1).tolist()  # greedy rows (what transformers' greedy decoding picks)
        hot = [i for i, r in enumerate(rows) if r.gen is not None and not r.done]
        if hot:
            drawn = sample_rows(
                logits[hot],
                [rows[i].gen for i in hot],
                [rows[i].req.temperature for i in hot],
                [rows[i].req.top_p for i in hot],
            ).tolist()
            for i, t in zip(hot, drawn):
                tokens[i] = t
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if r.done:
                continue
            p = r.req.steering.probe
            proj = float(self._probes[p[1]][i]) if p is not None and p[1] in self._probes else None
            r.push(int(t), proj, logprobs_of(logits[i], int(t), r.req.logprobs) if r.req.logprobs is not None else None)

    def _admit(self, new: list[Row]) -> None:
        """Prefill new rows together, hand out their first token, join them to the batch."""
        from transformers import DynamicCache

        self.stats["prefills"] += 1
        ids, mask = self.lm.left_pad([r.req.prompt_ids for r in new])
        cache = DynamicCache() if self.use_cache else None
        logits = self._forward(new, ids, mask, cache, prefill=True)
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

    def _join(self, new: list[Row], cache, mask: torch.Tensor) -> None:
        """Left-pad the two caches (and masks) to one length and stack their rows."""
        T = max(self.mask.shape[1], mask.shape[1])
        mine, theirs = cache_layers(self.cache), cache_layers(cache)
        # Every new tensor is built before any is assigned: a failure half-way (out of memory)
        # leaves the running batch as it was, and only the joining rows fail.
        kv = [
            (
                torch.cat([_lpad(a.keys, T, 2), _lpad(b.keys, T, 2)]),
                torch.cat([_lpad(a.values, T, 2), _lpad(b.values, T, 2)]),
            )
            for a, b in zip(mine, theirs)
        ]  # keys/values (B, heads, T, head_dim)
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
            ids, mask = self.lm.left_pad([r.req.prompt_ids + r.ids for r in rows])
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
