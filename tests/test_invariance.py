"""The invariance family: a row's steered greedy tokens and logits do not depend on what else is
in its batch. For every registered architecture, every `Positions` mode and the KV cache on and
off, a row run alone equals the same row left-padded in a batch of mixed prompt lengths, and
equals it again when it joins a running batch in the server's engine. The reference is the row
alone with no KV cache (every step a full forward over an unpadded sequence), so a cached step
that misreads its past length fails here even for a row with no padding.

A transformers release that passed the cache under a new keyword made every left-padded row lose
its steering after the first generated token; this family is what catches that.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from conftest import ALL_ARCHS, rand_vec, tiny_lm

from steerscope.errors import SteerscopeError
from steerscope.interventions.ops import Add
from steerscope.interventions.positions import Positions, StepState
from steerscope.interventions.steer import steer
from steerscope.models import compat
from steerscope.models.hooks import hooks
from steerscope.serving.engine import Engine
from steerscope.serving.protocol import AddSpec, DoneEvent, GenRequest, RowSteering, TokenEvent

PROMPTS = ["x", "a b c", "hello there friend", "the quick brown fox jumps over it"]  # 1 to 32 tokens
N_NEW = 8
LAYER = 1
MODES = {
    "all": Positions.all(),
    "prompt": Positions.prompt(),
    "generated": Positions.generated(),
    "range": Positions.range(2, 9),  # crosses the prompt/generated boundary of the short rows
    "prompt_tail": Positions.prompt_tail(2),
}


def _greedy(lm, prompts, vecs, pos, use_cache, min_new=N_NEW):
    """(tokens (B, N_NEW), logits (B, N_NEW, vocab)) of greedy decoding with row i steered by vecs[i]
    (EOS suppressed for `min_new` tokens, so every row runs all N_NEW steps)."""
    enc = lm.encode(prompts)
    # Pinned prompt lengths: without a cache every step is a fresh full pass (as `generate` does).
    with (
        torch.no_grad(),
        steer(lm, Add(vecs, layer=LAYER, coef=1.0, positions=pos), prompt_len=enc["attention_mask"].sum(-1)),
    ):
        out = lm.model.generate(
            **enc,
            max_new_tokens=N_NEW,
            min_new_tokens=min_new or None,
            do_sample=False,
            top_k=None,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    T = enc["input_ids"].shape[1]
    return out.sequences[:, T:], torch.stack(out.logits, dim=1).float()


def _vectors(lm):
    return rand_vec(lm, seed=7, scale=12.0, rows=len(PROMPTS))  # (B, d), one per row


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_alone_equals_batched(arch, mode):
    lm, pos = tiny_lm(arch), MODES[mode]
    vecs = _vectors(lm)
    ref = [_greedy(lm, [p], vecs[i : i + 1], pos, use_cache=False) for i, p in enumerate(PROMPTS)]
    for use_cache in (True, False):
        tokens, logits = _greedy(lm, PROMPTS, vecs, pos, use_cache)
        for i in range(len(PROMPTS)):
            where = f"{arch} {mode} cache={use_cache} row {i} ({PROMPTS[i]!r})"
            assert tokens[i].tolist() == ref[i][0][0].tolist(), where + ": batched tokens differ from alone"
            assert (logits[i] - ref[i][1][0]).abs().max() < 1e-4, where + ": batched logits differ from alone"
        alone = _greedy(lm, [PROMPTS[0]], vecs[:1], pos, use_cache)
        assert (alone[1][0] - ref[0][1][0]).abs().max() < 1e-4, f"{arch} {mode} cache={use_cache}: alone differs"
    # The steering does something in this mode (a silent no-op would pass every equality above).
    plain = [_greedy(lm, [p], torch.zeros_like(vecs[i : i + 1]), pos, use_cache=False) for i, p in enumerate(PROMPTS)]
    assert any((r[1] - p[1]).abs().max() > 1e-3 for r, p in zip(ref, plain)), f"{arch} {mode}: steering changed nothing"


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_joined_rows_equal_alone(arch, use_cache):
    """Requests arrive while others decode, so they join a running batch (padded caches joined);
    each request's tokens equal the row alone, in every positions mode at once."""
    lm = tiny_lm(arch)
    vecs = _vectors(lm)
    cases = [(i, name) for name in MODES for i in range(len(PROMPTS))]
    eos = lm.model.generation_config.eos_token_id
    refs = []
    for i, name in cases:  # the reference stops at EOS like a request does (EOS not in the text)
        toks = _greedy(lm, [PROMPTS[i]], vecs[i : i + 1], MODES[name], use_cache=False, min_new=0)[0][0].tolist()
        refs.append(toks[: toks.index(eos)] if eos in toks else toks)
    events: list[list] = [[] for _ in cases]
    done = threading.Semaphore(0)

    def slow(_args, _kwargs):  # 3 ms a step, so a wave is still decoding when the next arrives
        time.sleep(0.003)

    eng = Engine(lm, max_batch=8, window_s=0.0, use_cache=use_cache).start()
    try:
        with hooks([(lm.arch.base, "observe", slow)]):
            for k, (i, name) in enumerate(cases):

                def sink(e, k=k):
                    events[k].append(e)
                    if isinstance(e, DoneEvent):
                        done.release()

                ids = lm.encode([PROMPTS[i]])["input_ids"][0].tolist()
                steering = RowSteering(adds=(AddSpec(vecs[i], LAYER, 1.0, MODES[name]),))
                eng.submit(GenRequest(ids, steering, N_NEW, sink))
                if k % 3 == 2:  # wait until this wave has its first token, then send the next
                    deadline = time.monotonic() + 60
                    while not any(isinstance(e, TokenEvent) for e in events[k]) and time.monotonic() < deadline:
                        time.sleep(0.0005)
            for _ in cases:
                assert done.acquire(timeout=120), "a request never finished"
    finally:
        eng.stop()
    got = [[e.token_id for e in ev if isinstance(e, TokenEvent) and e.token_id is not None] for ev in events]
    for k, (i, name) in enumerate(cases):
        assert got[k] == refs[k], f"{arch} cache={use_cache} {name} row {i}: joined tokens differ from alone"
    assert eng.stats["errors"] == 0
    assert eng.stats["max_rows"] > 3, "no request joined a running batch"


