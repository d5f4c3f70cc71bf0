"""The server's decode loop: each request is a row with its own steering, rows join and leave
between steps, and a row's tokens equal `generate` for its prompt and vector (every architecture,
with and without the KV cache, greedy and sampled)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import ALL_ARCHS, CORE_ARCHS, make_tiny_lm, rand_vec, tiny_on

from steerscope.directions.vectors import SteeringVector
from steerscope.generation import generate
from steerscope.interventions.ops import Ablate
from steerscope.interventions.positions import ALL, Positions
from steerscope.models.hooks import count_hooks
from steerscope.serving.engine import Engine
from steerscope.serving.protocol import AblateSpec, AddSpec, DoneEvent, GenRequest, RowSteering, TokenEvent

PROMPTS = ["hello there friend", "a b c", "the quick brown fox jumps", "x"]
N_TOKENS = 12


class Collector:
    """Submits requests and waits for all of them; events per request in order."""

    def __init__(self, engine: Engine):
        self.engine, self.events, self.reqs, self.done = engine, [], [], threading.Semaphore(0)

    def submit(self, lm, prompt: str, steering: RowSteering | None = None, **kw) -> int:
        steering = steering if steering is not None else RowSteering()
        k = len(self.events)
        self.events.append([])

        def sink(e, k=k):
            self.events[k].append(e)
            if isinstance(e, DoneEvent):
                self.done.release()

        ids = lm.encode([prompt], chat=False)["input_ids"][0].tolist()
        self.reqs.append(GenRequest(ids, steering, kw.pop("max_tokens", N_TOKENS), sink, **kw))
        self.engine.submit(self.reqs[-1])
        return k

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout), "a request never finished"

    def tokens(self, k: int) -> list[int]:
        return [e.token_id for e in self.events[k] if isinstance(e, TokenEvent) and e.token_id is not None]

    def text(self, k: int) -> str:
        return "".join(e.text for e in self.events[k] if isinstance(e, TokenEvent))

    def finish(self, k: int) -> DoneEvent:
        return self.events[k][-1]


def _steered(vec, pos=ALL, layer=1, coef=1.0):
    return RowSteering(adds=(AddSpec(vec, layer, coef, pos),))


def _reference(lm, prompt, vec=None, pos=ALL, layer=1, **kw):
    if vec is None:
        return generate(lm, [prompt], max_new_tokens=kw.pop("max_new_tokens", N_TOKENS), chat=False, **kw)[0]
    return generate(
        lm,
        [prompt],
        vectors=[SteeringVector(vec, layer, "v")],
        positions=pos,
        chat=False,
        include_unsteered=False,
        max_new_tokens=kw.pop("max_new_tokens", N_TOKENS),
        **kw,
    )[0]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rows_equal_generate_while_joining(arch):
    """16 requests (4 prompts x unsteered/steered x two position selectors) arrive in waves, so
    rows join a running batch; each row's tokens equal `generate` run alone."""
    lm = make_tiny_lm(arch)
    vecs = rand_vec(lm, rows=4)
    cases = [(pi, vi, pos) for pi in range(4) for vi in (None, pi) for pos in (ALL, Positions.generated())]
    refs = [_reference(lm, PROMPTS[pi], None if vi is None else vecs[vi], pos).token_ids for pi, vi, pos in cases]
    modes = (True, False) if arch in CORE_ARCHS else (True,)
    for use_cache in modes:
        eng = Engine(lm, max_batch=8, window_s=0.0, use_cache=use_cache).start()
        try:
            col = Collector(eng)
            for k, (pi, vi, pos) in enumerate(cases):
                col.submit(lm, PROMPTS[pi], RowSteering() if vi is None else _steered(vecs[vi], pos))
                if k % 3 == 0:
                    time.sleep(0.01)  # later waves join rows already decoding
            col.wait(len(cases))
        finally:
            eng.stop()
        got = [col.tokens(k) for k in range(len(cases))]
        assert got == refs, f"{arch} use_cache={use_cache}: rows differ from generate"
        assert eng.stats["prefills"] > 1 and eng.stats["errors"] == 0
        assert count_hooks(lm.model) == 0
    # the steering did something (a silent no-op would pass the equality above)
    assert any(refs[k] != refs[k - 2] for k in range(2, len(cases), 4))


def test_sampled_rows_equal_generate():
    """temperature > 0: a request's random stream is generate's stream for (seed, prompt 0)."""
    lm = make_tiny_lm("llama")
    vec = rand_vec(lm)
    eng = Engine(lm, max_batch=8).start()
    try:
        col = Collector(eng)
        ks = [col.submit(lm, p, _steered(vec), temperature=0.9, top_p=0.9, seed=7) for p in PROMPTS]
        col.wait(len(ks))
    finally:
        eng.stop()
    for k, p in zip(ks, PROMPTS):
        assert col.tokens(k) == _reference(lm, p, vec, temperature=0.9, top_p=0.9, seed=7).token_ids


def test_ablation_and_two_vectors_in_one_request():
    """Per-row ablation + two additions at one layer equal generate with the same interventions;
    a row without them in the same batch is exactly unsteered."""
    lm = make_tiny_lm("qwen2")
    v = rand_vec(lm, rows=3)
    d = v[2] / v[2].norm()
    both = RowSteering(
        adds=(AddSpec(v[0], 1, 1.0, ALL), AddSpec(v[1], 1, 1.0, ALL)), ablations=(AblateSpec(v[2], ALL),)
    )
    eng = Engine(lm, max_batch=8).start()
    try:
        col = Collector(eng)
        a, b = col.submit(lm, PROMPTS[0], both), col.submit(lm, PROMPTS[0])
        col.wait(2)
    finally:
        eng.stop()
    ref = generate(
        lm,
        [PROMPTS[0]],
        vectors=[SteeringVector(v[0] + v[1], 1, "sum")],
        interventions=[Ablate(d)],
        chat=False,
        include_unsteered=False,
        max_new_tokens=N_TOKENS,
    )[0]
    assert col.tokens(a) == ref.token_ids
    assert col.tokens(b) == _reference(lm, PROMPTS[0]).token_ids


