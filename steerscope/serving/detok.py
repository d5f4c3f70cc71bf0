"""One row of the running batch, as its client sees it: tokens in, text out.

Incremental detokenisation (an incomplete UTF-8 character is held back until it completes),
stop strings (text that could be the start of one is held back until it cannot), EOS and the
length limit end a row; each step's new text goes to the request's sink as a `TokenEvent`, and
the end as one `DoneEvent`."""

from __future__ import annotations

import threading

from ..generation import row_generator
from .protocol import DoneEvent, GenRequest, TokenEvent


class Row:
    """A request's decoding state (`ids` so far, its `last` token, its random stream `gen`) and
    its text output. `eos`: `LM.eos_ids`; `tok_lock` is held around every tokenizer call."""

    def __init__(self, req: GenRequest, tokenizer, eos: frozenset[int], tok_lock: threading.Lock):
        self.req, self.tok, self.eos, self.tok_lock = req, tokenizer, eos, tok_lock
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.last: int | None = None
        self.gen = row_generator(req.seed) if req.temperature > 0 else None
        self.done = False
        self._lp: tuple | None = None  # (logprob, top) of the latest token, when the request asks
        self.gates: tuple = ()  # interventions.rows.RowGate per gate of the request's `when`s, set by its prefill

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
            self._emit(token, text[: min(hits)], projection)
            return self.finish("stop", flush=False)
        # Hold back an incomplete UTF-8 character and any tail that could start a stop string.
        safe = len(text.rstrip("\ufffd"))
        for s in self.req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        self._emit(token, text[: max(safe, len(self.sent))], projection)
        if len(self.ids) >= self.req.max_tokens:
            self.finish("length")

    def _emit(self, token: int | None, upto: str, projection: float | None) -> None:
        new = upto[len(self.sent) :] if upto.startswith(self.sent) else ""
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
        gates = tuple(
            {**({} if g.tag is None else {"steering": list(g.tag)}), "fired": d.fired, "score": d.score}
            for g, d in zip(self.req.steering.gates(), self.gates)
        )
        self._send(DoneEvent(reason, self.prompt_len, len(self.ids), error, status, gates))