# ---- the past length is read, never assumed -------------------------------------------------------
class _ZeroLengthCache:
    """A cache whose length reads 0 on a cached step: what a release that moves the length
    somewhere steerscope does not look would amount to."""

    def __init__(self, inner):
        self.inner = inner

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def test_cached_step_with_unreadable_past_raises_with_the_version():
    st = StepState()
    ids = torch.ones(2, 1, dtype=torch.long)
    mask = torch.ones(2, 6, dtype=torch.long)  # 5 cached tokens + 1 new
    with pytest.raises(SteerscopeError, match=r"transformers \d"):
        st.observe((), {"input_ids": ids, "attention_mask": mask})  # no cache anywhere
    with pytest.raises(SteerscopeError, match=r"transformers \d"):
        st.observe((), {"input_ids": ids, "attention_mask": mask, "kv_store": _ZeroLengthCache(None)})


def test_a_cache_under_any_keyword_is_found_and_checked_against_position_ids():
    st = StepState()
    ids = torch.ones(2, 1, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

    class FiveCached:
        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 5

    st.observe(
        (),
        {
            "input_ids": ids,
            "attention_mask": mask,
            "some_new_name": FiveCached(),
            "position_ids": torch.tensor([[3], [5]]),
        },
    )
    assert st.abs_pos.tolist() == [[3], [5]] and st.valid.all()
    with pytest.raises(SteerscopeError, match="position_ids disagree"):
        st.observe(
            (),
            {"input_ids": ids, "attention_mask": mask, "cache": FiveCached(), "position_ids": torch.tensor([[0], [0]])},
        )


def test_a_call_that_continues_an_unseen_cache_raises():
    """No cache and a mask over just the new tokens looks like a first call; position ids that
    do not start at 0 say otherwise (a cache passed where steerscope does not look)."""
    st = StepState()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(compat.IncompatibleTransformers, match="do not start at 0"):
        st.observe(
            (),
            {
                "input_ids": ids,
                "attention_mask": torch.ones(2, 3, dtype=torch.long),
                "position_ids": torch.tensor([[7, 8, 9], [7, 8, 9]]),
            },
        )
    # left padding with transformers' pad positions (1) and restarts inside a row (packing) are fine
    st.observe(
        (),
        {
            "input_ids": ids,
            "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
            "position_ids": torch.tensor([[1, 0, 1], [0, 1, 0]]),
        },
    )
    assert st.prompt_len.tolist() == [2, 3]


def test_a_broken_cache_length_fails_generate_loudly(monkeypatch):
    """The regression itself, simulated: the cache reports no past on a cached step. Steering
    must raise, not decode with the wrong positions."""
    from transformers import DynamicCache

    lm = tiny_lm("llama")
    if compat.accepts(lm.arch.base, "cache_position"):  # transformers < 5.25: read from there first
        pytest.skip("this transformers passes cache_position, which steerscope reads before the cache")
    monkeypatch.setattr(DynamicCache, "get_seq_length", lambda self, layer_idx=0: 0)
    with pytest.raises(SteerscopeError, match=r"transformers \d"):
        _greedy(lm, PROMPTS[:2], _vectors(lm)[:2], Positions.generated(), use_cache=True)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_cached_path_passes_the_cache_under_the_current_name(arch):
    """steerscope's own cached calls (the shared-prefix scorer, LayerRange's prefix capture, SAE
    corpus sampling, the server's engine) use the keyword the model's signature names: no
    deprecated `past_key_values` (transformers 5.25 warns that it goes in 5.40), so a release
    that removes it breaks none of them."""
    from conftest import make_tiny_lm

    from steerscope.generation import _SharedPrefix, last_token_logits
    from steerscope.models.layer_range import LayerRange
    from steerscope.sae.corpus import sample_batch

    lm = make_tiny_lm(arch, chat=True)
    prompts = ["Once upon a time, a cat", "Once upon a time, a much longer story"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated")
        assert _SharedPrefix(lm, prompts, True, None).ok
        last_token_logits(lm, prompts, vectors=_vectors(lm)[:2], layer=LAYER, chat=True)
        lr = LayerRange(lm, prompts, 0, 2, chat=False)
        assert lr.shared_prefix > 0, lr.prefix_skipped
        sample_batch(lm, prompts, 3, 1.0, torch.Generator().manual_seed(0))
        eng = Engine(lm, max_batch=2, window_s=0.0).start()
        try:
            done, events = threading.Event(), []

            def sink(e):
                events.append(e)
                if isinstance(e, DoneEvent):
                    done.set()

            eng.submit(GenRequest(lm.encode(prompts[:1])["input_ids"][0].tolist(), RowSteering(), 4, sink))
            assert done.wait(30)
        finally:
            eng.stop()
    assert events[-1].finish_reason in ("stop", "length"), events[-1]