def test_stop_strings_eos_and_length():
    lm = make_tiny_lm("llama")
    plain = _reference(lm, PROMPTS[2], max_new_tokens=20)
    assert len(plain.text) > 6
    stop = plain.text[4:6]
    eng = Engine(lm).start()
    try:
        col = Collector(eng)
        a = col.submit(lm, PROMPTS[2], max_tokens=20, stop=(stop,))
        b = col.submit(lm, PROMPTS[2], max_tokens=5)
        col.wait(2)
    finally:
        eng.stop()
    assert col.text(a) == plain.text[: plain.text.find(stop)] and col.finish(a).finish_reason == "stop"
    assert col.text(b) == lm.tokenizer.decode(plain.token_ids[:5]) and col.finish(b).finish_reason == "length"
    assert col.finish(b).completion_tokens == 5


def test_cancel_frees_the_row():
    lm = make_tiny_lm("llama")
    eng = Engine(lm).start()
    try:
        col = Collector(eng)
        k = col.submit(lm, PROMPTS[0], max_tokens=100_000, ignore_eos=True)
        while len(col.tokens(k)) < 3:  # it is running
            time.sleep(0.001)
        col.reqs[k].cancelled.set()  # what the server does when the client leaves
        col.wait(1, timeout=10)
        assert col.finish(k).finish_reason == "cancelled"
        t0 = time.monotonic()
        while eng.busy_rows and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert eng.busy_rows == 0 and eng.cache is None
    finally:
        eng.stop()
    assert count_hooks(lm.model) == 0


def test_engine_on_device(device):
    """Rows steer and join on every device (tensors are made on the model's device)."""
    lm = tiny_on("llama", device)
    vec = rand_vec(lm)
    eng = Engine(lm).start()
    try:
        col = Collector(eng)
        ks = [col.submit(lm, p, _steered(vec)) for p in PROMPTS[:2]]
        col.wait(2)
    finally:
        eng.stop()
    for k, p in zip(ks, PROMPTS[:2]):
        assert col.tokens(k) == _reference(lm, p, vec).token_ids


def test_a_failing_forward_fails_only_its_rows():
    """An exception inside a forward ends the rows in it with an error event; the engine keeps
    serving and leaves no hook."""
    lm = make_tiny_lm("llama")
    eng = Engine(lm).start()
    boom = {"on": True}

    def bad_hook(module, args, output):
        if boom["on"]:
            raise RuntimeError("injected failure")

    h = lm.model.model.layers[1].register_forward_hook(bad_hook)
    try:
        col = Collector(eng)
        k = col.submit(lm, PROMPTS[0])
        col.wait(1)
        assert col.finish(k).finish_reason == "error" and "injected failure" in col.finish(k).error
        boom["on"] = False
        k2 = col.submit(lm, PROMPTS[0])
        col.wait(1)
    finally:
        h.remove()
        eng.stop()
    assert col.tokens(k2) == _reference(lm, PROMPTS[0]).token_ids
    assert count_hooks(lm.model) == 0


def test_generate_without_kv_cache_is_the_same():
    lm = make_tiny_lm("gpt2")
    vec = rand_vec(lm)
    for pos in (ALL, Positions.generated(), Positions.prompt()):
        a = generate(lm, PROMPTS, vectors=[SteeringVector(vec, 1, "v")], positions=pos, chat=False, max_new_tokens=8)
        b = generate(
            lm,
            PROMPTS,
            vectors=[SteeringVector(vec, 1, "v")],
            positions=pos,
            chat=False,
            max_new_tokens=8,
            use_cache=False,
        )
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_prompt_len_is_pinned_in_steer():
    """`steer(..., prompt_len=...)` keeps "generated" positions right when calls have no cache."""
    from steerscope.interventions.ops import Add
    from steerscope.interventions.steer import steer

    lm = make_tiny_lm("llama")
    enc = lm.encode(["abcdef"], chat=False)
    with steer(lm, Add(rand_vec(lm), layer=1, positions=Positions.generated()), prompt_len=torch.tensor([3])) as st:
        lm.forward(**enc)
        assert st.prompt_len.tolist() == [3]
        assert Positions.generated().mask(st).tolist() == [[False] * 3 + [True] * (enc["input_ids"].shape[1] - 3)]


def test_batches_per_window_when_caches_cannot_join():
    """A model whose cache cannot be padded and joined runs one batch per window: requests that
    arrive while a batch decodes wait for it, and still get generate's tokens."""
    lm = make_tiny_lm("llama")
    vec = rand_vec(lm)
    eng = Engine(lm, max_batch=8, window_s=0.0)
    eng.joinable = False
    eng.start()
    try:
        col = Collector(eng)
        first = col.submit(lm, PROMPTS[0], max_tokens=40, ignore_eos=True)
        while not col.tokens(first):
            time.sleep(0.001)
        late = [col.submit(lm, p, _steered(vec)) for p in PROMPTS[1:]]
        col.wait(1 + len(late))
    finally:
        eng.stop()
    assert col.finish(first).completion_tokens == 40
    for k, p in zip(late, PROMPTS[1:]):
        assert col.tokens(k) == _reference(lm, p, vec).token_ids
    assert eng.stats["max_rows"] == len(late)  # the late ones batched together, never with the first
